"""Ragged paged decode attention over head groups, driven by the AOT work table.

Design. The grid is (work items of the layer's AOT table, batch). A work item is
(kv head h, split s of S_h); `S_h` is its group's split count from `AotPlan` for the
batch's bucket. The program reads tokens [s * chunk, min((s + 1) * chunk, len)) of its
head's group length, chunk = round_up(max(ceil(len / S_h), min_chunk), BLOCK_N): the
token range follows from the length alone, so nothing is planned at run time, and since
S_h is proportional to the group ratio every program reads about the same bytes. Slot
ids come from `req_to_slot[g, r]` (token-level, so any page size works), K/V rows from
`head_base[h] + slot * head_stride[h]`. All q heads of the GQA group are handled
together (one [BLOCK_H, D] x [D, BLOCK_N] dot per tile, BLOCK_H >= 16 for the MMA), with
an fp32 online softmax.

A head with one split writes its final output directly. Otherwise each program writes a
partial (o, lse) into a fixed buffer `[B, Hq, max_splits, D]`, and the partials are
combined by log-sum-exp, BLOCK_S of them at a time, so any split count merges with one
compile: by a merge kernel (`merge="kernel"`), or by the last split of the (request, kv
head) to finish, counted by an atomic (`merge="fused"`, one launch per layer; it merges
all q heads of its kv head together). With `pdl`, on Hopper and newer, each launch may
start while the previous one drains (programmatic dependent launch): a program reads the
tables written before the step's first layer (plan, pool, the step's rows and lengths)
before it waits for the previous grid, and only after the wait what the layer's earlier
kernels write (q, K/V, partials); where it lets the next launch start is a launch knob.
The contract: those tables are written before the step's first layer (in serving, by
the forward's set-up).
How to launch is a `DecodeLaunch`; the benchmark's variant sweep picks one. Launch shapes
depend only on the bucket and the batch size, so a decode step can be captured in a CUDA
graph per batch size.

A length of 0 gives a zero output row (every partial is empty, lse = -inf).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from tangram_sglang.kernels.online_softmax import load_ragged_kv, online_update

from tangram_sglang.attention.aot_plan import AotPlan
from tangram_sglang.memory.ragged_kv import RaggedKV

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # a Triton without programmatic dependent launch: pdl is ignored
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)  # jit functions read only constexpr globals
MERGES = ("kernel", "fused")
TRIGGERS = ("start", "wait", "end")  # where a program lets the next PDL launch start


def interpreting() -> bool:
    """Under TRITON_INTERPRET the kernels upcast dot operands: the interpreter's bf16 dot
    is wrong (triton 3.9), and fp32 operands give the same function."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class DecodeLaunch:
    """How to launch decode: tile width, warps and pipeline stages of the split kernel;
    who merges the splits (`kernel`: a second launch; `fused`: the last split to finish);
    partial elements one merge load holds (`merge_tile`, (q head, split, dim) fp32 values:
    the merge kernel takes all the bucket's splits of a row at once where they fit, slicing
    the head dim over programs to make them fit); programmatic dependent launch (`pdl`,
    ignored where the GPU or the interpreter cannot do it) and where a program lets the
    next launch start (`trigger`: at its start, after its wait, or at its end); grid order
    (`batch_fastest`: the grid is (batch, work items), so CTAs start item by item across
    all requests and the table's heaviest splits start first for every request, not only
    for the first ones); a register cap for the split kernel (`max_regs`: more resident
    CTAs per SM, more loads in flight; a grid of one CTA more than fits pays a whole extra
    CTA's time); an L2 prefetch of each program's first `prefetch` tokens of K/V (rounded
    up to whole tiles), issued before the PDL wait (with `pdl` only: it fills the memory
    idle while the previous grid drains and merges; a prefetch only warms L2, so what is
    read after the wait is always current). The field defaults are the 2026-11-23 launch
    (the sweep's legacy variant); `DEFAULT_LAUNCH` is the overall fastest of the H100
    sweep of 2026-11-24 (bench/results/kernels-2026-11-24f), for plans of
    `DEFAULT_WAVES`."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    merge: str = "kernel"
    merge_tile: int = 8192
    pdl: bool = False
    trigger: str = "wait"
    batch_fastest: bool = False
    max_regs: int | None = None
    prefetch: int = 0

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n {self.block_n} must be a power of 2 >= 16")
        if self.merge_tile < 32 or self.merge_tile & (self.merge_tile - 1):
            raise ValueError(f"merge_tile {self.merge_tile} must be a power of 2 >= 32")
        if self.max_regs is not None and not 24 <= self.max_regs <= 255:
            raise ValueError(f"max_regs {self.max_regs} must lie in 24..255")
        if self.prefetch < 0:
            raise ValueError(f"prefetch {self.prefetch} must be >= 0 tokens")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger {self.trigger!r} is not one of {TRIGGERS}")
        if self.merge not in MERGES:
            raise ValueError(f"merge {self.merge!r} is not one of {MERGES}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"num_warps {self.num_warps} / num_stages {self.num_stages} invalid")


DEFAULT_LAUNCH = DecodeLaunch(
    num_stages=4, pdl=True, batch_fastest=True, trigger="start", max_regs=128, prefetch=64
)
# The AOT plan's CTAs per SM for DEFAULT_LAUNCH: at 128 registers 4 of its CTAs fit an SM;
# 3.8 keeps the plan's rounded-up split counts inside that one wave (a CTA past it costs a
# whole extra CTA's time).
DEFAULT_WAVES = 3.8


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    if not HAVE_GDC or interpreting() or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


@dataclass(frozen=True)
class LayerWork:
    """One layer's AOT table on the device, for one bucket."""

    items: torch.Tensor  # [>= num_items, 4] int32: (kv_head, split, head's splits, group)
    num_items: int
    head_splits: torch.Tensor  # [Hkv] int32
    max_splits: int  # partial-buffer stride (the bucket's largest split count)
    block_s: int  # next power of 2 of the bucket's largest split count (merge chunk bound)
    min_chunk: int


