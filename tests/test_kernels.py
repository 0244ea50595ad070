"""Ragged attention kernels against the float64 reference (`tangram_sglang.reference`).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on tiny shapes; with CUDA
the same tests run compiled, on larger shapes and page size 64 too. Every test draws
fresh random inputs (the seed is in the failure message), fills outputs and unwritten
storage with NaN first, and builds its pool through `RaggedPool` with page tables
fragmented across requests.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from tangram_sglang.kernels.decode import (  # noqa: E402
    DecodeSchedule,
    DecodeWorkspace,
    decode_attention,
)
from tangram_sglang.kernels.extend import extend_attention  # noqa: E402
from tangram_sglang.kernels.scatter import pack_selection, scatter_selected  # noqa: E402

from tangram_sglang.compress.write import write_selected  # noqa: E402
from tangram_sglang.flashinfer_path import FlashInferRaggedDecode, flashinfer_available  # noqa: E402
from tangram_sglang.layout import PoolLayout  # noqa: E402
from tangram_sglang.plan import AotPlan  # noqa: E402
from tangram_sglang.pool import RaggedPool  # noqa: E402
from tangram_sglang.reference import ragged_decode, ragged_extend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

DEVICE = "cuda" if CUDA else "cpu"
PAGE_SIZES = (1, 16, 64) if CUDA else (1, 16)
# (head_dim, longest group length, kernel tile) per device: tiny under the interpreter.
DIM, MAX_LEN, BLOCK = (128, 700, 64) if CUDA else (32, 70, 16)
# ||out - ref|| / ||ref|| per q-head row: fp32 accumulation, inputs and output rounded.
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


def random_layout(num_layers: int, num_kv_heads: int, groups: int, dim: int) -> PoolLayout:
    """Heads spread over groups differently in each layer (global grouping), so some
    group has several heads in one layer and none in another."""
    heads = [[[] for _ in range(num_layers)] for _ in range(groups)]
    for layer in range(num_layers):
        for h in range(num_kv_heads):
            heads[int(torch.randint(groups, ()))][layer].append(h)
    ratios = sorted(float(r) for r in torch.rand(groups) * 0.9 + 0.1)
    return PoolLayout(
        num_layers,
        num_kv_heads,
        dim,
        tuple(tuple(tuple(hs) for hs in g) for g in heads),
        tuple(ratios),
    )


def interesting_lengths(count: int, page: int, longest: int) -> list[int]:
    """Ragged lengths that include 0, 1, page boundaries and random ones."""
    picks = [0, 1, page - 1, page, page + 1, 2 * page + 1, longest]
    picks = [n for n in picks if 0 <= n <= longest]
    out = [
        random.choice(picks) if random.random() < 0.6 else random.randint(0, longest)
        for _ in range(count)
    ]
    return out


def build_pool(
    layout: PoolLayout, lens: list[list[int]], page: int, dtype: torch.dtype, spare: int = 0
) -> tuple[RaggedPool, list[int]]:
    """Pool whose request b holds `lens[b][g]` written tokens in group g, pages handed
    out in random order across requests (fragmented tables); every unwritten row is NaN.
    `spare` tokens of room are left per request and group for later reservations."""
    groups = layout.num_groups
    spare = -(-spare // page) * page
    pages_needed = [[-(-n // page) for n in row] for row in lens]
    slots = [
        page * (sum(p[g] for p in pages_needed) + 2) + spare * len(lens) for g in range(groups)
    ]
    longest = max([page, *(n for row in lens for n in row)])
    pool = RaggedPool(
        layout,
        slots,
        dtype,
        DEVICE,
        len(lens) + 1,
        -(-longest // page) * page + page + spare,
        page_size=page,
    )
    for storage in pool.k_storage + pool.v_storage:
        storage.fill_(float("nan"))
    rows = [pool.alloc_row() for _ in lens]
    todo = [
        (b, g) for b, need in enumerate(pages_needed) for g in range(groups) for _ in range(need[g])
    ]
    random.shuffle(todo)
    for b, g in todo:
        pool.reserve(rows[b], [page if gg == g else 0 for gg in range(groups)])
    for b, row in enumerate(rows):
        for layer in range(layout.num_layers):
            for g in range(groups):
                n = lens[b][g]
                slots_g = pool.next_slots(row, [n if gg == g else 0 for gg in range(groups)])[g]
                heads = len(layout.heads[g][layer])
                pool.write(
                    layer,
                    g,
                    slots_g,
                    torch.randn(n, heads, layout.head_dim, device=DEVICE),
                    torch.randn(n, heads, layout.head_dim, device=DEVICE),
                )
        pool.append(row, lens[b])
    return pool, rows


def assert_rows_close(
    out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, seed: int
) -> None:
    assert not torch.isnan(out).any(), (
        f"{what}: NaN in the output (unwritten or bad read), seed {seed}"
    )
    err = (out.double() - ref).flatten(0, -2).norm(dim=-1)
    size = ref.flatten(0, -2).norm(dim=-1)
    bad = err > tol * size + 1e-6
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} rows off; worst relative error "
        f"{float((err / size.clamp_min(1e-12)).max()):.3g} > {tol}, seed {seed}"
    )


@pytest.mark.parametrize("fused", [True, False], ids=["fused-merge", "merge-kernel"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_decode_matches_reference(gqa: int, dtype: torch.dtype, page: int, fused: bool) -> None:
    seed = fresh_seed()
    hkv = 4 if gqa == 1 else 2
    layout = random_layout(2, hkv, 3, DIM)
    batch = random.randint(2, 5)
    lens = [interesting_lengths(layout.num_groups, page, MAX_LEN) for _ in range(batch)]
    pool, rows = build_pool(layout, lens, page, dtype)
    plan = AotPlan.build(
        layout,
        hkv * gqa,
        num_sms=random.randint(1, 6),
        waves=random.choice([1.0, 4.0]),
        max_splits=random.choice([4, 16]),
        min_chunk=random.choice([1, BLOCK, 3 * BLOCK]),
    )
    schedule = DecodeSchedule(plan, DEVICE)
    workspace = DecodeWorkspace(schedule, 8, DIM, DEVICE)
    workspace.o_part.fill_(float("nan"))
    q = torch.randn(batch, hkv * gqa, DIM, device=DEVICE).to(dtype)
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    scale = 1 / math.sqrt(DIM)
    for layer in range(layout.num_layers):
        kv = pool.layer_view(layer)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((batch, hkv * gqa), float("nan"), device=DEVICE)
        decode_attention(
            q,
            kv,
            req,
            scale,
            schedule.layer(batch, layer),
            workspace,
            out=out,
            lse=lse,
            block_n=BLOCK,
            fused_merge=fused,
        )
        ref, ref_lse = ragged_decode(q, kv, rows, scale, return_lse=True)
        what = f"decode layer {layer} gqa {gqa} {dtype} page {page} fused {fused} lens {lens}"
        assert_rows_close(out.cpu(), ref.cpu(), TOL[dtype], what, seed)
        got_lse, ref_lse = lse.cpu().double(), ref_lse.cpu()
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(got_lse), empty), f"{what}: lse -inf mismatch, seed {seed}"
        diff = (got_lse[~empty] - ref_lse[~empty]).abs()
        lse_err = float(diff.max()) if diff.numel() else 0.0
        assert lse_err < 2e-2, f"{what}: lse differs by {lse_err}, seed {seed}"


@pytest.mark.parametrize("fused", [True, False], ids=["fused-merge", "merge-kernel"])
def test_decode_empty_rows_are_zero_and_splits_beyond_length_are_harmless(fused: bool) -> None:
    """Length 0 gives zeros; a head with far more splits than tiles still matches; the
    fused merge's arrival counters are back at zero after every launch."""
    seed = fresh_seed()
    layout = random_layout(1, 2, 2, DIM)
    lens = [[0, 0], [1, 3], [0, MAX_LEN]]
    pool, rows = build_pool(layout, lens, 16, torch.float16)
    plan = AotPlan.build(layout, 8, num_sms=64, waves=8, max_splits=32, min_chunk=1)
    schedule = DecodeSchedule(plan, DEVICE)
    workspace = DecodeWorkspace(schedule, 4, DIM, DEVICE)
    q = torch.randn(3, 8, DIM, device=DEVICE).half()
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    kv = pool.layer_view(0)
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        decode_attention(
            q,
            kv,
            req,
            0.2,
            schedule.layer(3, 0),
            workspace,
            out=out,
            block_n=BLOCK,
            fused_merge=fused,
        )
        assert not workspace.arrivals.any(), "arrival counters were not reset"
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu())), f"seed {seed}"
    assert_rows_close(
        out.cpu(),
        ragged_decode(q, kv, rows, 0.2).cpu(),
        TOL[torch.float16],
        "decode with many splits",
        seed,
    )


