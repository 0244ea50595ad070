"""RaggedPool: the storage contract, exact accounting, and budget sizing."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tangram_sglang.budget import BudgetRule, Workload, reserve_turn, session_slots
from tangram_sglang.layout import PoolLayout
from tangram_sglang.pool import PoolExhausted, RaggedPool
from tangram_sglang.profile import ModelIdentity
from tangram_sglang.synthetic import synthetic_profile


def small_profile(seed: int, layers: int = 3, kv_heads: int = 4, head_dim: int = 4, groups=3):
    model = ModelIdentity("test", layers, kv_heads * 2, kv_heads, head_dim, f"t{seed}")
    return synthetic_profile(model, 0.3, spread=0.8, seed=seed, max_groups=groups)


# ---- storage contract ----------------------------------------------------------------


@given(seed=st.integers(0, 10_000), page_size=st.sampled_from([1, 2, 4]))
@settings(max_examples=20, deadline=None)
def test_group_views_tile_the_layer_storage_and_head_tables_address_them(seed, page_size):
    gen = torch.Generator().manual_seed(seed)
    profile = small_profile(seed)
    layout = PoolLayout.from_profile(profile)
    slots = [page_size * int(torch.randint(0, 6, (), generator=gen)) for _ in layout.ratios]
    pool = RaggedPool(profile, slots, torch.float64, "cpu", 2, 8, page_size)
    for layer in range(layout.num_layers):
        storage = pool.k_storage[layer]
        storage.copy_(torch.randn(storage.shape, generator=gen, dtype=torch.float64))
        covered = torch.zeros(storage.shape[0], dtype=torch.int64)
        view = pool.layer_view(layer)
        for g in range(layout.num_groups):
            buf = pool.k_buffer(g, layer)
            members = layout.heads[g][layer]
            assert buf.shape == (slots[g] + page_size, len(members), layout.head_dim)
            if buf.numel():
                start = (buf.data_ptr() - storage.data_ptr()) // storage.element_size()
                covered[
                    start // layout.head_dim : start // layout.head_dim
                    + buf.shape[0] * buf.shape[1]
                ] += 1
            for j, h in enumerate(members):
                assert layout.locate(layer, h) == (g, j)
                s = torch.arange(slots[g] + page_size)
                assert torch.equal(storage[view.head_rows(h, s)], buf[:, j]), (
                    f"head tables disagree with group {g}'s view for (layer {layer}, head {h})"
                )
        assert torch.all(covered == 1), f"layer {layer}: group views do not tile the storage"


def test_write_tokens_stores_every_head_of_every_token_in_its_group():
    gen = torch.Generator().manual_seed(7)
    profile = small_profile(7)
    layout = PoolLayout.from_profile(profile)
    pool = RaggedPool(layout, [8] * layout.num_groups, torch.float64, "cpu", 2, 16)
    row = pool.alloc_row()
    pool.reserve(row, [5] * layout.num_groups)
    slots = pool.next_slots(row, [5] * layout.num_groups)
    k = torch.randn(5, layout.num_kv_heads, layout.head_dim, generator=gen, dtype=torch.float64)
    pool.write_tokens(1, slots, k, -k)
    for h in range(layout.num_kv_heads):
        g, j = layout.locate(1, h)
        assert torch.equal(pool.k_buffer(g, 1)[slots[g], j], k[:, h])
        assert torch.equal(pool.v_buffer(g, 1)[slots[g], j], -k[:, h])


# ---- exact accounting ------------------------------------------------------------------


def snapshot(pool: RaggedPool):
    return (
        pool.free_slots(),
        torch.tensor([pool.reserved_counts(r) for r in range(pool.max_requests + 1)]),
        pool.req_to_slot.clone(),
        pool.group_lens.clone(),
        [a.free_pages.clone() for a in pool.allocators],
    )


def same(a, b) -> bool:
    return (
        a[0] == b[0]
        and torch.equal(a[1], b[1])
        and torch.equal(a[2], b[2])
        and torch.equal(a[3], b[3])
        and all(torch.equal(x, y) for x, y in zip(a[4], b[4], strict=True))
    )


@pytest.mark.parametrize("page_size", [1, 4])
def test_reserve_that_cannot_fit_changes_nothing_and_names_the_group(page_size):
    layout = PoolLayout.from_profile(small_profile(3))
    G = layout.num_groups
    slots = [4 * page_size * (g + 1) for g in range(G)]
    pool = RaggedPool(layout, slots, torch.float32, "cpu", 3, 64, page_size)
    a, b = pool.alloc_row(), pool.alloc_row()
    pool.reserve(a, [2 * page_size] * G)
    before = snapshot(pool)
    counts = [page_size] * G
    counts[G - 1] = slots[G - 1]  # more than the last group has left
    with pytest.raises(
        PoolExhausted,
        match=f"group {G - 1} needs {slots[G - 1]} slots but has "
        f"{slots[G - 1] - 2 * page_size} free",
    ):
        pool.reserve(b, counts)
    assert same(before, snapshot(pool)), "a failed reserve changed the pool"
    pool.check_invariants()


def test_bad_arguments_are_refused_with_a_clear_error():
    layout = PoolLayout.from_profile(small_profile(5))
    G = layout.num_groups
    pool = RaggedPool(layout, [16] * G, torch.float32, "cpu", 2, 16, page_size=4)
    row = pool.alloc_row()
    with pytest.raises(ValueError, match="multiple of page_size 4"):
        pool.reserve(row, [3] * G)
    with pytest.raises(ValueError, match="entries for"):
        pool.reserve(row, [4] * (G + 1))
    with pytest.raises(ValueError, match="not an allocated row"):
        pool.reserve(2, [4] * G)
    pool.reserve(row, [4] * G)
    with pytest.raises(ValueError, match="reserved 4"):
        pool.append(row, [5] * G)
    with pytest.raises(ValueError, match="more than max_context 16"):
        pool.reserve(row, [16] * G)
    pool.append(row, [4] * G)
    with pytest.raises(ValueError, match="no reserved unwritten slot"):
        pool.decode_slots([row])
    with pytest.raises(ValueError, match="slots\\[0\\] = 3"):
        RaggedPool(layout, [3] * G, torch.float32, "cpu", 2, 16, page_size=4)
    twice = dataclasses.replace(layout, heads=(layout.heads[0], *layout.heads))
    with pytest.raises(ValueError, match="exactly one group"):
        RaggedPool(twice, [4] * (G + 1), torch.float32, "cpu", 2, 16, page_size=4)
    pool.check_invariants()


def test_trim_frees_only_whole_unwritten_pages():
    layout = PoolLayout.from_profile(small_profile(11))
    G = layout.num_groups
    pool = RaggedPool(layout, [32] * G, torch.float32, "cpu", 2, 32, page_size=4)
    row = pool.alloc_row()
    pool.reserve(row, [12] * G)
    pool.append(row, [5] * G)  # 5 written: pages 1 and 2 touched, page 3 untouched
    assert pool.trim(row) == (4,) * G
    assert pool.reserved_counts(row) == (8,) * G
    assert pool.free_slots() == (24,) * G
    pool.check_invariants()


class PoolTrace(RuleBasedStateMachine):
    """Random multi-request traces: admit, extend, decode, finish, abort, evict.

    The model (`self.owned`) records the slots each reserve returned, per row and group;
    the pool must agree with it after every step.
    """

    @initialize(page_size=st.sampled_from([1, 4]), seed=st.integers(0, 10_000), data=st.data())
    def build(self, page_size, seed, data):
        layout = PoolLayout.from_profile(small_profile(seed, layers=2, kv_heads=2, head_dim=2))
        slots = [page_size * data.draw(st.integers(2, 10)) for _ in layout.ratios]
        self.pool = RaggedPool(layout, slots, torch.float32, "cpu", 4, 40 * page_size, page_size)
        self.P = page_size
        self.G = layout.num_groups
        self.start = self.pool.free_slots()
        self.owned: dict[int, list[list[int]]] = {}

    def unwritten(self, row: int) -> list[int]:
        reserved, written = self.pool.reserved_counts(row), self.pool.written_counts(row)
        return [r - w for r, w in zip(reserved, written, strict=True)]

    def try_reserve(self, row: int, counts: list[int]) -> bool:
        before = snapshot(self.pool)
        try:
            new = self.pool.reserve(row, counts)
        except PoolExhausted:
            assert any(c > f for c, f in zip(counts, before[0], strict=True))
            assert same(before, snapshot(self.pool)), "a failed reserve changed the pool"
            return False
        for g, slots in enumerate(new):
            assert slots.numel() == counts[g], f"group {g}: reserve returned a wrong count"
            self.owned[row][g] += slots.tolist()
        return True

    @rule()
    def admit(self):
        if self.pool.available_rows():
            self.owned[self.pool.alloc_row()] = [[] for _ in range(self.G)]

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def extend(self, data):
        row = data.draw(st.sampled_from(sorted(self.owned)))
        if self.try_reserve(row, [self.P * data.draw(st.integers(0, 4)) for _ in range(self.G)]):
            self.pool.append(row, [data.draw(st.integers(0, u)) for u in self.unwritten(row)])

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def decode(self, data):
        rows = data.draw(st.lists(st.sampled_from(sorted(self.owned)), min_size=1, unique=True))
        ready = [
            row
            for row in rows
            if self.try_reserve(row, [0 if u else self.P for u in self.unwritten(row)])
        ]
        if ready:
            expected = torch.stack(
                [torch.cat(self.pool.next_slots(r, [1] * self.G)) for r in ready]
            )
            assert torch.equal(self.pool.decode_slots(ready), expected.T), "decode_slots"
            self.pool.append_decode(ready)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def finish(self, data):
        """The turn ends (maybe before its budget): trim, then free the row."""
        row = data.draw(st.sampled_from(sorted(self.owned)))
        before = self.pool.reserved_counts(row)
        freed = self.pool.trim(row)
        after = self.pool.reserved_counts(row)
        assert [b - a for b, a in zip(before, after, strict=True)] == list(freed)
        written = self.pool.written_counts(row)
        for g in range(self.G):
            tail = self.pool.req_to_slot[g, row, written[g] : after[g]]
            assert tail.numel() < self.P and not (tail % self.P == 0).any(), (
                f"group {g}: trim kept a whole unwritten page"
            )
            self.owned[row][g] = self.owned[row][g][: after[g]]
        self.accounting_is_exact()
        self.pool.free_row(row)
        del self.owned[row]

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def abort(self, data):
        row = data.draw(st.sampled_from(sorted(self.owned)))
        self.pool.free_row(row)
        del self.owned[row]

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def evict(self, data):
        row = data.draw(st.sampled_from(sorted(self.owned)))
        self.pool.release(row)
        self.owned[row] = [[] for _ in range(self.G)]

    @invariant()
    def accounting_is_exact(self):
        self.pool.check_invariants()
        for g in range(self.G):
            owned = [s for row in self.owned for s in self.owned[row][g]]
            assert len(owned) == len(set(owned)), f"group {g}: a slot is owned twice"
            assert self.pool.free_slots()[g] == self.start[g] - len(owned), (
                f"group {g}: free count {self.pool.free_slots()[g]} != start {self.start[g]} "
                f"- owned {len(owned)}"
            )
            for row in self.owned:
                reserved = self.pool.reserved_counts(row)[g]
                table = self.pool.req_to_slot[g, row, :reserved].tolist()
                assert table == self.owned[row][g], f"group {g} row {row}: reservation order"

    def teardown(self):
        if not hasattr(self, "pool"):
            return
        for row in list(self.owned):
            self.pool.free_row(row)
        assert self.pool.free_slots() == self.start, "free counts did not return to start"
        self.pool.check_invariants()


PoolTrace.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_accounting_is_exact_under_random_traces = PoolTrace.TestCase


# ---- budget ----------------------------------------------------------------------------

workloads = st.builds(
    Workload,
    context=st.integers(0, 400),
    turns=st.integers(1, 4),
    user_tokens=st.integers(0, 60),
    answer_tokens=st.integers(1, 30),
)
rules = st.builds(
    BudgetRule,
    sink=st.integers(0, 4),
    window=st.integers(0, 16),
    floor=st.integers(0, 8),
    page_size=st.sampled_from([1, 4, 16]),
)


@given(workload=workloads, rule=rules, seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_a_session_holds_exactly_budget_session_slots(workload, rule, seed):
    profile = small_profile(seed, layers=2, kv_heads=2, head_dim=2)
    ratios = profile.group_ratios()
    turns = workload.turn_shapes()
    expected = session_slots(turns, ratios, rule)
    pool = RaggedPool(
        profile, [2 * s for s in expected], torch.float32, "cpu", 2, max(expected), rule.page_size
    )
    row = pool.alloc_row()
    written = 0
    for new_tokens, answer in turns:
        reservation = reserve_turn(new_tokens, answer, ratios, rule)
        pool.reserve(row, reservation.slots)
        pool.append(row, reservation.kept)  # extend writes exactly the kept tokens
        for _ in range(answer):  # decode: every group keeps every token
            pool.decode_slots([row])
            pool.append_decode([row])
        written += answer
    assert pool.reserved_counts(row) == expected, "held slots differ from budget.session_slots"
    kept = [
        sum(reserve_turn(n, a, ratios, rule).kept[g] for n, a in turns) for g in range(len(ratios))
    ]
    assert pool.written_counts(row) == tuple(k + written for k in kept)
    assert pool.free_slots() == expected
    pool.check_invariants()


@given(
    seed=st.integers(0, 10_000),
    page_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(200_000, 4_000_000),
    workload=workloads,
    rule=rules,
    dtype=st.sampled_from([torch.float16, torch.float32]),
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_from_budget_fits_the_budget_and_groups_run_out_together(
    seed, page_size, budget, workload, rule, dtype
):
    profile = small_profile(seed, layers=4, kv_heads=4, head_dim=8, groups=4)
    layout = PoolLayout.from_profile(profile)
    rule = BudgetRule(rule.sink, rule.window, rule.floor, page_size)
    demand = session_slots(workload.turn_shapes(), layout.ratios, rule)
    pool = RaggedPool.from_budget(profile, budget, dtype, "cpu", 2, 8, page_size, demand=demand)
    nbytes = torch.empty((), dtype=dtype).element_size()
    slot_bytes = [layout.slot_bytes(g, nbytes) for g in range(layout.num_groups)]
    allocated = sum(t.numel() * t.element_size() for t in pool.k_storage + pool.v_storage)
    assert pool.total_bytes() == allocated == sum(pool.bytes_per_group())
    assert pool.total_bytes() <= budget, f"{pool.total_bytes()} bytes > budget {budget}"
    assert budget - pool.total_bytes() <= 2 * page_size * sum(slot_bytes), "budget left unused"
    assert pool.bytes_per_group() == tuple(
        (s + page_size) * b for s, b in zip(pool.slots, slot_bytes, strict=True)
    )
    fits = pool.sessions_that_fit(demand)
    assume(fits > 0)
    for g, (s, d) in enumerate(zip(pool.slots, demand, strict=True)):
        assert s - fits * d < d + page_size, (
            f"group {g} has {s - fits * d} idle slots when the first group runs out "
            f"(one session is {d}, one page {page_size}): groups do not run out together"
        )
    assert pool.describe()["bytes_per_group"] == list(pool.bytes_per_group())


@given(
    seed=st.integers(0, 10_000),
    page_size=st.sampled_from([1, 16]),
    budget=st.integers(1_000_000, 8_000_000),
)
@settings(max_examples=20, deadline=None)
def test_default_demand_runs_groups_out_together_in_logical_tokens(seed, page_size, budget):
    profile = small_profile(seed, layers=4, kv_heads=4, head_dim=8, groups=4)
    pool = RaggedPool.from_budget(profile, budget, torch.float16, "cpu", 2, 8, page_size)
    ratios = pool.layout.ratios
    tokens = [s / r for s, r in zip(pool.slots, ratios, strict=True)]
    spread = max(tokens) - min(tokens)
    assert spread <= page_size / min(ratios) + 1e-6, (
        f"logical tokens that fit per group {tokens} differ by more than one page"
    )
    assert min(pool.slots) > 0, f"a group got no slots: {pool.slots}"
