"""RaggedPool: the storage contract, its group allocators, and budget sizing (the request
ledger is TangramAllocator's: tests/test_allocator.py)."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pool_rows import fill_row

from tangram_sglang.memory.budget import BudgetRule, Workload, session_slots
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.profile import ModelIdentity


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
    slots = fill_row(pool, 1, [5] * layout.num_groups)
    k = torch.randn(5, layout.num_kv_heads, layout.head_dim, generator=gen, dtype=torch.float64)
    pool.write_tokens(1, slots, k, -k)
    for h in range(layout.num_kv_heads):
        g, j = layout.locate(1, h)
        assert torch.equal(pool.k_buffer(g, 1)[slots[g], j], k[:, h])
        assert torch.equal(pool.v_buffer(g, 1)[slots[g], j], -k[:, h])


def test_bad_arguments_are_refused_with_a_clear_error():
    layout = PoolLayout.from_profile(small_profile(5))
    G = layout.num_groups
    pool = RaggedPool(layout, [16] * G, torch.float32, "cpu", 2, 16, page_size=4)
    slots = [torch.arange(4, 6)] * G
    k = torch.zeros(2, layout.num_kv_heads, layout.head_dim)
    with pytest.raises(ValueError, match="entries for"):
        pool.write_tokens(0, [*slots, slots[0]], k, k)
    g = next(g for g in range(G) if layout.heads[g][0])
    wrong = torch.zeros(2, len(layout.heads[g][0]) + 1, layout.head_dim)
    with pytest.raises(ValueError, match=f"write\\(layer 0, group {g}\\): k_rows"):
        pool.write(0, g, slots[g], wrong, wrong)
    with pytest.raises(ValueError, match="slots\\[0\\] = 3"):
        RaggedPool(layout, [3] * G, torch.float32, "cpu", 2, 16, page_size=4)
    twice = dataclasses.replace(layout, heads=(layout.heads[0], *layout.heads))
    with pytest.raises(ValueError, match="exactly one group"):
        RaggedPool(twice, [4] * (G + 1), torch.float32, "cpu", 2, 16, page_size=4)
    assert all(not s.any() for s in pool.k_storage + pool.v_storage), "a refused write wrote"


@pytest.mark.parametrize("page_size", [1, 4])
def test_clear_frees_every_slot_and_empties_every_row(page_size):
    layout = PoolLayout.from_profile(small_profile(11))
    G = layout.num_groups
    pool = RaggedPool(layout, [8 * page_size] * G, torch.float32, "cpu", 3, 16, page_size)
    start = pool.free_slots()
    for row in (1, 3):
        fill_row(pool, row, [page_size + 1] * G)
    assert pool.free_slots() == tuple(s - 4 * page_size for s in start)
    pool.clear()
    assert pool.free_slots() == start, f"clear left {pool.free_slots()} of {start} free"
    assert not pool.req_to_slot.any() and not pool.group_lens.any(), "clear left a row"


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
