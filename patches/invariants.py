"""Touchpoint: the scheduler's idle leak check (`SchedulerInvariantChecker._check_all_pools`).

SGLang checks available + evictable + protected == max_total_num_tokens in raw tokens.
Under --kv-compression that is the logical space (`available_size()` counts logical
slots), and the group slots behind it are checked per group:
free + slots mapped from logical slots == capacity, no slot mapped twice or both mapped
and free. With nothing running, no group slot may stay reserved (Budget Reservation
released every finished, aborted or retracted request), and the radix tree's incremental
evictable group-slot count must equal a full walk.

SGLang runs this on every pass of its idle loop, which a multi-turn client reaches between
turns. By default each group's counts are checked (`count_leaks`: free + mapped ==
capacity, one vector sum); the per-slot walk of `leaks()` (no slot mapped twice, or both
mapped and free), whose cost grows with the pools (0.1-0.5 s at a million logical slots,
paid by the next request's TTFT), runs only with `TANGRAM_STRICT_POOL_CHECK=1`, as
SGLang's own per-page checks run only with `SGLANG_CHECK_KV_PAGE_INVARIANTS`. Either runs
only when the pools changed since the last clean check (`_CLEAN`, a cheap signature).
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import TangramAllocator
from tangram_sglang.memory.radix import TangramRadixCache

from . import Hook


def check_all_pools(original: Any, self: Any, ps: Any, uncached: int = 0) -> Any:
    allocator = self.token_to_kv_pool_allocator
    if not isinstance(allocator, TangramAllocator):
        return original(self, ps, uncached)
    available = allocator.available_size()
    evictable = self.tree_cache.evictable_size()
    protected = self.tree_cache.protected_size()
    session = self.pool_stats_observer.session_held_tokens()
    leak, message = self._check_pool_invariant(
        "logical", available, evictable, protected, session, allocator.size, uncached
    )
    problems = [*pool_leaks(allocator, self.tree_cache), *idle_problems(allocator, self.tree_cache)]
    return leak or bool(problems), [message, *problems]


STRICT_ENV = "TANGRAM_STRICT_POOL_CHECK"  # "1": walk every slot at idle (tests set it)

# Allocator -> the pool signature of its last clean check.
_CLEAN: weakref.WeakKeyDictionary[TangramAllocator, tuple] = weakref.WeakKeyDictionary()


def pool_leaks(allocator: TangramAllocator, tree_cache: Any) -> list[str]:
    """`allocator.leaks()` (`TANGRAM_STRICT_POOL_CHECK=1`) or `count_leaks()`, skipped while
    nothing changed since a clean check: free counts per group and of the logical space,
    reservations and the tree's sizes did not move."""
    signature = (
        allocator.available_size(),
        allocator.pool.free_slots(),
        allocator.budget.reserved(),
        tree_cache.evictable_size(),
        tree_cache.protected_size(),
    )
    if _CLEAN.get(allocator) == signature:
        return []
    strict = os.environ.get(STRICT_ENV, "0") == "1"
    problems = allocator.leaks() if strict else allocator.count_leaks()
    if problems:
        _CLEAN.pop(allocator, None)
    else:
        _CLEAN[allocator] = signature
    return problems


def idle_problems(allocator: TangramAllocator, tree_cache: Any) -> list[str]:
    """What must hold once nothing runs, beyond the pools' own accounting (one line each)."""
    problems = []
    budget = allocator.budget
    reserved = budget.reserved()
    if any(reserved):
        rows = int((budget.row_reserved.sum(0) > 0).sum())
        problems.append(
            f"[tangram] {rows} request row(s) and {len(budget.pending)} unbound "
            f"request(s) reserve {list(reserved)} group slots (none may once idle)"
        )
    if isinstance(tree_cache, TangramRadixCache) and not tree_cache.disable:
        drift = tree_cache.check_evictable_count()
        if drift is not None:
            problems.append(f"[tangram] {drift}")
    return problems


HOOKS = (
    Hook(
        "sglang.srt.managers.scheduler_components.invariant_checker."
        "SchedulerInvariantChecker._check_all_pools",
        check_all_pools,
        HookType.AROUND,
    ),
)
