"""Expected Attention scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import Scorer, checked, group_mean


@dataclass
class ExpectedAttention(Scorer):
    """Expected Attention (Devoto et al., 2025, NVIDIA kvpress): model the queries still
    to come as a Gaussian with the mean mu and covariance S of the segment's queries; a key
    k then gets the softmax of its expected logit mu.k/sqrt(d) + k'Sk/(2d) (E[exp X] of a
    Gaussian logit), averaged over the GQA group and weighted by ||v||.

    Simplification against kvpress: the statistics come from the post-RoPE queries we are
    given (skipping the first `n_sink` outliers) instead of projecting pre-RoPE statistics
    to future positions, so they average the rotation over the segment's own positions.
    """

    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = checked(q, k, v)
        d, keys = k.shape[2], k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        stats = q[self.n_sink :] if q.shape[0] > self.n_sink else q
        mu = stats.mean(0)
        logits = torch.einsum("hd,thd->ht", mu, keys) / math.sqrt(d)
        if self.use_covariance:
            centred = stats - mu
            cov = torch.einsum("nhi,nhj->hij", centred, centred) / stats.shape[0]
            spread = (torch.einsum("thi,hij->thj", keys, cov) * keys).sum(-1).T
            logits = logits + spread / (2 * d)
        scores = group_mean(logits.softmax(dim=-1), k.shape[1])
        return scores * v.norm(dim=-1).T if self.use_vnorm else scores
