"""Scorers equal an independent float64 reading of their paper; selection keeps exactly the
reserved budget with sink and window forced; Ada-KV's split conserves the layer budget."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sglang.compress import (
    SCORERS,
    TOVA,
    AdaSnapKV,
    DuoAttention,
    ExpectedAttention,
    KeyDiff,
    Scorer,
    SegmentBatch,
    SnapKV,
    StreamingLLM,
    ada_allocation,
    check_budgets,
    duo_split,
    pool1d,
    select,
    select_batch,
)
from tangram_sglang.compress.base import partition_by_length
from tangram_sglang.memory.budget import BudgetRule, kept_tokens

# ------------------------------------------------------------ float64 references (numpy loops)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_attention_rows(q, k, qi, last):
    """Attention of query head qi over the last `last` positions: rows [last, T]."""
    t, hq, d = q.shape
    h = qi // (hq // k.shape[1])
    rows = np.zeros((last, t))
    for r, pos in enumerate(range(t - last, t)):
        rows[r, : pos + 1] = softmax(k[: pos + 1, h] @ q[pos, qi] / math.sqrt(d))
    return rows


def ref_group(per_q_head, hkv):
    """Per-q-head arrays -> per-kv-head means, q head i -> kv head i // group."""
    g = len(per_q_head) // hkv
    return np.stack([np.mean(per_q_head[h * g : (h + 1) * g], axis=0) for h in range(hkv)])


def ref_snapkv(q, k, window, kernel, pooling):
    t, hq, _ = q.shape
    hkv, w = k.shape[1], min(window, t)
    att = ref_group([ref_attention_rows(q, k, i, w).mean(0) for i in range(hq)], hkv)
    prefix, pad = t - w, kernel // 2
    out = np.full((hkv, t), np.inf)
    for h in range(hkv):
        for j in range(prefix):
            near = att[h, max(0, j - pad) : min(prefix, j + pad + 1)]
            out[h, j] = near.sum() / kernel if pooling == "avg" else near.max()
    return out


def ref_tova(q, k):
    hq = q.shape[1]
    return ref_group([ref_attention_rows(q, k, i, 1)[0] for i in range(hq)], k.shape[1])


def ref_keydiff(k):
    t, hkv, _ = k.shape
    out = np.zeros((hkv, t))
    for h in range(hkv):
        unit = k[:, h] / np.linalg.norm(k[:, h], axis=1, keepdims=True)
        anchor = unit.mean(0)
        for j in range(t):
            out[h, j] = -(k[j, h] @ anchor) / (np.linalg.norm(k[j, h]) * np.linalg.norm(anchor))
    return out


def ref_expected_attention(q, k, v, n_sink):
    t, hq, d = q.shape
    hkv = k.shape[1]
    per_q = []
    for i in range(hq):
        h = i // (hq // hkv)
        stats = q[n_sink:, i] if t > n_sink else q[:, i]
        mu = stats.mean(0)
        cov = np.cov(stats.T, bias=True).reshape(d, d) if len(stats) > 1 else np.zeros((d, d))
        logits = np.array(
            [mu @ k[j, h] / math.sqrt(d) + k[j, h] @ cov @ k[j, h] / (2 * d) for j in range(t)]
        )
        per_q.append(softmax(logits))
    return ref_group(per_q, hkv) * np.linalg.norm(v, axis=-1).T


def ref_duo_mass(q, k, observation, sink, window):
    t, hq, _ = q.shape
    w = min(observation, t)
    dropped = [i for i in range(t) if sink <= i < t - window]
    mass = [ref_attention_rows(q, k, i, w)[:, dropped].sum(1).mean() for i in range(hq)]
    return ref_group(np.array(mass), k.shape[1])


def ref_select(scores, kept, sink, window):
    """Forced tokens plus the best others by (score desc, index asc), as sorted lists."""
    out = []
    for h, row in enumerate(scores):
        t = len(row)
        forced = [i for i in range(t) if i < sink or i >= t - window]
        others = sorted((i for i in range(t) if i not in forced), key=lambda i: (-row[i], i))
        out.append(sorted(forced + others[: kept[h] - len(forced)]))
    return out


