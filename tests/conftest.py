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

import sitecustomize  # noqa: E402,F401  (tests/cpu_shims: torchvision stand-in, rotary CPU flag)
