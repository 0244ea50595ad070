"""The rate-distortion report: what fusion stores and what it changes, per layer.

Input is what a serving engine holds after prefill, captured from a real model: per
request (or per input, for chunk fusion) the post-RoPE K and V of every layer and some
real post-RoPE queries. `fuse_captures` fuses them unit by unit (`blocks.units`) with the
tree merge, decodes, and reports per layer:

- compression: blocks stored / blocks in (fused layers' full pages only);
- cosine distortion 1 - cos(x, decoded x) of K and V blocks, mean and max;
- attention-output error: |softmax(q K'^T) V' - softmax(q K^T) V| / |softmax(q K^T) V|
  (Frobenius, float64, causal, GQA) with the captured queries attending to the decoded
  cache of their own request;
- the Poisson prediction of how many blocks find a partner (below).

**Poisson model (our reading).** The paper ties thresholds to a rate-distortion analysis
under a Poisson process model; its equations were not available to us, so this is the
model written the way we use it: a block's number of blocks in *other* units within the
threshold is taken as Poisson with rate lambda = p(tau) * (blocks of other units), p(tau)
being the share of cross-unit block pairs whose cosine (every feature) is at least tau.
The predicted share of blocks with at least one partner is mean(1 - exp(-lambda)); the
measured share is the blocks in fused sets. Distortion needs no model here: the guarded
merge bounds every block's cosine distortion by 1 - tau.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tangram_sglang.fusion.blocks import Unit, from_blocks, to_blocks
from tangram_sglang.fusion.encoding import cosine, decode, encode
from tangram_sglang.fusion.merge import tree_merge
from tangram_sglang.fusion.thresholds import LayerThresholds


@dataclass
class Capture:
    """One request's (or input's) KV as the engine holds it, and queries to measure with."""

    k: list[torch.Tensor]  # per layer [kv_heads, T, D], post-RoPE
    v: list[torch.Tensor]  # per layer [kv_heads, T, D]
    q: list[torch.Tensor]  # per layer [q_heads, nq, D], post-RoPE
    q_pos: torch.Tensor  # [nq] positions of those queries
    # Set when `k` holds keys before RoPE (fusion of position-free keys): rotates K and
    # decoded K to their positions before attention, as a kernel reading them would.
    k_rope: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class LayerReport:
    layer: int
    threshold: float | None
    blocks_in: int = 0
    blocks_stored: int = 0
    matched: int = 0  # blocks in fused sets (size >= 2)
    predicted_matched: float = 0.0  # Poisson prediction of `matched`
    k_distortion: list[float] = field(default_factory=list, repr=False)
    v_distortion: list[float] = field(default_factory=list, repr=False)
    attention_error: float = 0.0

    @property
    def compression(self) -> float:
        """Blocks stored / blocks in (1.0: nothing saved)."""
        return self.blocks_stored / self.blocks_in if self.blocks_in else 1.0

    def row(self) -> dict:
        k, v = self.k_distortion or [0.0], self.v_distortion or [0.0]
        return {
            "layer": self.layer,
            "threshold": self.threshold,
            "blocks_in": self.blocks_in,
            "blocks_stored": self.blocks_stored,
            "compression": self.compression,
            "matched_share": self.matched / self.blocks_in if self.blocks_in else 0.0,
            "predicted_matched_share": (
                self.predicted_matched / self.blocks_in if self.blocks_in else 0.0
            ),
            "k_distortion_mean": sum(k) / len(k),
            "k_distortion_max": max(k),
            "v_distortion_mean": sum(v) / len(v),
            "v_distortion_max": max(v),
            "attention_error": self.attention_error,
        }


def attention_output(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Causal GQA attention of `q [Hq, nq, D]` at positions `q_pos` over `k, v [Hkv, T, D]`,
    float64: `[Hq, nq, D]`."""
    group = q.shape[0] // k.shape[0]
    kk = k.double().repeat_interleave(group, 0)
    vv = v.double().repeat_interleave(group, 0)
    scores = q.double() @ kk.transpose(1, 2) / math.sqrt(q.shape[-1])
    future = torch.arange(k.shape[1])[None, :] > q_pos[:, None]
    scores = scores.masked_fill(future[None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ vv


def poisson_matched(
    features: Sequence[torch.Tensor], owner: torch.Tensor, thresholds: Sequence[float]
) -> float:
    """Predicted number of blocks with at least one cross-owner partner (module docstring)."""
    n = owner.shape[0]
    passing = torch.ones(n, n, dtype=torch.bool)
    for x, t in zip(features, thresholds, strict=True):
        unit = torch.nn.functional.normalize(x.double(), dim=1)
        passing &= unit @ unit.T >= t - 1e-12
    cross = owner[:, None] != owner[None, :]
    pairs = int(cross.sum())
    if pairs == 0:
        return 0.0
    p = float((passing & cross).sum()) / pairs
    others = cross.sum(dim=1).double()
    return float((1 - torch.exp(-p * others)).sum())


def fuse_captures(
    captures: Sequence[Capture],
    units: Sequence[Unit],
    thresholds: LayerThresholds,
    page: int,
    chunk_blocks: int | None = None,
    match: str = "kv",
) -> tuple[list[LayerReport], dict]:
    """Fuse `captures` unit by unit; returns per-layer reports and whole-cache totals.

    Owners of blocks: the capture (batch fusion), or with `chunk_blocks` the chunk of
    `chunk_blocks` consecutive blocks within a capture (chunk fusion). `match`: "kv"
    guards K and V (our default, the bound holds for both); "k" is the paper's (V follows
    K's sets, unchecked).
    """
    if match not in ("kv", "k"):
        raise ValueError(f"match {match!r} is not 'kv' or 'k'")
    num_layers = len(captures[0].k)
    reports = {layer: LayerReport(layer, thresholds[layer]) for layer in range(num_layers)}
    k_hat = [[x.clone() for x in c.k] for c in captures]
    v_hat = [[x.clone() for x in c.v] for c in captures]
    saved_elements = 0
    for unit in units:
        pieces = [(layer, heads, thresholds[layer]) for layer, heads in unit.pieces]
        if any(t is None for _, _, t in pieces):
            raise ValueError(f"unit {unit.name} has a piece in an unfused layer")
        ks = [[to_blocks(c.k[layer], heads, page) for c in captures] for layer, heads, _ in pieces]
        vs = [[to_blocks(c.v[layer], heads, page) for c in captures] for layer, heads, _ in pieces]
        counts = [b.shape[0] for b in ks[0]]
        owner = torch.cat(
            [
                torch.full((n,), i) * 1_000_000
                + (torch.arange(n) // chunk_blocks if chunk_blocks else 0)
                for i, n in enumerate(counts)
            ]
        )
        k_flat = [torch.cat(b) for b in ks]
        v_flat = [torch.cat(b) for b in vs]
        feats, ts = [], []
        for p, (_, _, t) in enumerate(pieces):
            feats += [k_flat[p], v_flat[p]] if match == "kv" else [k_flat[p]]
            ts += [t, t] if match == "kv" else [t]
        labels = tree_merge(feats, owner, ts).labels
        matched = int((torch.bincount(labels, minlength=labels.shape[0])[labels] > 1).sum())
        predicted = poisson_matched(feats, owner, ts)
        for p, (layer, heads, _) in enumerate(pieces):
            report = reports[layer]
            for flat, out, dist in (
                (k_flat[p], k_hat, report.k_distortion),
                (v_flat[p], v_hat, report.v_distortion),
            ):
                fused = encode(flat, labels)
                decoded = decode(fused)
                dist += (1 - cosine(flat, decoded)).clamp_min(0).tolist()
                saved_elements += (fused.blocks_in - fused.blocks_stored) * flat.shape[1]
                for i, part in enumerate(decoded.split(counts)):
                    from_blocks(part, out[i][layer], heads, page)
            report.blocks_in += fused.blocks_in  # K and V share the sets: same counts
            report.blocks_stored += fused.blocks_stored
            report.matched += matched
            report.predicted_matched += predicted
    for layer, report in reports.items():
        num = den = 0.0
        for i, c in enumerate(captures):
            rope = c.k_rope or (lambda k: k)
            ref = attention_output(c.q[layer], c.q_pos, rope(c.k[layer]), c.v[layer])
            got = attention_output(c.q[layer], c.q_pos, rope(k_hat[i][layer]), v_hat[i][layer])
            num += float(((got - ref) ** 2).sum())
            den += float((ref**2).sum())
        report.attention_error = math.sqrt(num / den) if den else 0.0
    total = sum(x.numel() for c in captures for x in c.k) * 2
    totals = {
        "kv_elements": total,
        "saved_elements": saved_elements,
        "kv_share_stored": (total - saved_elements) / total,
    }
    return [reports[layer] for layer in range(num_layers)], totals
