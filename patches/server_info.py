"""Touchpoint: the scheduler's internal state (`Scheduler.get_internal_state`, served as
`/server_info` -> `internal_states[i]`). Adds `tangram_pool`: the head-group split, free
slots per group and the logical space, so an operator (and the e2e tests) can see the
pools drain and refill, e.g. return to their start after `/flush_cache`.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import TangramAllocator

from . import Hook


def add_pool_state(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    allocator = self.token_to_kv_pool_allocator
    if isinstance(allocator, TangramAllocator):
        result.internal_state["tangram_pool"] = allocator.describe()
    return result


HOOKS = (
    Hook(
        "sglang.srt.managers.scheduler.Scheduler.get_internal_state", add_pool_state, HookType.AFTER
    ),
)
