"""Reference ragged attention in float64 torch: the oracle for the kernels and the backend.

It reads the ragged storage exactly as the contract in `pool.py` states (per-head tables,
`req_to_slot`, `group_lens`) and computes plain softmax attention, one (request, kv head)
at a time (FP8 values dequantized with the layer's scales), so a kernel that disagrees
with it is wrong. Outputs and log-sum-exps are float64; the log-sum-exp is natural-log of
sum_j exp(sm_scale * q . k_j), -inf (with a zero output) where a query sees no key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tangram_sglang.memory.ragged_kv import RaggedKV, dequantize

Rows = Sequence[int] | torch.Tensor


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries `[M, D]` over keys/values `[N, D]`; `mask` `[M, N]`
    says which keys each query sees. Returns output `[M, D]` and log-sum-exp `[M]`."""
    logits = (q @ k.T) * sm_scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    seen = torch.isfinite(lse)
    probs = torch.where(seen[:, None], torch.exp(logits - lse[:, None]), 0.0)
    return probs @ v, lse


def _gqa(q: torch.Tensor, kv: RaggedKV) -> int:
    if q.dim() != 3 or q.shape[2] != kv.head_dim:
        raise ValueError(f"q must be [tokens, q_heads, {kv.head_dim}], got {tuple(q.shape)}")
    if q.shape[1] % kv.num_kv_heads:
        raise ValueError(f"q heads {q.shape[1]} are not a multiple of kv heads {kv.num_kv_heads}")
    return q.shape[1] // kv.num_kv_heads


def _rows(req_rows: Rows, count: int, what: str) -> list[int]:
    rows = [int(r) for r in (req_rows.tolist() if torch.is_tensor(req_rows) else req_rows)]
    if len(rows) != count:
        raise ValueError(f"req_rows has {len(rows)} entries for {count} {what}")
    return rows


def _prefix(kv: RaggedKV, head: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[n, D]` (float64, dequantized) of the written slots of `row` as kv head
    `head` sees them."""
    index = kv.head_rows(head, kv.head_slots(head, row))
    return (
        dequantize(kv.k[index], torch.float64, kv.k_scale),
        dequantize(kv.v[index], torch.float64, kv.v_scale),
    )


def ragged_decode(
    q: torch.Tensor, kv: RaggedKV, req_rows: Rows, sm_scale: float, return_lse: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query token per request `q` `[B, Hq, D]` over each head's written slots.

    Query head i reads kv head i // (Hq // Hkv), whose group g sees
    `req_to_slot[g, r, :group_lens[g, r]]` (the current token already counted). Returns
    `[B, Hq, D]` (and log-sum-exp `[B, Hq]`).
    """
    gqa = _gqa(q, kv)
    rows = _rows(req_rows, q.shape[0], "decode queries")
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64, device=q.device)
    for b, row in enumerate(rows):
        for h in range(kv.num_kv_heads):
            heads = slice(h * gqa, (h + 1) * gqa)
            k, v = _prefix(kv, h, row)
            out[b, heads], lse[b, heads] = _attend(q[b, heads].double(), k, v, sm_scale, None)
    return (out, lse) if return_lse else out


def ragged_extend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    extend_lens: Sequence[int] | torch.Tensor,
    kv: RaggedKV,
    req_rows: Rows,
    sm_scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """New tokens `q` `[T, Hq, D]` (requests concatenated) over each head's compressed
    prefix (`group_lens` not yet counting them) plus the request's new tokens `k_new`/
    `v_new` `[T, Hkv, D]` up to themselves (causal). Returns `[T, Hq, D]` (and `[T, Hq]`)."""
    gqa = _gqa(q, kv)
    lens = [int(x) for x in (extend_lens.tolist() if torch.is_tensor(extend_lens) else extend_lens)]
    rows = _rows(req_rows, len(lens), "extend_lens")
    expected = (q.shape[0], kv.num_kv_heads, kv.head_dim)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if tuple(x.shape) != expected:
            raise ValueError(f"{name} is {tuple(x.shape)}, expected {expected}")
    if any(n < 0 for n in lens) or sum(lens) != q.shape[0]:
        raise ValueError(f"extend_lens {lens} do not add up to the {q.shape[0]} new tokens")
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float64, device=q.device)
    start = 0
    for row, n in zip(rows, lens, strict=True):
        seg = slice(start, start + n)
        start += n
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        for h in range(kv.num_kv_heads):
            heads = slice(h * gqa, (h + 1) * gqa)
            k_pre, v_pre = _prefix(kv, h, row)
            k = torch.cat((k_pre, k_new[seg, h].double()))
            v = torch.cat((v_pre, v_new[seg, h].double()))
            sees = torch.cat((causal.new_ones(n, k_pre.shape[0]), causal), dim=1)
            mask = sees.repeat_interleave(gqa, dim=0)
            o, s = _attend(q[seg, heads].double().reshape(n * gqa, -1), k, v, sm_scale, mask)
            out[seg, heads] = o.reshape(n, gqa, -1)
            lse[seg, heads] = s.reshape(n, gqa)
    return (out, lse) if return_lse else out


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ordinary GQA attention of one sequence: `q` `[T, Hq, D]`, `k`/`v` `[S, Hkv, D]`.

    With `causal`, the queries are the last T of the S key positions (query i sits at
    S - T + i and sees keys up to it). Returns `[T, Hq, D]` float64 (and `[T, Hq]`).
    """
    t, hq, _ = q.shape
    s, hkv, _ = k.shape
    keys = k.double().repeat_interleave(hq // hkv, dim=1)
    values = v.double().repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("thd,shd->hts", q.double(), keys) * sm_scale
    if causal:
        future = (
            torch.arange(s, device=q.device)[None, :]
            > torch.arange(s - t, s, device=q.device)[:, None]
        )
        logits = logits.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.where(torch.isfinite(lse)[..., None], torch.exp(logits - lse[..., None]), 0.0)
    out = torch.einsum("hts,shd->thd", probs, values)
    return (out, lse.T) if return_lse else out
