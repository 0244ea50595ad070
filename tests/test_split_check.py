"""`SplitCheck` (tangram_sglang/memory/split_check.py): traffic of the planned session shape
passes silently; traffic of another shape is named, as the `--tangram-workload` under
which its turns would fill the groups together."""

from __future__ import annotations

import random

from tangram_sglang.memory.budget import BudgetRule, Workload
from tangram_sglang.memory.split_check import SplitCheck

RULE = BudgetRule(sink=4, window=32)


def play(check: SplitCheck, shape: Workload, sessions: int) -> list[str]:
    """`sessions` sessions of `shape`, turn by turn, as SGLang releases them."""
    lines = []
    for _ in range(sessions):
        history = 0
        for t, (new, answer) in enumerate(shape.turn_shapes()):
            line = check.observe(new, answer, history if t else 0)
            history += new + answer
            lines += [line] if line else []
    return lines


def ratios(rng: random.Random) -> list[float]:
    return sorted(rng.uniform(0.08, 0.9) for _ in range(rng.randint(2, 5)))


def test_the_planned_shape_passes_silently():
    rng = random.Random(random.randrange(10_000))
    planned = Workload(rng.randint(500, 8000), rng.randint(2, 8), rng.randint(16, 512), 128)
    check = SplitCheck(planned, ratios(rng), RULE, first_report=64)
    assert play(check, planned, 100) == []
    assert check.imbalance() < 1.001
    assert check.observed() == planned
    assert check.describe()["planned"] == check.describe()["observed"] == planned.flag()


def test_another_shape_is_named_and_its_split_would_fit_it():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    r = sorted([rng.uniform(0.08, 0.2), rng.uniform(0.5, 0.9), *ratios(rng)])  # spread out
    planned = Workload(4096, 4, 256, 256)  # the server's default shape, chat-like
    traffic = Workload(rng.randint(2000, 6000), rng.randint(3, 8), rng.randint(2, 12), 16)
    check = SplitCheck(planned, r, RULE, first_report=32)
    lines = play(check, traffic, 40)
    assert check.imbalance() > 1.25, (seed, check.fill())
    assert lines, f"seed {seed}: no report for {traffic} on a split for {planned}"
    tight = max(range(len(r)), key=check.fill().__getitem__)
    assert f"fills head group {tight} " in lines[-1]
    assert f"--tangram-workload {check.observed().flag()}" in lines[-1]
    assert check.observed() == traffic, seed
    # Split for the named shape, the same traffic fills the groups together.
    refit = SplitCheck(check.observed(), r, RULE, first_report=32)
    assert play(refit, traffic, 40) == [] and refit.imbalance() < 1.001, seed


def test_reports_come_at_doubling_turn_counts():
    planned, traffic = Workload(4096, 4, 256, 256), Workload(3000, 6, 4, 16)
    check = SplitCheck(planned, [0.15, 0.3, 0.55], RULE, first_report=12)
    reported = []
    for _ in range(20):
        history = 0
        for t, (new, answer) in enumerate(traffic.turn_shapes()):
            if check.observe(new, answer, history if t else 0):
                reported.append(check.turns)
            history += new + answer
    assert reported == [12, 24, 48, 96]
