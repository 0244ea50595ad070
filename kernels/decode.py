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
an fp32 online softmax. Each program writes a partial (o, lse) into a fixed buffer
`[B, Hq, max_splits, D]`; a merge kernel combines the S_h partials of each q head (or,
with `fused_merge`, the last split to finish does, counted by an atomic; measured slower
on the H100 at batch 4, so off by default). Launch shapes depend only on the bucket and
the batch size, so a decode step can be captured in a CUDA graph per batch size.

A length of 0 gives a zero output row (every partial is empty, lse = -inf).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from tangram_sglang.kernels.online_softmax import load_ragged_kv, online_update

from tangram_sglang.plan import AotPlan
from tangram_sglang.ragged_kv import RaggedKV

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def interpreting() -> bool:
    """Under TRITON_INTERPRET the kernels upcast dot operands: the interpreter's bf16 dot
    is wrong (triton 3.9), and fp32 operands give the same function."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class LayerWork:
    """One layer's AOT table on the device, for one bucket."""

    items: torch.Tensor  # [>= num_items, 2] int32: (kv_head, split)
    num_items: int
    head_splits: torch.Tensor  # [Hkv] int32
    max_splits: int  # partial-buffer stride (the bucket's largest split count)
    block_s: int  # merge width: next power of 2 of the plan's max_splits (one compile)
    min_chunk: int


