"""What one fused block is: a page of tokens times the kv heads of one unit of fusion.

The paper fuses vLLM pages (16 tokens) of one layer, all kv heads flattened into one
vector. Tangram stores each head group in its own pool, and one group slot holds that
group's heads in *every* layer, so the unit matters (docs/architecture.md, "Fast Fusion"):

- `layer`: all kv heads of one layer (the paper's unit);
- `group`: the heads of one head group in one layer (one block of one group's pool rows);
- `head`: one kv head of one layer;
- `slot`: the heads of one head group across every fused layer, the unit a tangram pool
  can actually free (a group slot spans all layers); one decision for all its pieces.

A unit is a tuple of pieces `(layer, heads)`. Blocks are full pages only: a tail shorter
than a page is never fused (the paper fuses full blocks; the tail is still being written).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tangram_sglang.offline.profile import Profile

KINDS = ("layer", "group", "head", "slot")


@dataclass(frozen=True)
class Unit:
    """One unit of fusion: its pieces `(layer, kv heads)`, fused by one decision."""

    name: str
    pieces: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(layer for layer, _ in self.pieces)


def units(
    kind: str,
    layers: Sequence[int],
    num_kv_heads: int,
    profile: Profile | None = None,
) -> list[Unit]:
    """The units of `kind` over `layers` (a profile's head groups for `group` and `slot`)."""
    if kind not in KINDS:
        raise ValueError(f"unit kind {kind!r} is not one of {KINDS}")
    everyone = tuple(range(num_kv_heads))
    if kind == "layer":
        return [Unit(f"L{layer}", ((layer, everyone),)) for layer in layers]
    if kind == "head":
        return [Unit(f"L{layer}h{h}", ((layer, (h,)),)) for layer in layers for h in everyone]
    if profile is None:
        raise ValueError(f"unit kind {kind!r} needs a profile (its head groups)")
    out = []
    for g in profile.groups:
        pieces = tuple(
            (layer, tuple(sorted(g.heads_in_layer(layer))))
            for layer in layers
            if g.heads_in_layer(layer)
        )
        if kind == "group":
            out += [Unit(f"L{piece[0]}G{g.gid}", (piece,)) for piece in pieces]
        elif pieces:
            out.append(Unit(f"G{g.gid}", pieces))
    return out


def to_blocks(x: torch.Tensor, heads: Sequence[int], page: int) -> torch.Tensor:
    """`x [kv_heads, T, D]` -> `[T // page, page * len(heads) * D]`: the full pages of
    `heads`, token-major as a paged pool stores them."""
    h, t, d = len(heads), x.shape[1], x.shape[2]
    n = t // page
    picked = x[list(heads), : n * page]  # [h, n*page, D]
    return picked.reshape(h, n, page, d).permute(1, 2, 0, 3).reshape(n, page * h * d)


def from_blocks(blocks: torch.Tensor, out: torch.Tensor, heads: Sequence[int], page: int) -> None:
    """Write `blocks` (as `to_blocks` cut them) back into `out [kv_heads, T, D]` in place."""
    n, h, d = blocks.shape[0], len(heads), out.shape[2]
    rows = blocks.reshape(n, page, h, d).permute(2, 0, 1, 3).reshape(h, n * page, d)
    out[list(heads), : n * page] = rows.to(out.dtype)
