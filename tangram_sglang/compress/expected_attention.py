"""Expected Attention scores."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import (
    PaddedSegments,
    Scorer,
    checked,
    group_mean,
    scoring_dtype,
)


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

    def score_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: PaddedSegments
    ) -> torch.Tensor:
        """`score` of every segment in one pass: the statistics are masked sums over each
        segment's own queries (past `n_sink` when it is longer), the softmax over its keys."""
        dtype = scoring_dtype(q)
        s, width = part.rows.shape
        hkv, d = k.shape[1], k.shape[2]
        group = q.shape[1] // hkv
        queries = q[part.rows].to(dtype).view(s, width, hkv, group, d)
        keys = k[part.rows].to(dtype)  # [n, width, Hkv, D]
        lengths = part.lengths
        skip = lengths > self.n_sink
        stats = part.valid & ((part.positions >= self.n_sink) | ~skip[:, None])
        count = torch.where(skip, lengths - self.n_sink, lengths).to(dtype)[:, None, None, None]
        stats = stats[:, :, None, None, None]  # [S, width, 1, 1, 1]
        mu = queries.masked_fill(~stats, 0.0).sum(1) / count  # [S, Hkv, G, D]
        logits = torch.einsum("shgd,sthd->shgt", mu, keys) / math.sqrt(d)
        if self.use_covariance:
            centred = (queries - mu[:, None]).masked_fill(~stats, 0.0)
            cov = torch.einsum("snhgi,snhgj->shgij", centred, centred) / count[..., None]
            spread = torch.einsum("sthi,shgij->shgtj", keys, cov)
            spread = (spread * keys.transpose(1, 2)[:, :, None]).sum(-1)
            logits = logits + spread / (2 * d)
        valid = part.valid[:, None, None]
        scores = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1).mean(2)
        if self.use_vnorm:
            scores = scores * v[part.rows].to(dtype).norm(dim=-1).transpose(1, 2)
        return part.pad(scores)
