"""Budget Reservation: the exact post-compression footprint of a request, per head group.

Everything here is a pure function of token counts and group ratios, so the scheduler
can reserve at admission exactly what the pools will later be asked for, and nothing is
ever allocated-then-reclaimed.

Conventions (stated once, here):
- A compressed segment of n new tokens keeps, in every head of a group with ratio r,
  the first `sink` and the last `window` tokens plus ceil(r * rest) of the others, and
  never fewer than `floor` (nor more than n).
- Decoded tokens are kept uncompressed by every group.
- Each turn's new slots start on a fresh page, so a turn reserves
  ceil((kept + decode) / page_size) pages per group; a session is the sum of its turns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 1e-9


@dataclass(frozen=True)
class BudgetRule:
    """The deterministic kept-token rule shared by calibration, scheduler and pools."""

    sink: int = 4
    window: int = 32
    floor: int = 0
    page_size: int = 1

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 0 or self.floor < 0:
            raise ValueError("BudgetRule: sink, window and floor must be >= 0")
        if self.page_size < 1:
            raise ValueError("BudgetRule: page_size must be >= 1")


def kept_tokens(n: int, ratio: float, rule: BudgetRule) -> int:
    """kept_g(n): tokens a head with kept ratio `ratio` stores for a segment of n tokens."""
    if n < 0:
        raise ValueError(f"segment length {n} is negative")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio {ratio} is outside (0, 1]")
    forced = min(n, rule.sink + rule.window)
    rest = n - forced
    kept = forced + math.ceil(ratio * rest - _EPS)
    return min(n, max(kept, rule.floor))


def pages(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@dataclass(frozen=True)
class TurnBudget:
    """What one turn of one request holds in each group, decided at admission."""

    kept: tuple[int, ...]
    decode: int
    slots: tuple[int, ...]

    @property
    def total_slots(self) -> int:
        return sum(self.slots)


def reserve_turn(
    new_tokens: int, max_new_tokens: int, ratios: Sequence[float], rule: BudgetRule
) -> TurnBudget:
    """Per-group slots for a turn: its compressed new segment plus its decode budget."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens {max_new_tokens} is negative")
    kept = tuple(kept_tokens(new_tokens, r, rule) for r in ratios)
    slots = tuple(pages(k + max_new_tokens, rule.page_size) * rule.page_size for k in kept)
    return TurnBudget(kept, max_new_tokens, slots)


def session_slots(
    turns: Sequence[tuple[int, int]], ratios: Sequence[float], rule: BudgetRule
) -> tuple[int, ...]:
    """Per-group slots a whole session holds: turns are (new prompt tokens, answer tokens)."""
    total = [0] * len(ratios)
    for new_tokens, answer in turns:
        for g, s in enumerate(reserve_turn(new_tokens, answer, ratios, rule).slots):
            total[g] += s
    return tuple(total)


@dataclass(frozen=True)
class Workload:
    """A multi-turn session shape: a shared first context, then follow-up turns."""

    context: int = 8192
    turns: int = 4
    user_tokens: int = 256
    answer_tokens: int = 256

    def turn_shapes(self) -> list[tuple[int, int]]:
        """(new prompt tokens, answer tokens) per turn; turn 1 carries the context."""
        first = (self.context + self.user_tokens, self.answer_tokens)
        rest = [(self.user_tokens, self.answer_tokens)] * (self.turns - 1)
        return [first, *rest]

    @property
    def raw_tokens(self) -> int:
        return sum(n + a for n, a in self.turn_shapes())

    def flag(self) -> str:
        """As the value of `--tangram-workload` (CONTEXT,TURNS,USER,ANSWER)."""
        return f"{self.context},{self.turns},{self.user_tokens},{self.answer_tokens}"


def serving_workload(max_context: int) -> Workload:
    """The session shape a server's pools are split for (and its start-up log counts): a
    4-turn chat whose first prompt is half the context, at most 8K tokens."""
    return Workload(context=max(256, min(8192, max_context // 2)))
