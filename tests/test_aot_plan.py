"""AotPlan: splits proportional to group budgets, balanced CTAs, fixed tables per bucket."""

from __future__ import annotations

import math
import random

import pytest

from tangram_sglang.attention.aot_plan import DEFAULT_BUCKETS, SPLITS_LIMIT, AotPlan, PlanError
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.offline.profile import ModelIdentity, uniform_profile


def random_layout(
    rng: random.Random, layers: int = 6, kv_heads: int = 8, groups: int = 4
) -> PoolLayout:
    heads = [[[] for _ in range(layers)] for _ in range(groups)]
    for layer in range(layers):
        for h in range(kv_heads):
            heads[rng.randrange(groups)][layer].append(h)
    ratios = sorted(rng.choice([1.0, rng.uniform(0.02, 1.0)]) for _ in range(groups))
    return PoolLayout(
        layers, kv_heads, 128, tuple(tuple(tuple(x) for x in g) for g in heads), tuple(ratios)
    )


@pytest.fixture
def rng() -> random.Random:
    seed = random.SystemRandom().randrange(2**31)
    r = random.Random(seed)
    r.seed_value = seed  # type: ignore[attr-defined]
    return r


def test_no_cta_reads_more_than_a_balanced_share(rng: random.Random) -> None:
    """Every work item's expected tokens (ratio / splits, in units of the raw length) stay
    within the balanced share 1 / c unless the head is capped at max_splits."""
    layout = random_layout(rng)
    sms, waves = rng.choice([8, 66, 132]), rng.choice([1.0, 2.0, 4.0])
    plan = AotPlan.build(layout, 32, sms, waves=waves, max_splits=64)
    mean_load = sum(sum(layout.ratios[g] for g in row) for row in plan.group_of) / 6
    for b, batch in enumerate(plan.buckets):
        share = batch * mean_load / (waves * sms)
        for g, (ratio, splits) in enumerate(zip(plan.ratios, plan.splits[b], strict=True)):
            if splits < plan.max_splits:
                assert ratio / splits <= share + 1e-9, (
                    f"bucket {batch} group {g}: {splits} splits leave {ratio / splits:.4f} "
                    f"of the context per CTA > balanced share {share:.4f} (seed {rng.seed_value})"
                )
            if splits > 1:
                assert ratio / (splits - 1) > share - 1e-9, (
                    f"bucket {batch} group {g}: {splits} splits is more than needed "
                    f"(seed {rng.seed_value})"
                )


def test_default_plan_gives_a_full_group_the_splits_its_ratio_deserves(rng: random.Random) -> None:
    """No cap at 64: at a small batch and a low mean ratio, a 100% group gets every split
    its ratio asks for (hundreds on 132 SMs), so its CTAs are no longer than the others'."""
    full = (rng.randrange(6), rng.randrange(8))  # the one (layer, head) kept at 100%
    heads: list[list[list[int]]] = [[[] for _ in range(6)] for _ in range(3)]
    for layer in range(6):
        mid = rng.sample(range(8), 2)
        for h in range(8):
            g = 2 if (layer, h) == full else 1 if h in mid else 0
            heads[g][layer].append(h)
    ratios = (rng.uniform(0.01, 0.05), rng.uniform(0.05, 0.2), 1.0)
    layout = PoolLayout(6, 8, 128, tuple(tuple(map(tuple, g)) for g in heads), ratios)
    plan = AotPlan.build(layout, 32, 132)
    mean_load = sum(sum(layout.ratios[g] for g in row) for row in plan.group_of) / 6
    b = plan.bucket(4)
    want = math.ceil(4 * 132 / (4 * mean_load) - 1e-9)
    assert plan.splits[b][2] == want > 64, (
        f"100% group at batch 4: {plan.splits[b][2]} splits, its ratio asks for {want} "
        f"(seed {rng.seed_value})"
    )
    assert AotPlan.from_dict(plan.to_dict()) == plan


def test_splits_grow_with_the_group_ratio(rng: random.Random) -> None:
    layout = random_layout(rng)
    plan = AotPlan.build(layout, 32, 132)
    for b in range(len(plan.buckets)):
        order = sorted(range(len(plan.ratios)), key=lambda g: plan.ratios[g])
        counts = [plan.splits[b][g] for g in order]
        assert counts == sorted(counts), (
            f"bucket {plan.buckets[b]}: {counts} for ratios {[plan.ratios[g] for g in order]}"
        )


