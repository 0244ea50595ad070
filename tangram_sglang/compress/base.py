"""What every scorer shares: input checks, GQA averaging, pooling, and token selection.

A scorer only decides how important each new token is (`score`); which tokens survive is
decided here, once, by `select` (fixed per-head budgets from `budget.kept_tokens`) or by
`ada_allocation` (one budget per layer, split across heads by score). Both force the
first `rule.sink` and the last `rule.window` tokens and break ties by the lower token
index, so selection is deterministic and matches what the scheduler reserved.

Shapes: q `[T, Hq, D]`, k and v `[T, Hkv, D]` (post-RoPE, one request's segment of T new
tokens); scores `[Hkv, T]`, higher = keep. Query head i reads kv head i // (Hq // Hkv).

Serving compresses every segment of an extend forward in every layer, so the batched forms
(`Scorer.score_batch`, `select_batch`) take all segments at once (`SegmentBatch`: parts of
similar length, each padded to its longest), with device ops only: a per-segment loop
costs tens of small kernel launches per segment and layer, and any host read of the
device a stall per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tangram_sglang.memory import staging
from tangram_sglang.memory.budget import BudgetRule

# `partition_by_length` (max_padding, min_tokens) per device type, when not given. On CPU
# the padded arithmetic is what costs, so parts stay tight; on a GPU each part costs a dozen
# launches while padding is nearly free, so the default (2.0, 4096) only bounds the memory.
PART_DEFAULTS = {"cpu": (1.25, 0)}


def partition_by_length(
    lens: Sequence[int], max_padding: float, min_tokens: int
) -> list[list[int]]:
    """Segment indices in parts of similar length (each ascending; the longest part first).
    Taking segments longest first, a part grows while its padded size (count x its longest)
    stays within `max_padding` x its real tokens, or within `min_tokens`. Bounds the padded
    work and memory of a batch that mixes a long prompt with many short ones, at a few
    launches per part."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    parts: list[list[int]] = []
    real = 0
    for i in order:
        if parts:
            padded = (len(parts[-1]) + 1) * lens[parts[-1][0]]
            if padded <= max(min_tokens, max_padding * (real + lens[i])):
                parts[-1].append(i)
                real += lens[i]
                continue
        parts.append([i])
        real = lens[i]
    return [sorted(part) for part in parts]


class SegmentBatch:
    """The segments of one extend forward, as the batched scorers and `select_batch` read
    them: segment s is rows `starts[s] .. starts[s] + lens[s] - 1` of the forward's q/k/v.

    Scorers work on `parts` (`partition_by_length`), each padded to its own longest
    segment; their scores come back padded to `width` = max(lens). Everything here depends
    only on host-known counts, so it is built once per forward (a few copies to the device)
    and every layer reads it with device ops only.
    """

    def __init__(
        self,
        starts: Sequence[int],
        lens: Sequence[int],
        device: torch.device | str = "cpu",
        max_padding: float | None = None,
        min_tokens: int | None = None,
    ) -> None:
        if len(starts) != len(lens) or not lens:
            raise ValueError(f"SegmentBatch: {len(starts)} starts for {len(lens)} lens (need >= 1)")
        if min(lens) < 1 or min(starts) < 0:
            raise ValueError(f"SegmentBatch: lens {list(lens)} must be >= 1, starts >= 0")
        self.starts = tuple(int(x) for x in starts)
        self.lens = tuple(int(x) for x in lens)
        self.width = max(self.lens)
        self.end = max(a + n for a, n in zip(self.starts, self.lens, strict=True))
        self.lengths = staging.to_device(torch.tensor(self.lens), device)  # [S] int64
        default_padding, default_tokens = PART_DEFAULTS.get(torch.device(device).type, (2.0, 4096))
        max_padding = default_padding if max_padding is None else max_padding
        min_tokens = default_tokens if min_tokens is None else min_tokens
        self.parts = tuple(
            PaddedSegments(self.starts, self.lens, index, device)
            for index in partition_by_length(self.lens, max_padding, min_tokens)
        )
        # One part holding every segment in order: its scores are the batch's.
        self.whole = len(self.parts) == 1 and self.parts[0].order == tuple(range(len(self)))

    def __len__(self) -> int:
        return len(self.lens)

    def check(self, num_rows: int) -> None:
        if self.end > num_rows:
            raise ValueError(
                f"segments reach row {self.end} but the scorer inputs have {num_rows} tokens"
            )