@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_extend_matches_reference(gqa: int, page: int) -> None:
    seed = fresh_seed()
    dtype = random.choice([torch.float16, torch.bfloat16])
    hkv = 2
    layout = random_layout(1, hkv, 2, DIM)
    batch = random.randint(1, 3)
    prefix = [interesting_lengths(layout.num_groups, page, MAX_LEN) for _ in range(batch)]
    pool, rows = build_pool(layout, prefix, page, dtype)
    new = [random.choice([1, 2, BLOCK - 1, BLOCK + 3, 2 * BLOCK + 5]) for _ in range(batch)]
    total = sum(new)
    q = torch.randn(total, hkv * gqa, DIM, device=DEVICE).to(dtype)
    k_new = torch.randn(total, hkv, DIM, device=DEVICE).to(dtype)
    v_new = torch.randn(total, hkv, DIM, device=DEVICE).to(dtype)
    lens = torch.tensor(new, dtype=torch.int32, device=DEVICE)
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    kv = pool.layer_view(0)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((total, hkv * gqa), float("nan"), device=DEVICE)
    extend_attention(
        q,
        k_new,
        v_new,
        lens,
        kv,
        req,
        0.15,
        max(new),
        out=out,
        lse=lse,
        block_m=BLOCK,
        block_n=BLOCK,
    )
    ref, ref_lse = ragged_extend(q, k_new, v_new, new, kv, rows, 0.15, return_lse=True)
    what = f"extend gqa {gqa} {dtype} page {page} prefix {prefix} new {new}"
    assert_rows_close(out.cpu(), ref.cpu(), TOL[dtype], what, seed)
    assert torch.allclose(lse.cpu().double(), ref_lse.cpu(), atol=2e-2), f"{what}: lse, seed {seed}"