def test_launch_size_is_about_waves_times_sms(rng: random.Random) -> None:
    layout = random_layout(rng)
    sms, waves = 132, 4.0
    plan = AotPlan.build(layout, 32, sms, waves=waves, max_splits=1024)
    for b, batch in enumerate(plan.buckets):
        ctas = sum(plan.ctas(b, layer, batch) for layer in range(6)) / 6
        low = waves * sms
        high = waves * sms + batch * 8  # ceil adds under one split per head
        if all(s > 1 for s in plan.splits[b]):
            assert low - 1e-6 <= ctas <= high, f"bucket {batch}: {ctas} CTAs per layer"
        else:
            assert ctas >= batch * 8, f"bucket {batch}: fewer CTAs than (request, head) pairs"


def test_work_table_covers_each_head_split_once(rng: random.Random) -> None:
    layout = random_layout(rng)
    plan = AotPlan.build(layout, 16, rng.randint(1, 200))
    for b in range(len(plan.buckets)):
        for layer in range(6):
            table = plan.table(b, layer)
            expected = {(h, s) for h in range(8) for s in range(table.head_splits[h])}
            assert sorted(table.items) == sorted(expected), f"bucket {b} layer {layer}"
            assert table.head_splits == tuple(
                plan.splits[b][layout.locate(layer, h)[0]] for h in range(8)
            )


def test_bucket_is_the_smallest_that_holds_the_batch() -> None:
    plan = AotPlan.build(random_layout(random.Random(1)), 32, 132)
    assert plan.buckets == DEFAULT_BUCKETS
    for batch in range(1, 300):
        b = plan.bucket(batch)
        size = plan.buckets[b]
        if batch <= plan.buckets[-1]:
            assert size >= batch and (b == 0 or plan.buckets[b - 1] < batch)
        else:
            assert b == len(plan.buckets) - 1
    for bad in (0, -3, 2.0, True):
        with pytest.raises(PlanError, match="batch"):
            plan.bucket(bad)  # type: ignore[arg-type]


def test_uniform_profile_gives_every_head_the_same_splits() -> None:
    model = ModelIdentity("Qwen3ForCausalLM", 4, 32, 8, 128, "x")
    plan = AotPlan.from_profile(uniform_profile(model, 0.25), None, 132)
    for b, batch in enumerate(plan.buckets):
        assert len(set(plan.head_splits(b, 0))) == 1
        # uniform ratios cancel: about waves * SMs CTAs over batch * 8 (request, head) pairs
        want = min(plan.max_splits, max(1, math.ceil(4 * 132 / (batch * 8) - 1e-9)))
        assert plan.splits[b][0] == want, f"bucket {batch}: {plan.splits[b][0]} != {want}"


def test_round_trip_and_malformed_documents(rng: random.Random) -> None:
    plan = AotPlan.build(random_layout(rng), 32, 132, waves=3.0, min_chunk=64)
    assert AotPlan.from_dict(plan.to_dict()) == plan
    doc = plan.to_dict()
    del doc["splits"]
    with pytest.raises(PlanError, match="'splits'"):
        AotPlan.from_dict(doc)
    doc = plan.to_dict()
    doc["splits"][0][0] = 0
    with pytest.raises(PlanError, match=r"splits\[0\]"):
        AotPlan.from_dict(doc)
    doc = plan.to_dict()
    doc["group_of"][1][2] = 99
    with pytest.raises(PlanError, match=r"group_of\[1\]"):
        AotPlan.from_dict(doc)
    with pytest.raises(PlanError, match="format"):
        AotPlan.from_dict({**plan.to_dict(), "format": "other"})


def test_bad_knobs_are_named() -> None:
    layout = random_layout(random.Random(2))
    with pytest.raises(PlanError, match="num_q_heads"):
        AotPlan.build(layout, 12, 132)
    with pytest.raises(PlanError, match="buckets"):
        AotPlan.build(layout, 32, 132, buckets=(4, 2))
    with pytest.raises(PlanError, match="num_sms"):
        AotPlan.build(layout, 32, 0)
    with pytest.raises(PlanError, match="waves"):
        AotPlan.build(layout, 32, 132, waves=0)
    for bad in (0, SPLITS_LIMIT + 1):
        with pytest.raises(PlanError, match="max_splits"):
            AotPlan.build(layout, 32, 132, max_splits=bad)