# ------------------------------------------------------------ inputs


def qkv(t, hq, hkv, d=16, dtype=torch.float32, seed=None):
    """Fresh random q/k/v (a new seed per call unless given; the seed is in `qkv.seed`)."""
    qkv.seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(qkv.seed)
    q, k, v = (torch.from_numpy(rng.standard_normal((t, h, d)) * 1.5) for h in (hq, hkv, hkv))
    return q.to(dtype), k.to(dtype), v.to(dtype)


SHAPES = [(t, hkv * g, hkv) for t in (1, 3, 20, 36, 37, 90) for hkv, g in ((4, 1), (2, 2), (2, 4))]


def close(ours, ref, what):
    ours = ours.double().numpy()
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("t,hq,hkv", SHAPES)
def test_scorers_match_float64_references(t, hq, hkv):
    q, k, v = qkv(t, hq, hkv)
    q64, k64, v64 = (x.double().numpy() for x in (q, k, v))
    what = f"T={t} Hq={hq} Hkv={hkv} seed={qkv.seed}"
    for pooling, kernel in (("avg", 5), ("max", 3), ("avg", 1)):
        scorer = SnapKV(window_size=8, kernel_size=kernel, pooling=pooling)
        close(scorer.score(q, k, v), ref_snapkv(q64, k64, 8, kernel, pooling), f"SnapKV {what}")
    close(AdaSnapKV(window_size=8).score(q, k, v), ref_snapkv(q64, k64, 8, 5, "avg"), what)
    close(TOVA().score(q, k, v), ref_tova(q64, k64), f"TOVA {what}")
    close(KeyDiff().score(q, k, v), ref_keydiff(k64), f"KeyDiff {what}")
    close(
        ExpectedAttention(n_sink=4).score(q, k, v),
        ref_expected_attention(q64, k64, v64, 4),
        f"ExpectedAttention {what}",
    )
    positions = np.broadcast_to(np.arange(t, dtype=np.float64), (hkv, t))
    close(StreamingLLM().score(q, k, v), positions, f"StreamingLLM {what}")
    rule = BudgetRule(sink=2, window=5)
    close(
        DuoAttention(observation=6).head_mass(q, k, rule),
        ref_duo_mass(q64, k64, 6, 2, 5),
        f"Duo head mass {what}",
    )


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scores_are_float32_for_half_inputs_and_float64_for_double(name):
    scorer = SCORERS[name]()
    for dtype, expected in (
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float64, torch.float64),
    ):
        q, k, v = qkv(40, 4, 2, dtype=dtype)
        scores = scorer.score(q, k, v)
        assert scores.dtype == expected, f"{name} on {dtype} scored in {scores.dtype}"
        assert scores.shape == (2, 40) and not torch.isnan(scores).any(), name


def test_scorer_inputs_are_checked_by_name():
    q, k, v = qkv(10, 4, 2)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        SnapKV().score(q[:, :3], k, v)
    with pytest.raises(ValueError, match="disagree on T or D"):
        TOVA().score(q[:5], k, v)
    with pytest.raises(ValueError, match="k .* and v .* differ"):
        KeyDiff().score(q, k, v[:5])
    with pytest.raises(ValueError, match=r"\[T, heads, head_dim\]"):
        KeyDiff().score(q[0], k, v)
    with pytest.raises(ValueError, match="kernel_size"):
        pool1d(torch.zeros(2, 10), 4)


# ------------------------------------------------------------ selection


def random_scores(rng, heads, t, ties):
    values = rng.integers(0, 3, (heads, t)) if ties else rng.standard_normal((heads, t))
    return torch.tensor(values, dtype=torch.float32)


# What a selection property test draws besides its lengths: heads, the forced-token rule,
# tied or distinct scores, and the budgets.
SELECTION_DRAWS = {
    "heads": st.integers(1, 4),
    "sink": st.integers(0, 6),
    "window": st.integers(0, 12),
    "ties": st.booleans(),
    "data": st.data(),
}


