"""Capacity planning: how many multi-turn sessions fit in a KV budget, per layout.

Compares, for one workload shape, full KV, uniform compression at the target ratio,
the profile's per-head budgets on a single-length paged pool (every head padded to the
largest reserved ratio: what a stock paged engine must do), and Tangram's head-group
pools. All numbers come from `budget.session_slots` and `PoolLayout.pool_slots`, the
same functions `RaggedPool` sizes itself with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tangram_sglang.memory.budget import BudgetRule, Workload, session_slots
from tangram_sglang.memory.layout import PoolLayout, agreed_pool_slots, sessions_that_fit
from tangram_sglang.offline.profile import Profile


@dataclass(frozen=True)
class PlanRow:
    name: str
    bytes_per_session: int
    sessions: int


@dataclass(frozen=True)
class GroupSplit:
    gid: int
    ratio: float
    heads: int
    slots: int
    bytes: int
    slots_per_session: int


@dataclass(frozen=True)
class CapacityPlan:
    rows: tuple[PlanRow, ...]
    groups: tuple[GroupSplit, ...]
    held_ratio: float  # memory share per compressed token (uniform's ratio in the rows)
    rank_use: tuple[float, ...] = (1.0,)  # share of each TP rank's budget its pools use


def _single_group_row(
    name: str, ratio: float, layout: PoolLayout, turns, rule: BudgetRule, budget: int, dtype_bytes
) -> PlanRow:
    per_session = session_slots(turns, [ratio], rule)[0] * layout.full_token_bytes(dtype_bytes)
    return PlanRow(name, per_session, budget // per_session)


def serving_sessions(
    pool_slots: Sequence[int],
    ratios: Sequence[float],
    rule: BudgetRule,
    full_tokens: int,
    workload: Workload,
) -> tuple[int, int]:
    """Sessions of `workload` that fit at once in the same KV bytes: at full KV
    (`full_tokens` slots, one per token) and in the head-group pools (`pool_slots`)."""
    turns = workload.turn_shapes()
    full = full_tokens // session_slots(turns, [1.0], rule)[0]
    return full, sessions_that_fit(pool_slots, session_slots(turns, ratios, rule))


def capacity_plan(
    profile: Profile,
    kv_bytes: int,
    workload: Workload,
    dtype_bytes: int = 2,
    page_size: int = 1,
    target_ratio: float | None = None,
    tp_size: int = 1,
) -> CapacityPlan:
    """Sessions per layout in `kv_bytes` (per GPU: under tensor parallelism each rank
    holds its share of the heads, and the group slots all ranks agree on)."""
    c = profile.calibration
    rule = BudgetRule(sink=c.sink, window=c.window, page_size=page_size)
    shards = PoolLayout.from_profile(profile, target_ratio).shards(tp_size)
    layout = shards[0]
    turns = workload.turn_shapes()
    ratio = target_ratio if target_ratio is not None else profile.held_ratio
    padded = max(layout.ratios)  # one paged pool reserves every head's budget for the largest

    demand = session_slots(turns, layout.ratios, rule)
    slots = agreed_pool_slots(shards, kv_bytes, demand, dtype_bytes, page_size)
    rank_use = tuple(sum(s.group_bytes(slots, dtype_bytes, page_size)) / kv_bytes for s in shards)
    groups = tuple(
        GroupSplit(
            g,
            layout.ratios[g],
            sum(len(h) for s in shards for h in s.heads[g]),
            slots[g],
            slots[g] * layout.slot_bytes(g, dtype_bytes),
            demand[g],
        )
        for g in range(layout.num_groups)
    )
    tangram_bytes = sum(d * layout.slot_bytes(g, dtype_bytes) for g, d in enumerate(demand))
    rows = (
        _single_group_row("full KV", 1.0, layout, turns, rule, kv_bytes, dtype_bytes),
        _single_group_row(
            f"uniform {ratio:.0%}", ratio, layout, turns, rule, kv_bytes, dtype_bytes
        ),
        _single_group_row(
            "per-head, one paged pool", padded, layout, turns, rule, kv_bytes, dtype_bytes
        ),
        PlanRow("tangram head groups", tangram_bytes, sessions_that_fit(slots, demand)),
    )
    return CapacityPlan(rows, groups, ratio, rank_use)


def format_plan(
    plan: CapacityPlan, profile: Profile, kv_bytes: int, workload: Workload, dtype_bytes: int = 2
) -> str:
    m = profile.model
    full = plan.rows[0]
    lines = [
        f"model {m.architecture} ({m.num_layers} layers, {m.num_kv_heads} kv heads, head_dim "
        f"{m.head_dim}), method {profile.method}, {profile.num_groups} head groups",
        f"memory share {plan.held_ratio:.3f} of full KV per compressed token (the profile as "
        f"calibrated at base ratio {profile.calibration.base_ratio} holds "
        f"{profile.held_ratio:.3f}); uniform compared at the same share",
        f"KV budget {kv_bytes / 2**30:.2f} GiB at {dtype_bytes} byte(s) per KV element; "
        f"session: {workload.context} context tokens, "
        f"{workload.turns} turns of {workload.user_tokens} user + {workload.answer_tokens} "
        "answer tokens",
        "",
        f"{'layout':<28}{'MiB/session':>12}{'sessions':>10}{'vs full':>9}",
    ]
    for row in plan.rows:
        gain = row.sessions / full.sessions if full.sessions else float("inf")
        lines.append(
            f"{row.name:<28}{row.bytes_per_session / 2**20:>12.2f}{row.sessions:>10}{gain:>8.2f}x"
        )
    lines += [
        "",
        f"{'group':<7}{'ratio':>8}{'heads':>7}{'slots':>12}{'MiB':>10}{'slots/session':>15}",
    ]
    for g in plan.groups:
        lines.append(
            f"{g.gid:<7}{g.ratio:>8.3f}{g.heads:>7}{g.slots:>12}{g.bytes / 2**20:>10.1f}"
            f"{g.slots_per_session:>15}"
        )
    if len(plan.rank_use) > 1:
        use = ", ".join(f"{u:.1%}" for u in plan.rank_use)
        lines += [
            "",
            f"tensor parallel {len(plan.rank_use)}: per GPU (MiB of rank 0); every rank holds "
            "these group slots, its pools using "
            f"{use} of its KV budget (the heaviest rank's heads set the slots)",
        ]
    return "\n".join(lines)
