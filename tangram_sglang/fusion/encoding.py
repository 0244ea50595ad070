"""The fused-block representation: one shared vector per fused set, one scale per member.

A fused set of blocks x_1..x_m (one unit, K or V alike) is stored as the unit direction
u = normalize(sum_i x_i / |x_i|) (the paper's normalized mean of the members' directions)
and each member decodes as |x_i| * u: its own norm along the shared direction, so the
decoded block keeps its magnitude and errs only in angle (cosine distortion).

A set of one, or a set whose members are bit-identical, keeps the raw block with scale
1.0: decoding it is exact, which is what makes threshold 1.0 lossless, and a pool slot
that holds an unfused block never has to be rewritten when fusion runs (the reason the
reference implementation moved from rewriting normalized blocks to sharing raw ones:
mutated KV corrupts a prefix cache that already hashed it).

`FusedBlocks` is what a pool would hold: `shared [S, F]` (the stored blocks), `index [N]`
(which stored block member n reads) and `scale [N]` (its norm, or 1.0 for a raw block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FusedBlocks:
    shared: torch.Tensor  # [S, F] stored blocks (unit directions or raw blocks)
    index: torch.Tensor  # [N] int64, the stored block each member reads
    scale: torch.Tensor  # [N] float32, the factor each member applies

    @property
    def blocks_in(self) -> int:
        return int(self.index.shape[0])

    @property
    def blocks_stored(self) -> int:
        return int(self.shared.shape[0])


def encode(x: torch.Tensor, labels: torch.Tensor) -> FusedBlocks:
    """Encode blocks `x [N, F]` fused as `labels [N]` (equal labels = one fused set)."""
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} do not match {x.shape[0]} blocks")
    _, set_of = torch.unique(labels, return_inverse=True)
    size = int(set_of.max()) + 1 if set_of.numel() else 0
    first = torch.full((size,), x.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, set_of, torch.arange(x.shape[0]), "amin")
    same = (x == x[first[set_of]]).all(dim=1).to(torch.int8)
    raw = torch.ones(size, dtype=torch.int8).scatter_reduce_(0, set_of, same, "amin").bool()
    xf = x.float()
    sums = torch.zeros(size, x.shape[1]).index_add_(0, set_of, F.normalize(xf, dim=1))
    direction = F.normalize(sums, dim=1).to(x.dtype)
    shared = torch.where(raw[:, None], x[first], direction)
    scale = torch.where(raw[set_of], torch.ones(()), xf.norm(dim=1))
    return FusedBlocks(shared, set_of, scale)


def decode(fused: FusedBlocks, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every member's block, `[N, F]`: `scale[n] * shared[index[n]]` (written into `out`
    when given, every element of it)."""
    rows = fused.shared[fused.index]
    decoded = rows * fused.scale[:, None].to(rows.dtype)
    # Raw members multiply by exactly 1.0, so their decode is bit-exact.
    if out is None:
        return decoded
    out.copy_(decoded)
    return out


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of `[N, F]` tensors in float64; zero rows count as cosine 1 with
    themselves and 0 with anything else."""
    x, y = x.double(), y.double()
    num = (x * y).sum(dim=1)
    den = x.norm(dim=1) * y.norm(dim=1)
    both_zero = (x.norm(dim=1) == 0) & (y.norm(dim=1) == 0)
    return torch.where(both_zero, torch.ones_like(num), num / den.clamp_min(1e-300))