class DecodeSchedule:
    """The plan's tables for every bucket, moved to the device once at start-up."""

    def __init__(self, plan: AotPlan, device: torch.device | str) -> None:
        self.plan = plan
        self._layers: list[list[LayerWork]] = []
        for b in range(len(plan.buckets)):
            tables = [plan.table(b, layer) for layer in range(plan.num_layers)]
            width = max(t.num_items for t in tables)
            items = torch.zeros((plan.num_layers, width, 2), dtype=torch.int32)
            splits = torch.zeros((plan.num_layers, plan.num_kv_heads), dtype=torch.int32)
            for layer, t in enumerate(tables):
                items[layer, : t.num_items] = torch.tensor(t.items, dtype=torch.int32)
                splits[layer] = torch.tensor(t.head_splits, dtype=torch.int32)
            items, splits = items.to(device), splits.to(device)
            self._layers.append(
                [
                    LayerWork(
                        items[layer],
                        t.num_items,
                        splits[layer],
                        plan.bucket_max_splits(b),
                        triton.next_power_of_2(max(plan.max_splits, 2)),
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
def _split_kernel(
    Q,
    K,
    V,
    HeadGroup,
    HeadBase,
    HeadStride,
    ReqToSlot,
    GroupLens,
    ReqRows,
    Items,
    HeadSplits,
    OPart,
    LsePart,
    Arrivals,
    Out,
    LseOut,
    qk_scale,
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
    BLOCK_S: tl.constexpr,
    DOT_F32: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    item = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.load(Items + item * 2)
    s = tl.load(Items + item * 2 + 1)
    n_split = tl.load(HeadSplits + h)
    g = tl.load(HeadGroup + h).to(tl.int64)
    base = tl.load(HeadBase + h).to(tl.int64)
    stride = tl.load(HeadStride + h).to(tl.int64)
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
    q_heads = h * GQA + offs_h
    q = tl.load(
        Q + b * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    slot_ptr = ReqToSlot + g * stride_rs_g + r * stride_rs_r

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        k, v = load_ragged_kv(
            K, V, slot_ptr, base, stride, stride_kr, stride_vr, offs_n, mask_n, offs_d, mask_d
        )
        m_i, l_i, acc = online_update(q, k, v, mask_n[None, :], m_i, l_i, acc, qk_scale, DOT_F32)

    out_row = (b * num_q_heads + q_heads) * max_splits + s
    if end > start:
        o = acc / l_i[:, None]
        tl.store(
            OPart + out_row[:, None] * HEAD_DIM + offs_d[None, :],
            o,
            mask=mask_h[:, None] & mask_d[None, :],
        )
        tl.store(LsePart + out_row, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_h)
    else:
        tl.store(LsePart + out_row, tl.full([BLOCK_H], float("-inf"), tl.float32), mask=mask_h)

    if FUSED_MERGE:
        # The last of the head's splits to arrive merges all of them (no second launch).
        tl.debug_barrier()
        arrived = tl.atomic_add(Arrivals + b * num_kv_heads + h, 1, sem="acq_rel")
        if arrived == n_split - 1:
            first_row = (b * num_q_heads + q_heads) * max_splits
            offs_s = tl.arange(0, BLOCK_S)
            lse = tl.load(
                LsePart + first_row[:, None] + offs_s[None, :],
                mask=mask_h[:, None] & (offs_s[None, :] < n_split),
                other=float("-inf"),
                cache_modifier=".cg",
            )
            m = tl.max(lse, 1)
            m_safe = tl.where(m > float("-inf"), m, 0.0)
            w = tl.where(lse > float("-inf"), tl.exp(lse - m_safe[:, None]), 0.0)
            denom = tl.sum(w, 1)
            merged = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            for s2 in range(0, n_split):
                w_s = tl.sum(tl.where(offs_s[None, :] == s2, w, 0.0), 1)
                o_s = tl.load(
                    OPart + (first_row + s2)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=(mask_h & (w_s > 0))[:, None] & mask_d[None, :],
                    other=0.0,
                    cache_modifier=".cg",
                )
                merged += o_s * w_s[:, None]
            merged = merged / tl.where(denom > 0, denom, 1.0)[:, None]
            tl.store(
                Out + b * stride_ob + q_heads[:, None] * stride_oh + offs_d[None, :],
                merged.to(Out.dtype.element_ty),
                mask=mask_h[:, None] & mask_d[None, :],
            )
            if WRITE_LSE:
                total = tl.where(denom > 0, m_safe + tl.log(denom), float("-inf"))
                tl.store(LseOut + b * num_q_heads + q_heads, total, mask=mask_h)
            tl.atomic_xchg(Arrivals + b * num_kv_heads + h, 0)


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
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNIFORM_SPLITS: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    LSE_BASE2: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    if UNIFORM_SPLITS > 0:  # noqa: SIM108  (a constexpr branch, as Triton prefers)
        n_split = UNIFORM_SPLITS
    else:
        n_split = tl.load(HeadSplits + hq // GQA)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < n_split
    lse = tl.load(
        LsePart + b * stride_lb + hq * stride_lh + offs_s * stride_ls,
        mask=mask_s,
        other=float("-inf"),
    )
    valid = lse > float("-inf")
    m = tl.max(lse, 0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    if LSE_BASE2:
        w = tl.where(valid, tl.exp2(lse - m_safe), 0.0)
    else:
        w = tl.where(valid, tl.exp(lse - m_safe), 0.0)
    o = tl.load(
        OPart + b * stride_pb + hq * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    denom = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(
        Out + b * stride_ob + hq * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
    if WRITE_LSE:
        if LSE_BASE2:
            total = (m_safe + tl.log2(denom)) * 0.6931471805599453
        else:
            total = m_safe + tl.log(denom)
        tl.store(LseOut + b * tl.num_programs(1) + hq, tl.where(denom > 0, total, float("-inf")))


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
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    fused_merge: bool = False,
) -> torch.Tensor:
    """Ragged decode for one layer: q `[B, Hq, D]` -> out `[B, Hq, D]` (q's dtype).

    `req_rows` `[B]` (int32/int64, on the device) are the request rows in `req_to_slot`;
    `work` is `DecodeSchedule.layer(B, layer)`. `lse` `[B, Hq]` fp32, if given, receives
    the natural-log log-sum-exp (-inf for an empty row). `fused_merge`: the last split of
    each (request, kv head) to finish merges the partials in the same launch (an arrival
    counter in the workspace, reset by that split); otherwise a second kernel merges. The
    defaults are the fastest launch variant measured on an H100 (bench/kernels.py
    variant sweep, 2026-11-23: the separate merge kernel beat the fused merge at batch 4).
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
    block_d = triton.next_power_of_2(dim)
    ms = work.max_splits
    _split_kernel[(work.num_items, batch)](
        q,
        kv.k,
        kv.v,
        kv.head_group,
        kv.head_base,
        kv.head_stride,
        kv.req_to_slot,
        kv.group_lens,
        req_rows,
        work.items,
        work.head_splits,
        workspace.o_part,
        workspace.lse_part,
        workspace.arrivals,
        out,
        lse if lse is not None else workspace.lse_part,
        sm_scale * LOG2E,
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
        BLOCK_N=block_n,
        BLOCK_S=work.block_s,
        DOT_F32=interpreting(),
        FUSED_MERGE=fused_merge,
        WRITE_LSE=lse is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not fused_merge:
        merge_partials(
            workspace.o_part,
            workspace.lse_part,
            work.head_splits,
            out,
            lse,
            partial_strides=(hq * ms * dim, ms * dim, dim),
            lse_strides=(hq * ms, ms, 1),
            gqa=gqa,
            max_splits=work.block_s,
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
) -> torch.Tensor:
    """Combine split partials by log-sum-exp: out[b, h] = sum_s w_s o[b, h, s] with
    w_s = exp(lse_s - lse), skipping empty splits (lse = -inf); all empty gives 0.

    Strides (in elements) address partial (b, h, s) of `o_part`/`lse_part`, so both this
    module's buffer and FlashInfer's [(b, s), h] outputs merge without a copy. Split
    counts come from `head_splits[h // gqa]`, or `uniform_splits` when > 0. `lse_base2`:
    the partial lse are log2 (FlashInfer's); `lse` is always written in natural log.
    """
    batch, hq, dim = out.shape
    if out.stride(2) != 1:
        raise ValueError("out needs a contiguous last dimension")
    if lse is not None and (lse.shape != (batch, hq) or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous [{batch}, {hq}] tensor")
    _merge_kernel[(batch, hq)](
        o_part,
        lse_part,
        head_splits if head_splits is not None else lse_part,
        out,
        lse if lse is not None else lse_part,
        *partial_strides,
        *lse_strides,
        out.stride(0),
        out.stride(1),
        GQA=gqa,
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_S=triton.next_power_of_2(max(max_splits, 2)),
        UNIFORM_SPLITS=uniform_splits,
        WRITE_LSE=lse is not None,
        LSE_BASE2=lse_base2,
        num_warps=4,
    )
    return out
