"""TangramAllocator: logical slots for SGLang, group slots behind them, owned by the
logical slot of their latest kept token."""

from __future__ import annotations

import random

import pytest
import torch

from tangram_sglang.allocator import TangramAllocator, TangramKVPool, build_tangram_pools
from tangram_sglang.backend import KeptOwners
from tangram_sglang.budget import BudgetRule, Workload, kept_tokens, session_slots
from tangram_sglang.layout import PoolLayout
from tangram_sglang.pool import PoolExhausted, RaggedPool
from tangram_sglang.profile import ModelIdentity, uniform_profile
from tangram_sglang.synthetic import synthetic_profile

RULE = BudgetRule(sink=2, window=3)


def make_allocator(seed: int, logical: int = 400, slots: int = 300, dtype=torch.float32):
    model = ModelIdentity("test", 2, 8, 4, 4, f"a{seed}")
    profile = synthetic_profile(model, 0.4, spread=0.8, seed=seed, max_groups=3)
    layout = PoolLayout.from_profile(profile)
    pool = RaggedPool(layout, [slots] * layout.num_groups, dtype, "cpu", 8, 256)
    return TangramAllocator(logical, TangramKVPool(pool, logical), RULE)


def test_compressed_segment_maps_its_last_kept_slots_and_rows_compact_the_prefix():
    seed = random.randrange(10_000)
    a = make_allocator(seed)
    n1, n2 = random.randint(12, 40), random.randint(12, 40)
    first = a.alloc(n1)
    a.begin_extend([1], [first[:0]], [first])
    kept = [kept_tokens(n1, r, RULE) for r in a.ratios]
    for g, k in enumerate(kept):
        mapped = a.logical_to_group[g, first]
        assert (mapped[: n1 - k] == 0).all() and (mapped[n1 - k :] > 0).all(), (
            f"seed {seed}: group {g} keeps {k} of {n1}; mapping {mapped.tolist()}"
        )
    second = a.alloc(n2)
    state = a.begin_extend([2], [first], [second])
    segment = state.segments[0]
    assert segment.prefix_lens == tuple(kept), f"seed {seed}: prefix lens {segment.prefix_lens}"
    for g, slots in enumerate(a.row_slots(2)):
        expected = torch.cat((a.compact(first)[g], segment.slots[g]))
        assert torch.equal(slots, expected), f"seed {seed}: row 2 group {g} is {slots.tolist()}"
    assert a.leaks() == [], f"seed {seed}: {a.leaks()}"


def test_free_returns_every_group_slot_and_clear_restores_the_start():
    seed = random.randrange(10_000)
    a = make_allocator(seed)
    start = (a.pool.free_slots(), a.logical_available_size())
    logical = []
    for row in range(1, 5):
        new = a.alloc(random.randint(1, 30))
        a.begin_extend([row], [new[:0]], [new])
        dec = a.alloc(1)
        a.begin_decode([row], dec)
        logical += [new, dec]
    assert a.pool.free_slots() != start[0], "nothing was allocated"
    assert a.available_size() == min(a.logical_available_size(), *a.pool.free_slots())
    random.shuffle(logical)
    for chunk in logical:
        a.free(chunk)
        assert a.leaks() == [], f"seed {seed}: {a.leaks()}"
    assert (a.pool.free_slots(), a.logical_available_size()) == start, f"seed {seed}: leaked"
    new = a.alloc(10)
    a.begin_extend([1], [new[:0]], [new])
    a.clear()
    assert (a.pool.free_slots(), a.logical_available_size()) == start


def random_selections(a, n: int, kept, gen):
    """Per layer, per kv head: ascending positions of the tokens its group keeps of n."""
    layout = a.pool.layout
    heads = range(layout.num_kv_heads)
    return [
        [
            torch.randperm(n, generator=gen)[: kept[a.pool.head_group[layer][h]]].sort().values
            for h in heads
        ]
        for layer in range(layout.num_layers)
    ]


def record_owners(a, segment, chosen) -> KeptOwners:
    """The backend's owner tracking over one segment's per-layer selections (`chosen`, as
    `random_selections` gives them), each layer as the `[1, Hkv, W]` batch it updates."""
    owners = KeptOwners([segment], a.pool.num_groups)
    width = max(segment.kept)
    for layer, heads in enumerate(chosen):
        batch = torch.full((1, len(heads), width), -1, dtype=torch.int64)
        for h, sel in enumerate(heads):
            batch[0, h, : len(sel)] = sel
        members = [a.pool.heads_in(g, layer) for g in range(a.pool.num_groups)]
        owners.update_batch(batch, a.pool.head_group[layer], members)
    return owners


