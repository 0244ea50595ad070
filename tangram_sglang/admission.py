"""Budget Reservation at admission: the exact per-group slots a request will allocate.

A turn of `extend_len` new tokens with a decode budget of `max_new` tokens allocates, in
group g, kept_g(extend_len) slots at extend (the allocation hook compresses every
segment by the same `kept_tokens` rule) and one slot per decoded token. Admission
reserves that (`budget.reserve_turn`) and admits only while every group keeps
`need_g <= free_g + evictable_g - reserved_g`, where evictable_g counts the group slots
behind the radix tree's unlocked (evictable) logical slots. Pure functions of counts,
plus the two reads of live state the gate needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tangram_sglang.allocator import TangramAllocator
from tangram_sglang.budget import reserve_turn


def turn_need(extend_len: int, max_new: int, allocator: TangramAllocator) -> tuple[int, ...]:
    """Per-group slots a segment of `extend_len` tokens plus `max_new` decoded ones use."""
    return reserve_turn(extend_len, max_new, allocator.ratios, allocator.rule).slots


def short_group(need: Sequence[int], room: Sequence[int]) -> int | None:
    """The first group whose `need` exceeds its `room`, or None when every group fits."""
    for g, (n, r) in enumerate(zip(need, room, strict=True)):
        if n > r:
            return g
    return None


def never_fits(input_len: int, max_new: int, allocator: TangramAllocator) -> str | None:
    """Why a request of `input_len` prompt tokens and `max_new` new tokens cannot fit even
    in an empty cache (its whole prompt as one segment), or None when it can."""
    need = turn_need(input_len, max_new, allocator)
    capacity = allocator.pool.slots
    g = short_group(need, capacity)
    if g is None:
        return None
    kept = need[g] - max_new
    return (
        f"tangram: the request can never fit the KV pools: head group {g} (ratio "
        f"{allocator.ratios[g]:.4g}) needs {need[g]} slots ({kept} kept of {input_len} prompt "
        f"tokens + {max_new} max new tokens) but holds {capacity[g]} in all; shorten the "
        "prompt or lower max_new_tokens"
    )


def decode_budget(req: Any) -> int:
    """Tokens the request may still decode (none for one that finishes at prefill)."""
    if getattr(req, "to_finish", None) is not None:
        return 0
    return max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)


def evictable_group_slots(tree_cache: Any, allocator: TangramAllocator) -> tuple[int, ...]:
    """Per group, slots freed by evicting the whole evictable tree (0 without a tree)."""
    count = getattr(tree_cache, "evictable_group_slots", None)
    if count is None or getattr(tree_cache, "disable", False):
        return (0,) * allocator.pool.num_groups
    return count()
