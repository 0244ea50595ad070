"""Ahead-of-Time load balancing: the static work tables that drive ragged decode.

In a ragged pool a head of a 100% group reads ten times the KV bytes of a head of a 10%
group. Length-driven planners (FlashInfer's `plan()`) rebalance this on the host every
step, for every layer shape, which costs host time and rules out a fixed CUDA graph. The
imbalance is known ahead: group g's lengths are about ratio_g times the request's raw
length. So each kv head gets a number of splits proportional to its group's ratio,
chosen once per batch-size bucket so that a launch has about `waves` CTAs per SM; every
CTA then reads about the same bytes at any context length. A work item is one
(kv head, split) of one layer; the decode grid is (work items of the layer, batch).
Split counts are not capped low: at a small batch and a low kept ratio the 100% group
needs hundreds of splits to keep its CTAs as short as the others' (a cap of 64 made them
read 2-3x more on the H100, 2026-11-23); the merge walks any number of partials in
fixed-width chunks. `max_splits` only bounds the partial buffer.

Nothing here touches a tensor or a kernel: the plan decides, kernels execute. Decode
picks a bucket from the batch size alone (host-known), so the step's only per-step
metadata remain page tables and lengths (DESIGN invariant 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.offline.profile import Profile

FORMAT = "tangram-aot-plan/1"
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_MAX_SPLITS = 1024  # a 128K context in min_chunk 128 pieces; beyond, splits are empty
SPLITS_LIMIT = 1 << 16
_EPS = 1e-9


class PlanError(ValueError):
    """An AOT plan that cannot be built or loaded; the message names the argument."""


@dataclass(frozen=True)
class WorkTable:
    """One layer's launch for one bucket: work items (kv_head, split) and splits per head."""

    items: tuple[tuple[int, int], ...]
    head_splits: tuple[int, ...]

    @property
    def num_items(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class AotPlan:
    """Splits per (bucket, group) and the per-layer work tables derived from them.

    `group_of[l][h]` is the group of kv head h in layer l, `ratios[g]` the group's kept
    ratio; `splits[b][g]` is the number of splits of every head of group g when the batch
    falls in bucket b. A split's token range is fixed by the kernel from the head's length
    alone: chunk = round_up(max(ceil(len / splits), min_chunk), tile), split s reads
    [s * chunk, min((s + 1) * chunk, len)).
    """

    group_of: tuple[tuple[int, ...], ...]
    ratios: tuple[float, ...]
    num_q_heads: int
    num_sms: int
    buckets: tuple[int, ...]
    splits: tuple[tuple[int, ...], ...]
    waves: float
    max_splits: int
    min_chunk: int

    def __post_init__(self) -> None:
        _check_plan(self)

    @classmethod
    def build(
        cls,
        layout: PoolLayout,
        num_q_heads: int,
        num_sms: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        waves: float = 4.0,
        max_splits: int = DEFAULT_MAX_SPLITS,
        min_chunk: int = 128,
    ) -> AotPlan:
        """Plan for a pool layout on a GPU with `num_sms` multiprocessors."""
        group_of = _group_table(layout)
        ratios = tuple(float(r) for r in layout.ratios)
        _check_knobs(num_q_heads, len(group_of[0]), num_sms, buckets, waves, max_splits, min_chunk)
        splits = tuple(
            balanced_splits(group_of, ratios, batch, num_sms, waves, max_splits)
            for batch in buckets
        )
        return cls(
            group_of,
            ratios,
            num_q_heads,
            num_sms,
            tuple(buckets),
            splits,
            waves,
            max_splits,
            min_chunk,
        )

    @classmethod
    def from_profile(
        cls, profile: Profile, target_ratio: float | None, num_sms: int, **knobs: Any
    ) -> AotPlan:
        layout = PoolLayout.from_profile(profile, target_ratio)
        return cls.build(layout, profile.model.num_q_heads, num_sms, **knobs)

    @property
    def num_layers(self) -> int:
        return len(self.group_of)

    @property
    def num_kv_heads(self) -> int:
        return len(self.group_of[0])

    @property
    def gqa(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def bucket(self, batch: int) -> int:
        """Index of the bucket serving `batch` requests: the smallest that holds it (the
        largest bucket serves anything bigger; its tables are valid at any batch)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise PlanError(f"batch {batch!r} must be a positive integer")
        for i, size in enumerate(self.buckets):
            if batch <= size:
                return i
        return len(self.buckets) - 1

    def bucket_max_splits(self, bucket: int) -> int:
        return max(self.splits[bucket])

    @property
    def most_splits(self) -> int:
        """The largest split count of any bucket."""
        return max(max(row) for row in self.splits)

    def head_splits(self, bucket: int, layer: int) -> tuple[int, ...]:
        return tuple(self.splits[bucket][g] for g in self.group_of[layer])

    def table(self, bucket: int, layer: int) -> WorkTable:
        """Work items of one layer, heaviest heads' splits first (they finish last)."""
        per_head = self.head_splits(bucket, layer)
        order = sorted(range(self.num_kv_heads), key=lambda h: (-per_head[h], h))
        items = tuple((h, s) for h in order for s in range(per_head[h]))
        return WorkTable(items, per_head)

    def ctas(self, bucket: int, layer: int, batch: int) -> int:
        return self.table(bucket, layer).num_items * batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "group_of": [list(row) for row in self.group_of],
            "ratios": list(self.ratios),
            "num_q_heads": self.num_q_heads,
            "num_sms": self.num_sms,
            "buckets": list(self.buckets),
            "splits": [list(row) for row in self.splits],
            "waves": self.waves,
            "max_splits": self.max_splits,
            "min_chunk": self.min_chunk,
        }

    @classmethod
    def from_dict(cls, data: Any) -> AotPlan:
        if not isinstance(data, Mapping):
            raise PlanError("aot plan: the document must be a mapping")
        if data.get("format") != FORMAT:
            raise PlanError(f"aot plan field 'format': {data.get('format')!r} is not {FORMAT!r}")
        try:
            return cls(
                group_of=tuple(tuple(int(g) for g in row) for row in data["group_of"]),
                ratios=tuple(float(r) for r in data["ratios"]),
                num_q_heads=int(data["num_q_heads"]),
                num_sms=int(data["num_sms"]),
                buckets=tuple(int(b) for b in data["buckets"]),
                splits=tuple(tuple(int(s) for s in row) for row in data["splits"]),
                waves=float(data["waves"]),
                max_splits=int(data["max_splits"]),
                min_chunk=int(data["min_chunk"]),
            )
        except KeyError as exc:
            raise PlanError(f"aot plan field {exc.args[0]!r} is missing") from exc
        except (TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"aot plan: malformed field ({exc})") from exc


def balanced_splits(
    group_of: Sequence[Sequence[int]],
    ratios: Sequence[float],
    batch: int,
    num_sms: int,
    waves: float,
    max_splits: int,
) -> tuple[int, ...]:
    """Splits per group, proportional to the group's ratio, for about waves * num_sms CTAs.

    With c = waves * num_sms / (batch * mean over layers of sum_h ratio_{g(h)}), group g
    gets ceil(c * ratio_g) splits (at least 1, at most `max_splits`), so no CTA reads
    more than 1 / c of a request's raw length: the largest CTA is no bigger than the
    average one would be with perfect balance at `waves` CTAs per SM.
    """
    layer_load = [sum(ratios[g] for g in row) for row in group_of]
    mean_load = sum(layer_load) / len(layer_load)
    c = waves * num_sms / (batch * mean_load)
    return tuple(min(max_splits, max(1, math.ceil(c * r - _EPS))) for r in ratios)


def _group_table(layout: PoolLayout) -> tuple[tuple[int, ...], ...]:
    table = [[-1] * layout.num_kv_heads for _ in range(layout.num_layers)]
    for g in range(layout.num_groups):
        for layer in range(layout.num_layers):
            for h in layout.heads_in(g, layer):
                table[layer][h] = g
    for layer, row in enumerate(table):
        if -1 in row:
            raise PlanError(f"layout: kv head {row.index(-1)} of layer {layer} is in no group")
    return tuple(tuple(row) for row in table)


def _check_knobs(
    num_q_heads: int,
    num_kv_heads: int,
    num_sms: int,
    buckets: Sequence[int],
    waves: float,
    max_splits: int,
    min_chunk: int,
) -> None:
    if num_q_heads < 1 or num_q_heads % num_kv_heads:
        raise PlanError(f"num_q_heads {num_q_heads} is not a multiple of {num_kv_heads} kv heads")
    if num_sms < 1:
        raise PlanError(f"num_sms {num_sms} must be >= 1")
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise PlanError(f"buckets {list(buckets)} must be positive, ascending, distinct")
    if not waves > 0:
        raise PlanError(f"waves {waves} must be > 0")
    if not 1 <= max_splits <= SPLITS_LIMIT:
        raise PlanError(f"max_splits {max_splits} must lie in 1..{SPLITS_LIMIT}")
    if min_chunk < 1:
        raise PlanError(f"min_chunk {min_chunk} must be >= 1")


def _check_plan(plan: AotPlan) -> None:
    if not plan.group_of or not plan.group_of[0]:
        raise PlanError("aot plan field 'group_of': needs at least one layer and one kv head")
    heads = len(plan.group_of[0])
    if any(len(row) != heads for row in plan.group_of):
        raise PlanError("aot plan field 'group_of': layers have different kv head counts")
    _check_knobs(
        plan.num_q_heads,
        heads,
        plan.num_sms,
        plan.buckets,
        plan.waves,
        plan.max_splits,
        plan.min_chunk,
    )
    groups = len(plan.ratios)
    for layer, row in enumerate(plan.group_of):
        bad = [g for g in row if not 0 <= g < groups]
        if bad:
            raise PlanError(f"aot plan field 'group_of[{layer}]': unknown group {bad[0]}")
    if any(not 0.0 < r <= 1.0 for r in plan.ratios):
        raise PlanError(f"aot plan field 'ratios': {list(plan.ratios)} must lie in (0, 1]")
    if len(plan.splits) != len(plan.buckets):
        raise PlanError("aot plan field 'splits': needs one row per bucket")
    for b, row in enumerate(plan.splits):
        if len(row) != groups or any(not 1 <= s <= plan.max_splits for s in row):
            raise PlanError(
                f"aot plan field 'splits[{b}]': needs {groups} counts in 1..{plan.max_splits}"
            )
