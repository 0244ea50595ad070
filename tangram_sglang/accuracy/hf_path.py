"""The reference path: a Hugging Face model that keeps its KV the way the server does.

The server compresses inside each layer of an extend: the new segment's tokens attend to
the row's compressed prefix plus themselves (causally), then the scorer scores the
segment's post-RoPE q/k/v and every head keeps its group's budget (`kept_tokens`) of it;
decoded tokens are one-token segments every head keeps. This module reproduces exactly
that on transformers' own model with a registered attention function, holding every
token's K/V and, per layer, a `[kv_heads, T]` mask of what each head kept. A dropped
token is masked out of every later query, which is the same function as not storing it.

Scores and selection are the server's own calls (`Scorer.score_batch`, `select_batch`),
so the two paths differ only by the model's float arithmetic (transformers vs SGLang
layers), and the accuracy benchmark measures how often that changes an answer.

A turn-1 prefill does not depend on the budgets (no prefix yet, the segment sees all of
itself), so `Conversation.branch` prefills once and gives each configuration its own
selection of the same KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tangram_sglang.compress import SCORERS, Scorer, SegmentBatch, select_batch
from tangram_sglang.memory.budget import BudgetRule, kept_tokens

ATTENTION = "tangram_reference"


@dataclass(frozen=True)
class HeadBudgets:
    """One configuration's kept ratio per (layer, kv head) (`None`: full KV) and scorer."""

    name: str
    ratios: np.ndarray | None  # [L, Hkv]
    method: str = "snapkv"

    def kept(self, layer: int, n: int, rule: BudgetRule) -> list[int] | None:
        """Tokens each head keeps of an n-token segment; None when every head keeps all."""
        if self.ratios is None:
            return None
        kept = [kept_tokens(n, float(r), rule) for r in self.ratios[layer]]
        return None if min(kept) == n else kept

    @property
    def held(self) -> float:
        """Mean kept ratio over heads: the memory share of a long compressed segment."""
        return 1.0 if self.ratios is None else float(np.mean(self.ratios))


@dataclass
class KeptMasks:
    """What one configuration's heads hold: per layer `[kv_heads, T]` bool."""

    budgets: HeadBudgets
    layers: list[torch.Tensor] = field(default_factory=list)

    def copy(self) -> KeptMasks:
        return KeptMasks(self.budgets, list(self.layers))

    def held_slots(self) -> int:
        """Slots held, summed over (layer, head): bytes / (2 * head_dim * dtype size)."""
        return int(sum(int(m.sum()) for m in self.layers))


@dataclass
class _Forward:
    """The forward in flight: its prefix length, whose masks it reads (`reader`) and
    which configurations select from its new segment (`writers`)."""

    prefix: int
    reader: KeptMasks
    writers: Sequence[KeptMasks]
    rule: BudgetRule
    scorers: dict[str, Scorer]


_ACTIVE: ContextVar[_Forward | None] = ContextVar("tangram_reference_forward", default=None)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention over the kept prefix plus the causal segment, then selection."""
    fwd = _ACTIVE.get()
    if fwd is None:
        raise RuntimeError("the reference attention runs only inside Conversation forwards")
    if query.shape[0] != 1:
        raise ValueError("the reference path runs one conversation at a time (batch size 1)")
    layer, p = module.layer_idx, fwd.prefix
    n, t = query.shape[2], key.shape[2]
    hq, hkv = query.shape[1], key.shape[1]
    if p:
        causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        visible = torch.cat(
            (fwd.reader.layers[layer][:, None, :].expand(hkv, n, p), causal.expand(hkv, n, n)), -1
        ).repeat_interleave(hq // hkv, 0)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=visible[None], scale=scaling, enable_gqa=True
        )
    else:
        out = F.scaled_dot_product_attention(
            query, key, value, scale=scaling, is_causal=n > 1, enable_gqa=True
        )
    _select(fwd, layer, query[0, :, -n:], key[0, :, p:t], value[0, :, p:t])
    return out.transpose(1, 2).contiguous(), None


def _select(fwd: _Forward, layer: int, q, k, v) -> None:
    """Every writer keeps its budget of the segment (`[heads, n, D]` inputs), as the
    server's `_select` does: one batched score, `select_batch` per head's budget."""
    n, hkv = k.shape[1], k.shape[0]
    scores: dict[str, torch.Tensor] = {}
    segment = None
    for masks in fwd.writers:
        kept = masks.budgets.kept(layer, n, fwd.rule)
        keep = torch.ones(hkv, n, dtype=torch.bool, device=k.device)
        if kept is not None:
            method = masks.budgets.method
            if segment is None:
                segment = SegmentBatch([0], [n], q.device)
            if method not in scores:
                scorer = fwd.scorers.setdefault(method, SCORERS[method]())
                qt, kt, vt = (x.transpose(0, 1) for x in (q, k, v))
                scores[method] = scorer.score_batch(qt, kt, vt, segment)
            budget = torch.tensor([kept], dtype=torch.int64, device=k.device)
            chosen = select_batch(scores[method], segment.lengths, budget, fwd.rule, max(kept))
            keep = torch.zeros(hkv, n, dtype=torch.bool, device=k.device)
            for h, count in enumerate(kept):
                keep[h, chosen[0, h, :count]] = True
        previous = masks.layers[layer] if layer < len(masks.layers) else None
        merged = keep if previous is None else torch.cat((previous, keep), 1)
        if layer < len(masks.layers):
            masks.layers[layer] = merged
        else:
            masks.layers.append(merged)


def register() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def load_model(
    model_path: str | Path, threads: int | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The model in float32 (the server's dtype for exact comparisons) with our attention,
    on `device` (every tensor of a conversation follows the model there)."""
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.float32, attn_implementation=register()
    )
    return model.to(device).eval()


