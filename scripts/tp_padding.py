"""Padding of head groups under tensor parallelism, per option (docs/architecture.md,
"Tensor parallelism"): the table that chose what the server does.

    python scripts/tp_padding.py [PROFILE.yaml ...]   (default: every shipped profile)

Padding is 1 - (sum of the heads' own reserved ratios) / (what the option stores per
token, summed over ranks at the slots every rank agrees on), head-weighted:
- global, TP=1: the profile's optimal grouping on one GPU;
- (A) rank-balanced: the k-th lightest head of every rank join one group, so all ranks
  hold the same heads per group;
- (B) agreed capacity (served): the global grouping, each rank its contiguous block of
  heads, all ranks held to the heaviest rank's bytes per token;
- (C) B with heads permuted across ranks per layer (greedy: heaviest head to the lightest
  rank) to even the ranks out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tangram_sglang.memory.layout import rank_heads
from tangram_sglang.offline.grouping import optimal_grouping, partition_sorted, reserved_table
from tangram_sglang.offline.profile import Profile

PROFILES = Path(__file__).resolve().parent.parent / "profiles"


def group_ratio_table(table: np.ndarray, max_groups: int) -> np.ndarray:
    """Each head's stored ratio under the global optimal grouping."""
    grouping = optimal_grouping(table.reshape(-1), max_groups)
    stored = np.zeros(table.size)
    for members, ratio in zip(grouping.members, grouping.ratios, strict=True):
        stored[list(members)] = ratio
    return stored.reshape(table.shape)


def padding(ideal: float, stored: float) -> float:
    return 1.0 - ideal / stored


def agreed(stored: np.ndarray, tp: int) -> float:
    """(B): every rank stores as much per token as the heaviest."""
    per_rank = [stored[:, list(rank_heads(r, stored.shape[1], tp))].sum() for r in range(tp)]
    return tp * max(per_rank)


def rank_balanced(table: np.ndarray, tp: int, max_groups: int) -> float:
    """(A): tuples of the k-th lightest head of each rank, grouped by their largest."""
    columns = [
        np.sort(table[:, list(rank_heads(r, table.shape[1], tp))].reshape(-1)) for r in range(tp)
    ]
    tuples = np.sort(np.stack(columns, axis=1).max(axis=1))
    runs = partition_sorted(tuples, max_groups)
    return tp * sum((b - a) * tuples[b - 1] for a, b in runs)


def permuted(stored: np.ndarray, tp: int) -> float:
    """(C): per layer (widest spread first), heaviest head to the lightest rank with room."""
    heads = stored.shape[1]
    per = heads // tp
    load = np.zeros(tp)
    for layer in np.argsort(-(stored.max(axis=1) - stored.min(axis=1)), kind="stable"):
        room = np.full(tp, per)
        for ratio in sorted(stored[layer], reverse=True):
            rank = min((r for r in range(tp) if room[r]), key=lambda r: load[r])
            load[rank] += ratio
            room[rank] -= 1
    return tp * load.max()


def rows(path: Path) -> list[str]:
    profile = Profile.load(path)
    m = profile.model
    table = reserved_table(profile.heads, profile.model.num_layers, profile.model.num_kv_heads)
    stored = group_ratio_table(table, profile.num_groups)
    ideal = table.sum()
    out = []
    for tp in range(2, m.num_kv_heads + 1):
        if m.num_kv_heads % tp or m.num_q_heads % tp:
            continue
        cells = (
            stored.sum(),
            rank_balanced(table, tp, profile.num_groups),
            agreed(stored, tp),
            permuted(stored, tp),
        )
        out.append(
            f"| {path.stem} | {tp} | "
            + " | ".join(f"{padding(ideal, c):.1%}" for c in cells)
            + " |"
        )
    return out


def main(argv: list[str]) -> int:
    paths = [Path(p) for p in argv] or sorted(PROFILES.glob("*.yaml"))
    options = ("global, TP=1", "(A) rank-balanced", "(B) agreed capacity", "(C) B + permutation")
    print("| profile | TP | " + " | ".join(options) + " |")
    print("|---|---|---|---|---|---|")
    for path in paths:
        print("\n".join(rows(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
