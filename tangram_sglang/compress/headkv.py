"""HeadKV-style budgets: heads that retrieve get more of the cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tangram_sglang.compress.base import checked, group_mean, window_attention
from tangram_sglang.compress.snapkv import SnapKV
from tangram_sglang.offline.profile import scale_ratios


@dataclass
class HeadKV(SnapKV):
    """HeadKV (Fu et al., 2024, arXiv:2410.19258): heads differ in how much they matter for
    retrieving from the context, so budgets follow a per-head importance score measured on
    retrieval examples, not how spread out a head's attention is (Ada-KV's signal).

    Our importance is the attention the question's queries (the observation window) pay to
    the statements the question is about (`needle_mass`), measured at calibration on
    samples with known statement spans; serving selects within the budgets like SnapKV.
    """

    def needle_mass(
        self, q: torch.Tensor, k: torch.Tensor, spans: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """`[Hkv]`: mean attention of the last `window_size` queries on the `spans` tokens."""
        q, k, _ = checked(q, k, k)
        t = k.shape[0]
        attention = window_attention(q[t - min(self.window_size, t) :], k)
        inside = torch.zeros(t, dtype=torch.bool, device=k.device)
        for start, end in spans:
            inside[start:end] = True
        return group_mean(attention[..., inside].sum(-1).mean(-1), k.shape[1])


def headkv_ratios(importance: np.ndarray, ratio: float, share: float) -> np.ndarray:
    """Per-head kept ratios with mean `ratio`: `1 - share` of the budget spread evenly, the
    `share` left in proportion to `importance` (HeadKV's base + shared pool), water-filled
    at 1 so that a full head's excess goes to the others."""
    imp = np.clip(np.asarray(importance, dtype=np.float64), 0.0, None)
    imp = imp / imp.mean() if imp.sum() > 0 else np.ones_like(imp)
    shape = (1.0 - share) + share * imp.ravel()
    scaled = scale_ratios(shape.tolist(), [1] * shape.size, ratio / shape.mean())
    return np.asarray(scaled).reshape(imp.shape)
