"""TangramAllocator: logical slots for SGLang, group slots behind them, owned by the
logical slot of their latest kept token."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_pool import workloads

from tangram_sglang.attention.backend import KeptOwners
from tangram_sglang.config import tp_conflicts
from tangram_sglang.memory.allocator import (
    FUSION_LOGICAL,
    TangramAllocator,
    TangramKVPool,
    build_tangram_pools,
)
from tangram_sglang.memory.budget import BudgetRule, Workload, kept_tokens, session_slots
from tangram_sglang.memory.layout import PoolLayout, rank_heads
from tangram_sglang.memory.pool import PoolExhausted, RaggedPool
from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

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
    start = (a.pool.free_slots(), a.available_size())
    logical = []
    for row in range(1, 5):
        new = a.alloc(random.randint(1, 30))
        a.begin_extend([row], [new[:0]], [new])
        dec = a.alloc(1)
        a.begin_decode([row], dec)
        logical += [new, dec]
    assert a.pool.free_slots() != start[0], "nothing was allocated"
    random.shuffle(logical)
    for chunk in logical:
        a.free(chunk)
        assert a.leaks() == [], f"seed {seed}: {a.leaks()}"
    assert (a.pool.free_slots(), a.available_size()) == start, f"seed {seed}: leaked"
    new = a.alloc(10)
    a.begin_extend([1], [new[:0]], [new])
    a.clear()
    assert (a.pool.free_slots(), a.available_size()) == start


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
    # Fast Fusion: a fused token costs a logical slot and no group slot.
    _, fused = build_tangram_pools(
        uniform_profile(model, 1.0), None, "snapkv", full, torch.float32, "cpu", 4, 64, fusion=0.9
    )
    assert fused.size == FUSION_LOGICAL * full and fused.fusion.threshold == 0.9


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


@pytest.mark.parametrize("tp_size", [2, 4, 8])
def test_tensor_parallel_ranks_store_their_own_heads_in_agreed_slots(tp_size):
    """Every (layer, kv head) lands on exactly one rank (or, with fewer heads than ranks,
    on the ranks SGLang replicates it to); all ranks get the same group slots and logical
    space, each within its bytes, and the heaviest rank uses its budget."""
    seed = random.randrange(10_000)
    model = ModelIdentity("test", 3, 8, 4, 8, f"tp{seed}")
    profile = synthetic_profile(model, 0.25, seed=seed)
    full = random.randint(500, 1500)
    built = [
        build_tangram_pools(
            profile, None, "snapkv", full, torch.float32, "cpu", 4, 256, None, rank, tp_size
        )
        for rank in range(tp_size)
    ]
    layout = PoolLayout.from_profile(profile)
    for layer in range(model.num_layers):
        owners = {}
        for rank, (kv_pool, _) in enumerate(built):
            own = rank_heads(rank, model.num_kv_heads, tp_size)
            shard = kv_pool.pool.layout
            assert shard.num_kv_heads == len(own) and shard.ratios == layout.ratios
            for g in range(layout.num_groups):
                for local in shard.heads[g][layer]:
                    owners.setdefault((own[local], g), []).append(rank)
        stored = sorted((h, g) for g in range(layout.num_groups) for h in layout.heads[g][layer])
        assert sorted(owners) == stored, f"seed {seed}: layer {layer} stores {sorted(owners)}"
        copies = {len(r) for r in owners.values()}
        assert copies == {max(1, tp_size // model.num_kv_heads)}, f"seed {seed}: {owners}"
    slots = {kv_pool.pool.slots for kv_pool, _ in built}
    logical = {allocator.size for _, allocator in built}
    assert len(slots) == 1 and len(logical) == 1, f"seed {seed}: ranks disagree: {slots} {logical}"
    budget = full * layout.shard(0, tp_size).full_token_bytes(4)
    used = [kv_pool.pool.total_bytes() for kv_pool, _ in built]
    assert max(used) <= budget, f"seed {seed}: a rank's pools take {used} of {budget} bytes"
    page = sum(layout.shard(0, tp_size).slot_bytes(g, 4) for g in range(layout.num_groups))
    assert max(used) >= budget - 2 * page * tp_size, f"seed {seed}: {used} of {budget} bytes"


def test_a_split_sglang_cannot_make_is_refused_in_one_line():
    with pytest.raises(ValueError, match="4 kv heads do not split evenly over --tp-size 3"):
        rank_heads(0, 4, 3)
    assert tp_conflicts({"num_key_value_heads": 4}, 3) == [
        "tensor parallelism (--tp-size 3: 4 kv heads do not split evenly over --tp-size 3)"
    ]
    assert tp_conflicts({"num_key_value_heads": 4}, 2) == []
    assert rank_heads(5, 2, 8) == (1,), "fewer heads than ranks: SGLang replicates each head"


# ---- the request ledger under serving traces -------------------------------------------
# The one ledger of group slots is this allocator (plus its BudgetReservation): checked
# through the calls serving makes, begin_extend / begin_decode / free / release_row.


def allocator_with(layout: PoolLayout, slots, rule: BudgetRule, logical: int, rows: int):
    pool = RaggedPool(layout, slots, torch.float32, "cpu", rows, max(1, *slots))
    return TangramAllocator(logical, TangramKVPool(pool, logical), rule)


ROWS_STATE = ("req_to_slot", "group_lens", "row_lens", "row_reserved", "overdrawn")


def ledger_state(a: TangramAllocator) -> dict:
    """Everything an allocation may change: group and logical free lists, the mapping,
    segment positions, and (`ROWS_STATE`, what freeing never touches) the row tables and
    lengths and the reservations."""
    pool = a.pool
    return {
        "free": pool.free_slots(),
        "free_lists": [x.free_pages.clone() for x in [a.logical, *pool.allocators]],
        "logical_to_group": a.logical_to_group.clone(),
        "seg_pos": a.seg_pos.clone(),
        "req_to_slot": pool.req_to_slot.clone(),
        "group_lens": pool.group_lens.clone(),
        "row_lens": a.row_lens.clone(),
        "row_reserved": a.budget.row_reserved.clone(),
        "overdrawn": a.budget.overdrawn.clone(),
    }


def same_state(x: dict, y: dict, keys=None) -> bool:
    def equal(p, q) -> bool:
        if isinstance(p, torch.Tensor):
            return torch.equal(p, q)
        if isinstance(p, list):
            return len(p) == len(q) and all(map(equal, p, q))
        return p == q if isinstance(p, tuple) else p is q

    return all(equal(x[k], y[k]) for k in keys or x)


def test_an_extend_batch_that_cannot_fit_changes_nothing_and_names_the_group():
    seed = random.randrange(10_000)
    a = make_allocator(seed, slots=20)
    rows = list(range(1, 9))
    decoded = [a.alloc(8), a.alloc(8)]
    for new in decoded:
        a.begin_decode(rows, new)  # 4 free slots left in every group
    for row, n in ((1, 3), (2, 2)):
        a.budget.reserve(f"r{row}", a.budget.prompt_need(n))
        a.budget.bind(f"r{row}", row)
    # Rows 1 and 2 go on with 3 and 2 tokens, fewer than sink + window, so all kept: row 1
    # alone fits, the batch needs 5 > 4 in every group.
    news = [a.alloc(3), a.alloc(2)]
    prefixes = [torch.stack([d[row - 1] for d in decoded]) for row in (1, 2)]
    before = ledger_state(a)
    with pytest.raises(PoolExhausted, match=r"group 0 needs 5 slots, 4 free of 20"):
        a.begin_extend([1, 2], prefixes, news)
    assert same_state(before, ledger_state(a)), (
        f"seed {seed}: an extend batch that did not fit changed the allocator (the first "
        "request alone fits, so it must not have been half done)"
    )
    assert a.leaks() == [], f"seed {seed}: {a.leaks()}"


class AllocatorTrace(RuleBasedStateMachine):
    """Random serving traces on the real ledger: extend batches (new requests, some with
    a cut of a cached history as prefix, and next chunks of live ones), decode batches,
    owners moved after a compressed forward, finish into the cache, abort, evict a tail
    from the cache. The model holds each live request's logical slots and the cache's;
    after every step the allocator must agree with it and lose no slot."""

    @initialize(seed=st.integers(0, 10_000), data=st.data())
    def build(self, seed, data):
        model = ModelIdentity("test", 2, 4, 2, 2, f"trace{seed}")
        layout = PoolLayout.from_profile(
            synthetic_profile(model, 0.4, spread=0.8, seed=seed, max_groups=3)
        )
        slots = [data.draw(st.integers(16, 80)) for _ in layout.ratios]
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.a = allocator_with(layout, slots, RULE, logical=800, rows=4)
        self.G = layout.num_groups
        self.start = (self.a.pool.free_slots(), self.a.available_size())
        self.live: dict[int, list[torch.Tensor]] = {}  # row -> its logical slots, in order
        self.cache: list[list[torch.Tensor]] = []  # histories finished requests left

    def fail(self, what: str) -> str:
        return f"seed {self.seed}: {what}"

    @rule(data=st.data())
    def extend(self, data):
        a = self.a
        rows = data.draw(
            st.lists(st.integers(1, a.pool.max_requests), min_size=1, max_size=3, unique=True)
        )
        histories, adopted = [], []
        for row in rows:
            if row in self.live:
                histories.append(list(self.live[row]))  # its next chunk or turn
                continue
            history: list[torch.Tensor] = []
            if self.cache and data.draw(st.booleans()):  # a radix match, cut anywhere
                whole = self.cache.pop(data.draw(st.integers(0, len(self.cache) - 1)))
                flat = torch.cat(whole)
                cut = data.draw(st.integers(0, flat.numel()))
                adopted.append((whole, flat[cut:]))
                history = [flat[:cut]]
            histories.append(history)
        news = [a.alloc(data.draw(st.integers(1, 16))) for _ in rows]
        if any(n is None for n in news):
            self.undo([n for n in news if n is not None], adopted)
            return
        for row, new in zip(rows, news, strict=True):
            a.budget.reserve(f"r{row}", a.budget.prompt_need(new.numel()))
            a.budget.bind(f"r{row}", row)
        prefixes = [torch.cat([news[0][:0], *h]) for h in histories]
        evict = self.evict_from_cache if data.draw(st.booleans()) else None
        before = ledger_state(a)
        try:
            state = a.begin_extend(rows, prefixes, news, evict)
        except PoolExhausted:
            needs = torch.tensor([a.kept(n.numel()) for n in news]).sum(0).tolist()
            short = [n > f for n, f in zip(needs, a.pool.free_slots(), strict=True)]
            assert any(short), self.fail(f"refused {needs} with {a.pool.free_slots()} free")
            self.refused_unchanged(before, evict, "extend", torch.cat(news))
            for row in rows:
                a.budget.release(row)
            self.undo(news, adopted)
            return
        for _, tail in adopted:
            if tail.numel():
                self.cache.append([tail])
        for row, history, new in zip(rows, histories, news, strict=True):
            self.live[row] = [*history, new]
        for segment in state.segments:
            if segment.compress and data.draw(st.booleans()):  # the backend's selections
                n = segment.extend_len
                owners = [torch.randperm(n, generator=self.gen)[:k].sort()[0] for k in segment.kept]
                a.assign_owners(segment, owners)

    def evict_from_cache(self, tokens: int) -> None:
        """The radix cache's eviction, as the allocator calls it: free cached histories,
        oldest first, until `tokens` logical slots are freed or nothing is left."""
        while tokens > 0 and self.cache:
            flat = torch.cat(self.cache.pop(0))
            self.a.free(flat)
            tokens -= flat.numel()

    def refused_unchanged(self, before: dict, evict, what: str, new: torch.Tensor) -> None:
        """A refused allocation allocated nothing; with eviction it may have freed cached
        slots first, which changes no row."""
        after = ledger_state(self.a)
        keys = ROWS_STATE if evict is not None else None
        assert same_state(before, after, keys), self.fail(f"a refused {what} changed")
        mapped = self.a.logical_to_group[:, new.long()]
        assert not mapped.any(), self.fail(f"a refused {what} mapped its new logical slots")

    def undo(self, news, adopted) -> None:
        """An extend that did not happen: its logical slots and cache matches go back."""
        for new in news:
            self.a.free(new)
        for whole, _ in adopted:
            self.cache.append(whole)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def decode(self, data):
        a = self.a
        rows = data.draw(st.lists(st.sampled_from(sorted(self.live)), min_size=1, unique=True))
        new = a.alloc(len(rows))
        if new is None:
            return
        evict = self.evict_from_cache if data.draw(st.booleans()) else None
        before = ledger_state(a)
        try:
            a.begin_decode(rows, new, evict)
        except PoolExhausted:
            assert min(a.pool.free_slots()) < len(rows), self.fail("a decode that fit refused")
            self.refused_unchanged(before, evict, "decode", new)
            a.free(new)
            return
        for i, row in enumerate(rows):
            self.live[row].append(new[i : i + 1])

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        """The request ends: its slots stay with the cache, its row is released."""
        row = data.draw(st.sampled_from(sorted(self.live)))
        self.a.release_row(row)
        self.cache.append(self.live.pop(row))

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def abort(self, data):
        row = data.draw(st.sampled_from(sorted(self.live)))
        self.a.release_row(row)
        self.a.free(torch.cat(self.live.pop(row)))

    @precondition(lambda self: self.cache)
    @rule(data=st.data())
    def evict(self, data):
        """The cache frees a history's tail (a leaf), maybe all of it."""
        flat = torch.cat(self.cache.pop(data.draw(st.integers(0, len(self.cache) - 1))))
        cut = data.draw(st.integers(0, flat.numel()))
        self.a.free(flat[cut:])
        if cut:
            self.cache.append([flat[:cut]])

    @invariant()
    def nothing_is_lost(self):
        a = self.a
        assert a.leaks() == [], self.fail(str(a.leaks()))
        free, mapped = a.pool.free_slots(), a.mapped_counts()
        for g in range(self.G):
            assert free[g] + mapped[g] == a.pool.slots[g], self.fail(
                f"group {g}: {free[g]} free + {mapped[g]} mapped != {a.pool.slots[g]}"
            )
        held = sum(t.numel() for h in [*self.live.values(), *self.cache] for t in h)
        assert a.available_size() + held == a.size, self.fail("logical slots leaked")
        assert torch.equal(a.pool.group_lens.long(), a.row_lens), self.fail("lens differ")
        for row in range(1, a.pool.max_requests + 1):
            want = a.compact(torch.cat(self.live[row])) if row in self.live else None
            for g, got in enumerate(a.row_slots(row)):
                expected = want[g] if want is not None else got[:0]
                assert torch.equal(got, expected), self.fail(
                    f"row {row} group {g} attends to {got.tolist()}, its request's logical "
                    f"slots map to {expected.tolist()}"
                )
        assert a.budget.reserved() == (0,) * self.G, self.fail(
            f"reservations {a.budget.reserved()} left after their extends"
        )
        assert not a.budget.overdrawn.any(), self.fail(f"overdrawn {a.budget.overdrawn}")

    def teardown(self):
        if not hasattr(self, "a"):
            return
        for row, history in self.live.items():
            self.a.release_row(row)
            self.a.free(torch.cat(history))
        for history in self.cache:
            self.a.free(torch.cat(history))
        assert (self.a.pool.free_slots(), self.a.available_size()) == self.start, self.fail(
            "freeing every request and the cache did not restore the start"
        )
        assert self.a.leaks() == [], self.fail(str(self.a.leaks()))


