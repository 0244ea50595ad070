"""write_selected: each head's kept tokens land in its group's slots for the segment,
nothing else changes, and attention then sees exactly the kept tokens."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pool_rows import fill_row, take_pages

from tangram_sglang.attention.reference import dense_attention, ragged_decode
from tangram_sglang.compress.write import write_selected
from tangram_sglang.memory.budget import BudgetRule, kept_tokens, pages
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.profile import ModelIdentity

F64 = torch.float64


def compressed_segment(seed: int, gqa: int = 2, page_size: int = 1):
    """A pool with one row holding one segment's kept_g(T) fresh slots per group (whole
    pages, as the row's table and lengths stand during the segment's forward), the
    segment's K/V, and a random selection of exactly kept_g(T) tokens per head. Returns
    the pool, the row, its slots per group, K, V, the selection and kept_g(T)."""
    gen = torch.Generator().manual_seed(seed)
    model = ModelIdentity("test", 3, 4 * gqa, 4, 8, f"w{seed}")
    profile = synthetic_profile(model, 0.3, spread=0.8, seed=seed, max_groups=3)
    layout = PoolLayout.from_profile(profile)
    rule = BudgetRule(sink=2, window=4, page_size=page_size)
    T = int(torch.randint(1, 60, (), generator=gen))
    kept = [kept_tokens(T, r, rule) for r in layout.ratios]
    slots = [pages(k, page_size) * page_size for k in kept]
    pool = RaggedPool(layout, [2 * s + 4 * page_size for s in slots], F64, "cpu", 2, 64, page_size)
    for storage in pool.k_storage + pool.v_storage:
        storage.fill_(float("nan"))  # poison: anything not written stays NaN
    for g in range(len(slots)):  # another request's pages shift this row's slots
        take_pages(pool, g, page_size * int(torch.randint(0, 4, (), generator=gen)))
    row = 2
    group_slots = fill_row(pool, row, kept)
    k = torch.randn(model.num_layers, T, 4, 8, generator=gen, dtype=F64)
    v = torch.randn(model.num_layers, T, 4, 8, generator=gen, dtype=F64)
    selected = [
        [
            torch.randperm(T, generator=gen)[: kept[layout.locate(layer, h)[0]]].sort().values
            for h in range(4)
        ]
        for layer in range(model.num_layers)
    ]
    return pool, row, group_slots, k, v, selected, kept


@given(seed=st.integers(0, 2**31), page_size=st.sampled_from([1, 4]))
@settings(max_examples=25, deadline=None)
def test_write_selected_places_exactly_the_selected_rows(seed, page_size):
    pool, row, group_slots, k, v, selected, kept = compressed_segment(seed, page_size=page_size)
    layout = pool.layout
    for layer in range(layout.num_layers):
        write_selected(pool, layer, row, k[layer], v[layer], selected[layer], group_slots)
    for layer in range(layout.num_layers):
        view = pool.layer_view(layer)
        written = torch.zeros(view.k.shape[0], dtype=torch.bool)
        for h in range(layout.num_kv_heads):
            g, j = layout.locate(layer, h)
            rows = view.head_rows(h, group_slots[g])
            written[rows] = True
            assert torch.equal(view.k[rows], k[layer, selected[layer][h], h]), (
                f"layer {layer} head {h}: K rows are not the selected tokens in order"
            )
            assert torch.equal(
                pool.v_buffer(g, layer)[group_slots[g], j], v[layer, selected[layer][h], h]
            ), f"layer {layer} head {h}: V"
        for storage in (view.k, view.v):
            assert torch.isnan(storage[~written]).all(), (
                f"layer {layer}: write_selected touched rows outside the selected slots"
            )


@given(seed=st.integers(0, 2**31))
@settings(max_examples=15, deadline=None)
def test_write_selected_rejects_a_head_that_kept_a_different_count(seed):
    pool, row, group_slots, k, v, selected, kept = compressed_segment(seed)
    layout = pool.layout
    layer = seed % layout.num_layers
    T = k.shape[1]
    h = next((h for h in range(layout.num_kv_heads) if len(selected[layer][h]) < T), None)
    if h is None:  # every head kept everything: drop one token instead
        h = 0
        selected[layer][h] = selected[layer][h][1:]
    else:
        missing = [t for t in range(T) if t not in set(selected[layer][h].tolist())]
        selected[layer][h] = torch.cat((selected[layer][h], torch.tensor(missing[:1]))).sort()[0]
    g = layout.locate(layer, h)[0]
    with pytest.raises(ValueError, match=f"layer {layer}, row {row}\\): group {g} .* kv head {h}"):
        write_selected(pool, layer, row, k[layer], v[layer], selected[layer], group_slots)
    assert all(torch.isnan(s).all() for s in pool.k_storage + pool.v_storage), (
        "a rejected write_selected still wrote some rows"
    )


@given(seed=st.integers(0, 2**31), gqa=st.sampled_from([1, 2, 4, 8]))
@settings(max_examples=15, deadline=None)
def test_after_write_selected_each_head_attends_over_its_selected_tokens(seed, gqa):
    pool, row, group_slots, k, v, selected, kept = compressed_segment(seed, gqa=gqa)
    layout = pool.layout
    for layer in range(layout.num_layers):
        write_selected(pool, layer, row, k[layer], v[layer], selected[layer], group_slots)
    gen = torch.Generator().manual_seed(seed + 1)
    scale = 1 / math.sqrt(8)
    for layer in range(layout.num_layers):
        q = torch.randn(1, 4 * gqa, 8, generator=gen, dtype=F64)
        out = ragged_decode(q, pool.layer_view(layer), [row], scale)
        for h in range(4):
            idx = selected[layer][h]
            heads = slice(h * gqa, (h + 1) * gqa)
            want = dense_attention(
                q[:, heads], k[layer, idx, h : h + 1], v[layer, idx, h : h + 1], scale
            )
            torch.testing.assert_close(
                out[:, heads], want, rtol=1e-12, atol=1e-12, msg=f"layer {layer} kv head {h}"
            )
