"""Touchpoint: KV allocation for a batch (`mem_cache.allocation.alloc_for_extend` and
`alloc_for_decode`), and its hand-off to the batch's forward (`ForwardBatch.init_new`).

SGLang allocates logical slots and writes `req_to_token` as usual; then the
`TangramAllocator` builds each request's group rows, allocates the new segment's group
slots (k_g per group, or one per group per decoded token) and returns the batch's
`ForwardState`. The state rides on SGLang's own batch objects, as SGLang's per-batch
fields do: `ScheduleBatch.tangram_state`, copied to `ForwardBatch.tangram_state` when the
forward batch is built, to the copy the eager runner makes of it (`EagerRunner.load_batch`)
and to the padded view the decode CUDA-graph runner hands the backend before a replay
(`build_replay_fb_view`). A copy SGLang made elsewhere would reach the backend without
a state, and the backend refuses such a forward by name. Under overlap scheduling the
next batch is allocated while the previous forward runs; each forward still reads its
own batch's state.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import Evict, TangramAllocator

from . import Hook

TARGET = "sglang.srt.mem_cache.allocation"
STATE = "tangram_state"  # the attribute on ScheduleBatch and ForwardBatch


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
    setattr(batch, STATE, allocator.begin_extend(rows, prefixes, new, _evictor(batch.tree_cache)))
    return result


def alloc_for_decode(original: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
    out_cache_loc = original(batch, *args, **kwargs)
    allocator = batch.token_to_kv_pool_allocator
    if isinstance(allocator, TangramAllocator):
        rows = batch.req_pool_indices_cpu.tolist()  # SGLang's host copy: no device read
        state = allocator.begin_decode(rows, out_cache_loc, _evictor(batch.tree_cache))
        setattr(batch, STATE, state)
    return out_cache_loc


def _carry(source: Any, target: Any) -> Any:
    """`target`, a batch object SGLang built from `source`, with `source`'s state."""
    setattr(target, STATE, getattr(source, STATE, None))
    return target


def forward_batch_init_new(forward_batch: Any, cls: Any, batch: Any, *args: Any, **kw: Any) -> Any:
    """(`init_new` is a classmethod: the hook gets `cls`.) The forward batch built from
    `batch` carries its allocation state (None where no tangram allocation preceded it:
    stock pools, idle batches)."""
    return _carry(batch, forward_batch)


def eager_copy(copy: Any, runner: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
    """The eager runner's copy of the forward batch (`dataclasses.replace`) keeps its state."""
    return _carry(forward_batch, copy)


def replay_view(view: Any, *args: Any, **kwargs: Any) -> Any:
    """The decode graph runner's padded view of a forward batch keeps its state."""
    return _carry(kwargs["forward_batch"] if "forward_batch" in kwargs else args[0], view)


HOOKS = (
    Hook(f"{TARGET}.alloc_for_extend", alloc_for_extend, HookType.AROUND),
    Hook(f"{TARGET}.alloc_for_decode", alloc_for_decode, HookType.AROUND),
    Hook(
        "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
        forward_batch_init_new,
        HookType.AFTER,
    ),
    Hook(
        "sglang.srt.model_executor.runner.eager_runner.EagerRunner.load_batch",
        eager_copy,
        HookType.AFTER,
    ),
    Hook(
        "sglang.srt.model_executor.runner.decode_cuda_graph_runner.build_replay_fb_view",
        replay_view,
        HookType.AFTER,
    ),
)
