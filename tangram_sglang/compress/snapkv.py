"""SnapKV scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import (
    PaddedSegments,
    Scorer,
    checked,
    group_mean,
    pool1d,
    scoring_dtype,
    window_attention,
    window_attention_mean,
)


@dataclass
class SnapKV(Scorer):
    """SnapKV (Li et al., 2024, arXiv:2404.14469): the last `window_size` queries (the
    observation window) already attend to what later generation will need, so a token's
    score is their mean attention to it, averaged over the GQA group and pooled over
    `kernel_size` neighbours so kept tokens come in small clusters.

    The observation window itself scores +inf (always kept).
    """

    window_size: int = 32
    kernel_size: int = 5
    pooling: str = "avg"

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = checked(q, k, v)
        t, w = k.shape[0], min(self.window_size, k.shape[0])
        attention = group_mean(window_attention(q[t - w :], k).mean(1), k.shape[1])
        prefix = pool1d(attention[:, : t - w], self.kernel_size, self.pooling)
        return torch.cat([prefix, torch.full_like(attention[:, t - w :], float("inf"))], dim=1)

    def score_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: PaddedSegments
    ) -> torch.Tensor:
        """`score` of every segment in one pass: pooled over the prefix alone (zeros, or
        -inf for max pooling, beyond it, as `pool1d` pads the prefix slice)."""
        dtype = scoring_dtype(q)
        attention = window_attention_mean(q, k, part, self.window_size)
        hkv, s, width = attention.shape
        window = part.window(self.window_size, q.shape[1] // hkv)
        outside = 0.0 if self.pooling == "avg" else float("-inf")
        pooled = pool1d(
            attention.masked_fill_(~window.prefix, outside).view(hkv * s, width),
            self.kernel_size,
            self.pooling,
        ).view(hkv, s, width)
        return torch.where(window.prefix, pooled, window.tail.to(dtype)).transpose(0, 1)
