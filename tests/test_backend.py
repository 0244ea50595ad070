"""Attention backend `tangram` (torch path) against the float64 reference ragged attention,
and what it stores: each head's kept tokens of a compressed segment, in order."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from backend_fakes import fake_batch, fake_layer, fake_runner
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from test_allocator import RULE, make_allocator

from tangram_sglang.attention.backend import TangramAttnBackend
from tangram_sglang.attention.reference import ragged_decode, ragged_extend
from tangram_sglang.compress.base import forced_mask

HQ, HKV, D = 8, 4, 4


def layer(layer_id: int):
    return fake_layer(layer_id, HQ, HKV, D)


def qkv(tokens: int, gen: torch.Generator):
    def rand(heads):
        return torch.randn(tokens, heads, D, dtype=torch.float64, generator=gen)

    return rand(HQ), rand(HKV), rand(HKV)


def extend_and_check(backend, allocator, rows, prefixes, lens, gen, seed):
    """One extend forward over every layer, checked against `ragged_extend`, then the
    owners of each compressed segment's group slots; returns the new logical slots and
    the state."""
    new = [allocator.alloc(n) for n in lens]
    state = allocator.begin_extend(rows, prefixes, new)
    fb = fake_batch(ForwardMode.EXTEND, rows, state)
    backend.init_forward_metadata(fb)
    pool = allocator.pool
    latest = {}  # (segment, group) -> per slot, the latest kept position over layers/heads
    for layer_id in range(pool.num_layers):
        q, k, v = qkv(sum(lens), gen)
        prefix_lens = pool.group_lens.clone()
        for s in state.segments:
            prefix_lens[:, s.row] = torch.tensor(s.prefix_lens, dtype=torch.int32)
        view = dataclasses.replace(pool.layer_view(layer_id), group_lens=prefix_lens)
        expected = ragged_extend(q, k, v, lens, view, rows, D**-0.5)
        out = backend.forward_extend(
            q.reshape(len(q), -1), k.reshape(len(k), -1), v.reshape(len(v), -1),
            layer(layer_id), fb,
        )  # fmt: skip
        where = f"seed {seed} layer {layer_id}: extend differs from the reference"
        torch.testing.assert_close(
            out.view_as(q), expected, rtol=1e-10, atol=1e-10, msg=lambda m, w=where: f"{w}: {m}"
        )
        check_stored(pool, layer_id, state, k, v, seed, latest)
    for i, s in enumerate(state.segments):
        for g, slots in enumerate(s.slots):
            owner = latest.get((i, g)) if s.compress else None
            if owner is None:  # uncompressed, or no head of the group in any layer
                owner = torch.arange(s.extend_len - len(slots), s.extend_len)
            expected = torch.zeros(s.extend_len, dtype=torch.int64)
            expected[owner] = slots
            mapped = allocator.logical_to_group[g, s.logical]
            assert torch.equal(mapped, expected), (
                f"seed {seed}: segment {i} group {g} maps {mapped.tolist()}, expected each slot "
                f"at its latest kept token {owner.tolist()}"
            )
    return new, state


def check_stored(pool, layer_id, state, k, v, seed, latest):
    """Each head's segment slots hold k_g of its new tokens, ascending, sink + window kept;
    `latest[(segment, group)]` gathers each slot's latest kept position."""
    start = 0
    for i, s in enumerate(state.segments):
        k_seg, v_seg = k[start : start + s.extend_len], v[start : start + s.extend_len]
        start += s.extend_len
        forced = forced_mask(s.extend_len, RULE).nonzero().flatten()
        for g, slots in enumerate(s.slots):
            stored_k = pool.k_buffer(g, layer_id)[slots]
            stored_v = pool.v_buffer(g, layer_id)[slots]
            for j, h in enumerate(pool.heads_in(g, layer_id)):
                match = (stored_k[:, j, None] == k_seg[None, :, h]).all(-1)
                assert (match.sum(1) == 1).all(), f"seed {seed}: stored K is not a new token"
                index = match.int().argmax(1)
                assert (index[1:] > index[:-1]).all(), f"seed {seed}: kept tokens out of order"
                assert torch.isin(forced, index).all() or not s.compress, (
                    f"seed {seed}: head {h} dropped a sink/window token"
                )
                assert torch.equal(stored_v[:, j], v_seg[index, h]), f"seed {seed}: V mismatch"
                before = latest.get((i, g))
                latest[(i, g)] = index if before is None else torch.maximum(before, index)


