"""Batch fusion while serving: which new blocks of an extend batch read another request's.

After an extend forward has stored its KV, the batch's new group slots are cut into
blocks of `BLOCK` consecutive slots of one segment (full blocks only, counted from the
segment's start, as vLLM pages count from a request's start). Requests are visited in
batch order; each block of a request joins the most similar *representative* block of an
earlier request of the batch (a block that joined nobody), if it passes the guard, and
then stops holding its own K/V: its slots return to the group's free pool and its rows
read the representative's slots (`TangramAllocator.share`).

Why raw sharing and a norm guard instead of the paper's shared direction + member norms:
a member reads the representative's stored block as it is, so the pools, the radix cache
(whose cached KV is never rewritten: the reference implementation's lesson) and every
attention kernel stay as they are, with no per-read scale table and no host work per
decode step. The decoded member is then the representative itself, so the guard bounds
that directly, per feature (K and V of every layer the group has heads in):
cos(member, representative) >= tau, and the norm ratio within [tau, 1 / tau]. Its
relative L2 error is then at most sqrt(1 + rho^2 - 2 rho tau) for the ratio rho, about
sqrt(2 (1 - tau)) near rho = 1.
Tau >= 1.0 fuses only bit-identical blocks (the same tokens at the same positions after
the same prefix, e.g. one prompt sent twice in a batch): lossless, outputs unchanged.

The unit is the group slot (one head group across every layer: what a pool can free), so
the guard holds in every layer of the group, the edge layers included: the paper leaves
its first and last two layers unfused, which a slot shared in all layers cannot, and
checking them is the stricter choice (docs/architecture.md, "Fast Fusion").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tangram_sglang.fusion.merge import check_thresholds
from tangram_sglang.memory.pool import RaggedPool

BLOCK = 16  # slots per fused block: the paper's vLLM page
EXACT_COSINE = 1.0 - 1e-6  # tau 1.0: candidates within float rounding, then compared bit by bit


@dataclass(frozen=True)
class SlotPairs:
    """Per fused slot, the member slot that is given up and the slot it reads instead."""

    member: torch.Tensor  # [M] int64
    rep: torch.Tensor  # [M] int64

    @classmethod
    def empty(cls, device: torch.device | str) -> SlotPairs:
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(none, none)


class BatchFusion:
    """Finds the guarded member -> representative block pairs of one group in a batch."""

    def __init__(self, pool: RaggedPool, threshold: float, block: int = BLOCK) -> None:
        check_thresholds([threshold])
        if block < 1:
            raise ValueError(f"fusion block {block} must be >= 1")
        self.pool = pool
        self.threshold = float(threshold)
        self.block = int(block)
        self.exact = self.threshold >= 1.0

    def blocks(self, slots: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment's slots per request (batch order) -> the full blocks `[N, block]`
        and each block's request index `[N]`."""
        cut, owner = [], []
        for i, s in enumerate(slots):
            whole = s.numel() // self.block
            if whole:
                cut.append(s[: whole * self.block].reshape(whole, self.block))
                owner.append(torch.full((whole,), i, dtype=torch.int64))
        if not cut:
            none = torch.zeros(0, dtype=torch.int64)
            return none.reshape(0, self.block), none
        return torch.cat(cut).long(), torch.cat(owner)

    def features(self, group: int, blocks: torch.Tensor) -> list[torch.Tensor]:
        """K and V of each block in every layer the group has heads in: `[N, F]` each
        (float32; an FP8 pool's per-layer scale changes no cosine or norm ratio)."""
        index = blocks.reshape(-1).to(self.pool.device)
        n = blocks.shape[0]
        out = []
        for layer in range(self.pool.num_layers):
            if not self.pool.heads_in(group, layer):
                continue
            for buffer in (self.pool.k_buffer(group, layer), self.pool.v_buffer(group, layer)):
                out.append(buffer[index].float().reshape(n, -1))
        return out

    def pairs(self, group: int, slots: Sequence[torch.Tensor]) -> SlotPairs:
        """The fused slot pairs among one group's new `slots` (one tensor per request, in
        batch order): member blocks of later requests onto representatives of earlier ones."""
        blocks, owner = self.blocks(slots)
        if blocks.shape[0] < 2 or int(owner.max()) == int(owner.min()):
            return SlotPairs.empty(self.pool.device)
        features = self.features(group, blocks)
        if not features:
            return SlotPairs.empty(self.pool.device)
        rep_of = self._representatives(features, owner.to(self.pool.device))
        member = (rep_of >= 0).nonzero().flatten()
        if member.numel() == 0:
            return SlotPairs.empty(self.pool.device)
        dev_blocks = blocks.to(self.pool.device)
        return SlotPairs(dev_blocks[member].reshape(-1), dev_blocks[rep_of[member]].reshape(-1))

    def _representatives(self, features: list[torch.Tensor], owner: torch.Tensor) -> torch.Tensor:
        """Per block, the block it reads instead of its own (-1: its own). One pass over the
        requests; a request's blocks compare with the representatives of earlier ones."""
        n = owner.numel()
        device = owner.device
        unit = [F.normalize(f, dim=1) for f in features]
        norms = [f.norm(dim=1) for f in features]
        rep_of = torch.full((n,), -1, dtype=torch.int64, device=device)
        is_rep = torch.zeros(n, dtype=torch.bool, device=device)
        for r in torch.unique(owner).tolist():
            mine = (owner == r).nonzero().flatten()
            prior = is_rep.nonzero().flatten()
            if prior.numel():
                best = self._best(features, unit, norms, mine, prior)
                rep_of[mine] = torch.where(best >= 0, prior[best.clamp_min(0)], -1)
            is_rep[mine[rep_of[mine] < 0]] = True
        return rep_of

    def _best(
        self,
        features: list[torch.Tensor],
        unit: list[torch.Tensor],
        norms: list[torch.Tensor],
        mine: torch.Tensor,
        prior: torch.Tensor,
    ) -> torch.Tensor:
        """For each block of `mine`, the index into `prior` of its most similar block that
        passes the guard in every feature, or -1. Exact mode picks by cosine too (within
        float rounding of 1) and then keeps only a pick that is bit-identical."""
        ok = torch.ones((mine.numel(), prior.numel()), dtype=torch.bool, device=mine.device)
        score = torch.zeros(ok.shape, device=mine.device)
        tau = EXACT_COSINE if self.exact else self.threshold
        for u, nrm in zip(unit, norms, strict=True):
            cos = u[mine] @ u[prior].T
            ratio = nrm[prior][None, :] / nrm[mine][:, None].clamp_min(1e-30)
            ok &= (cos >= tau) & (ratio >= tau) & (ratio <= 1.0 / tau)
            score += cos
        score = torch.where(ok, score, torch.full_like(score, -torch.inf))
        value, index = score.max(dim=1)
        best = torch.where(torch.isfinite(value), index, -1)
        if self.exact:
            same = torch.ones(mine.numel(), dtype=torch.bool, device=mine.device)
            for f in features:
                same &= (f[mine] == f[prior[best.clamp_min(0)]]).all(1)
            best = torch.where(same, best, -1)
        return best
