"""Head groups: cluster heads of similar reserved ratio so they can share one pool.

A group stores every member head at the group's ratio (its largest member's), so the
cost of a grouping is the padded slots sum(size_g * ratio_g) against the ideal sum of
the heads' own ratios. On sorted ratios the optimal partition into contiguous runs is
found exactly by a 1-D dynamic program.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tangram_sglang.offline.profile import HeadGroup, HeadStats


@dataclass(frozen=True)
class Grouping:
    """Member indices (into the ratio list given) and ratio of each group."""

    members: tuple[tuple[int, ...], ...]
    ratios: tuple[float, ...]
    padded_slots: float
    ideal_slots: float

    @property
    def waste(self) -> float:
        """Fraction of reserved slots that no head needs."""
        return 0.0 if self.padded_slots == 0 else 1.0 - self.ideal_slots / self.padded_slots


def _evaluate(ratios: np.ndarray, members: list[tuple[int, ...]]) -> Grouping:
    group_ratios = tuple(float(ratios[list(m)].max()) for m in members)
    padded = sum(len(m) * r for m, r in zip(members, group_ratios, strict=True))
    return Grouping(tuple(members), group_ratios, float(padded), float(ratios.sum()))


def partition_sorted(
    values: Sequence[float], max_groups: int, min_size: int = 1, max_size: int | None = None
) -> list[tuple[int, int]]:
    """Optimal cut of ascending `values` into runs [a, b) minimising sum (b-a)*values[b-1].

    Returns the runs in order. Raises ValueError if the size limits admit no partition.
    """
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return []
    if np.any(np.diff(v) < 0):
        raise ValueError("partition_sorted needs ascending values")
    max_size = n if max_size is None else max_size
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"group size limits [{min_size}, {max_size}] are empty")
    inf = np.inf
    cost = np.full((max_groups + 1, n + 1), inf)
    back = np.zeros((max_groups + 1, n + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for k in range(1, max_groups + 1):
        for b in range(1, n + 1):
            lo, hi = max(0, b - max_size), b - min_size
            if hi < lo:
                continue
            a = np.arange(lo, hi + 1)
            cand = cost[k - 1, a] + (b - a) * v[b - 1]
            best = int(np.argmin(cand))
            cost[k, b], back[k, b] = cand[best], a[best]
    k = int(np.argmin(cost[:, n]))
    if not np.isfinite(cost[k, n]):
        raise ValueError(
            f"no grouping of {n} heads into at most {max_groups} groups of size "
            f"{min_size}..{max_size}"
        )
    runs = []
    b = n
    while k > 0:
        a = int(back[k, b])
        runs.append((a, b))
        b, k = a, k - 1
    return runs[::-1]


def optimal_grouping(
    ratios: Sequence[float], max_groups: int, min_size: int = 1, max_size: int | None = None
) -> Grouping:
    """Global clustering: any head may join any group (least padding)."""
    r = np.asarray(ratios, dtype=np.float64)
    order = np.argsort(r, kind="stable")
    runs = partition_sorted(r[order], max_groups, min_size, max_size)
    return _evaluate(r, [tuple(sorted(int(i) for i in order[a:b])) for a, b in runs])


def per_layer_grouping(ratios: np.ndarray, max_groups: int) -> Grouping:
    """Balanced clustering: every layer gives each group the same number of heads.

    `ratios` is [layers, kv_heads]; returned members index the flattened array. Heads
    are taken by rank within their layer, so one kernel plan per group fits all layers.
    """
    r = np.asarray(ratios, dtype=np.float64)
    layers, heads = r.shape
    order = np.argsort(r, axis=1, kind="stable")
    envelope = np.take_along_axis(r, order, axis=1).max(axis=0)
    runs = partition_sorted(envelope, min(max_groups, heads))
    members = [
        tuple(
            sorted(
                int(layer * heads + order[layer, j]) for layer in range(layers) for j in range(a, b)
            )
        )
        for a, b in runs
    ]
    return _evaluate(r.reshape(-1), members)


def adjacent_grouping(ratios: Sequence[float], num_groups: int) -> Grouping:
    """Baseline: consecutive heads in model order, equal-sized chunks."""
    r = np.asarray(ratios, dtype=np.float64)
    chunks = np.array_split(np.arange(len(r)), min(num_groups, len(r)))
    return _evaluate(r, [tuple(int(i) for i in c) for c in chunks if len(c)])


def no_grouping(ratios: Sequence[float]) -> Grouping:
    """Baseline: one group, every head padded to the largest ratio."""
    r = np.asarray(ratios, dtype=np.float64)
    return _evaluate(r, [tuple(range(len(r)))])


def reserved_table(heads: Sequence[HeadStats], num_layers: int, num_kv_heads: int) -> np.ndarray:
    """`[layers, kv heads]`: each head's reserved ratio (what grouping rounds up)."""
    table = np.zeros((num_layers, num_kv_heads))
    for h in heads:
        table[h.layer, h.head] = h.reserved
    return table


def build_groups(
    heads: Sequence[HeadStats],
    num_layers: int,
    num_kv_heads: int,
    max_groups: int = 4,
    mode: str = "global",
    min_size: int = 1,
    max_size: int | None = None,
) -> tuple[tuple[HeadGroup, ...], dict[str, float]]:
    """Head groups for a profile plus a waste report against the two baselines."""
    table = reserved_table(heads, num_layers, num_kv_heads)
    flat = table.reshape(-1)
    if mode == "global":
        chosen = optimal_grouping(flat, max_groups, min_size, max_size)
    elif mode == "per-layer":
        chosen = per_layer_grouping(table, max_groups)
    else:
        raise ValueError(f"unknown grouping mode {mode!r}")
    groups = tuple(
        HeadGroup(
            gid,
            ratio,
            tuple((int(i) // num_kv_heads, int(i) % num_kv_heads) for i in members),
        )
        for gid, (members, ratio) in enumerate(zip(chosen.members, chosen.ratios, strict=True))
    )
    report = {
        "waste_pct": 100 * chosen.waste,
        "adjacent_waste_pct": 100 * adjacent_grouping(flat, len(groups)).waste,
        "no_grouping_waste_pct": 100 * no_grouping(flat).waste,
    }
    return groups, report