class DecodeSchedule:
    """The plan's tables for every bucket, moved to the device once at start-up."""

    def __init__(self, plan: AotPlan, device: torch.device | str) -> None:
        self.plan = plan
        self._layers: list[list[LayerWork]] = []
        for b in range(len(plan.buckets)):
            tables = [plan.table(b, layer) for layer in range(plan.num_layers)]
            width = max(t.num_items for t in tables)
            # Each item carries its head's split count and group, so a program's first
            # load round gives all it needs to find its token range. The group is the
            # plan's: plan and pool come from one layout (TritonPath builds the plan from
            # the pool's), so it equals the pool's head_group.
            items = torch.zeros((plan.num_layers, width, 4), dtype=torch.int32)
            splits = torch.zeros((plan.num_layers, plan.num_kv_heads), dtype=torch.int32)
            for layer, t in enumerate(tables):
                rows = [(h, s, t.head_splits[h], plan.group_of[layer][h]) for h, s in t.items]
                items[layer, : t.num_items] = torch.tensor(rows, dtype=torch.int32)
                splits[layer] = torch.tensor(t.head_splits, dtype=torch.int32)
            items, splits = items.to(device), splits.to(device)
            self._layers.append(
                [
                    LayerWork(
                        items[layer],
                        t.num_items,
                        splits[layer],
                        plan.bucket_max_splits(b),
                        triton.next_power_of_2(max(plan.bucket_max_splits(b), 2)),
                        plan.min_chunk,
                    )
                    for layer, t in enumerate(tables)
                ]
            )

    def layer(self, batch: int, layer: int) -> LayerWork:
        return self._layers[self.plan.bucket(batch)][layer]

    def partial_rows(self, max_batch: int) -> int:
        """(request, q head) rows x splits the partial buffer needs for any batch <= max_batch."""
        plan = self.plan
        candidates = {min(size, max_batch) for size in plan.buckets} | {max_batch}
        need = max(b * plan.bucket_max_splits(plan.bucket(b)) for b in candidates)
        return need * plan.num_q_heads


