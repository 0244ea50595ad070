"""Budget Reservation's ledger, step by step (need, room, reserve, bind, consume, settle,
release), and its two uses by the allocator: an extend consumes exactly, a decode step
evicts only each group's shortfall and never eats a prompt reservation."""

from __future__ import annotations

import random

import pytest
import torch
from test_allocator import RULE, make_allocator

from tangram_sglang.memory.budget import kept_tokens
from tangram_sglang.memory.reservation import (
    BudgetReservation,
    ChunkPlan,
    ReservationRefused,
    decode_estimate,
    prompt_need,
)


def make_ledger(rng, groups=3, capacity=500):
    ratios = sorted(rng.uniform(0.05, 1.0) for _ in range(groups))
    return BudgetReservation(ratios, RULE, [capacity] * groups, max_rows=8)


def test_reserve_assigns_bind_moves_consume_takes_and_release_returns():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    ledger = make_ledger(rng)
    G = ledger.num_groups
    ledger.reserve("x", [5] * G)
    ledger.reserve("x", [7] * G)  # admission retried: the last need stands, not the sum
    assert ledger.reserved() == (7,) * G, f"seed {seed}: reserve added up: {ledger.reserved()}"
    ledger.bind("x", 2)
    assert ledger.pending == {} and ledger.row_reserved[:, 2].tolist() == [7] * G
    ledger.consume([2], torch.full((G, 1), 3))
    assert ledger.reserved() == (4,) * G and ledger.overdrawn.tolist() == [0] * G
    ledger.consume([2], torch.full((G, 1), 6))
    assert ledger.overdrawn.tolist() == [2] * G and ledger.reserved() == (0,) * G, (
        f"seed {seed}: 2 slots beyond the reservation: overdrawn {ledger.overdrawn.tolist()}"
    )
    ledger.reserve("y", [1] * G)
    ledger.bind("y", 3)
    ledger.release(3)
    assert ledger.reserved() == (0,) * G, "a released row must reserve nothing"
    with pytest.raises(ValueError, match="counts >= 0"):
        ledger.reserve("z", [-1] * G)


def test_room_counts_reservations_and_the_decode_estimates_of_admitted_requests():
    rng = random.Random(random.randrange(10_000))
    ledger = make_ledger(rng, groups=2)
    ledger.reserve("a", [10, 20])
    assert ledger.room([100, 50], [5, 0], decode_offset=7.5) == (100 + 5 - 10 - 7.5, 50 - 20 - 7.5)


def test_settle_assigns_the_remaining_need_and_refuses_growth_beyond_room():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    ledger = make_ledger(rng)
    G = ledger.num_groups
    ledger.reserve("x", [30] * G)
    ledger.bind("x", 1)
    assert ledger.settle(1, [30] * G, [0] * G) == (0,) * G, "an unchanged need needs no room"
    assert ledger.settle(1, [20] * G, [0] * G) == (-10,) * G
    with pytest.raises(
        ReservationRefused, match="10 more slots of head group 0, which has room for 9"
    ):
        ledger.settle(1, [30] * G, [9] * G)
    assert ledger.row_reserved[:, 1].tolist() == [20] * G, "a refused settle changed the row"
    assert ledger.settle(1, [30] * G, [10] * G) == (10,) * G


def test_stale_pending_reservations_are_cleared_and_counted():
    rng = random.Random(random.randrange(10_000))
    ledger = make_ledger(rng)
    for rid in ("a", "b", "c"):
        ledger.reserve(rid, [1] * ledger.num_groups)
    assert ledger.drop_stale(["b"]) == ["a", "c"] and list(ledger.pending) == ["b"]
    assert ledger.describe()["stale_total"] == 2


def test_prompt_need_sums_each_chunks_kept_tokens_and_decode_follows_sglangs_estimate():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    ratios = [rng.uniform(0.05, 1.0) for _ in range(3)]
    n, size = rng.randint(100, 400), rng.randint(10, 90)
    chunks = [size] * (n // size) + ([n % size] if n % size else [])
    expected = tuple(sum(kept_tokens(c, r, RULE) for c in chunks) for r in ratios)
    assert prompt_need(n, ratios, RULE, ChunkPlan.whole_chunks(size)) == expected, f"seed {seed}"
    assert decode_estimate(9000, 4096) == 4096 and decode_estimate(100, 4096, 0.5) == 50
    assert decode_estimate(-3, 4096) == 0


def test_never_fits_names_the_group_and_max_decode_is_what_the_scarcest_group_leaves():
    rng = random.Random(random.randrange(10_000))
    ledger = BudgetReservation([0.2, 1.0], RULE, [300, 200], max_rows=4)
    need = ledger.prompt_need(150)
    assert ledger.max_decode(150, None) == min(300 - need[0], 200 - need[1]) == 50
    assert ledger.never_fits(150, 50) is None
    reason = ledger.never_fits(150, 51)
    assert reason is not None and "head group 1 (ratio 1)" in reason and "150 prompt" in reason
    held = ledger.never_fits(150, 0, held=[0, rng.randint(51, 99)])
    assert held is not None and "of its cached prefix" in held


def test_a_decode_step_evicts_only_the_shortfall_and_keeps_prompt_reservations():
    """A stand-in tree of whole nodes (one extend each, evicted oldest first, a node at a
    time as SGLang's LRU does): a decode step evicts nothing while every group has room
    beside the prompt reservations, and otherwise stops at the first node that covers the
    per-group shortfall."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    a = make_allocator(seed, logical=4_000, slots=300)
    G = a.pool.num_groups
    nodes = []
    for row in range(1, 7):
        new = a.alloc(rng.randint(10, 40))
        a.begin_extend([row], [new[:0]], [new])
        a.release_row(row)
        nodes.append(new)
    counts = [a.group_counts(n) for n in nodes]
    evicted = []

    def evict(n):
        freed = 0
        while freed < n and len(evicted) < len(nodes):
            node = nodes[len(evicted)]
            a.free(node)
            evicted.append(node)
            freed += node.numel()

    free = a.pool.free_slots()
    hold = min(free) - 2
    a.budget.reserve("p", [hold] * G)
    a.budget.bind("p", 7)
    assert a.make_decode_room(2, evict) and evicted == [], (
        f"seed {seed}: evicted {len(evicted)} nodes with room for the step"
    )
    rows = rng.randint(3, 40)
    short = torch.tensor([max(0, rows + hold - f) for f in free])
    assert a.make_decode_room(rows, evict), f"seed {seed}: the tree holds enough to evict"
    freed = torch.stack(counts[: len(evicted)]).sum(0)
    before_last = freed - counts[len(evicted) - 1]
    assert (freed >= short).all() and not (before_last >= short).all(), (
        f"seed {seed}: needed {short.tolist()} per group, evicted {len(evicted)} nodes "
        f"freeing {freed.tolist()}: the last one was not needed"
    )
    assert a.budget.reserved() == (hold,) * G, "a decode step took a prompt reservation"
    assert not a.make_decode_room(10**6, evict), "an impossible step must report False"
