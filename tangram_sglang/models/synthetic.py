"""Synthetic profiles: a realistic per-head spread for models that cannot be calibrated.

Dummy-weight models (benchmarks on the GPU) and unit tests need profiles whose shape
matches the model but whose numbers are not measured. Per-head kept ratios are drawn
log-normally around the target (the skew seen in calibrated models: most heads keep
little, a few keep almost everything), then grouped exactly as calibration would.
"""

from __future__ import annotations

import numpy as np

from tangram_sglang.offline.calibrate import HeadStatistics, profile_from_statistics
from tangram_sglang.offline.profile import Calibration, ModelIdentity, Profile


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
    """Profile from per-(layer, head) kept-ratio mean/std tables ([layers, kv_heads]),
    reserved and grouped exactly as calibration does (p90 assumes a normal spread)."""
    mean = np.clip(np.asarray(mean, dtype=np.float64), 1e-6, 1.0)
    std = np.maximum(np.asarray(std, dtype=np.float64), 0.0)
    p90 = np.minimum(1.0, mean + 1.2816 * std)
    stats = HeadStatistics.from_moments(
        mean, std, p90, calibration.alpha, minimum=1e-6, rank_stability=rank_stability
    )
    return profile_from_statistics(model, method, calibration, stats, max_groups, grouping)


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
