"""Budget Reservation: kept_g(n) and per-request reservations are exact and bounded."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sglang.memory.budget import (
    BudgetRule,
    Workload,
    kept_tokens,
    pages,
    reserve_turn,
    session_slots,
)

rules = st.builds(
    BudgetRule,
    sink=st.integers(0, 8),
    window=st.integers(0, 64),
    floor=st.integers(0, 16),
    page_size=st.sampled_from([1, 16, 64]),
)
ratios = st.floats(min_value=1e-3, max_value=1.0)


@given(n=st.integers(0, 20000), ratio=ratios, rule=rules)
def test_kept_never_above_n_and_never_below_forced(n, ratio, rule):
    kept = kept_tokens(n, ratio, rule)
    assert kept <= n, f"kept {kept} > n {n}"
    forced = min(n, max(rule.sink + rule.window, rule.floor))
    assert kept >= forced, f"kept {kept} below sink+window/floor {forced} (n={n})"


@given(n=st.integers(0, 20000), ratio=ratios, rule=rules)
def test_kept_is_monotone_in_n(n, ratio, rule):
    assert kept_tokens(n + 1, ratio, rule) >= kept_tokens(n, ratio, rule)


@given(n=st.integers(0, 20000), r1=ratios, r2=ratios, rule=rules)
def test_kept_is_monotone_in_ratio(n, r1, r2, rule):
    lo, hi = sorted((r1, r2))
    assert kept_tokens(n, lo, rule) <= kept_tokens(n, hi, rule)


@given(n=st.integers(0, 20000), rule=rules)
def test_full_ratio_keeps_everything(n, rule):
    assert kept_tokens(n, 1.0, rule) == n


def test_kept_matches_the_formula_on_a_known_case():
    rule = BudgetRule(sink=4, window=32)
    # 1000 tokens at 25%: 36 forced + ceil(0.25 * 964) = 36 + 241
    assert kept_tokens(1000, 0.25, rule) == 277
    assert kept_tokens(30, 0.25, rule) == 30


@given(
    n=st.integers(0, 5000),
    decode=st.integers(0, 2000),
    group_ratios=st.lists(ratios, min_size=1, max_size=6),
    rule=rules,
)
def test_reservation_is_page_rounded_and_covers_kept_plus_decode(n, decode, group_ratios, rule):
    res = reserve_turn(n, decode, group_ratios, rule)
    for kept, slots, ratio in zip(res.kept, res.slots, group_ratios, strict=True):
        assert kept == kept_tokens(n, ratio, rule)
        assert slots % rule.page_size == 0
        assert kept + decode <= slots < kept + decode + rule.page_size
    assert res.total_slots == sum(res.slots)


@given(
    turns=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 500)), min_size=1, max_size=6),
    group_ratios=st.lists(ratios, min_size=1, max_size=4),
    rule=rules,
)
@settings(max_examples=50)
def test_session_slots_sum_the_turn_reservations(turns, group_ratios, rule):
    total = session_slots(turns, group_ratios, rule)
    expected = [0] * len(group_ratios)
    for n, a in turns:
        for g, r in enumerate(group_ratios):
            expected[g] += pages(kept_tokens(n, r, rule) + a, rule.page_size) * rule.page_size
    assert list(total) == expected


def test_workload_turn_shapes_put_the_context_in_turn_one():
    w = Workload(context=1000, turns=3, user_tokens=10, answer_tokens=20)
    assert w.turn_shapes() == [(1010, 20), (10, 20), (10, 20)]
    assert w.raw_tokens == 1010 + 20 + 2 * 30


@pytest.mark.parametrize(
    "call",
    [
        lambda: kept_tokens(-1, 0.5, BudgetRule()),
        lambda: kept_tokens(10, 0.0, BudgetRule()),
        lambda: kept_tokens(10, 1.5, BudgetRule()),
        lambda: kept_tokens(10, math.nan, BudgetRule()),
        lambda: BudgetRule(page_size=0),
        lambda: reserve_turn(10, -1, [0.5], BudgetRule()),
    ],
)
def test_bad_budget_input_is_refused(call):
    with pytest.raises(ValueError):
        call()
