"""Touchpoint: SGLang's radix-cache registry. `--kv-compression` selects the radix cache
backend `tangram` (`tangram_sglang.memory.radix`), registered here once per process (SGLang
refuses a second registration of a name)."""

from __future__ import annotations

from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend

from tangram_sglang.attention.backend import BACKEND
from tangram_sglang.memory.radix import make_tangram_tree

from . import Registration

HOOKS = ()
REGISTRATIONS = (
    Registration(
        "radix cache backend 'tangram'",
        lambda: register_radix_cache_backend(BACKEND, make_tangram_tree),
        lambda: get_radix_cache_factory(BACKEND) is make_tangram_tree,
    ),
)
