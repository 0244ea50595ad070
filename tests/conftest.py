"""Test environment: CPU stand-ins for SGLang's GPU-only imports, in this process and in
every process a test spawns (servers, schedulers), via tests/cpu_shims on PYTHONPATH."""

import os
import sys
from pathlib import Path

SHIMS = Path(__file__).parent / "cpu_shims"

if str(SHIMS) not in sys.path:
    sys.path.insert(0, str(SHIMS))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SHIMS), os.environ.get("PYTHONPATH", "")) if p
    )
os.environ.pop("SGLANG_USE_CPU_ENGINE", None)

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton picks interpreted or compiled per @triton.jit at decoration time, so the
    # choice must be made before any test module imports a kernel (or SGLang's).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import sitecustomize  # noqa: E402,F401  (tests/cpu_shims: torchvision stand-in, rotary CPU flag)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny fp32 Qwen3 with its local tokenizer (the shipped profile's model)."""
    from server_harness import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen3") / "model")


@pytest.fixture(scope="session")
def profile_file(model_dir, tmp_path_factory):
    """A one-group profile at ratio 0.5 for the tiny model."""
    from tangram_sglang.profile import ModelIdentity, uniform_profile

    path = tmp_path_factory.mktemp("profile") / "tiny.uniform.yaml"
    uniform_profile(ModelIdentity.from_model_path(model_dir), 0.5).save(path)
    return path
