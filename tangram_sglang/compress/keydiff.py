"""KeyDiff scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tangram_sglang.compress.base import (
    PaddedSegments,
    Scorer,
    checked,
    scoring_dtype,
)


@dataclass
class KeyDiff(Scorer):
    """KeyDiff (Park et al., 2025, arXiv:2504.15364): keys that look like the average key
    carry little distinct information, so a token scores the negative cosine similarity of
    its key to the mean of the segment's normalized keys (no attention needed).
    """

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = checked(q, k, v)
        anchor = F.normalize(k, dim=-1).mean(0, keepdim=True)
        return -F.cosine_similarity(k, anchor, dim=-1).T

    def score_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: PaddedSegments
    ) -> torch.Tensor:
        keys = k[part.rows].to(scoring_dtype(q))  # [n, width, Hkv, D]
        unit = F.normalize(keys, dim=-1).masked_fill(~part.valid[:, :, None, None], 0.0)
        anchor = unit.sum(1, keepdim=True) / part.lengths[:, None, None, None]
        return part.pad(-F.cosine_similarity(keys, anchor, dim=-1).transpose(1, 2))
