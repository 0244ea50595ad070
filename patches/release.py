"""Touchpoint: a request releasing its KV (`mem_cache.common.release_kv_cache`). SGLang
caches or frees its logical slots (which frees their group slots) and returns its
`req_pool_idx`; the row's group lengths are reset with it.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import TangramAllocator

from . import Hook


def release_kv_cache(original: Any, req: Any, tree_cache: Any, *args: Any, **kwargs: Any) -> Any:
    row = req.req_pool_idx
    result = original(req, tree_cache, *args, **kwargs)
    allocator = tree_cache.token_to_kv_pool_allocator
    if row is not None and isinstance(allocator, TangramAllocator):
        allocator.release_row(row)
    return result


HOOKS = (Hook("sglang.srt.mem_cache.common.release_kv_cache", release_kv_cache, HookType.AROUND),)
