"""SnapKV scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import Scorer, checked, group_mean, pool1d, window_attention


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
