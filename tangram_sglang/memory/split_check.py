"""Whether the traffic has the session shape the head-group pools were split for.

At start-up the KV bytes are split over the head groups so that they run out together for
one session shape (`--tangram-workload`, else `budget.serving_workload`): a compressed
prompt token costs each group its ratio of a slot, an uncompressed one (an answer token, a
turn too short to compress) a slot in every group. Traffic of another shape fills one
group first, and eviction then empties the others for nothing: on SmolLM2 tangram held 10
of 64 sessions where uniform held 55 at the same bytes, and all that uniform held once its
pools were split for the traffic (bench/results/serve-2026-12-06-cpu-split.md).

The split cannot change while serving (the storage is laid out per group), so
`SplitCheck` tells the operator. It adds up each released turn's per-group slots the way
admission reserves them (`budget.reserve_turn`), compares that mix with the planned one
(`budget.session_slots` of the planned shape: how the bytes were split), and past a
tolerance names the shape the traffic has, as the `--tangram-workload` to restart with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tangram_sglang.memory.budget import BudgetRule, Workload, reserve_turn, session_slots


class SplitCheck:
    """The released turns' per-group slot demand against the planned split."""

    def __init__(
        self,
        planned: Workload,
        ratios: Sequence[float],
        rule: BudgetRule,
        first_report: int = 256,
        tolerance: float = 1.25,
    ) -> None:
        self.planned = planned
        self.ratios, self.rule = tuple(ratios), rule
        self.plan = session_slots(planned.turn_shapes(), self.ratios, rule)
        self.tolerance = tolerance
        self.next_report = first_report  # then at twice as many turns, and so on
        self.demand = [0] * len(self.ratios)
        self.turns = 0
        self.first_turns = self.first_tokens = 0
        self.follow_turns = self.follow_tokens = 0
        self.answer_tokens = 0

    def observe(self, new_tokens: int, answer_tokens: int, cached_tokens: int) -> str | None:
        """Count one released turn (prompt tokens computed, answer tokens, prompt tokens
        the radix cache supplied). Returns a line for the log when a report is due and the
        mix is off the plan by more than the tolerance, else None."""
        slots = reserve_turn(max(0, new_tokens), max(0, answer_tokens), self.ratios, self.rule)
        for g, s in enumerate(slots.slots):
            self.demand[g] += s
        self.turns += 1
        self.answer_tokens += max(0, answer_tokens)
        if cached_tokens >= new_tokens:  # most of its prompt was a cached history
            self.follow_turns += 1
            self.follow_tokens += max(0, new_tokens)
        else:
            self.first_turns += 1
            self.first_tokens += max(0, new_tokens)
        if self.turns < self.next_report:
            return None
        self.next_report *= 2
        return self.message()

    def fill(self) -> list[float]:
        """Per group, demand over planned demand, normalized to a mean of 1 (equal: the
        groups run out together, as planned)."""
        raw = [d / p if p else 0.0 for d, p in zip(self.demand, self.plan, strict=True)]
        mean = sum(raw) / len(raw) if raw else 0.0
        return [x / mean if mean else 0.0 for x in raw]

    def imbalance(self) -> float:
        """How much faster the tightest group fills than the loosest (1.0: as planned)."""
        fill = [x for x in self.fill() if x > 0] or [1.0]
        if len(fill) < len(self.plan):
            return math.inf
        return max(fill) / min(fill)

    def observed(self) -> Workload:
        """The traffic's mean session shape in `Workload` terms."""
        first = self.first_tokens / self.first_turns if self.first_turns else 0.0
        user = self.follow_tokens / self.follow_turns if self.follow_turns else first
        answer = self.answer_tokens / self.turns if self.turns else 0.0
        turns = 1 + (self.follow_turns / self.first_turns if self.first_turns else 0.0)
        return Workload(
            context=max(1, round(first - user)) if self.follow_turns else max(1, round(first)),
            turns=max(1, round(turns)),
            user_tokens=max(1, round(user)),
            answer_tokens=max(1, round(answer)),
        )

    def message(self) -> str | None:
        imbalance = self.imbalance()
        if imbalance <= self.tolerance:
            return None
        fill = self.fill()
        tight = max(range(len(fill)), key=fill.__getitem__)
        loose = min(range(len(fill)), key=fill.__getitem__)
        return (
            f"tangram: over {self.turns} turns the traffic fills head group {tight} "
            f"{imbalance:.2f}x as fast as group {loose} for their slots: the pools are split "
            f"for sessions of --tangram-workload {self.planned.flag()}, the traffic "
            f"looks like --tangram-workload {self.observed().flag()}; restart with "
            "it so that the groups run out together"
        )

    def describe(self) -> dict[str, Any]:
        """For /server_info: the planned and observed shapes and how far apart they are."""
        imbalance = self.imbalance() if self.turns else 1.0
        return {
            "planned": self.planned.flag(),
            "observed": self.observed().flag() if self.turns else None,
            "turns": self.turns,
            "imbalance": round(imbalance, 3) if math.isfinite(imbalance) else None,
        }