class DecodeWorkspace:
    """Preallocated partial (o, lse) buffers, so decode allocates nothing per step."""

    def __init__(
        self, schedule: DecodeSchedule, max_batch: int, head_dim: int, device: torch.device | str
    ) -> None:
        rows = schedule.partial_rows(max_batch)
        self.o_part = torch.empty((rows, head_dim), dtype=torch.float32, device=device)
        self.lse_part = torch.empty((rows,), dtype=torch.float32, device=device)
        # Fused merge: arrivals per (request, kv head); the last split resets it to 0.
        self.arrivals = torch.zeros(
            (max_batch * schedule.plan.num_kv_heads,), dtype=torch.int32, device=device
        )
        self.max_batch = max_batch


@triton.jit
def _prefetch_l2(ptrs, keep):
    """`prefetch.global.L2` of each kept pointer's line (a hint: no result, no fault).
    Masked lanes issue nothing: many programs prefetching one line serialize on it."""
    tl.inline_asm_elementwise(
        "{\n\t.reg .pred p;\n\tsetp.ne.s32 p, $2, 0;\n\t@p prefetch.global.L2 [$1];\n\t"
        "mov.u32 $0, 0;\n\t}",
        "=r,l,r",
        [ptrs, keep.to(tl.int32)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _merge_rows(
    OPart,
    LsePart,
    rows_o,
    rows_l,
    mask_r,
    stride_ps,
    stride_ls,
    n_split,
    offs_d,
    mask_d,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LSE_BASE2: tl.constexpr,
    CACHE: tl.constexpr,
):
    """Log-sum-exp merge of `n_split` partials for BLOCK_R rows at once (the fused merge:
    the q heads of one kv head; the merge kernel: one), BLOCK_S splits per load (online),
    so one compile merges any split count and the rows' loads are issued together.
    `rows_o`/`rows_l` `[BLOCK_R]` are each row's split-0 offsets into OPart/LsePart. Empty
    partials (lse = -inf) weigh 0 whatever their stale o holds. Returns (merged rows fp32
    [BLOCK_R, BLOCK_D], natural-log lse or -inf)."""
    offs_s = tl.arange(0, BLOCK_S)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s0 in range(0, n_split, BLOCK_S):
        split = s0 + offs_s
        mask_rs = mask_r[:, None] & (split < n_split)[None, :]
        lse = tl.load(
            LsePart + rows_l[:, None] + split[None, :] * stride_ls,
            mask=mask_rs,
            other=float("-inf"),
            cache_modifier=CACHE,
        )
        o_rows = rows_o[:, None] + split[None, :] * stride_ps
        o = tl.load(
            OPart + o_rows[:, :, None] + offs_d[None, None, :],
            mask=mask_rs[:, :, None] & mask_d[None, None, :],
            other=0.0,
            cache_modifier=CACHE,
        )
        if LSE_BASE2:
            lse = lse * LN2
        m_new = tl.maximum(m, tl.max(lse, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m - m_safe)
        w = tl.where(lse > float("-inf"), tl.exp(lse - m_safe[:, None]), 0.0)
        o = tl.where(w[:, :, None] > 0, o, 0.0)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 1)
        denom = denom * alpha + tl.sum(w, 1)
        m = m_new
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    nonempty = denom > 0
    out = acc / tl.where(nonempty, denom, 1.0)[:, None]
    total = tl.where(nonempty, m_safe + tl.log(tl.where(nonempty, denom, 1.0)), float("-inf"))
    return out, total


@triton.jit
def _store_merged(
    Out,
    LseOut,
    b,
    heads,
    mask_r,
    mask_lse,
    offs_d,
    mask_d,
    out,
    total,
    stride_ob,
    stride_oh,
    num_q_heads,
    WRITE_LSE: tl.constexpr,
):
    """Merged rows `heads` of request b into Out, and their lse where `mask_lse` holds."""
    tl.store(
        Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_r[:, None] & mask_d[None, :],
    )
    if WRITE_LSE:
        tl.store(LseOut + b * num_q_heads + heads, total, mask=mask_lse)


@triton.jit
def _split_kernel(
    Q,
    K,
    V,
    HeadBase,
    HeadStride,
    ReqToSlot,
    GroupLens,
    ReqRows,
    Items,
    OPart,
    LsePart,
    Arrivals,
    Out,
    LseOut,
    qk_scale,
    v_scale,
    stride_qb,
    stride_qh,
    stride_kr,
    stride_vr,
    stride_rs_g,
    stride_rs_r,
    stride_gl_g,
    stride_ob,
    stride_oh,
    num_q_heads,
    num_kv_heads,
    max_splits,
    min_chunk,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_F32: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    USE_PDL: tl.constexpr,
    TRIGGER: tl.constexpr,
    BATCH_FASTEST: tl.constexpr,
    PREFETCH_TILES: tl.constexpr,
    LINES: tl.constexpr,
    LINE_ELEMS: tl.constexpr,
):
    if BATCH_FASTEST:
        b = tl.program_id(0)
        item = tl.program_id(1)
    else:
        item = tl.program_id(0)
        b = tl.program_id(1)
    if USE_PDL and TRIGGER == 0:  # the next launch reads nothing of ours before its wait
        gdc_launch_dependents()
    # The plan's and the pool's tables (written once at start-up) ...
    h = tl.load(Items + item * 4)
    s = tl.load(Items + item * 4 + 1)
    n_split = tl.load(Items + item * 4 + 2)
    g = tl.load(Items + item * 4 + 3).to(tl.int64)
    base = tl.load(HeadBase + h).to(tl.int64)
    stride = tl.load(HeadStride + h).to(tl.int64)
    # ... the step's rows and lengths (written before its first layer) ...
    r = tl.load(ReqRows + b).to(tl.int64)
    length = tl.load(GroupLens + g * stride_gl_g + r)
    chunk = tl.maximum(tl.cdiv(length, n_split), min_chunk)
    chunk = tl.cdiv(chunk, BLOCK_N) * BLOCK_N
    start = s * chunk
    end = tl.minimum(start + chunk, length)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GQA
    if BLOCK_D == HEAD_DIM:  # noqa: SIM108  (all-true constant: 16-byte vector loads)
        mask_d = tl.full([BLOCK_D], 1, tl.int1)
    else:
        mask_d = offs_d < HEAD_DIM
    mask_hd = mask_h[:, None] & mask_d[None, :]
    slot_ptr = ReqToSlot + g * stride_rs_g + r * stride_rs_r
    # While the previous grid drains: the first tiles' K/V lines into L2 (their slots come
    # from req_to_slot, which like the lengths is written before the step's first layer).
    offs_line = tl.minimum(tl.arange(0, LINES) * LINE_ELEMS, HEAD_DIM - 1)
    for t in tl.static_range(PREFETCH_TILES):
        offs_n = start + t * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = offs_n < end
        slot = tl.load(slot_ptr + offs_n, mask=keep, other=0).to(tl.int64)
        row = base + slot * stride
        keep_lines = tl.broadcast_to(keep[:, None], (BLOCK_N, LINES))
        _prefetch_l2(K + row[:, None] * stride_kr + offs_line[None, :], keep_lines)
        _prefetch_l2(V + row[:, None] * stride_vr + offs_line[None, :], keep_lines)
    if USE_PDL:  # ... then what the layer's earlier kernels write
        gdc_wait()
        if TRIGGER == 1:
            gdc_launch_dependents()

    q_heads = h * GQA + offs_h
    q = tl.load(
        Q + b * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_hd,
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k, v = load_ragged_kv(
            K, V, slot_ptr, base, stride, stride_kr, stride_vr, offs_n, mask_n, offs_d, mask_d
        )
        m_i, l_i, acc = online_update(
            q, k, v, mask_n[None, :], m_i, l_i, acc, qk_scale, v_scale, DOT_F32
        )

    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * LN2, float("-inf"))
    if n_split == 1:  # the head's only split: its result is final, nothing to merge
        tl.store(
            Out + b * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=mask_hd,
        )
        if WRITE_LSE:
            tl.store(LseOut + b * num_q_heads + q_heads, lse, mask=mask_h)
    else:
        out_row = (b * num_q_heads + q_heads) * max_splits + s
        if end > start:
            tl.store(OPart + out_row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=mask_hd)
        tl.store(LsePart + out_row, lse, mask=mask_h)
        if FUSED_MERGE:
            # The last of the head's splits to arrive merges all of them (no second launch),
            # all q heads of the kv head together, BLOCK_S partials per load.
            tl.debug_barrier()
            arrived = tl.atomic_add(Arrivals + b * num_kv_heads + h, 1, sem="acq_rel")
            if arrived == n_split - 1:
                offs_r = tl.arange(0, BLOCK_R)
                mask_r = offs_r < GQA
                heads = h * GQA + offs_r
                rows = (b * num_q_heads + heads) * max_splits
                merged, total = _merge_rows(
                    OPart,
                    LsePart,
                    rows * HEAD_DIM,
                    rows,
                    mask_r,
                    HEAD_DIM,
                    1,
                    n_split,
                    offs_d,
                    mask_d,
                    BLOCK_R,
                    BLOCK_S,
                    BLOCK_D,
                    False,
                    ".cg",
                )
                _store_merged(
                    Out,
                    LseOut,
                    b,
                    heads,
                    mask_r,
                    mask_r,
                    offs_d,
                    mask_d,
                    merged,
                    total,
                    stride_ob,
                    stride_oh,
                    num_q_heads,
                    WRITE_LSE,
                )
                tl.atomic_xchg(Arrivals + b * num_kv_heads + h, 0)
    if USE_PDL and TRIGGER == 2:
        gdc_launch_dependents()


@triton.jit
def _merge_kernel(
    OPart,
    LsePart,
    HeadSplits,
    Out,
    LseOut,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ob,
    stride_oh,
    num_q_heads,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNIFORM_SPLITS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    LSE_BASE2: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,
    USE_PDL: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    """One program per (request, q head, BLOCK_D slice of the head dim): slices spread a
    row's partial loads over programs, so a wide BLOCK_S loads all splits at once."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    if USE_PDL and TRIGGER == 0:
        gdc_launch_dependents()
    if UNIFORM_SPLITS > 0:  # noqa: SIM108  (a constexpr branch, as Triton prefers)
        n_split = UNIFORM_SPLITS
    else:
        n_split = tl.load(HeadSplits + hq // GQA)
    if SKIP_SINGLE:  # noqa: SIM108
        fewest = 2  # one split wrote the final output itself
    else:
        fewest = 1
    if USE_PDL:
        gdc_wait()
        if TRIGGER != 0:
            gdc_launch_dependents()
    if n_split >= fewest:
        row = tl.zeros([1], tl.int64) + hq
        first_slice = (tl.zeros([1], tl.int32) + tl.program_id(2)) == 0  # writes the lse
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        out, total = _merge_rows(
            OPart,
            LsePart,
            b * stride_pb + row * stride_ph,
            b * stride_lb + row * stride_lh,
            row >= 0,
            stride_ps,
            stride_ls,
            n_split,
            offs_d,
            mask_d,
            1,
            BLOCK_S,
            BLOCK_D,
            LSE_BASE2,
            "",
        )
        _store_merged(
            Out,
            LseOut,
            b,
            row,
            row >= 0,
            first_slice,
            offs_d,
            mask_d,
            out,
            total,
            stride_ob,
            stride_oh,
            num_q_heads,
            WRITE_LSE,
        )


def merge_shape(block_s: int, tile: int, rows: int, block_d: int) -> tuple[int, int]:
    """(splits, head-dim slice) per merge load of `rows` q heads: all `block_s` splits if
    `tile` elements hold them at a slice of >= 16, else as many as fit the whole dim; at
    least 2 splits."""
    dim = max(16, min(block_d, tile // (rows * block_s)))
    return max(2, min(block_s, tile // (rows * dim))), dim


def _check_decode_args(
    q: torch.Tensor, kv: RaggedKV, req_rows: torch.Tensor, work: LayerWork
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, q_heads, head_dim], got {tuple(q.shape)}")
    hkv = kv.head_group.shape[0]
    if q.shape[1] % hkv:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of {hkv} kv heads")
    if kv.k.dim() != 2 or kv.k.shape[1] != q.shape[2] or kv.v.shape != kv.k.shape:
        raise ValueError(
            f"kv.k/kv.v must both be [rows, {q.shape[2]}], got {tuple(kv.k.shape)} and "
            f"{tuple(kv.v.shape)}"
        )
    if kv.k.stride(1) != 1 or kv.v.stride(1) != 1 or q.stride(2) != 1:
        raise ValueError("q, kv.k and kv.v need a contiguous last dimension")
    if req_rows.shape != (q.shape[0],):
        raise ValueError(f"req_rows must be [{q.shape[0]}], got {tuple(req_rows.shape)}")
    if work.head_splits.shape != (hkv,):
        raise ValueError(f"work table is for {work.head_splits.shape[0]} kv heads, kv has {hkv}")
    if kv.req_to_slot.stride(2) != 1:
        raise ValueError("kv.req_to_slot needs a contiguous last dimension")


def decode_attention(
    q: torch.Tensor,
    kv: RaggedKV,
    req_rows: torch.Tensor,
    sm_scale: float,
    work: LayerWork,
    workspace: DecodeWorkspace,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    launch: DecodeLaunch = DEFAULT_LAUNCH,
) -> torch.Tensor:
    """Ragged decode for one layer: q `[B, Hq, D]` -> out `[B, Hq, D]` (q's dtype).

    `req_rows` `[B]` (int32/int64, on the device) are the request rows in `req_to_slot`;
    `work` is `DecodeSchedule.layer(B, layer)`. `lse` `[B, Hq]` fp32, if given, receives
    the natural-log log-sum-exp (-inf for an empty row). `launch` picks the launch variant
    (`DecodeLaunch`); a fused merge keeps its arrival counters in the workspace (each
    back at 0 after the launch).
    """
    _check_decode_args(q, kv, req_rows, work)
    batch, hq, dim = q.shape
    if batch == 0:
        return q.new_empty(q.shape) if out is None else out
    if batch > workspace.max_batch:
        raise ValueError(f"batch {batch} exceeds the workspace's max_batch {workspace.max_batch}")
    hkv = kv.head_group.shape[0]
    gqa = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    if out.shape != q.shape or out.stride(2) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} with a contiguous last dimension")
    if lse is not None and (lse.shape != (batch, hq) or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous [{batch}, {hq}] tensor")
    if workspace.arrivals.numel() < batch * hkv:
        raise ValueError(f"workspace was sized for another kv head count than {hkv}")
    fused = launch.merge == "fused"
    pdl = launch.pdl and _pdl_supported(q.device)
    pdl_kw = {"launch_pdl": True} if pdl else {}
    regs_kw = {"maxnreg": launch.max_regs} if launch.max_regs and not interpreting() else {}
    block_d = triton.next_power_of_2(dim)
    block_r = triton.next_power_of_2(gqa)
    # The fused merge loads whole rows (its program's head dim is not sliced).
    block_s = max(2, min(work.block_s, launch.merge_tile // (block_r * block_d)))
    ms = work.max_splits
    grid = (batch, work.num_items) if launch.batch_fastest else (work.num_items, batch)
    _split_kernel[grid](
        q,
        kv.k,
        kv.v,
        kv.head_base,
        kv.head_stride,
        kv.req_to_slot,
        kv.group_lens,
        req_rows,
        work.items,
        workspace.o_part,
        workspace.lse_part,
        workspace.arrivals,
        out,
        lse if lse is not None else workspace.lse_part,
        sm_scale * LOG2E * kv.k_scale,
        kv.v_scale,
        q.stride(0),
        q.stride(1),
        kv.k.stride(0),
        kv.v.stride(0),
        kv.req_to_slot.stride(0),
        kv.req_to_slot.stride(1),
        kv.group_lens.stride(0),
        out.stride(0),
        out.stride(1),
        hq,
        hkv,
        ms,
        work.min_chunk,
        GQA=gqa,
        HEAD_DIM=dim,
        BLOCK_D=block_d,
        BLOCK_H=max(16, triton.next_power_of_2(gqa)),
        BLOCK_N=launch.block_n,
        BLOCK_R=block_r,
        BLOCK_S=block_s,
        DOT_F32=interpreting(),
        FUSED_MERGE=fused,
        WRITE_LSE=lse is not None,
        USE_PDL=pdl,
        TRIGGER=TRIGGERS.index(launch.trigger),
        BATCH_FASTEST=launch.batch_fastest,
        PREFETCH_TILES=triton.cdiv(launch.prefetch, launch.block_n) if pdl else 0,
        LINES=triton.next_power_of_2(triton.cdiv(dim * kv.k.element_size(), 128)),
        LINE_ELEMS=128 // kv.k.element_size(),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
        **pdl_kw,
        **regs_kw,
    )
    if not fused:
        merge_s, merge_d = merge_shape(work.block_s, launch.merge_tile, 1, block_d)
        _merge_kernel[(batch, hq, block_d // merge_d)](
            workspace.o_part,
            workspace.lse_part,
            work.head_splits,
            out,
            lse if lse is not None else workspace.lse_part,
            hq * ms * dim,
            ms * dim,
            dim,
            hq * ms,
            ms,
            1,
            out.stride(0),
            out.stride(1),
            hq,
            GQA=gqa,
            HEAD_DIM=dim,
            BLOCK_D=merge_d,
            BLOCK_S=merge_s,
            UNIFORM_SPLITS=0,
            WRITE_LSE=lse is not None,
            LSE_BASE2=False,
            SKIP_SINGLE=True,
            USE_PDL=pdl,
            TRIGGER=TRIGGERS.index(launch.trigger),
            num_warps=4,
            **pdl_kw,
        )
    return out


def merge_partials(
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    head_splits: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    partial_strides: tuple[int, int, int],
    lse_strides: tuple[int, int, int],
    gqa: int,
    max_splits: int,
    uniform_splits: int = 0,
    lse_base2: bool = False,
    merge_tile: int = 8192,
) -> torch.Tensor:
    """Combine split partials by log-sum-exp: out[b, h] = sum_s w_s o[b, h, s] with
    w_s = exp(lse_s - lse), skipping empty splits (lse = -inf); all empty gives 0.

    Strides (in elements) address partial (b, h, s) of `o_part`/`lse_part`, so both this
    module's buffer and FlashInfer's [(b, s), h] outputs merge without a copy. Split
    counts come from `head_splits[h // gqa]`, or `uniform_splits` when > 0; any count up
    to `max_splits` merges, `merge_tile` partial elements per load. `lse_base2`: the partial lse
    are log2 (FlashInfer's); `lse` is always written in natural log.
    """
    batch, hq, dim = out.shape
    if out.stride(2) != 1:
        raise ValueError("out needs a contiguous last dimension")
    if lse is not None and (lse.shape != (batch, hq) or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous [{batch}, {hq}] tensor")
    block_d = triton.next_power_of_2(dim)
    block_s = triton.next_power_of_2(max(max_splits, 2))
    merge_s, merge_d = merge_shape(block_s, merge_tile, 1, block_d)
    _merge_kernel[(batch, hq, block_d // merge_d)](
        o_part,
        lse_part,
        head_splits if head_splits is not None else lse_part,
        out,
        lse if lse is not None else lse_part,
        *partial_strides,
        *lse_strides,
        out.stride(0),
        out.stride(1),
        hq,
        GQA=gqa,
        HEAD_DIM=dim,
        BLOCK_D=merge_d,
        BLOCK_S=merge_s,
        UNIFORM_SPLITS=uniform_splits,
        WRITE_LSE=lse is not None,
        LSE_BASE2=lse_base2,
        SKIP_SINGLE=False,
        USE_PDL=False,
        TRIGGER=1,
        num_warps=4,
    )
    return out
