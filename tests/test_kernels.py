"""Ragged attention kernels against the float64 reference (`tangram_sglang.attention.reference`).

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on tiny shapes; with CUDA
the same tests run compiled, on larger shapes and page size 64 too. Every test draws
fresh random inputs (the seed is in the failure message), fills outputs and unwritten
storage with NaN first, and builds its pool through `RaggedPool` with page tables
fragmented across requests (`pool_rows.lay_out_rows`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from pool_rows import lay_out_rows, take_pages  # noqa: E402
from tangram_sglang.kernels.decode import (  # noqa: E402
    DecodeLaunch,
    DecodeSchedule,
    DecodeWorkspace,
    decode_attention,
    merge_partials,
)
from tangram_sglang.kernels.extend import extend_attention, serving_launch  # noqa: E402
from tangram_sglang.kernels.scatter import pack_selection, scatter_selected  # noqa: E402

from tangram_sglang.attention.aot_plan import AotPlan  # noqa: E402
from tangram_sglang.attention.flashinfer_path import FlashInferRaggedDecode, flashinfer_available  # noqa: E402
from tangram_sglang.attention.reference import ragged_decode, ragged_extend  # noqa: E402
from tangram_sglang.compress.write import write_selected  # noqa: E402
from tangram_sglang.memory.layout import PoolLayout  # noqa: E402
from tangram_sglang.memory.pool import RaggedPool  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

DEVICE = "cuda" if CUDA else "cpu"
PAGE_SIZES = (1, 16, 64) if CUDA else (1, 16)
# (head_dim, longest group length, kernel tile) per device: tiny under the interpreter.
DIM, MAX_LEN, BLOCK = (128, 700, 64) if CUDA else (32, 70, 16)
# ||out - ref|| / ||ref|| per q-head row: fp32 accumulation, inputs and output rounded.
TOL = {torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
# Decode launch variants under test: both merges, both grid orders. `pdl` only changes
# compiled code on Hopper and newer, so only the GPU runs it (and a wider tile); the
# benchmark's sweep checks every other variant's output against the first's.
LAUNCHES = {
    "merge-kernel": DecodeLaunch(block_n=BLOCK),
    "merge-kernel-small-tile": DecodeLaunch(block_n=BLOCK, merge_tile=64),
    "fused-merge": DecodeLaunch(block_n=BLOCK, merge="fused", batch_fastest=True),
}
if CUDA:
    LAUNCHES |= {
        "merge-kernel-pdl": DecodeLaunch(block_n=BLOCK, pdl=True, batch_fastest=True),
        "merge-kernel-pdl-start": DecodeLaunch(
            block_n=BLOCK, pdl=True, trigger="start", merge_tile=2048
        ),
        "fused-merge-pdl": DecodeLaunch(block_n=BLOCK, merge="fused", pdl=True),
        "fused-merge-pdl-end": DecodeLaunch(block_n=BLOCK, merge="fused", pdl=True, trigger="end"),
        "n128-w8-fused-pdl": DecodeLaunch(block_n=128, num_warps=8, merge="fused", pdl=True),
        "n32-regs72": DecodeLaunch(block_n=32, num_stages=3, pdl=True, max_regs=72),
        "prefetch-start": DecodeLaunch(block_n=BLOCK, pdl=True, trigger="start", prefetch=40),
        "fused-prefetch": DecodeLaunch(block_n=BLOCK, merge="fused", pdl=True, prefetch=3 * BLOCK),
    }


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
    `spare` tokens of room are left per request and group for a later segment."""
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
    rows = list(range(1, len(lens) + 1))
    held = lay_out_rows(pool, rows, lens, random.shuffle)
    for b in range(len(rows)):
        for layer in range(layout.num_layers):
            for g in range(groups):
                n = lens[b][g]
                heads = len(layout.heads[g][layer])
                pool.write(
                    layer,
                    g,
                    held[b][g],
                    torch.randn(n, heads, layout.head_dim, device=DEVICE),
                    torch.randn(n, heads, layout.head_dim, device=DEVICE),
                )
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


