"""Request rows of a bare `RaggedPool`, for tests of what reads the pool (kernels, reference
attention, writers) without a `TangramAllocator`.

Slots come from the pool's own group allocators, whole pages at a time as SGLang's paged
allocator hands them out, and land in the tables the way the allocator writes them:
`req_to_slot[g, row, :n]` in token order and `group_lens[g, row] = n`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tangram_sglang.memory.budget import pages
from tangram_sglang.memory.pool import PoolExhausted, RaggedPool


def take_pages(pool: RaggedPool, group: int, n: int) -> torch.Tensor:
    """The slots of the whole pages that cover `n` slots of `group`, in allocator order."""
    size = pages(n, pool.page_size) * pool.page_size
    got = pool.allocators[group].alloc(size)
    if got is None:
        raise PoolExhausted(
            f"test pool: group {group} has {pool.free_slots()[group]} free slots, {size} wanted"
        )
    return got


def set_row(pool: RaggedPool, row: int, slots: Sequence[torch.Tensor]) -> None:
    """Request row `row` attends to `slots[g]` in group g, in that order."""
    if len(slots) != pool.num_groups:
        raise ValueError(f"slots has {len(slots)} entries for {pool.num_groups} groups")
    pool.req_to_slot[:, row] = 0
    for g, s in enumerate(slots):
        pool.req_to_slot[g, row, : s.numel()] = s.to(torch.int32)
        pool.group_lens[g, row] = s.numel()


def fill_row(pool: RaggedPool, row: int, counts: Sequence[int]) -> list[torch.Tensor]:
    """Row `row` holds `counts[g]` fresh slots of every group (the first of whole pages);
    returns them."""
    slots = [take_pages(pool, g, n)[:n] for g, n in enumerate(counts)]
    set_row(pool, row, slots)
    return slots


def lay_out_rows(
    pool: RaggedPool,
    rows: Sequence[int],
    counts: Sequence[Sequence[int]],
    shuffle: Callable[[list[Any]], None],
) -> list[list[torch.Tensor]]:
    """Row `rows[b]` holds `counts[b][g]` slots of group g, taken one page at a time in the
    order `shuffle` gives the (row, group) pages, so rows interleave and a row's pages are
    not contiguous (fragmented page tables). Returns each row's slots per group."""
    P = pool.page_size
    todo = [
        (b, g)
        for b, need in enumerate(counts)
        for g, n in enumerate(need)
        for _ in range(pages(n, P))
    ]
    shuffle(todo)
    taken: list[list[list[torch.Tensor]]] = [[[] for _ in range(pool.num_groups)] for _ in rows]
    for b, g in todo:
        taken[b][g].append(take_pages(pool, g, P))
    out = []
    for row, need, parts in zip(rows, counts, taken, strict=True):
        empty = torch.zeros(0, dtype=torch.int64, device=pool.device)
        slots = [torch.cat([empty, *p])[:n] for p, n in zip(parts, need, strict=True)]
        set_row(pool, row, slots)
        out.append(slots)
    return out
