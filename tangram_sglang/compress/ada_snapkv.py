"""Ada-SnapKV: SnapKV scores with Ada-KV's adaptive per-head budget split."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tangram_sglang.compress.base import ada_allocation
from tangram_sglang.compress.snapkv import SnapKV
from tangram_sglang.memory.budget import BudgetRule


@dataclass
class AdaSnapKV(SnapKV):
    """Ada-KV (Feng et al., 2024, arXiv:2407.11550) over SnapKV scores: a layer's budget
    goes to the highest scores across all of its heads jointly, so heads whose attention
    is spread out get more tokens than heads that attend sharply.

    Within fixed per-head budgets (serving, where budgets come from the profile) it
    selects exactly like SnapKV; `allocate` is the dynamic split calibration measures.
    """

    def allocate(self, scores: torch.Tensor, layer_budget: int, rule: BudgetRule) -> list[int]:
        return ada_allocation(scores, layer_budget, rule)
