"""Touchpoint: the scheduler's idle leak check (`SchedulerInvariantChecker._check_all_pools`).

SGLang checks available + evictable + protected == max_total_num_tokens in raw tokens.
Under --kv-compression `available_size()` is the scarcest group's free count (what
admission may promise), so the check runs on the logical space instead, and per group:
free + slots mapped from logical slots == capacity, no slot mapped twice or both mapped
and free.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.allocator import TangramAllocator

from . import Hook


def check_all_pools(original: Any, self: Any, ps: Any, uncached: int = 0) -> Any:
    allocator = self.token_to_kv_pool_allocator
    if not isinstance(allocator, TangramAllocator):
        return original(self, ps, uncached)
    available = allocator.logical_available_size()
    evictable = self.tree_cache.evictable_size()
    protected = self.tree_cache.protected_size()
    session = self.pool_stats_observer.session_held_tokens()
    leak, message = self._check_pool_invariant(
        "logical", available, evictable, protected, session, allocator.size, uncached
    )
    groups = allocator.leaks()
    messages = [message, *groups] if groups else [message]
    return leak or bool(groups), messages


HOOKS = (
    Hook(
        "sglang.srt.managers.scheduler_components.invariant_checker."
        "SchedulerInvariantChecker._check_all_pools",
        check_all_pools,
        HookType.AROUND,
    ),
)