@pytest.mark.parametrize("variant", LAUNCHES)
@pytest.mark.parametrize("gqa", [1, 4, 7, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_decode_matches_reference(gqa: int, dtype: torch.dtype, page: int, variant: str) -> None:
    seed = fresh_seed()
    launch = dataclasses.replace(LAUNCHES[variant], merge_tile=random.choice([32, 256, 8192]))
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
        max_splits=random.choice([4, 16, 1024]),
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
            launch=launch,
        )
        ref, ref_lse = ragged_decode(q, kv, rows, scale, return_lse=True)
        what = f"decode layer {layer} gqa {gqa} {dtype} page {page} {launch} lens {lens}"
        assert_rows_close(out.cpu(), ref.cpu(), TOL[dtype], what, seed)
        got_lse, ref_lse = lse.cpu().double(), ref_lse.cpu()
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(got_lse), empty), f"{what}: lse -inf mismatch, seed {seed}"
        diff = (got_lse[~empty] - ref_lse[~empty]).abs()
        lse_err = float(diff.max()) if diff.numel() else 0.0
        assert lse_err < 2e-2, f"{what}: lse differs by {lse_err}, seed {seed}"


@pytest.mark.parametrize("variant", LAUNCHES)
def test_decode_empty_rows_are_zero_and_splits_beyond_length_are_harmless(variant: str) -> None:
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
            launch=LAUNCHES[variant],
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


def two_group_layout(low: float) -> PoolLayout:
    """One layer, kv head 0 in a group of ratio `low`, kv head 1 in a 100% group."""
    return PoolLayout(1, 2, DIM, (((0,),), ((1,),)), (low, 1.0))