class Conversation:
    """One session on the reference path: `extend` a turn's new tokens, then `answer`.

    As in the server, the last sampled token of an answer has no KV until the next turn:
    it opens the next turn's segment (`pending`), which is what the radix cache leaves to
    extend after matching the previous prompt and answer.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        budgets: HeadBudgets,
        rule: BudgetRule,
        eos: Sequence[int] = (),
    ) -> None:
        from transformers import DynamicCache

        self.model, self.rule, self.eos = model, rule, set(eos)
        self.masks = KeptMasks(budgets)
        self.cache = DynamicCache(config=model.config)
        self.length = 0  # tokens with KV
        self.pending: list[int] = []
        self.logits: torch.Tensor | None = None  # after the last extend, not yet answered
        self.scorers: dict[str, Scorer] = {}

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int], writers: Sequence[KeptMasks]) -> torch.Tensor:
        fwd = _Forward(self.length, self.masks, writers, self.rule, self.scorers)
        device = self.model.device
        positions = torch.arange(self.length, self.length + len(ids), device=device)[None]
        token = _ACTIVE.set(fwd)
        try:
            out = self.model(
                torch.tensor([list(ids)], device=device),
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            _ACTIVE.reset(token)
        self.length += len(ids)
        return out.logits[0, -1]

    def extend(self, new_ids: Sequence[int]) -> None:
        """The turn's segment: the previous answer's last token, then `new_ids`."""
        self.logits = self._forward(self.pending + list(new_ids), [self.masks])
        self.pending = []

    def answer(self, max_new_tokens: int) -> list[int]:
        """Greedy tokens after the last extend, up to an EOS or `max_new_tokens`."""
        if self.logits is None:
            raise RuntimeError("answer() needs an extend() first")
        output = [int(self.logits.argmax())]
        self.logits = None
        while len(output) < max_new_tokens and output[-1] not in self.eos:
            output.append(int(self._forward(output[-1:], [self.masks]).argmax()))
        self.pending = output[-1:]
        return output

    def turn(self, new_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        self.extend(new_ids)
        return self.answer(max_new_tokens)

    def branch(self, ids: Sequence[int], configs: Sequence[HeadBudgets]) -> list[Conversation]:
        """Extend `ids` once (this conversation must be empty) into one conversation per
        configuration, each holding its own selection of the same KV, ready to `answer`."""
        if self.length or self.pending:
            raise ValueError("branch starts from an empty conversation")
        writers = [KeptMasks(c) for c in configs]
        logits = self._forward(ids, writers)
        branches = []
        for masks in writers:
            other = Conversation(self.model, masks.budgets, self.rule, self.eos)
            other.masks, other.cache, other.length = masks, _share(self.cache), self.length
            other.logits, other.scorers = logits, self.scorers
            branches.append(other)
        return branches


def _share(cache):
    """A cache holding the same tensors (updates concatenate, so nothing is shared after)."""
    from transformers import DynamicCache

    copy = DynamicCache()
    for layer, entry in enumerate(cache.layers):
        copy.update(entry.keys, entry.values, layer)
    return copy
