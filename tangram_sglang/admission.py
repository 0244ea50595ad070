"""Budget Reservation at admission: the exact per-group slots a request will allocate.

A turn of `extend_len` new tokens with a decode budget of `max_new` tokens allocates, in
group g, kept_g(n) slots for every extend chunk of n tokens (each chunk is its own
segment, compressed by the same `kept_tokens` rule the allocation hook applies) and one
slot per decoded token. Admission reserves that (`turn_need`, with the `ChunkPlan` that
says how SGLang's chunked prefill will cut the prompt) and admits only while every group
keeps `need_g <= free_g + evictable_g - reserved_g`, where evictable_g counts the group
slots behind the radix tree's unlocked (evictable) logical slots. Pure functions of counts,
plus the two reads of live state the gate needs.

A request can never fit when, in some group, its need plus the slots of the prefix it
keeps locked exceeds the group's capacity (`never_fits`): everything else in the pool is
eventually freed or evictable, that is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tangram_sglang.allocator import TangramAllocator
from tangram_sglang.budget import reserve_turn


@dataclass(frozen=True)
class ChunkPlan:
    """How SGLang's chunked prefill cuts a request's new tokens: a first chunk of at most
    `first` tokens (what the batch's chunk budget has left), then chunks of `size` tokens
    (the whole budget: a continuing request is scheduled first in its batch). None: no
    chunking, the new tokens are one segment."""

    first: int | None = None
    size: int | None = None

    @classmethod
    def whole_chunks(cls, size: int | None) -> ChunkPlan:
        """Every chunk takes the whole budget: the fewest chunks, so the smallest need."""
        return cls(size, size)

    def pieces(self, rest: int) -> tuple[tuple[int, int], ...]:
        """(chunk length, how many such chunks) covering `rest` new tokens, in order."""
        if rest < 0:
            raise ValueError(f"chunk plan: {rest} new tokens is negative")
        if self.first is None or rest <= self.first:
            return ((rest, 1),)
        first = max(self.first, 0)
        if self.size is None or self.size <= 0:
            return ((first, 1), (rest - first, 1))
        whole, last = divmod(rest - first, self.size)
        return ((first, 1), (self.size, whole), (last, 1))


def turn_need(
    extend_len: int, max_new: int, allocator: TangramAllocator, plan: ChunkPlan = ChunkPlan()
) -> tuple[int, ...]:
    """Per-group slots `extend_len` new tokens (extended in the chunks of `plan`) plus
    `max_new` decoded ones use."""
    ratios, rule = allocator.ratios, allocator.rule
    pieces = plan.pieces(extend_len)
    if len(pieces) == 1:
        return reserve_turn(extend_len, max_new, ratios, rule).slots
    kept = [0] * len(ratios)
    for n, count in pieces:
        for g, k in enumerate(reserve_turn(n, 0, ratios, rule).kept):
            kept[g] += count * k
    page = rule.page_size
    return tuple(-(-(k + max_new) // page) * page for k in kept)


def short_group(need: Sequence[int], room: Sequence[int]) -> int | None:
    """The first group whose `need` exceeds its `room`, or None when every group fits."""
    for g, (n, r) in enumerate(zip(need, room, strict=True)):
        if n > r:
            return g
    return None


def never_fits(
    input_len: int,
    max_new: int,
    allocator: TangramAllocator,
    chunk_size: int | None = None,
    held: Sequence[int] | None = None,
) -> str | None:
    """Why `input_len` new tokens (extended in chunks of `chunk_size`, None: one segment)
    and `max_new` decoded ones cannot fit even when everything else is evicted, with
    `held[g]` group slots of a locked prefix in the pools; None when they can."""
    need = turn_need(input_len, max_new, allocator, ChunkPlan.whole_chunks(chunk_size))
    held = tuple(held) if held is not None else (0,) * len(need)
    capacity = allocator.pool.slots
    g = short_group([n + h for n, h in zip(need, held, strict=True)], capacity)
    if g is None:
        return None
    chunks = f" in chunks of {chunk_size}" if chunk_size and input_len > chunk_size else ""
    prefix = f" + {held[g]} of its cached prefix" if held[g] else ""
    return (
        f"tangram: the request can never fit the KV pools: head group {g} (ratio "
        f"{allocator.ratios[g]:.4g}) needs {need[g]} slots ({need[g] - max_new} kept of "
        f"{input_len} prompt tokens{chunks} + {max_new} max new tokens){prefix} but holds "
        f"{capacity[g]} in all; shorten the prompt or lower max_new_tokens"
    )


def decode_budget(req: Any) -> int:
    """Tokens the request may still decode (none for one that finishes at prefill)."""
    if getattr(req, "to_finish", None) is not None:
        return 0
    return max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)


def new_tokens(req: Any) -> int:
    """Tokens the request still has to extend: its fill minus the prefix it holds."""
    return len(req.full_untruncated_fill_ids) - len(req.prefix_indices)


def evictable_group_slots(tree_cache: Any, allocator: TangramAllocator) -> tuple[int, ...]:
    """Per group, slots freed by evicting the whole evictable tree (0 without a tree)."""
    count = getattr(tree_cache, "evictable_group_slots", None)
    if count is None or getattr(tree_cache, "disable", False):
        return (0,) * allocator.pool.num_groups
    return count()