class PaddedSegments:
    """Some segments of a `SegmentBatch` (`order`, their indices there) as index tensors
    padded to the longest of them (`width`); `window` tables are computed on the device at
    first use and kept for the forward's other layers."""

    def __init__(
        self,
        starts: Sequence[int],
        lens: Sequence[int],
        order: Sequence[int],
        device: torch.device | str,
    ) -> None:
        self.order = tuple(order)
        self.starts = tuple(starts[i] for i in self.order)
        self.lens = tuple(lens[i] for i in self.order)
        self.width = max(self.lens)
        first, count = torch.tensor(self.starts), torch.tensor(self.lens)
        pos = torch.arange(self.width)
        self.index = staging.to_device(torch.tensor(self.order), device)  # [n]: score rows
        self.lengths = staging.to_device(count, device)  # [n] int64
        self.positions = staging.to_device(pos, device)  # [width]
        self.valid = staging.to_device(pos < count[:, None], device)  # [n, width]: real tokens
        # [n, width]: row of each token, padding clamped to the segment's last row.
        self.rows = staging.to_device(
            first[:, None] + torch.minimum(pos, count[:, None] - 1), device
        )
        self._windows: dict[tuple[int, int], Window] = {}

    def __len__(self) -> int:
        return len(self.lens)

    def pad(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` `[n, H, width]` with -inf at the padding."""
        return scores.masked_fill(~self.valid[:, None], float("-inf"))

    def window(self, size: int, group: int) -> Window:
        """The last min(size, len) queries of each segment (what `window_attention` gets),
        for kv heads that serve `group` query heads each."""
        if size < 1 or group < 1:
            raise ValueError(f"window size {size} and GQA group {group} must be >= 1")
        if (size, group) not in self._windows:
            self._windows[size, group] = Window.of(self, size, group)
        return self._windows[size, group]


@dataclass(frozen=True)
class Window:
    """The observation window of every segment, right-aligned in `size` columns: column w
    is position `len - size + w`, a real query where that is >= 0. Query rows are (w, q
    head of the GQA group) pairs, w-major, as `window_attention_mean` lays them out.

    `hidden`: keys a query row must not see (later positions and padding; a padded query
    sees every key, so its softmax stays finite, and weighs 0). `weights`: each query row's
    share of the mean over the real queries and the group. `prefix`: the tokens before the
    window; `tail`: +inf in the window, -inf at the padding (SnapKV's scores there).
    """

    rows: torch.Tensor  # [n, size] int64, clamped into the segment
    hidden: torch.Tensor  # [n, size * group, width] bool
    weights: torch.Tensor  # [n, 1, size * group] float64
    prefix: torch.Tensor  # [n, width] bool
    tail: torch.Tensor  # [n, width] float64

    @classmethod
    def of(cls, part: PaddedSegments, size: int, group: int) -> Window:
        lengths, keys = part.lengths, part.positions
        n, width = part.rows.shape
        query = lengths[:, None] - size + torch.arange(size, device=lengths.device)
        valid = query >= 0  # [n, size]
        rows = part.rows.gather(1, query.clamp(min=0))
        hidden = (keys[None, None, :] > query[:, :, None]) & valid[:, :, None]
        count = lengths.clamp(max=size) * group
        weights = valid.to(torch.float64) / count[:, None]
        tail = torch.full((n, width), math.inf, dtype=torch.float64, device=lengths.device)
        return cls(
            rows,
            hidden[:, :, None].expand(n, size, group, width).reshape(n, size * group, width),
            weights[:, :, None].expand(n, size, group).reshape(n, 1, size * group),
            keys[None, :] < (lengths - lengths.clamp(max=size))[:, None],
            tail.masked_fill_(~part.valid, -math.inf),
        )


@dataclass
class Scorer:
    """Base of all scorers: `score(q, k, v) -> [Hkv, T]`, higher means keep."""

    def score(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_batch(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: SegmentBatch
    ) -> torch.Tensor:
        """`[S, Hkv, width]`: `score` of each segment (rows of q/k/v `[T, heads, D]` as
        `segments` says), padded with -inf; one `score_padded` per part of the batch."""
        check_inputs(q, k, v)
        segments.check(q.shape[0])
        if segments.whole:
            return self.score_padded(q, k, v, segments.parts[0])
        out = None
        for part in segments.parts:
            scores = self.score_padded(q, k, v, part)
            if out is None:
                shape = (len(segments), scores.shape[1], segments.width)
                out = scores.new_full(shape, -math.inf)
            out[:, :, : part.width].index_copy_(0, part.index, scores)
        return out

    def score_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part: PaddedSegments
    ) -> torch.Tensor:
        """`[n, Hkv, part.width]`: the part's segments scored, padded with -inf. This loop
        over `score` is right for every scorer; scorers override it with one computation
        for all of the part's segments."""
        out = None
        for s, (start, n) in enumerate(zip(part.starts, part.lens, strict=True)):
            rows = slice(start, start + n)
            scores = self.score(q[rows], k[rows], v[rows])
            if out is None:
                out = scores.new_full((len(part), scores.shape[0], part.width), -math.inf)
            out[s, :, :n] = scores
        return out


def checked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate scorer inputs and cast them to the scoring dtype (float32, or float64)."""
    check_inputs(q, k, v)
    dtype = scoring_dtype(q)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def scoring_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape checks of scorer inputs (named), before any cast."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(
                f"scorer input {name} must be [T, heads, head_dim], got {tuple(x.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"scorer inputs k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"scorer inputs q {tuple(q.shape)} and k {tuple(k.shape)} disagree on T or D"
        )
    if q.shape[0] == 0:
        raise ValueError("scorer inputs have no tokens (T = 0)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads {q.shape[1]} are not a multiple of kv heads {k.shape[1]}")


def group_mean(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Average a per-query-head tensor `[Hq, ...]` over each kv head's GQA group."""
    return x.reshape(num_kv_heads, x.shape[0] // num_kv_heads, *x.shape[1:]).mean(1)


def window_attention(q_tail: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention `[Hq, W, T]` of the last W queries to all T keys.

    Query w sits at position T - W + w and sees keys 0..T - W + w.
    """
    w, hq, d = q_tail.shape
    t, hkv, _ = k.shape
    keys = k.repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("whd,thd->hwt", q_tail, keys) / math.sqrt(d)
    future = (
        torch.arange(t, device=k.device)[None, :] > torch.arange(t - w, t, device=k.device)[:, None]
    )
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def window_attention_mean(
    q: torch.Tensor, k: torch.Tensor, part: PaddedSegments, size: int
) -> torch.Tensor:
    """`[Hkv, n, width]` (kv head first), in the scoring dtype: `window_attention` of each
    of the part's segments' last `size` queries, averaged over them and over each kv head's
    GQA group (0 at the padding). Keys are gathered as `[Hkv, n, width, D]` so that both
    matmuls read their operands in place; only the gathered rows are cast."""
    t, hkv, d = k.shape
    group = q.shape[1] // hkv
    dtype = scoring_dtype(q)
    window = part.window(size, group)
    queries = q.unflatten(1, (hkv, group)).transpose(0, 1)[:, window.rows]  # [Hkv,n,W,G,D]
    keys = k.transpose(0, 1)[:, part.rows].to(dtype)  # [Hkv, n, width, D]
    queries = queries.flatten(2, 3).to(dtype) / math.sqrt(d)
    logits = torch.matmul(queries, keys.transpose(-1, -2))  # [Hkv, n, W * G, width]
    probs = logits.masked_fill_(window.hidden, float("-inf")).softmax(dim=-1)
    mean = torch.matmul(window.weights.to(dtype), probs)  # [Hkv, n, 1, width]
    return mean.view(hkv, len(part), part.width)


def pool1d(scores: torch.Tensor, kernel_size: int, mode: str = "avg") -> torch.Tensor:
    """Same-length 1-D pooling along tokens (SnapKV's clustering of neighbouring tokens).

    Average pooling counts the zero padding at the edges (divides by `kernel_size`).
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size {kernel_size} must be a positive odd number")
    if kernel_size == 1 or scores.shape[-1] == 0:
        return scores
    pad = kernel_size // 2
    if mode == "avg":
        return F.avg_pool1d(scores[:, None], kernel_size, 1, pad)[:, 0]
    if mode == "max":
        return F.max_pool1d(scores[:, None], kernel_size, 1, pad)[:, 0]
    raise ValueError(f"pooling {mode!r} is not 'avg' or 'max'")


def forced_mask(
    num_tokens: int, rule: BudgetRule, device: torch.device | None = None
) -> torch.Tensor:
    """`[T]` bool: the sink and recent-window tokens every head keeps."""
    pos = torch.arange(num_tokens, device=device)
    return (pos < rule.sink) | (pos >= num_tokens - rule.window)


def _keep_order(scores: torch.Tensor, rule: BudgetRule) -> torch.Tensor:
    """Per head, token indices in keep order: forced first, then score desc, index asc."""
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    forced = forced_mask(scores.shape[-1], rule, scores.device)[by_score]
    forced_first = torch.sort(forced.to(torch.int8), dim=-1, descending=True, stable=True)
    return by_score.gather(-1, forced_first.indices)


def _minimum(num_tokens: int, rule: BudgetRule) -> int:
    return min(num_tokens, rule.sink + rule.window)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [kv_heads, T], got {tuple(scores.shape)}")


def select(
    scores: torch.Tensor, kept_per_head: Sequence[int], rule: BudgetRule
) -> list[torch.Tensor]:
    """Per kv head, the ascending indices of exactly `kept_per_head[h]` tokens to keep.

    The first `rule.sink` and last `rule.window` tokens are always kept; the rest of a
    head's budget goes to its highest scores, ties to the lower index.
    """
    _check_scores(scores)
    heads, t = scores.shape
    if len(kept_per_head) != heads:
        raise ValueError(f"kept_per_head has {len(kept_per_head)} entries for {heads} kv heads")
    for h, kept in enumerate(kept_per_head):
        _check_budget(f"kept_per_head[{h}]", kept, t, rule)
    order = _keep_order(scores, rule)
    return [order[h, : int(kept)].sort().values for h, kept in enumerate(kept_per_head)]


def check_budgets(lens: Sequence[int], kept: Sequence[Sequence[int]], rule: BudgetRule) -> None:
    """Host check of `select_batch`'s budgets (it cannot read them without a device sync):
    `kept[s][i]` within [min(lens[s], sink + window), lens[s]]."""
    if len(kept) != len(lens):
        raise ValueError(f"kept has {len(kept)} rows for {len(lens)} segments")
    for s, (n, row) in enumerate(zip(lens, kept, strict=True)):
        for i, count in enumerate(row):
            _check_budget(f"kept[{s}][{i}]", count, n, rule)


def _check_budget(name: str, kept: int, t: int, rule: BudgetRule) -> None:
    """A head keeps between its forced tokens and the whole segment of `t` tokens."""
    low = _minimum(t, rule)
    if not low <= kept <= t:
        raise ValueError(
            f"{name} = {kept} is outside [{low}, {t}] for a segment of {t} tokens with sink "
            f"{rule.sink} and window {rule.window}"
        )


def select_batch(
    scores: torch.Tensor,
    lens: torch.Tensor,
    kept: torch.Tensor,
    rule: BudgetRule,
    width: int | None = None,
) -> torch.Tensor:
    """`select` for all segments of a forward at once, with device ops only (no host sync).

    scores `[S, Hkv, T]` (segment s's tokens are the first `lens[s]`; the rest is padding,
    never chosen), lens `[S]`, kept `[S, Hkv]` budgets (as `select` would check them: see
    `check_budgets`; not read here). Returns `[S, Hkv, width]` int64 (width defaults to T
    and must be >= every budget): per segment and head the `kept[s, h]` ascending token
    indices `select` picks (forced first, then higher score, then lower index), then -1.
    NaN scores are not rejected (that would sync): scorers do not produce them.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be [segments, kv_heads, T], got {tuple(scores.shape)}")
    s, heads, t = scores.shape
    if tuple(lens.shape) != (s,):
        raise ValueError(f"lens must be [{s}], got {tuple(lens.shape)}")
    if tuple(kept.shape) != (s, heads):
        raise ValueError(f"kept must be [{s}, {heads}], got {tuple(kept.shape)}")
    width = t if width is None else width
    if not 0 <= width <= t:
        raise ValueError(f"width {width} is outside [0, {t}]")
    pos = torch.arange(t, device=scores.device)
    end = lens[:, None]
    real = pos < end  # [S, T]
    forced = ((pos < rule.sink) | (pos >= end - rule.window)) & real
    # Padding scores -inf and sits past every real token: a stable sort ranks it last.
    scores = scores.masked_fill(~real[:, None], float("-inf"))
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    forced = forced[:, None, :].expand(s, heads, t).gather(-1, by_score)
    first = torch.sort(forced.to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, first[..., :width])
    keep = torch.arange(width, device=scores.device) < kept[..., None]
    chosen = order.masked_fill(~keep, t).sort(dim=-1).values
    return chosen.masked_fill(~keep, -1)


def ada_allocation(scores: torch.Tensor, layer_budget: int, rule: BudgetRule) -> list[int]:
    """Ada-KV's per-head split of one layer budget: joint top-k over all heads' scores.

    Every head first gets its forced tokens (and `rule.floor`); the remaining budget goes
    to the highest scores of the whole layer (ties: lower head, then lower index). The
    result fed to `select` keeps exactly the tokens this joint choice picked.
    """
    _check_scores(scores)
    heads, t = scores.shape
    low = min(t, max(_minimum(t, rule), rule.floor))
    if not heads * low <= layer_budget <= heads * t:
        raise ValueError(
            f"layer_budget {layer_budget} is outside [{heads * low}, {heads * t}] for "
            f"{heads} heads of {t} tokens (forced minimum {low} per head)"
        )
    order = _keep_order(scores, rule)
    ranked = scores.gather(-1, order)[:, low:]
    flat = torch.sort(ranked.reshape(-1), descending=True, stable=True).indices
    counts = torch.bincount(flat[: layer_budget - heads * low] // max(t - low, 1), minlength=heads)
    return [low + int(c) for c in counts[:heads]]
