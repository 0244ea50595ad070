"""What every scorer shares: input checks, GQA averaging, pooling, and token selection.

A scorer only decides how important each new token is (`score`); which tokens survive is
decided here, once, by `select` (fixed per-head budgets from `budget.kept_tokens`) or by
`ada_allocation` (one budget per layer, split across heads by score). Both force the
first `rule.sink` and the last `rule.window` tokens and break ties by the lower token
index, so selection is deterministic and matches what the scheduler reserved.

Shapes: q `[T, Hq, D]`, k and v `[T, Hkv, D]` (post-RoPE, one request's segment of T new
tokens); scores `[Hkv, T]`, higher = keep. Query head i reads kv head i // (Hq // Hkv).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tangram_sglang.budget import BudgetRule


@dataclass
class Scorer:
    """Base of all scorers: `score(q, k, v) -> [Hkv, T]`, higher means keep."""

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def checked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate scorer inputs and cast them to the scoring dtype (float32, or float64)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(
                f"scorer input {name} must be [T, heads, head_dim], got {tuple(x.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"scorer inputs k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"scorer inputs q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or D"
        )
    if q.shape[0] == 0:
        raise ValueError("scorer inputs have no tokens (T = 0)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.to(dtype), k.to(dtype), v.to(dtype)


def group_mean(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Average a per-query-head tensor `[Hq, ...]` over each kv head's GQA group."""
    return x.reshape(num_kv_heads, x.shape[0] // num_kv_heads, *x.shape[1:]).mean(1)


def window_attention(q_tail: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention `[Hq, W, T]` of the last W queries to all T keys.

    Query w sits at position T - W + w and sees keys 0..T - W + w.
    """
    w, hq, d = q_tail.shape
    t, hkv, _ = k.shape
    keys = k.repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("whd,thd->hwt", q_tail, keys) / math.sqrt(d)
    future = (
        torch.arange(t, device=k.device)[None, :] > torch.arange(t - w, t, device=k.device)[:, None]
    )
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def pool1d(scores: torch.Tensor, kernel_size: int, mode: str = "avg") -> torch.Tensor:
    """Same-length 1-D pooling along tokens (SnapKV's clustering of neighbouring tokens).

    Average pooling counts the zero padding at the edges (divides by `kernel_size`).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size {kernel_size} must be a positive odd number")
    if kernel_size == 1 or scores.shape[-1] == 0:
        return scores
    pad = kernel_size // 2
    if mode == "avg":
        return F.avg_pool1d(scores[:, None], kernel_size, 1, pad)[:, 0]
    if mode == "max":
        return F.max_pool1d(scores[:, None], kernel_size, 1, pad)[:, 0]
    raise ValueError(f"pooling {mode!r} is not 'avg' or 'max'")


def forced_mask(
    num_tokens: int, rule: BudgetRule, device: torch.device | None = None
) -> torch.Tensor:
    """`[T]` bool: the sink and recent-window tokens every head keeps."""
    pos = torch.arange(num_tokens, device=device)
    return (pos < rule.sink) | (pos >= num_tokens - rule.window)


def _keep_order(scores: torch.Tensor, rule: BudgetRule) -> torch.Tensor:
    """Per head, token indices in keep order: forced first, then score desc, index asc."""
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    forced = forced_mask(scores.shape[-1], rule, scores.device)[by_score]
    forced_first = torch.sort(forced.to(torch.int8), dim=-1, descending=True, stable=True)
    return by_score.gather(-1, forced_first.indices)


def _minimum(num_tokens: int, rule: BudgetRule) -> int:
    return min(num_tokens, rule.sink + rule.window)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [kv_heads, T], got {tuple(scores.shape)}")


def select(
    scores: torch.Tensor, kept_per_head: Sequence[int], rule: BudgetRule
) -> list[torch.Tensor]:
    """Per kv head, the ascending indices of exactly `kept_per_head[h]` tokens to keep.

    The first `rule.sink` and last `rule.window` tokens are always kept; the rest of a
    head's budget goes to its highest scores, ties to the lower index.
    """
    _check_scores(scores)
    heads, t = scores.shape
    if len(kept_per_head) != heads:
        raise ValueError(f"kept_per_head has {len(kept_per_head)} entries for {heads} kv heads")
    low = _minimum(t, rule)
    for h, kept in enumerate(kept_per_head):
        if not low <= kept <= t:
            raise ValueError(
                f"kept_per_head[{h}] = {kept} is outside [{low}, {t}] for a segment of {t} "
                f"tokens with sink {rule.sink} and window {rule.window}"
            )
    order = _keep_order(scores, rule)
    return [order[h, : int(kept)].sort().values for h, kept in enumerate(kept_per_head)]


def ada_allocation(scores: torch.Tensor, layer_budget: int, rule: BudgetRule) -> list[int]:
    """Ada-KV's per-head split of one layer budget: joint top-k over all heads' scores.

    Every head first gets its forced tokens (and `rule.floor`); the remaining budget goes
    to the highest scores of the whole layer (ties: lower head, then lower index). The
    result fed to `select` keeps exactly the tokens this joint choice picked.
    """
    _check_scores(scores)
    heads, t = scores.shape
    low = min(t, max(_minimum(t, rule), rule.floor))
    if not heads * low <= layer_budget <= heads * t:
        raise ValueError(
            f"layer_budget {layer_budget} is outside [{heads * low}, {heads * t}] for "
            f"{heads} heads of {t} tokens (forced minimum {low} per head)"
        )
    order = _keep_order(scores, rule)
    ranked = scores.gather(-1, order)[:, low:]
    flat = torch.sort(ranked.reshape(-1), descending=True, stable=True).indices
    counts = torch.bincount(flat[: layer_budget - heads * low] // max(t - low, 1), minlength=heads)
    return [low + int(c) for c in counts[:heads]]
