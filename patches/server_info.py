"""Touchpoint: the scheduler's internal state (`Scheduler.get_internal_state`, served as
`/server_info` -> `internal_states[i]`). Adds `tangram_pool`: the head-group split, free
slots per group and the logical space, so an operator (and the e2e tests) can see the
pools drain and refill, e.g. return to their start after `/flush_cache`. Under tensor
parallelism `tangram_pool_ranks` lists every rank's (each rank stores its own heads; their
slot counts, free lists and reservations must agree, as admission runs on each rank).
"""

from __future__ import annotations

from typing import Any

import torch
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import TangramAllocator

from . import Hook


def add_pool_state(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    allocator = self.token_to_kv_pool_allocator
    if isinstance(allocator, TangramAllocator):
        state = allocator.describe()
        result.internal_state["tangram_pool"] = state
        if self.ps.attn_tp_size > 1:  # every rank serves this request, in the same order
            ranks: list[Any] = [None] * self.ps.attn_tp_size
            torch.distributed.all_gather_object(ranks, state, group=self.attn_tp_cpu_group)
            result.internal_state["tangram_pool_ranks"] = ranks
    return result


HOOKS = (
    Hook(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state", add_pool_state, HookType.AFTER
    ),
)