@given(t=st.integers(1, 60), **SELECTION_DRAWS)
@settings(max_examples=200, deadline=None)
def test_select_forces_sink_and_window_and_keeps_exactly_the_budget(
    t, heads, sink, window, ties, data
):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = random_scores(rng, heads, t, ties)
    rule = BudgetRule(sink=sink, window=window)
    low = min(t, sink + window)
    kept = [data.draw(st.integers(low, t)) for _ in range(heads)]
    chosen = select(scores, kept, rule)
    expected = ref_select(scores.numpy(), kept, sink, window)
    for h in range(heads):
        got = chosen[h].tolist()
        assert chosen[h].dtype == torch.long
        assert len(got) == kept[h], f"head {h} kept {len(got)} tokens, reserved {kept[h]}"
        assert got == sorted(set(got)), f"head {h} indices not ascending/unique: {got}"
        forced = {i for i in range(t) if i < sink or i >= t - window}
        assert forced <= set(got), f"head {h} dropped forced tokens {sorted(forced - set(got))}"
        assert got == expected[h], f"head {h}: {got} != reference {expected[h]}"


def test_select_with_budget_from_kept_tokens_matches_reservation():
    rule = BudgetRule(sink=4, window=32)
    for t in (1, 30, 36, 37, 500):
        for ratio in (0.01, 0.25, 0.5, 1.0):
            scores = torch.randn(3, t)
            kept = [kept_tokens(t, ratio, rule)] * 3
            assert [len(s) for s in select(scores, kept, rule)] == kept


def test_select_never_lets_a_nonforced_inf_displace_a_forced_token():
    scores = torch.zeros(1, 12)
    scores[0, 5] = float("inf")
    chosen = select(scores, [4], BudgetRule(sink=1, window=3)).pop().tolist()
    assert chosen == [0, 9, 10, 11], f"forced tokens lost to an inf score: {chosen}"


def test_select_rejects_budgets_outside_the_forced_minimum_and_length():
    rule = BudgetRule(sink=2, window=3)
    scores = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"kept_per_head\[1\] = 11"):
        select(scores, [5, 11, 5], rule)
    with pytest.raises(ValueError, match=r"kept_per_head\[2\] = 4"):
        select(scores, [5, 5, 4], rule)
    with pytest.raises(ValueError, match="3 kv heads"):
        select(scores, [5, 5], rule)
    with pytest.raises(ValueError, match="NaN"):
        select(torch.full((3, 10), float("nan")), [5, 5, 5], rule)