def test_extend_and_decode_equal_the_reference_over_compressed_prefixes():
    seed = random.randrange(10_000)
    rng = random.Random(seed)  # lengths and cut too: the seed reproduces a failure
    gen = torch.Generator().manual_seed(seed)
    allocator = make_allocator(seed, dtype=torch.float64)
    runner = fake_runner(allocator, HQ)
    backend = TangramAttnBackend(runner, method="snapkv", kernels="torch")
    none = torch.empty(0, dtype=torch.long)
    # Turn 1, one forward: two compressed segments, one too short to compress, one token.
    short = RULE.sink + RULE.window
    lens = [rng.randint(12, 30), rng.randint(1, short), rng.randint(12, 30), 1]
    rows = [1, 2, 3, 4]
    first, state = extend_and_check(backend, allocator, rows, [none] * 4, lens, gen, seed)
    assert [s.compress for s in state.segments] == [True, False, True, False]
    assert state.segments[0].kept != (lens[0],) * allocator.pool.num_groups
    # Decode one token for every row.
    for _ in range(2):
        state = allocator.begin_decode(rows, allocator.alloc(len(rows)))
        fb = fake_batch(ForwardMode.DECODE, rows, state)
        backend.init_forward_metadata(fb)
        for layer_id in range(allocator.pool.num_layers):
            q, k, v = qkv(len(rows), gen)
            flat = (x.reshape(len(rows), -1) for x in (q, k, v))
            out = backend.forward_decode(*flat, layer(layer_id), fb)
            expected = ragged_decode(q, allocator.pool.layer_view(layer_id), rows, D**-0.5)
            where = f"seed {seed} layer {layer_id}: decode differs from the reference"
            torch.testing.assert_close(
                out.view_as(q), expected, rtol=1e-10, atol=1e-10, msg=lambda m, w=where: f"{w}: {m}"
            )
    # Turn 2, one forward in fresh rows: request 1's compressed first turn as the prefix; a
    # prefix ending inside request 3's turn (the group slots its logical slots own); the
    # uncompressed turn as the prefix of a short segment.
    cut = rng.randint(1, lens[2] - 1)
    prefixes = [first[0], first[2][:cut], first[1]]
    # 12+ tokens, as in turn 1: at 6 (= short + 1) every group keeps all of them (the rule
    # keeps sink + window, then ceil(ratio * 1) = 1), so nothing would compress.
    lens2 = [rng.randint(12, 20), rng.randint(12, 20), rng.randint(1, short)]
    _, state = extend_and_check(backend, allocator, [5, 6, 7], prefixes, lens2, gen, seed)
    assert [s.compress for s in state.segments] == [True, True, False], f"seed {seed}"
    owned = (allocator.logical_to_group[:, first[2][:cut]] > 0).sum(1)
    assert list(state.segments[1].prefix_lens) == owned.tolist(), f"seed {seed}: cut {cut}"


def test_a_forward_without_its_own_allocation_state_is_refused():
    """The state rides on SGLang's batch: a forward whose batch carries none, another
    batch's (other size or mode), or a state an earlier forward already used is refused."""
    allocator = make_allocator(random.randrange(10_000))
    runner = fake_runner(allocator, HQ)
    backend = TangramAttnBackend(runner, kernels="torch")
    state = allocator.begin_decode([1], allocator.alloc(1))
    refused = {
        "no allocation preceded it": fake_batch(ForwardMode.DECODE, [1]),
        "the state of a decode of 1 requests": fake_batch(ForwardMode.DECODE, [1, 2], state),
        "the state of a decode of 1": fake_batch(ForwardMode.EXTEND, [1], state),
    }
    for reason, batch in refused.items():
        with pytest.raises(RuntimeError, match=reason):
            backend.init_forward_metadata(batch)
    backend.init_forward_metadata(fake_batch(ForwardMode.DECODE, [1], state))
    with pytest.raises(RuntimeError, match="served an earlier forward"):
        backend.init_forward_metadata(fake_batch(ForwardMode.DECODE, [1], state))


