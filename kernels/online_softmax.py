"""Triton building blocks shared by the decode and extend kernels: one tile of ragged K/V
read through a head's group slots, and the fp32 online-softmax update (base 2), which also
reads FP8 K/V."""

import triton
import triton.language as tl


@triton.jit
def load_ragged_kv(
    K, V, slot_ptr, base, stride, stride_kr, stride_vr, offs_n, mask_n, offs_d, mask_d
):
    """K/V rows `base + slot * stride` of the tile's slots (`slot_ptr[offs_n]`)."""
    slot = tl.load(slot_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    row = base + slot * stride
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + row[:, None] * stride_kr + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + row[:, None] * stride_vr + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def online_update(q, k, v, keep, m_i, l_i, acc, qk_scale, v_scale, DOT_F32: tl.constexpr):
    """Fold one K/V tile into the running (max, sum, acc); `keep` masks [rows, tile].

    K/V may be stored narrower than q (FP8): they are widened to q's dtype (exact for
    e4m3/e5m2 into fp16/bf16/fp32), their scales folded into `qk_scale` (K) and into the
    probabilities the values are weighted with (`v_scale`; the softmax sum stays unscaled).
    """
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot((p * v_scale).to(v.dtype), v)
    return m_new, l_i, acc
