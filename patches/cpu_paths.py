"""Touchpoint: SGLang's choice between Triton helper kernels and torch code by attention
backend name (`support_triton`). SGLang picks torch for `torch_native` only; under the
name `tangram` on a machine without CUDA it must take the same torch paths
(`write_cache_indices`, `compute_position`), since Triton kernels cannot launch there.
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.attention.backend import BACKEND

from . import Hook


def support_triton(original: Any, backend: str) -> bool:
    if backend == BACKEND and not torch.cuda.is_available():
        return False
    return original(backend)


HOOKS = (Hook("sglang.srt.utils.common.support_triton", support_triton, HookType.AROUND),)