def flat(profile, ratio: float):
    """`profile`'s groups with every head and group at one ratio: per-head budgets equal to
    uniform's, on several group pools."""
    heads = tuple(dataclasses.replace(h, reserved=ratio) for h in profile.heads)
    groups = tuple(dataclasses.replace(g, ratio=ratio) for g in profile.groups)
    return dataclasses.replace(profile, heads=heads, groups=groups)


def test_a_flat_profile_stores_and_attends_exactly_as_uniform():
    """Same budget in every head: several group pools must keep the same tokens per head and
    compute the same attention as one uniform pool (the pilot's flat-vs-uniform check)."""
    from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool
    from tangram_sglang.memory.layout import PoolLayout
    from tangram_sglang.memory.pool import RaggedPool
    from tangram_sglang.models.synthetic import synthetic_profile
    from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

    seed = random.randrange(10_000)
    model = ModelIdentity("test", 2, HQ, HKV, D, "flat")
    profiles = {
        "flat": flat(synthetic_profile(model, 0.4, spread=0.8, seed=seed, max_groups=3), 0.3),
        "uniform": uniform_profile(model, 0.3),
    }
    assert profiles["flat"].num_groups > 1, f"seed {seed}: the flat profile has one group"
    rng = random.Random(seed)
    lens = [rng.randint(12, 30) for _ in range(3)]
    outputs, stored = {}, {}
    for name, profile in profiles.items():
        layout = PoolLayout.from_profile(profile)
        pool = RaggedPool(layout, [300] * layout.num_groups, torch.float64, "cpu", 8, 256)
        allocator = TangramAllocator(400, TangramKVPool(pool, 400), RULE)
        backend = TangramAttnBackend(fake_runner(allocator, HQ), method="snapkv", kernels="torch")
        gen = torch.Generator().manual_seed(seed)
        rows = [1, 2, 3]
        new = [allocator.alloc(n) for n in lens]
        state = allocator.begin_extend(rows, [torch.empty(0, dtype=torch.long)] * 3, new)
        fb = fake_batch(ForwardMode.EXTEND, rows, state)
        backend.init_forward_metadata(fb)
        outs = []
        for layer_id in range(pool.num_layers):
            q, k, v = qkv(sum(lens), gen)
            flat_args = (x.reshape(len(x), -1) for x in (q, k, v))
            outs.append(backend.forward_extend(*flat_args, layer(layer_id), fb))
        state = allocator.begin_decode(rows, allocator.alloc(len(rows)))
        fb = fake_batch(ForwardMode.DECODE, rows, state)
        backend.init_forward_metadata(fb)
        for layer_id in range(pool.num_layers):
            q, k, v = qkv(len(rows), gen)
            flat_args = (x.reshape(len(x), -1) for x in (q, k, v))
            outs.append(backend.forward_decode(*flat_args, layer(layer_id), fb))
        outputs[name] = outs
        stored[name] = {
            (layer_id, h, row): pool.k_buffer(g, layer_id)[
                pool.req_to_slot[g, row, : int(allocator.row_lens[g, row])].long()
            ][:, pool.heads_in(g, layer_id).index(h)]
            for layer_id in range(pool.num_layers)
            for h in range(HKV)
            for g in [layout.locate(layer_id, h)[0]]
            for row in rows
        }
    for key, keys in stored["uniform"].items():
        assert torch.equal(stored["flat"][key], keys), f"seed {seed}: (layer, head, row) {key}"
    for a, b in zip(outputs["flat"], outputs["uniform"], strict=True):
        # Equal up to rounding: SDPA over a group's heads is not always bitwise SDPA over
        # all of them (seen at head_dim 4; SmolLM2's shape, head_dim 64, GQA 3, was bitwise).
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