@pytest.mark.parametrize("page", PAGE_SIZES)
def test_scatter_writes_what_write_selected_writes(page: int) -> None:
    seed = fresh_seed()
    layout = random_layout(2, 4, 3, DIM)
    t = random.randint(1, 3 * page)
    pool, (row,) = build_pool(
        layout, [[random.randint(0, 2 * page) for _ in range(3)]], page, torch.bfloat16, spare=t
    )
    kept = [random.randint(0, t) for _ in range(3)]
    pool.reserve(row, [-(-k // page) * page for k in kept])
    slots = pool.next_slots(row, kept)
    layer = random.randrange(2)
    group_of = [layout.locate(layer, h)[0] for h in range(4)]
    selected = [torch.randperm(t)[: kept[group_of[h]]].sort().values for h in range(4)]
    k_new = torch.randn(t, 4, DIM, device=DEVICE).bfloat16()
    v_new = torch.randn(t, 4, DIM, device=DEVICE).bfloat16()
    storages = (pool.k_storage[layer], pool.v_storage[layer])
    before = [s.clone() for s in storages]
    write_selected(pool, layer, row, k_new, v_new, selected, slots)
    expected = [s.clone() for s in storages]
    for s, b in zip(storages, before, strict=True):
        s.copy_(b)
    packed = pack_selection(selected, slots, group_of, DEVICE)
    scatter_selected(pool.layer_view(layer), k_new, v_new, *packed)
    for name, ref, got, old in zip("kv", expected, storages, before, strict=True):
        assert torch.equal(ref.isnan(), got.isnan()), (
            f"{name}: scatter wrote different rows than write_selected, seed {seed}"
        )
        assert torch.equal(ref.nan_to_num(), got.nan_to_num()), (
            f"{name}: scatter wrote different values than write_selected, seed {seed}"
        )
        if sum(kept):
            assert not torch.equal(got.nan_to_num(), old.nan_to_num()), "nothing was written"


def test_bad_arguments_name_the_problem() -> None:
    fresh_seed()
    layout = random_layout(1, 2, 2, DIM)
    pool, rows = build_pool(layout, [[3, 5]], 1, torch.float16)
    plan = AotPlan.build(layout, 4, num_sms=2)
    schedule = DecodeSchedule(plan, DEVICE)
    workspace = DecodeWorkspace(schedule, 2, DIM, DEVICE)
    kv = pool.layer_view(0)
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(
            torch.randn(1, 3, DIM, device=DEVICE).half(),
            kv,
            req,
            1.0,
            schedule.layer(1, 0),
            workspace,
        )
    with pytest.raises(ValueError, match="max_batch"):
        many = torch.randn(3, 4, DIM, device=DEVICE).half()
        decode_attention(many, kv, req.repeat(3), 1.0, schedule.layer(3, 0), workspace)
    with pytest.raises(ValueError, match="req_rows"):
        decode_attention(
            torch.randn(1, 4, DIM, device=DEVICE).half(),
            kv,
            req.repeat(2),
            1.0,
            schedule.layer(1, 0),
            workspace,
        )
    with pytest.raises(ValueError, match="kv head 1 kept"):
        pack_selection([torch.arange(2), torch.arange(3)], [torch.arange(2)], [0, 0], DEVICE)


@pytest.mark.skipif(not flashinfer_available(), reason="FlashInfer path needs CUDA + flashinfer")
@pytest.mark.parametrize("mode", ["replan", "aot"])
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_flashinfer_path_matches_reference(mode: str, page: int) -> None:
    """Plans are made at the first step; later steps with new lengths reuse them (aot)."""
    seed = fresh_seed()
    layout = random_layout(2, 4, 3, DIM)
    batch = 3
    lens = [[random.randint(1, MAX_LEN) for _ in range(3)] for _ in range(batch)]
    pool, rows = build_pool(layout, lens, page, torch.bfloat16)
    plan = AotPlan.build(layout, 16, num_sms=8, waves=2, min_chunk=page)
    capacity = [s + page for s in pool.slots]
    layers = [pool.layer_view(layer) for layer in range(2)]
    fi = FlashInferRaggedDecode(
        layers, plan, capacity, page, batch, pool.max_context, 0.1, mode=mode
    )
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    for step in range(2):
        if step == 1:  # shorter lengths: a reused plan must still cover them exactly
            lens = [[random.randint(1, n) for n in row] for row in lens]
            for b, row in enumerate(rows):
                pool.group_lens[:, row] = torch.tensor(lens[b], dtype=torch.int32)
        fi.prepare(req, torch.tensor(lens).T)
        q = torch.randn(batch, 16, DIM, device=DEVICE).bfloat16()
        for layer in range(2):
            out = torch.full_like(q, float("nan"))
            fi.run(layer, q, out)
            ref = ragged_decode(q, layers[layer], rows, 0.1)
            assert_rows_close(
                out,
                ref,
                TOL[torch.bfloat16],
                f"flashinfer {mode} step {step} layer {layer} lens {lens}",
                seed,
            )
