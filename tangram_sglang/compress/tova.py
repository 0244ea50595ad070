"""TOVA scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import (
    PaddedSegments,
    Scorer,
    checked,
    group_mean,
    window_attention,
    window_attention_mean,
)


@dataclass
class TOVA(Scorer):
    """TOVA (Oren et al., 2024, arXiv:2401.06104): the current token's attention is the best
    guide to what matters next, so a token scores the attention the last query pays it,
    averaged over the GQA group.
    """

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = checked(q, k, v)
        return group_mean(window_attention(q[-1:], k)[:, 0], k.shape[1])

    def score_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: PaddedSegments
    ) -> torch.Tensor:
        mean = window_attention_mean(q, k, part, 1)
        return part.pad(mean.transpose(0, 1))
