"""TOVA scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import Scorer, checked, group_mean, window_attention


@dataclass
class TOVA(Scorer):
    """TOVA (Oren et al., 2024, arXiv:2401.06104): the current token's attention is the best
    guide to what matters next, so a token scores the attention the last query pays it,
    averaged over the GQA group.
    """

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = checked(q, k, v)
        return group_mean(window_attention(q[-1:], k)[:, 0], k.shape[1])
