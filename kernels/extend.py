"""Extend attention: new tokens over the compressed ragged prefix plus themselves (causal).

One pass with an online softmax: a program owns BLOCK_M new tokens of one request and
one q head; it first walks the prefix of the head's group (`req_to_slot[g, r,
:group_lens[g, r]]`, the lengths before this chunk is written), then the request's new
tokens j <= i straight from the chunk's scratch `k_new`/`v_new` (DESIGN 3: the new
chunk's full KV never touches the pool before compression). With an FP8 pool the prefix is
read dequantized and the new tokens unquantized, as SGLang's Triton extend does. The grid is
(ceil(max_extend_len / BLOCK_M), Hq, B); tiles past a request's length do nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from tangram_sglang.kernels.decode import LOG2E, interpreting
from tangram_sglang.kernels.online_softmax import load_ragged_kv, online_update

from tangram_sglang.memory.ragged_kv import RaggedKV


@triton.jit
def _extend_kernel(
    Q,
    KNew,
    VNew,
    K,
    V,
    Out,
    LseOut,
    HeadGroup,
    HeadBase,
    HeadStride,
    ReqToSlot,
    GroupLens,
    ReqRows,
    ExtendLens,
    ExtendStarts,
    qk_scale,
    k_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_kr,
    stride_vr,
    stride_ot,
    stride_oh,
    stride_rs_g,
    stride_rs_r,
    stride_gl_g,
    num_q_heads,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    m_block = tl.program_id(0)
    hq = tl.program_id(1)
    b = tl.program_id(2)
    n_new = tl.load(ExtendLens + b)
    if m_block * BLOCK_M < n_new:
        t0 = tl.load(ExtendStarts + b).to(tl.int64)
        h = hq // GQA
        g = tl.load(HeadGroup + h).to(tl.int64)
        base = tl.load(HeadBase + h).to(tl.int64)
        stride = tl.load(HeadStride + h).to(tl.int64)
        r = tl.load(ReqRows + b).to(tl.int64)
        prefix = tl.load(GroupLens + g * stride_gl_g + r)

        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < n_new
        if BLOCK_D == HEAD_DIM:  # noqa: SIM108  (all-true constant: 16-byte vector loads)
            mask_d = tl.full([BLOCK_D], 1, tl.int1)
        else:
            mask_d = offs_d < HEAD_DIM
        q = tl.load(
            Q + (t0 + offs_m)[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        slot_ptr = ReqToSlot + g * stride_rs_g + r * stride_rs_r
        for n0 in range(0, prefix, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < prefix
            k, v = load_ragged_kv(
                K, V, slot_ptr, base, stride, stride_kr, stride_vr, offs_n, mask_n, offs_d, mask_d
            )
            m_i, l_i, acc = online_update(
                q, k, v, mask_n[None, :], m_i, l_i, acc, qk_scale * k_scale, v_scale, DOT_F32
            )

        causal_end = tl.minimum(n_new, (m_block + 1) * BLOCK_M)
        for n0 in range(0, causal_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < causal_end
            kv_mask = mask_n[:, None] & mask_d[None, :]
            tok = (t0 + offs_n)[:, None]
            k = tl.load(
                KNew + tok * stride_knt + h * stride_knh + offs_d[None, :], mask=kv_mask, other=0.0
            )
            v = tl.load(
                VNew + tok * stride_vnt + h * stride_vnh + offs_d[None, :], mask=kv_mask, other=0.0
            )
            keep = mask_n[None, :] & (offs_n[None, :] <= offs_m[:, None])
            m_i, l_i, acc = online_update(q, k, v, keep, m_i, l_i, acc, qk_scale, 1.0, DOT_F32)

        o = acc / l_i[:, None]
        tl.store(
            Out + (t0 + offs_m)[:, None] * stride_ot + hq * stride_oh + offs_d[None, :],
            o.to(Out.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )
        if WRITE_LSE:
            tl.store(
                LseOut + (t0 + offs_m) * num_q_heads + hq,
                (m_i + tl.log2(l_i)) * 0.6931471805599453,
                mask=mask_m,
            )


def serving_launch(max_extend_len: int, element_size: int) -> dict[str, int]:
    """The launch the serving backend uses for an extend batch. Measured on the H100 at the
    parity load's shapes (bench/extend_kernels.py, bench/results/gpu-2026-12-06c-h100.md,
    bf16, Qwen3-4B layer): two pipeline stages beat one at every point (1.13-1.45x stock's
    kernel against 1.02-1.34x), and 128-row query blocks win where rows are short and
    prefixes long (<= 256 new tokens: 1.71-1.73x) but lose on long chunks. fp32 keeps the
    single-stage 64-row launch, whose shared memory fits every card."""
    if element_size > 2:
        return {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 1}
    block_m = 128 if max_extend_len <= 256 else 64
    return {"block_m": block_m, "block_n": 64, "num_warps": 4, "num_stages": 2}


def extend_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    extend_lens: torch.Tensor,
    kv: RaggedKV,
    req_rows: torch.Tensor,
    sm_scale: float,
    max_extend_len: int,
    extend_starts: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 1,
) -> torch.Tensor:
    """q `[T, Hq, D]`, k_new/v_new `[T, Hkv, D]` (requests' tokens concatenated in order),
    `extend_lens` `[B]` and `req_rows` `[B]` on the device; `max_extend_len` is the host's
    max of `extend_lens` (it sizes the grid). `extend_starts` `[B]` defaults to the
    exclusive cumsum of `extend_lens`. Returns out `[T, Hq, D]`; `lse` `[T, Hq]` fp32 if
    given receives the natural-log log-sum-exp.
    """
    if q.dim() != 3 or k_new.dim() != 3 or v_new.shape != k_new.shape:
        raise ValueError(
            f"q must be [T, Hq, D] and k_new/v_new [T, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k_new.shape)}, {tuple(v_new.shape)}"
        )
    total, hq, dim = q.shape
    hkv = kv.head_group.shape[0]
    if k_new.shape != (total, hkv, dim):
        raise ValueError(f"k_new must be [{total}, {hkv}, {dim}], got {tuple(k_new.shape)}")
    if hq % hkv:
        raise ValueError(f"q has {hq} heads, not a multiple of {hkv} kv heads")
    if kv.k.shape[1] != dim or kv.v.shape != kv.k.shape:
        raise ValueError(f"kv.k/kv.v must be [rows, {dim}], got {tuple(kv.k.shape)}")
    if extend_lens.shape != req_rows.shape or extend_lens.dim() != 1:
        raise ValueError("extend_lens and req_rows must both be [B]")
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("kv.k", kv.k), ("kv.v", kv.v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    if max_extend_len < 0:
        raise ValueError(f"max_extend_len {max_extend_len} is negative")
    if out is None:
        out = torch.empty_like(q)
    if lse is not None and (lse.shape != (total, hq) or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous [{total}, {hq}] tensor")
    batch = extend_lens.shape[0]
    if batch == 0 or total == 0 or max_extend_len == 0:
        return out
    if extend_starts is None:
        extend_starts = torch.cumsum(extend_lens, 0) - extend_lens
    grid = (triton.cdiv(max_extend_len, block_m), hq, batch)
    _extend_kernel[grid](
        q,
        k_new,
        v_new,
        kv.k,
        kv.v,
        out,
        lse if lse is not None else out,
        kv.head_group,
        kv.head_base,
        kv.head_stride,
        kv.req_to_slot,
        kv.group_lens,
        req_rows,
        extend_lens,
        extend_starts,
        sm_scale * LOG2E,
        kv.k_scale,
        kv.v_scale,
        q.stride(0),
        q.stride(1),
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        kv.k.stride(0),
        kv.v.stride(0),
        out.stride(0),
        out.stride(1),
        kv.req_to_slot.stride(0),
        kv.req_to_slot.stride(1),
        kv.group_lens.stride(0),
        hq,
        GQA=hq // hkv,
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_F32=interpreting(),
        WRITE_LSE=lse is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
