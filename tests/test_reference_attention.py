"""Reference ragged attention: with every head keeping everything it is dense attention;
with groups keeping different tokens each head attends over exactly its group's tokens."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pool_rows import fill_row, set_row, take_pages

from tangram_sglang.attention.reference import dense_attention, ragged_decode, ragged_extend
from tangram_sglang.memory.budget import pages
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.offline.profile import HeadGroup, ModelIdentity, Profile, uniform_profile

F64 = torch.float64


def grouped_profile(
    rng: np.random.Generator, layers: int, kv_heads: int, gqa: int, head_dim: int, groups: int
) -> Profile:
    """Every head keeps everything (ratio 1); heads land in random groups, so a group has
    a different number of heads in each layer (some none)."""
    model = ModelIdentity("test", layers, kv_heads * gqa, kv_heads, head_dim, "ragged")
    owner = rng.integers(0, groups, size=layers * kv_heads)
    owner[rng.permutation(owner.size)[:groups]] = np.arange(groups)  # no group is empty
    pairs = [(layer, head) for layer in range(layers) for head in range(kv_heads)]
    members = [tuple(p for p, o in zip(pairs, owner, strict=True) if o == g) for g in range(groups)]
    base = uniform_profile(model, 1.0)
    return dataclasses.replace(
        base, groups=tuple(HeadGroup(g, 1.0, m) for g, m in enumerate(members))
    )


def filled_pool(rng, gen, profile, lengths, page_size):
    """A pool where request b holds `lengths[b]` tokens in every group, in two chunks of
    pages (every request's first chunk is taken before any second one) after scratch
    pages took a different amount per group (so slot numbers differ between groups and
    between a request's chunks). Returns the pool, the rows and the dense K/V per request
    `[layer][b] -> [n, Hkv, D]`."""
    m = profile.model
    G = profile.num_groups
    need = sum(pages(n, page_size) + 1 for n in lengths) * page_size
    pool = RaggedPool(
        profile,
        [need + 8 * page_size] * G,
        F64,
        "cpu",
        len(lengths) + 1,
        max(lengths + [8 * page_size]) + page_size,
        page_size,
    )
    for g in range(G):
        take_pages(pool, g, page_size * int(rng.integers(0, 8)))  # scratch
    rows = list(range(1, len(lengths) + 1))
    first = [page_size * int(rng.integers(0, pages(n, page_size) + 1)) for n in lengths]
    chunks = [[take_pages(pool, g, c) for g in range(G)] for c in first]
    for b, (n, c) in enumerate(zip(lengths, first, strict=True)):
        for g in range(G):
            rest = take_pages(pool, g, pages(n, page_size) * page_size - c)
            chunks[b][g] = torch.cat((chunks[b][g], rest))[:n]
    for row, slots in zip(rows, chunks, strict=True):
        set_row(pool, row, slots)
    kv = [
        [
            (
                torch.randn(n, m.num_kv_heads, m.head_dim, generator=gen, dtype=F64),
                torch.randn(n, m.num_kv_heads, m.head_dim, generator=gen, dtype=F64),
            )
            for n in lengths
        ]
        for _ in range(m.num_layers)
    ]
    for b, slots in enumerate(chunks):
        for layer in range(m.num_layers):
            pool.write_tokens(layer, slots, *kv[layer][b])
    return pool, rows, kv


shapes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "gqa": st.sampled_from([1, 2, 4, 8]),
        "kv_heads": st.integers(1, 4),
        "layers": st.integers(1, 3),
        "groups": st.integers(1, 4),
        "head_dim": st.sampled_from([4, 8, 16]),
        "page_size": st.sampled_from([1, 4]),
        "lengths": st.lists(st.integers(0, 40), min_size=1, max_size=4),
    }
)


def setup(shape):
    rng = np.random.default_rng(shape["seed"])
    gen = torch.Generator().manual_seed(shape["seed"])
    groups = min(shape["groups"], shape["layers"] * shape["kv_heads"])
    profile = grouped_profile(
        rng, shape["layers"], shape["kv_heads"], shape["gqa"], shape["head_dim"], groups
    )
    return rng, gen, profile


@given(shape=shapes)
@settings(max_examples=25, deadline=None)
def test_decode_with_every_head_keeping_everything_is_dense_attention(shape):
    rng, gen, profile = setup(shape)
    m = profile.model
    pool, rows, kv = filled_pool(rng, gen, profile, shape["lengths"], shape["page_size"])
    scale = 1 / math.sqrt(m.head_dim)
    for layer in range(m.num_layers):
        q = torch.randn(len(rows), m.num_q_heads, m.head_dim, generator=gen, dtype=F64)
        out, lse = ragged_decode(q, pool.layer_view(layer), rows, scale, return_lse=True)
        for b, (k, v) in enumerate(kv[layer]):
            want, want_lse = dense_attention(q[b : b + 1], k, v, scale, return_lse=True)
            torch.testing.assert_close(
                out[b],
                want[0],
                rtol=1e-12,
                atol=1e-12,
                msg=f"decode output, layer {layer}, request {b}",
            )
            torch.testing.assert_close(
                lse[b],
                want_lse[0],
                rtol=1e-12,
                atol=1e-12,
                msg=f"decode lse, layer {layer}, request {b}",
            )
            if k.shape[0] == 0:
                assert torch.all(out[b] == 0), "an empty row must give a zero output"


@given(shape=shapes, new=st.lists(st.integers(1, 24), min_size=4, max_size=4))
@settings(max_examples=25, deadline=None)
def test_extend_over_pool_prefix_plus_new_tokens_is_dense_causal_attention(shape, new):
    rng, gen, profile = setup(shape)
    m = profile.model
    prefix = shape["lengths"]
    new = new[: len(prefix)]
    pool, rows, kv = filled_pool(rng, gen, profile, prefix, shape["page_size"])
    scale = 1 / math.sqrt(m.head_dim)
    T = sum(new)
    for layer in range(m.num_layers):
        q = torch.randn(T, m.num_q_heads, m.head_dim, generator=gen, dtype=F64)
        k_new = torch.randn(T, m.num_kv_heads, m.head_dim, generator=gen, dtype=F64)
        v_new = torch.randn(T, m.num_kv_heads, m.head_dim, generator=gen, dtype=F64)
        out, lse = ragged_extend(
            q, k_new, v_new, new, pool.layer_view(layer), rows, scale, return_lse=True
        )
        start = 0
        for b, (k, v) in enumerate(kv[layer]):
            seg = slice(start, start + new[b])
            start += new[b]
            want, want_lse = dense_attention(
                q[seg],
                torch.cat((k, k_new[seg])),
                torch.cat((v, v_new[seg])),
                scale,
                causal=True,
                return_lse=True,
            )
            torch.testing.assert_close(
                out[seg],
                want,
                rtol=1e-12,
                atol=1e-12,
                msg=f"extend output, layer {layer}, request {b}",
            )
            torch.testing.assert_close(
                lse[seg],
                want_lse,
                rtol=1e-12,
                atol=1e-12,
                msg=f"extend lse, layer {layer}, request {b}",
            )


@given(seed=st.integers(0, 2**31), gqa=st.sampled_from([1, 2, 4, 8]))
@settings(max_examples=20, deadline=None)
def test_each_head_attends_over_exactly_the_tokens_its_group_kept(seed, gqa):
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    profile = grouped_profile(rng, 2, 4, gqa, 8, 3)
    m, G = profile.model, profile.num_groups
    n = int(rng.integers(1, 40))
    k = torch.randn(m.num_layers, n, m.num_kv_heads, m.head_dim, generator=gen, dtype=F64)
    v = torch.randn(m.num_layers, n, m.num_kv_heads, m.head_dim, generator=gen, dtype=F64)
    kept = [np.sort(rng.permutation(n)[: int(rng.integers(0, n + 1))]) for _ in range(G)]
    pool = RaggedPool(profile, [n] * G, F64, "cpu", 2, n, 1)
    row = 1
    slots = fill_row(pool, row, [len(t) for t in kept])
    for layer in range(m.num_layers):
        for g in range(G):
            heads = list(pool.heads_in(g, layer))
            if heads:
                idx = torch.as_tensor(kept[g], dtype=torch.long)
                pool.write(layer, g, slots[g], k[layer][idx][:, heads], v[layer][idx][:, heads])
    scale = 0.3
    for layer in range(m.num_layers):
        q = torch.randn(1, m.num_q_heads, m.head_dim, generator=gen, dtype=F64)
        out = ragged_decode(q, pool.layer_view(layer), [row], scale)
        for h in range(m.num_kv_heads):
            g = profile.group_of()[layer][h]
            idx = torch.as_tensor(kept[g], dtype=torch.long)
            heads = slice(h * gqa, (h + 1) * gqa)
            want = dense_attention(
                q[:, heads], k[layer][idx][:, h : h + 1], v[layer][idx][:, h : h + 1], scale
            )
            torch.testing.assert_close(
                out[:, heads],
                want,
                rtol=1e-12,
                atol=1e-12,
                msg=f"layer {layer} kv head {h} (group {g})",
            )


def test_bad_shapes_are_refused_before_any_attention():
    rng = np.random.default_rng(0)
    profile = grouped_profile(rng, 1, 2, 2, 8, 2)
    pool = RaggedPool(profile, [4, 4], F64, "cpu", 2, 4)
    view = pool.layer_view(0)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        ragged_decode(torch.zeros(1, 3, 8), view, [1], 1.0)
    with pytest.raises(ValueError, match="req_rows has 2 entries"):
        ragged_decode(torch.zeros(1, 4, 8), view, [1, 2], 1.0)
    with pytest.raises(ValueError, match="do not add up"):
        ragged_extend(
            torch.zeros(3, 4, 8), torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), [2], view, [1], 1.0
        )
