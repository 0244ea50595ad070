"""Head grouping: the DP is optimal, respects its limits, and beats the baselines."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sglang.offline.grouping import (
    adjacent_grouping,
    no_grouping,
    optimal_grouping,
    partition_sorted,
    per_layer_grouping,
)


def brute_force_cost(values, max_groups, min_size, max_size):
    n = len(values)
    best = np.inf
    for k in range(1, max_groups + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            sizes = [b - a for a, b in itertools.pairwise(bounds)]
            if min(sizes) < min_size or max(sizes) > max_size:
                continue
            best = min(best, sum((b - a) * values[b - 1] for a, b in itertools.pairwise(bounds)))
    return best


@given(
    values=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=9),
    max_groups=st.integers(1, 4),
    min_size=st.integers(1, 3),
    extra=st.integers(0, 9),
)
@settings(max_examples=150, deadline=None)
def test_partition_is_optimal_against_brute_force(values, max_groups, min_size, extra):
    values = sorted(values)
    max_size = min_size + extra
    expected = brute_force_cost(values, max_groups, min_size, max_size)
    if not np.isfinite(expected):
        with pytest.raises(ValueError):
            partition_sorted(values, max_groups, min_size, max_size)
        return
    runs = partition_sorted(values, max_groups, min_size, max_size)
    cost = sum((b - a) * values[b - 1] for a, b in runs)
    assert cost == pytest.approx(expected), f"DP cost {cost} != brute force {expected}"
    assert runs[0][0] == 0 and runs[-1][1] == len(values)
    assert all(min_size <= b - a <= max_size for a, b in runs)


def test_grouping_every_head_once_and_waste_order():
    rng = np.random.default_rng()
    ratios = rng.lognormal(0, 0.7, size=64)
    ratios = np.clip(ratios / ratios.mean() * 0.25, 0.01, 1.0)
    best = optimal_grouping(ratios, 4)
    members = sorted(i for m in best.members for i in m)
    assert members == list(range(64))
    assert best.waste <= adjacent_grouping(ratios, 4).waste + 1e-12
    assert best.waste <= no_grouping(ratios).waste + 1e-12
    for m, r in zip(best.members, best.ratios, strict=True):
        assert r == pytest.approx(max(ratios[list(m)]))


def test_per_layer_groups_take_the_same_number_of_heads_from_each_layer():
    rng = np.random.default_rng()
    table = rng.uniform(0.05, 0.9, size=(6, 8))
    result = per_layer_grouping(table, 3)
    for members in result.members:
        per_layer = np.bincount([i // 8 for i in members], minlength=6)
        assert len(set(per_layer.tolist())) == 1, f"unbalanced group: {per_layer}"
    assert result.waste >= optimal_grouping(table.reshape(-1), 3).waste - 1e-12
