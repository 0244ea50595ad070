"""The tree-structured merge: which blocks of different requests (or chunks) fuse.

The paper's fast fusion is a binary tree over the units being fused (the requests of a
batch for batch fusion, BFF; the prefill chunks of one input for chunk fusion, CFF): the
leaves are the units' own blocks, never fused with each other; each internal node compares
the fused sets of its left subtree with those of its right subtree by cosine similarity and
merges the pairs above the threshold, so a block meets the sets of log2(U) subtrees instead
of every other block, and a level is one batched similarity product per node.

What we keep and what we change, and why:
- pairing is bottom-up (units 0+1, 2+3, ...; an odd unit rises unchanged), the paper's
  recursive halving for a power-of-two count;
- each right set joins only its most similar left set (the reference code's later
  "nr_tree"), and the candidates of a level are tried from the most similar down; a left
  set may absorb several right sets, so two blocks of one unit can end up in one set
  through a block of another unit, as in the paper's merge;
- a merge is *guarded*: it is accepted only if every member of the merged set keeps a
  cosine of at least the threshold to the merged direction, in every feature (e.g. K and
  V of every layer of the unit). The paper's mean of means can drift below the threshold
  as sets grow up the tree (and its V follows K's matching unchecked); the guard makes the
  threshold a bound on each decoded block's cosine distortion, which the tests check;
- a feature whose threshold is >= 1.0 fuses only bit-identical blocks (a float cosine of
  two different blocks can round to 1.0).

The guard is checked with a small margin (`GUARD_MARGIN`) so that the float64 check of the
decoded blocks, whose direction `encoding.encode` recomputes in another summation order,
still holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GUARD_MARGIN = 1e-5


@dataclass(frozen=True)
class MergeResult:
    labels: torch.Tensor  # [N] int64: the smallest block index of each block's fused set
    levels: int  # tree levels run (ceil(log2 units))
    comparisons: int  # set-pair similarities evaluated, summed over all nodes


def check_thresholds(thresholds: Sequence[float]) -> None:
    for t in thresholds:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"fusion threshold {t} is outside (0, 1]")


class _Sets:
    """The fused sets while the tree runs: members and, per feature, the sum of the
    members' unit vectors (the set's direction up to a scale)."""

    def __init__(self, features: Sequence[torch.Tensor], thresholds: Sequence[float]):
        self.raw = [f.float() for f in features]
        self.unit = [F.normalize(f, dim=1) for f in self.raw]
        self.sums = [u.clone() for u in self.unit]
        self.exact = [t >= 1.0 for t in thresholds]
        self.thresholds = list(thresholds)
        n = self.raw[0].shape[0]
        self.members: list[list[int]] = [[i] for i in range(n)]

    def directions(self, ids: list[int]) -> list[torch.Tensor]:
        return [F.normalize(s[ids], dim=1) for s in self.sums]

    def accepts(self, left: int, right: int) -> bool:
        """The guard: every member of left + right stays within each feature's threshold
        of the merged direction (bit-identical to left's first member where exact)."""
        members = self.members[left] + self.members[right]
        for j, threshold in enumerate(self.thresholds):
            if self.exact[j]:
                ref = self.raw[j][self.members[left][0]]
                if not bool((self.raw[j][members] == ref).all()):
                    return False
                continue
            direction = F.normalize(self.sums[j][left] + self.sums[j][right], dim=0)
            if float((self.unit[j][members] @ direction).min()) < threshold + GUARD_MARGIN:
                return False
        return True

    def absorb(self, left: int, right: int) -> None:
        self.members[left] += self.members[right]
        self.members[right] = []
        for s in self.sums:
            s[left] += s[right]


def _merge_pair(sets: _Sets, left: list[int], right: list[int]) -> tuple[list[int], int]:
    """Merge the right subtree's sets into the left's; returns the node's sets and the
    number of set pairs compared."""
    if not left or not right:
        return left + right, 0
    dl, dr = sets.directions(left), sets.directions(right)
    score = torch.zeros(len(right), len(left))
    allowed = torch.ones(len(right), len(left), dtype=torch.bool)
    for j, threshold in enumerate(sets.thresholds):
        cos = dr[j] @ dl[j].T
        score += cos
        # The sets' own directions must already be close; exact features compare bits below.
        allowed &= cos >= (threshold - 1e-4 if sets.exact[j] else threshold)
    score = torch.where(allowed, score / len(sets.thresholds), torch.full_like(score, -2.0))
    best, best_left = score.max(dim=1)
    order = sorted(range(len(right)), key=lambda r: (-float(best[r]), r))
    merged = set()
    for r in order:
        if float(best[r]) > -2.0 and sets.accepts(left[int(best_left[r])], right[r]):
            sets.absorb(left[int(best_left[r])], right[r])
            merged.add(r)
    kept_right = [s for r, s in enumerate(right) if r not in merged]
    return left + kept_right, len(left) * len(right)


def tree_merge(
    features: Sequence[torch.Tensor], owner: torch.Tensor, thresholds: Sequence[float]
) -> MergeResult:
    """Fuse blocks across owners (requests or chunks). `features`: one `[N, F_j]` tensor
    per feature checked (e.g. K and V of each layer of the unit), `owner [N]`: the request
    or chunk of each block, `thresholds`: one per feature, in (0, 1]."""
    if len(features) != len(thresholds) or not features:
        raise ValueError("tree_merge needs one threshold per feature, and a feature")
    check_thresholds(thresholds)
    n = features[0].shape[0]
    if any(f.shape[0] != n for f in features) or owner.shape != (n,):
        raise ValueError("every feature and the owner vector need one row per block")
    sets = _Sets(features, thresholds)
    nodes = [(owner == o).nonzero(as_tuple=True)[0].tolist() for o in torch.unique(owner)]
    levels = comparisons = 0
    while len(nodes) > 1:
        nxt = []
        for a in range(0, len(nodes) - 1, 2):
            node, count = _merge_pair(sets, nodes[a], nodes[a + 1])
            nxt.append(node)
            comparisons += count
        if len(nodes) % 2:
            nxt.append(nodes[-1])
        nodes, levels = nxt, levels + 1
    labels = torch.arange(n)
    for members in sets.members:
        if len(members) > 1:
            labels[members] = min(members)
    return MergeResult(labels, levels, comparisons)


def batch_fusion(
    features: Sequence[torch.Tensor], request: torch.Tensor, thresholds: Sequence[float]
) -> MergeResult:
    """BFF: fuse blocks across the requests of a batch (`request [N]`: each block's)."""
    return tree_merge(features, request, thresholds)


def chunk_fusion(
    features: Sequence[torch.Tensor], blocks_per_chunk: int, thresholds: Sequence[float]
) -> MergeResult:
    """CFF: fuse the blocks of one input across its prefill chunks (consecutive runs of
    `blocks_per_chunk` blocks); blocks of one chunk are never compared with each other."""
    n = features[0].shape[0]
    return tree_merge(features, torch.arange(n) // blocks_per_chunk, thresholds)
