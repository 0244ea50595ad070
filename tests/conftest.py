"""Test environment: CPU stand-ins for SGLang's GPU-only imports, in this process and in
every process a test spawns (servers, schedulers), via tangram_sglang/cpu/shims on
PYTHONPATH; the strict idle pool check in every server."""

import os
import sys

from tangram_sglang.cpu.server import SHIMS

if str(SHIMS) not in sys.path:
    sys.path.insert(0, str(SHIMS))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SHIMS), os.environ.get("PYTHONPATH", "")) if p
    )
os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
# Every server a test starts walks each pool slot at idle (patches/invariants.py).
os.environ["TANGRAM_STRICT_POOL_CHECK"] = "1"

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton picks interpreted or compiled per @triton.jit at decoration time, so the
    # choice must be made before any test module imports a kernel (or SGLang's).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import sitecustomize  # noqa: E402,F401  (cpu/shims: torchvision stand-in, rotary CPU flag)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The tiny fp32 Qwen3 with its local tokenizer (the shipped profile's model)."""
    from tangram_sglang.models.tiny import build_tiny_chat_model

    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny-qwen3") / "model")


@pytest.fixture(scope="session")
def profile_file(model_dir, tmp_path_factory):
    """A one-group profile at ratio 0.5 for the tiny model."""
    from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

    path = tmp_path_factory.mktemp("profile") / "tiny.uniform.yaml"
    uniform_profile(ModelIdentity.from_model_path(model_dir), 0.5).save(path)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """The reference model's checkpoint (built once per machine by `.ci/setup`)."""
    from tangram_sglang.models import smollm2

    return smollm2.build()