AllocatorTrace.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_allocator_ledger_is_exact_under_random_serving_traces = AllocatorTrace.TestCase


@given(
    workload=workloads,
    rule=st.builds(
        BudgetRule, sink=st.integers(0, 4), window=st.integers(0, 16), floor=st.integers(0, 8)
    ),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_session_holds_exactly_budget_session_slots(workload, rule, seed):
    """Turn by turn (reserve the prompt at admission, extend over the previous turns,
    decode the answer), a session holds exactly `budget.session_slots` in every group,
    and each extend consumes exactly what its admission reserved."""
    model = ModelIdentity("test", 2, 4, 2, 2, f"session{seed}")
    layout = PoolLayout.from_profile(
        synthetic_profile(model, 0.3, spread=0.8, seed=seed, max_groups=3)
    )
    turns = workload.turn_shapes()
    expected = session_slots(turns, layout.ratios, rule)
    a = allocator_with(layout, [2 * s for s in expected], rule, workload.raw_tokens, 2)
    G, row, history = layout.num_groups, 1, []
    for t, (new_tokens, answer) in enumerate(turns):
        a.budget.reserve(f"turn {t}", a.budget.prompt_need(new_tokens))
        a.budget.bind(f"turn {t}", row)
        new = a.alloc(new_tokens)
        a.begin_extend([row], [torch.cat([new[:0], *history])], [new])
        assert a.budget.reserved() == (0,) * G and not a.budget.overdrawn.any(), (
            f"seed {seed}: turn {t}'s extend left {a.budget.reserved()} reserved, overdrew "
            f"{a.budget.overdrawn.tolist()}"
        )
        history.append(new)
        for _ in range(answer):  # decode: every group keeps every token
            dec = a.alloc(1)
            a.begin_decode([row], dec)
            history.append(dec)
        so_far = session_slots(turns[: t + 1], layout.ratios, rule)
        assert tuple(a.row_lens[:, row].tolist()) == so_far, (
            f"seed {seed}: after turn {t} the row holds {a.row_lens[:, row].tolist()} slots, "
            f"budget.session_slots says {so_far}"
        )
        a.release_row(row)
    assert a.mapped_counts() == expected, f"seed {seed}: the session maps {a.mapped_counts()}"
    assert a.pool.free_slots() == expected, f"seed {seed}: {a.pool.free_slots()} free"
    assert a.leaks() == [], f"seed {seed}: {a.leaks()}"


def test_eviction_goes_on_past_rounds_that_free_no_group_slot():
    """The front of a compressed segment owns no group slot until the owners move: a tree
    that evicts it first frees logical slots only, and the extend must evict further
    instead of reporting an exhausted pool."""
    seed = random.randrange(10_000)
    model = ModelIdentity("test", 2, 8, 4, 4, f"f{seed}")
    pool = RaggedPool(
        PoolLayout.from_profile(uniform_profile(model, 0.25)), [60], torch.float32, "cpu", 4, 64
    )
    a = TangramAllocator(1_000, TangramKVPool(pool, 1_000), RULE)
    old = a.alloc(200)
    a.begin_extend([1], [old[:0]], [old])  # keeps 2 + 3 + ceil(0.25 * 195) = 54 slots
    a.release_row(1)
    owned = list(old)  # evicted front first, 20 logical slots a round

    def evict(n):
        take = owned[:20]
        del owned[:20]
        if take:
            a.free(torch.stack(take))

    new = a.alloc(40)
    a.begin_extend([2], [new[:0]], [new], evict)
    assert a.leaks() == [], f"seed {seed}: {a.leaks()}"
