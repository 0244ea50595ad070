"""Per-layer fusion thresholds, with the paper's default of fusing only middle layers.

The reference implementation leaves the first two and the last two layers unfused ("2
warmup layers and 2 final layers") and applies one cosine threshold to the others (0.66
in its first patch, 0.7 in its README, 0.75 in its later default). The first layers'
keys carry the most token identity and the last ones feed the logits directly, so the
paper spends no distortion there. `None` for a layer means: never fused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tangram_sglang.fusion.merge import check_thresholds

EDGE_LAYERS = 2  # unfused at each end, as in the reference implementation


@dataclass(frozen=True)
class LayerThresholds:
    values: tuple[float | None, ...]  # per layer; None = not fused

    def __post_init__(self) -> None:
        check_thresholds([v for v in self.values if v is not None])

    @classmethod
    def middle(
        cls, num_layers: int, threshold: float, first: int = EDGE_LAYERS, last: int = EDGE_LAYERS
    ) -> LayerThresholds:
        """`threshold` for layers first .. num_layers - last - 1, the others unfused."""
        return cls(
            tuple(
                threshold if first <= layer < num_layers - last else None
                for layer in range(num_layers)
            )
        )

    @classmethod
    def per_layer(cls, values: Sequence[float | None]) -> LayerThresholds:
        return cls(tuple(values))

    def __getitem__(self, layer: int) -> float | None:
        return self.values[layer]

    @property
    def fused_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, v in enumerate(self.values) if v is not None)