@given(
    t=st.integers(1, 50),
    heads=st.integers(1, 5),
    sink=st.integers(0, 5),
    window=st.integers(0, 10),
    floor=st.integers(0, 20),
    ties=st.booleans(),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_ada_allocation_conserves_layer_budget_and_picks_the_joint_top_k(
    t, heads, sink, window, floor, ties, data
):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scores = random_scores(rng, heads, t, ties)
    rule = BudgetRule(sink=sink, window=window, floor=floor)
    low = min(t, max(sink + window, floor))
    budget = data.draw(st.integers(heads * low, heads * t))
    counts = ada_allocation(scores, budget, rule)
    assert sum(counts) == budget, f"counts {counts} do not sum to layer budget {budget}"
    assert all(low <= c <= t for c in counts), f"counts {counts} outside [{low}, {t}]"
    # Independent reading: each head's mandatory tokens, then a joint ranking of the rest.
    s = scores.numpy()
    minimum = ref_select(s, [low] * heads, sink, window)
    rest = sorted(
        ((h, i) for h in range(heads) for i in range(t) if i not in minimum[h]),
        key=lambda hi: (-s[hi], hi[0], hi[1]),
    )[: budget - heads * low]
    expected = [sorted(minimum[h] + [i for g, i in rest if g == h]) for h in range(heads)]
    chosen = [c.tolist() for c in select(scores, counts, rule)]
    assert chosen == expected, "select(ada_allocation) differs from the joint top-k"


def test_ada_allocation_gives_diffuse_heads_more_tokens():
    t, rule = 200, BudgetRule(sink=2, window=4)
    sharp = torch.zeros(t)
    sharp[50:55] = 1.0
    diffuse = torch.full((t,), 0.3)
    counts = ada_allocation(torch.stack([sharp, diffuse]), 2 * 40, rule)
    assert counts[1] > counts[0], f"diffuse head got {counts[1]}, sharp head {counts[0]}"


def test_ada_allocation_rejects_impossible_budgets():
    rule = BudgetRule(sink=2, window=3)
    with pytest.raises(ValueError, match="layer_budget 9"):
        ada_allocation(torch.randn(2, 10), 9, rule)
    with pytest.raises(ValueError, match="layer_budget 21"):
        ada_allocation(torch.randn(2, 10), 21, rule)


def test_ada_snapkv_allocates_with_ada_kv():
    q, k, v = qkv(120, 8, 4)
    rule = BudgetRule(sink=4, window=8)
    scorer = AdaSnapKV(window_size=8)
    scores = scorer.score(q, k, v)
    assert scorer.allocate(scores, 4 * 40, rule) == ada_allocation(scores, 4 * 40, rule)


# ------------------------------------------------------------ batched scoring and selection


class PlainScorer(Scorer):
    """A scorer with only `score`: the batched path falls back to a loop over it."""

    def score(self, q, k, v):
        return k.double().sum(-1).T * q.double().mean((1, 2))


def ragged(rng, count):
    """Random segment lengths (1, shorter than any window, long) and starts with gaps."""
    lens = [int(rng.choice([1, rng.integers(2, 8), rng.integers(8, 90)])) for _ in range(count)]
    gaps = rng.integers(0, 3, count)
    starts = [int(sum(lens[:i]) + gaps[: i + 1].sum()) for i in range(count)]
    return starts, lens


BATCH_SCORERS = {
    **{name: cls() for name, cls in SCORERS.items()},
    "snapkv max/3 w8": SnapKV(window_size=8, kernel_size=3, pooling="max"),
    "snapkv avg/1 w4": SnapKV(window_size=4, kernel_size=1),
    "expected-attention plain": ExpectedAttention(use_covariance=False, use_vnorm=False),
    "plain (loop fallback)": PlainScorer(),
}


@pytest.mark.parametrize("name", sorted(BATCH_SCORERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_score_batch_equals_score_of_each_segment(name, dtype):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    scorer = BATCH_SCORERS[name]
    hkv, group = [(4, 1), (2, 2), (2, 4)][rng.integers(3)]
    starts, lens = ragged(rng, int(rng.integers(1, 9)))
    q, k, v = qkv(max(starts) + max(lens) + 2, hkv * group, hkv, dtype=dtype, seed=seed)
    # One part padded to the longest segment, and many small parts (merged after scoring).
    for padding in (math.inf, 1.2):
        segments = SegmentBatch(starts, lens, "cpu", padding, 0)
        batch = scorer.score_batch(q, k, v, segments)
        what = f"{name} {dtype} seed {seed} lens {lens} parts {len(segments.parts)}"
        assert batch.shape == (len(lens), hkv, max(lens)), f"{what}: shape {batch.shape}"
        for s, (start, n) in enumerate(zip(starts, lens, strict=True)):
            rows = slice(start, start + n)
            alone = scorer.score(q[rows], k[rows], v[rows])
            assert batch.dtype == alone.dtype, f"{what}: dtype {batch.dtype} != {alone.dtype}"
            tight = 1e-12 if alone.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(
                batch[s, :, :n], alone, rtol=tight, atol=tight * 0.1,
                msg=lambda m, s=s, w=what: f"{w}: segment {s} differs from score(): {m}",
            )  # fmt: skip
            assert (batch[s, :, n:] == -math.inf).all(), f"{what}: segment {s} padding not -inf"


def test_partition_by_length_bounds_the_padding_and_covers_every_segment():
    rng = np.random.default_rng(int(np.random.SeedSequence().entropy % 2**32))
    for _ in range(200):
        lens = [int(x) for x in rng.integers(1, 5000, rng.integers(1, 40))]
        padding, floor = float(rng.uniform(1.0, 3.0)), int(rng.integers(0, 9000))
        parts = partition_by_length(lens, padding, floor)
        assert sorted(i for p in parts for i in p) == list(range(len(lens))), parts
        for part in parts:
            assert part == sorted(part), f"part {part} is not ascending"
            real = sum(lens[i] for i in part)
            padded = len(part) * max(lens[i] for i in part)
            assert len(part) == 1 or padded <= max(floor, padding * real), (
                f"lens {lens}: part {part} pads {real} tokens to {padded} "
                f"(max_padding {padding}, min_tokens {floor})"
            )


@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=6), **SELECTION_DRAWS)
@settings(max_examples=200, deadline=None)
def test_select_batch_equals_select_of_each_segment(lens, heads, sink, window, ties, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    rule = BudgetRule(sink=sink, window=window)
    width = max(lens)
    scores = random_scores(rng, len(lens) * heads, width, ties).view(len(lens), heads, width)
    # Padding holds anything (even +inf): select_batch must never pick it.
    scores[0, 0, -1] = math.inf
    kept = [[data.draw(st.integers(min(n, sink + window), n)) for _ in range(heads)] for n in lens]
    check_budgets(lens, kept, rule)
    top = max(max(row) for row in kept)
    out = select_batch(scores, torch.tensor(lens), torch.tensor(kept), rule, top)
    assert out.shape == (len(lens), heads, top) and out.dtype == torch.int64
    for s, n in enumerate(lens):
        chosen = select(scores[s, :, :n], kept[s], rule)
        for h in range(heads):
            got = out[s, h].tolist()
            assert got[: kept[s][h]] == chosen[h].tolist(), (
                f"segment {s} head {h}: {got[: kept[s][h]]} != select {chosen[h].tolist()}"
            )
            assert got[kept[s][h] :] == [-1] * (top - kept[s][h]), f"padding {got}"


def test_batched_inputs_are_checked_by_name():
    rule = BudgetRule(sink=2, window=3)
    with pytest.raises(ValueError, match=r"kept\[1\]\[0\] = 3 is outside \[4, 10\]"):
        check_budgets([10, 10], [[5, 5], [3, 5]], BudgetRule(sink=1, window=3))
    with pytest.raises(ValueError, match="lens must be"):
        select_batch(torch.zeros(2, 3, 9), torch.tensor([9]), torch.ones(2, 3), rule)
    with pytest.raises(ValueError, match="kept must be"):
        select_batch(torch.zeros(2, 3, 9), torch.tensor([9, 9]), torch.ones(2, 2), rule)
    with pytest.raises(ValueError, match="width 10"):
        select_batch(torch.zeros(2, 3, 9), torch.tensor([9, 9]), torch.ones(2, 3), rule, 10)
    with pytest.raises(ValueError, match="lens .* must be >= 1"):
        SegmentBatch([0, 4], [4, 0])
    q, k, v = qkv(10, 4, 2)
    with pytest.raises(ValueError, match="reach row 12 but the scorer inputs have 10"):
        SnapKV().score_batch(q, k, v, SegmentBatch([0, 6], [6, 6]))


# ------------------------------------------------------------ Duo-style heads


@given(
    layers=st.integers(1, 4),
    heads=st.integers(1, 6),
    t=st.integers(1, 300),
    ratio=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=100, deadline=None)
def test_duo_split_picks_heads_with_most_lost_mass_and_hits_the_ratio(
    layers, heads, t, ratio, seed
):
    rule = BudgetRule(sink=4, window=16)
    mass = np.random.default_rng(seed).random((layers, heads))
    full = duo_split(mass, t, ratio, rule)
    assert full.shape == mass.shape
    streaming = min(t, 20) / t
    if streaming >= 1.0:
        assert full.all()
        return
    n = mass.size
    mean_kept = lambda m: (m + (n - m) * streaming) / n  # noqa: E731
    best = min(range(n + 1), key=lambda m: (abs(mean_kept(m) - ratio), m))
    assert abs(mean_kept(full.sum()) - ratio) <= abs(mean_kept(best) - ratio) + 1e-12
    if full.any() and not full.all():
        assert mass[full].min() >= mass[~full].max(), (
            "a full head lost less mass than a streaming one"
        )
