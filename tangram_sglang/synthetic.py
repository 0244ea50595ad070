"""Synthetic profiles: a realistic per-head spread for models that cannot be calibrated.

Dummy-weight models (benchmarks on the GPU) and unit tests need profiles whose shape
matches the model but whose numbers are not measured. Per-head kept ratios are drawn
log-normally around the target (the skew seen in calibrated models: most heads keep
little, a few keep almost everything), then grouped exactly as calibration would.
"""

from __future__ import annotations

import numpy as np

from tangram_sglang.grouping import build_groups
from tangram_sglang.profile import Calibration, HeadStats, ModelIdentity, Profile


def profile_from_table(
    model: ModelIdentity,
    mean: np.ndarray,
    std: np.ndarray,
    method: str,
    calibration: Calibration,
    max_groups: int = 4,
    grouping: str = "global",
    rank_stability: float = 1.0,
) -> Profile:
    """Profile from per-(layer, head) kept-ratio mean/std tables ([layers, kv_heads])."""
    mean = np.clip(np.asarray(mean, dtype=np.float64), 1e-6, 1.0)
    std = np.maximum(np.asarray(std, dtype=np.float64), 0.0)
    reserved = np.minimum(1.0, np.ceil((mean + calibration.alpha * std) * 1e6) / 1e6)
    p90 = np.minimum(reserved, np.minimum(1.0, mean + 1.2816 * std))
    order = np.argsort(-mean.reshape(-1), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    heads = tuple(
        HeadStats(
            layer,
            head,
            float(mean[layer, head]),
            float(std[layer, head]),
            float(max(p90[layer, head], 1e-6)),
            float(reserved[layer, head]),
            int(rank[layer * model.num_kv_heads + head]),
        )
        for layer in range(model.num_layers)
        for head in range(model.num_kv_heads)
    )
    groups, report = build_groups(heads, model.num_layers, model.num_kv_heads, max_groups, grouping)
    return Profile(
        model,
        method,
        calibration,
        heads,
        groups,
        grouping,
        rank_stability,
        extra={k: round(v, 4) for k, v in report.items()},
    )


def synthetic_profile(
    model: ModelIdentity,
    ratio: float,
    spread: float = 0.6,
    seed: int = 0,
    max_groups: int = 4,
    grouping: str = "global",
    rel_std: float = 0.1,
) -> Profile:
    """Per-head means log-normal around `ratio` (sigma=`spread`), std = rel_std * mean."""
    rng = np.random.default_rng(seed)
    shape = (model.num_layers, model.num_kv_heads)
    raw = rng.lognormal(mean=0.0, sigma=spread, size=shape)
    mean = np.clip(raw / raw.mean() * ratio, 0.01, 1.0)
    calib = Calibration(0, ratio, seed, 2.0, 4, 32, f"synthetic-lognormal-{spread}")
    return profile_from_table(
        model, mean, rel_std * mean, "ada-snapkv", calib, max_groups, grouping
    )
