"""Duo-style heads: each kv head either keeps everything or only sink + recent window."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tangram_sglang.compress.base import checked, forced_mask, group_mean, window_attention
from tangram_sglang.compress.streaming import StreamingLLM
from tangram_sglang.memory.budget import BudgetRule


@dataclass
class DuoAttention(StreamingLLM):
    """DuoAttention (Xiao et al., 2024, arXiv:2410.10819): only some heads retrieve from the
    whole context, the others are streaming heads that need just sink + recent window.

    Serving needs no new scores (full heads sit in a ratio-1 group and keep every token,
    streaming heads keep sink + window by recency); calibration measures `head_mass`,
    the attention a head would lose as a streaming head, and `duo_split` picks full heads.
    """

    observation: int = 32

    def head_mass(self, q: torch.Tensor, k: torch.Tensor, rule: BudgetRule) -> torch.Tensor:
        """`[Hkv]`: mean attention of the last `observation` queries outside sink + window."""
        q, k, _ = checked(q, k, k)
        t = k.shape[0]
        attention = window_attention(q[t - min(self.observation, t) :], k)
        dropped = attention[..., ~forced_mask(t, rule, k.device)].sum(-1).mean(-1)
        return group_mean(dropped, k.shape[1])


def duo_split(mass: np.ndarray, num_tokens: int, ratio: float, rule: BudgetRule) -> np.ndarray:
    """Bool mask (shape of `mass`, all layers at once) of full heads: the heads with the most
    attention outside sink + window, as many as bring the mean kept ratio closest to `ratio`
    (streaming heads keep min(T, sink + window) of T tokens, full heads all T)."""
    mass = np.asarray(mass, dtype=np.float64)
    streaming = min(num_tokens, rule.sink + rule.window) / num_tokens
    if streaming >= 1.0:
        return np.ones(mass.shape, dtype=bool)
    share = (ratio - streaming) / (1.0 - streaming)
    num_full = int(np.clip(np.floor(share * mass.size + 0.5), 0, mass.size))
    order = np.argsort(-mass.reshape(-1), kind="stable")
    full = np.zeros(mass.size, dtype=bool)
    full[order[:num_full]] = True
    return full.reshape(mass.shape)