def test_every_cut_of_a_compressed_segment_owns_the_slots_of_earlier_tokens():
    seed = random.randrange(10_000)
    gen = torch.Generator().manual_seed(seed)
    a = make_allocator(seed)
    start = a.pool.free_slots()
    n = random.randint(12, 40)
    seg = a.alloc(n)
    segment = a.begin_extend([1], [seg[:0]], [seg]).segments[0]
    chosen = random_selections(a, n, segment.kept, gen)
    record_owners(a, segment, chosen).apply(a)
    for m in range(n + 1):
        head = a.compact(seg[:m])
        tail = a.compact(seg[m:])
        for g, slots in enumerate(segment.slots):
            held = [sel[h] for layer, sel in enumerate(chosen) for h in a.pool.heads_in(g, layer)]
            # Slots [0, C) hold only tokens before m for every head and layer.
            c = min(int((s < m).sum()) for s in held)
            assert torch.equal(head[g], slots[:c]) and torch.equal(tail[g], slots[c:]), (
                f"seed {seed}: cut {m} of {n}, group {g}: head owns {head[g].tolist()}, "
                f"tail {tail[g].tolist()}, expected the first {c} of {slots.tolist()}"
            )
    assert a.starts_segment(seg, 0) and not a.starts_segment(seg, 1)
    a.free(seg[: n // 2])
    a.free(seg[n // 2 :])
    assert a.leaks() == [] and a.pool.free_slots() == start, f"seed {seed}: {a.leaks()}"


def test_group_shortage_evicts_then_names_the_group():
    a = make_allocator(random.randrange(10_000), slots=20)
    rows = list(range(1, 9))
    evicted = []
    a.begin_decode(rows, a.alloc(8), evicted.append)
    a.begin_decode(rows, a.alloc(8), evicted.append)
    assert evicted == [], "evicted although every group had room"
    with pytest.raises(PoolExhausted, match=r"group \d+ needs 8 slots, 4 free of 20"):
        a.begin_decode(rows, a.alloc(8), evicted.append)
    assert evicted == [4], f"the allocator asked the tree to evict {evicted}, expected [4]"


def test_built_pools_spend_the_full_kv_bytes_and_widen_the_logical_space():
    model = ModelIdentity("test", 2, 8, 4, 8, "b")
    full = 1000
    kv_pool, allocator = build_tangram_pools(
        uniform_profile(model, 0.25), None, "snapkv", full, torch.float32, "cpu", 4, 64
    )
    budget = full * 2 * 4 * 8 * 2 * 4
    assert budget - 2 * (2 * 4 * 8 * 2 * 4) <= kv_pool.pool.total_bytes() <= budget
    assert allocator.size == 4 * full, f"logical slots {allocator.size} for ratio 0.25"
    assert kv_pool.method == "snapkv"


def test_settle_makes_the_remaining_reservation_exact_and_reports_the_change():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    a = make_allocator(seed)
    G = a.pool.num_groups
    need = [rng.randint(20, 60) for _ in range(G)]
    a.reserve("x", need)
    a.bind_reservation("x", 3)
    new = a.alloc(rng.randint(10, 19))
    a.begin_extend([3], [new[:0]], [new])
    held = [n - k for n, k in zip(need, a.kept(new.numel()), strict=True)]
    assert list(a.reserved()) == held, f"seed {seed}: {a.reserved()} after consuming, not {held}"
    target = [rng.randint(0, 80) for _ in range(G)]
    change = a.settle("x", 3, target)
    assert list(change) == [t - h for t, h in zip(target, held, strict=True)], (
        f"seed {seed}: settling {held} to {target} reported {change}"
    )
    assert list(a.reserved()) == target and a.pending == {}, f"seed {seed}: {a.reserved()}"
    assert a.settle("y", None, target) == tuple(target) and a.pending == {"y": target}, (
        f"seed {seed}: a request without a row settles into pending, got {a.pending}"
    )
    a.release_row(3)
    a.drop_pending("y")
    assert a.reserved() == (0,) * G


def test_allocation_beyond_a_reservation_is_counted_as_overdrawn():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    a = make_allocator(seed)
    G = a.pool.num_groups
    n = rng.randint(10, 40)
    short = [k - 1 for k in a.kept(n)]
    a.reserve("x", short)
    a.bind_reservation("x", 1)
    new = a.alloc(n)
    a.begin_extend([1], [new[:0]], [new])
    assert a.overdrawn.tolist() == [1] * G, f"seed {seed}: overdrawn {a.overdrawn.tolist()}"
    a.begin_decode([1], a.alloc(1))
    assert a.describe()["overdrawn"] == [2] * G, f"seed {seed}: {a.describe()['overdrawn']}"
    assert a.reserved() == (0,) * G, "an overdrawn row must not reserve negative slots"


def test_request_table_is_as_wide_as_the_largest_group_not_the_context():
    model = ModelIdentity("test", 2, 8, 4, 8, "w")
    full = random.randint(200, 400)
    kv_pool, allocator = build_tangram_pools(
        uniform_profile(model, 1.0), None, "snapkv", full, torch.float32, "cpu", 4, 32_768
    )
    pool = kv_pool.pool
    width = max(pool.slots)
    assert pool.req_to_slot.shape == (1, 5, width), (
        f"req_to_slot is {tuple(pool.req_to_slot.shape)} for groups of {pool.slots} slots"
    )
    new = allocator.alloc(width)  # a row may hold every slot of its group ...
    allocator.begin_extend([1], [new[:0]], [new])
    with pytest.raises(PoolExhausted, match=r"group 0 needs 1 slots, 0 free"):
        allocator.begin_decode([1], allocator.alloc(1))  # ... and the group runs out first
    narrow, _ = build_tangram_pools(
        uniform_profile(model, 1.0), None, "snapkv", full, torch.float32, "cpu", 4, 64
    )
    assert narrow.pool.req_to_slot.shape[2] == 64, "a shorter context must bound the width"


def test_built_pools_are_split_so_chat_sessions_exhaust_every_group_together():
    seed = random.randrange(10_000)
    model = ModelIdentity("test", 4, 16, 4, 8, f"c{seed}")
    profile = synthetic_profile(model, 0.25, seed=seed)
    workload = Workload(context=512, turns=3, user_tokens=64, answer_tokens=64)
    kv_pool, allocator = build_tangram_pools(
        profile, None, "snapkv", 20_000, torch.float32, "cpu", 4, 4096, workload
    )
    pool = kv_pool.pool
    demand = session_slots(workload.turn_shapes(), pool.layout.ratios, allocator.rule)
    fits = [s // d for s, d in zip(pool.slots, demand, strict=True)]
    assert max(fits) - min(fits) <= 1, (
        f"seed {seed}: groups {pool.slots} hold {fits} sessions of {demand} slots: one group "
        "runs out long before the others"
    )