@pytest.mark.parametrize("merge", ["kernel", "fused"])
def test_decode_merges_hundreds_of_splits(merge: str) -> None:
    """At a low kept ratio and a small batch the 100% group gets more than 64 splits (no
    cap); with tiny chunks most of them hold tokens, and merging them BLOCK_S at a time
    still gives the reference (lse included)."""
    seed = fresh_seed()
    layout = two_group_layout(random.uniform(0.05, 0.4))
    plan = AotPlan.build(layout, 8, num_sms=64, waves=8, buckets=(2,), min_chunk=1)
    splits = plan.splits[0][1]
    assert splits > 64, f"the 100% group got only {splits} splits, seed {seed}"
    longest = 80 * BLOCK
    lens = [[random.randint(0, longest // 4), random.randint(longest // 2, longest)], [1, 0]]
    pool, rows = build_pool(layout, lens, 16, torch.float16)
    schedule = DecodeSchedule(plan, DEVICE)
    workspace = DecodeWorkspace(schedule, 2, DIM, DEVICE)
    workspace.o_part.fill_(float("nan"))
    launch = DecodeLaunch(
        block_n=BLOCK,
        merge=merge,
        merge_tile=random.choice([64, 512, 4096, 16384]),
    )
    q = torch.randn(2, 8, DIM, device=DEVICE).half()
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    kv = pool.layer_view(0)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 8), float("nan"), device=DEVICE)
    decode_attention(q, kv, req, 0.3, schedule.layer(2, 0), workspace, out, lse, launch)
    ref, ref_lse = ragged_decode(q, kv, rows, 0.3, return_lse=True)
    what = f"{splits} splits, {launch}, lens {lens}"
    assert_rows_close(out.cpu(), ref.cpu(), TOL[torch.float16], what, seed)
    got, want = lse.cpu().double(), ref_lse.cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{what}: lse -inf, seed {seed}"
    finite = ~torch.isinf(want)
    assert torch.allclose(got[finite], want[finite], atol=2e-2), f"{what}: lse, seed {seed}"
    assert not workspace.arrivals.any(), "arrival counters were not reset"


@pytest.mark.parametrize("gqa", [1, 4])
def test_merge_partials_of_flashinfer_layout(gqa: int) -> None:
    """FlashInfer's layout (virtual request (b, s) at row b * S + s, log2 lse, some splits
    empty): the merge equals the float64 softmax-weighted sum, lse in natural log."""
    seed = fresh_seed()
    batch, hq, splits = random.randint(1, 3), 4 * gqa, random.randint(1, 9)
    o = torch.randn(batch * splits, hq, DIM, device=DEVICE)
    lse2 = torch.randn(batch * splits, hq, device=DEVICE) * 4
    lse2[torch.rand_like(lse2) < 0.3] = float("-inf")
    lse2[0] = float("-inf")  # request 0's first split is empty for every head
    out = torch.full((batch, hq, DIM), float("nan"), device=DEVICE)
    lse = torch.full((batch, hq), float("nan"), device=DEVICE)
    merge_partials(
        o,
        lse2,
        None,
        out,
        lse,
        partial_strides=(splits * hq * DIM, DIM, hq * DIM),
        lse_strides=(splits * hq, 1, hq),
        gqa=gqa,
        max_splits=splits,
        uniform_splits=splits,
        lse_base2=True,
        merge_tile=random.choice([32, 256, 8192]),
    )
    ln = lse2.double().view(batch, splits, hq) * math.log(2)
    w = torch.softmax(ln, dim=1).nan_to_num(0.0)  # all-empty rows: weight 0
    want = (w[..., None] * o.double().view(batch, splits, hq, DIM)).sum(1)
    want_lse = torch.logsumexp(ln, dim=1)
    what = f"gqa {gqa}, {splits} splits"
    assert_rows_close(out.cpu(), want.cpu(), 1e-5, what, seed)
    got = lse.cpu().double()
    assert torch.equal(torch.isinf(got), torch.isinf(want_lse.cpu())), f"{what}: -inf, {seed}"
    finite = ~torch.isinf(got)
    assert torch.allclose(got[finite], want_lse.cpu()[finite], atol=1e-5), f"{what}: lse, {seed}"


@pytest.mark.parametrize("variant", LAUNCHES)
def test_single_split_heads_write_their_output_directly(variant: str) -> None:
    """With one split per head (a large batch on few SMs) the split kernel's result is
    final: the partial buffers stay untouched (NaN here) and the output is exact."""
    seed = fresh_seed()
    layout = random_layout(2, 2, 2, DIM)
    batch = random.randint(2, 4)
    lens = [interesting_lengths(2, 16, MAX_LEN) for _ in range(batch)]
    pool, rows = build_pool(layout, lens, 16, torch.bfloat16)
    plan = AotPlan.build(layout, 8, num_sms=1, waves=1.0, buckets=(4,))
    assert all(s == 1 for row in plan.splits for s in row), plan.splits
    schedule = DecodeSchedule(plan, DEVICE)
    workspace = DecodeWorkspace(schedule, batch, DIM, DEVICE)
    workspace.o_part.fill_(float("nan"))
    workspace.lse_part.fill_(float("nan"))
    q = torch.randn(batch, 8, DIM, device=DEVICE).bfloat16()
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    for layer in range(2):
        kv = pool.layer_view(layer)
        out = torch.full_like(q, float("nan"))
        work = schedule.layer(batch, layer)
        decode_attention(q, kv, req, 0.2, work, workspace, out=out, launch=LAUNCHES[variant])
        what = f"one split per head, layer {layer}, {variant}, lens {lens}"
        assert_rows_close(
            out.cpu(), ragged_decode(q, kv, rows, 0.2).cpu(), TOL[torch.bfloat16], what, seed
        )
    assert workspace.o_part.isnan().all() and workspace.lse_part.isnan().all(), (
        f"a single-split head wrote partials, seed {seed}"
    )


@pytest.mark.parametrize("launch", ["small", "serving"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_extend_matches_reference(gqa: int, page: int, launch: str) -> None:
    """Small blocks (many blocks per row in few tokens), and the launch the backend serves
    with (`serving_launch`: up to 128-row blocks and two stages)."""
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
        **(
            {"block_m": BLOCK, "block_n": BLOCK}
            if launch == "small"
            else serving_launch(max(new), q.element_size())
        ),
    )
    ref, ref_lse = ragged_extend(q, k_new, v_new, new, kv, rows, 0.15, return_lse=True)
    what = f"extend gqa {gqa} {dtype} page {page} prefix {prefix} new {new}"
    assert_rows_close(out.cpu(), ref.cpu(), TOL[dtype], what, seed)
    assert torch.allclose(lse.cpu().double(), ref_lse.cpu(), atol=2e-2), f"{what}: lse, seed {seed}"


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("page", PAGE_SIZES)
def test_kernels_read_fp8_storage_with_the_layers_scales(kv_dtype: torch.dtype, page: int) -> None:
    """An FP8 pool (`--kv-cache-dtype fp8_*`): decode and extend read the stored values
    times the layer's K/V scales, checked against the float64 reference on the dequantized
    values; an extend's own new tokens stay unquantized (SGLang's Triton extend)."""
    seed = fresh_seed()
    dtype = random.choice([torch.float16, torch.bfloat16])
    gqa = random.choice([1, 4])
    hkv = 2
    layout = random_layout(2, hkv, 3, DIM)
    batch = random.randint(2, 4)
    lens = [interesting_lengths(layout.num_groups, page, MAX_LEN) for _ in range(batch)]
    pool, rows = build_pool(layout, lens, page, kv_dtype)
    assert pool.k_storage[0].element_size() == 1
    k_scale, v_scale = (
        random.choice([random.uniform(0.25, 0.7), random.uniform(1.5, 4)]) for _ in "kv"
    )
    req = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    plan = AotPlan.build(layout, hkv * gqa, num_sms=random.randint(1, 6), min_chunk=BLOCK)
    schedule = DecodeSchedule(plan, DEVICE)
    workspace = DecodeWorkspace(schedule, 8, DIM, DEVICE)
    workspace.o_part.fill_(float("nan"))
    what = f"{kv_dtype} q {dtype} gqa {gqa} page {page} scales {k_scale:.3f}/{v_scale:.3f}"
    layer = random.randrange(2)
    kv = pool.layer_view(layer, k_scale, v_scale)
    q = torch.randn(batch, hkv * gqa, DIM, device=DEVICE).to(dtype)
    out = torch.full_like(q, float("nan"))
    launch = random.choice(list(LAUNCHES.values()))
    decode_attention(
        q, kv, req, 0.2, schedule.layer(batch, layer), workspace, out=out, launch=launch
    )
    ref = ragged_decode(q, kv, rows, 0.2)
    assert_rows_close(out.cpu(), ref.cpu(), TOL[dtype], f"decode {what} lens {lens}", seed)

    new = [random.choice([1, BLOCK - 1, BLOCK + 3]) for _ in range(batch)]
    total = sum(new)
    q = torch.randn(total, hkv * gqa, DIM, device=DEVICE).to(dtype)
    k_new = torch.randn(total, hkv, DIM, device=DEVICE).to(dtype)
    v_new = torch.randn(total, hkv, DIM, device=DEVICE).to(dtype)
    out = torch.full_like(q, float("nan"))
    extend_lens = torch.tensor(new, dtype=torch.int32, device=DEVICE)
    extend_attention(
        q, k_new, v_new, extend_lens, kv, req, 0.2, max(new), out=out, block_m=BLOCK, block_n=BLOCK
    )
    ref = ragged_extend(q, k_new, v_new, new, kv, rows, 0.2)
    assert_rows_close(out.cpu(), ref.cpu(), TOL[dtype], f"extend {what} new {new}", seed)
    unscaled = ragged_extend(q, k_new, v_new, new, dataclasses.replace(kv, k_scale=1.0), rows, 0.2)
    # Where the K scale moves the true output by more than the tolerance, the kernel's output
    # must be at least half that far from the unscaled one (the prefix was read scaled).
    gap = (ref.cpu().double() - unscaled.cpu().double()).abs().max()
    if gap > 4 * TOL[dtype]:
        err = (out.cpu().double() - unscaled.cpu().double()).abs().max()
        assert err > gap / 2, (
            f"extend {what}: the prefix was read without its K scale ({err:.4f} from the "
            f"unscaled output, the reference {gap:.4f}), seed {seed}"
        )


@pytest.mark.parametrize("page", PAGE_SIZES)
def test_scatter_writes_what_write_selected_writes(page: int) -> None:
    seed = fresh_seed()
    layout = random_layout(2, 4, 3, DIM)
    t = random.randint(1, 3 * page)
    pool, (row,) = build_pool(
        layout, [[random.randint(0, 2 * page) for _ in range(3)]], page, torch.bfloat16, spare=t
    )
    kept = [random.randint(0, t) for _ in range(3)]
    slots = [take_pages(pool, g, k)[:k] for g, k in enumerate(kept)]  # the new segment's
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
        if any(kept[g] for g in group_of):  # some head of this layer keeps a token
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
    for bad, what in [
        ({"prefetch": -1}, "prefetch"),
        ({"max_regs": 8}, "max_regs"),
        ({"trigger": "late"}, "trigger"),
        ({"block_n": 48}, "block_n"),
    ]:
        with pytest.raises(ValueError, match=what):
            DecodeLaunch(**bad)
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
