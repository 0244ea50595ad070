"""Touchpoint: KV allocation for a batch (`mem_cache.allocation.alloc_for_extend` and
`alloc_for_decode`). SGLang allocates logical slots and writes `req_to_token` as usual;
then the `TangramAllocator` builds each request's group rows, allocates the new segment's
group slots (k_g per group, or one per group per decoded token) and records the state
the attention backend reads in the forward that follows.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import Evict, TangramAllocator

from . import Hook

TARGET = "sglang.srt.mem_cache.allocation"


def _evictor(tree_cache: Any) -> Evict | None:
    if tree_cache is None or tree_cache.is_chunk_cache():
        return None
    return lambda tokens: tree_cache.evict(EvictParams(num_tokens=tokens))


def alloc_for_extend(original: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(batch, *args, **kwargs)
    allocator = batch.token_to_kv_pool_allocator
    if not isinstance(allocator, TangramAllocator):
        return result
    out_cache_loc, _, rows_cpu = result
    rows = rows_cpu.tolist()
    req_to_token = batch.req_to_token_pool.req_to_token
    prefixes = [req_to_token[r, :p] for r, p in zip(rows, batch.prefix_lens, strict=True)]
    new = list(out_cache_loc.split(list(batch.extend_lens)))
    allocator.begin_extend(rows, prefixes, new, _evictor(batch.tree_cache))
    return result


def alloc_for_decode(original: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    out_cache_loc = original(batch, *args, **kwargs)
    allocator = batch.token_to_kv_pool_allocator
    if isinstance(allocator, TangramAllocator):
        rows = batch.req_pool_indices.cpu().tolist()
        allocator.begin_decode(rows, out_cache_loc, _evictor(batch.tree_cache))
    return out_cache_loc


HOOKS = (
    Hook(f"{TARGET}.alloc_for_extend", alloc_for_extend, HookType.AROUND),
    Hook(f"{TARGET}.alloc_for_decode", alloc_for_decode, HookType.AROUND),
)
