"""StreamingLLM scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import (
    PaddedSegments,
    Scorer,
    checked,
    scoring_dtype,
)


@dataclass
class StreamingLLM(Scorer):
    """StreamingLLM (Xiao et al., 2024, arXiv:2309.17453): attention sinks plus a recent
    window suffice for fluent generation, so a token scores its position; with `select`
    forcing the sink, any budget beyond sink + window just lengthens the recent window.
    """

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = checked(q, k, v)
        positions = torch.arange(k.shape[0], dtype=k.dtype, device=k.device)
        return positions.expand(k.shape[1], -1).clone()

    def score_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: PaddedSegments
    ) -> torch.Tensor:
        positions = part.positions.to(scoring_dtype(q))
        return part.pad(positions.expand(len(part), k.shape[1], -1))
