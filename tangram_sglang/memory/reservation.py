"""Budget Reservation: one request's KV budget per head group, from admission to release.

The paper's invariant holds for what is compressed: a prompt segment's kept slots are
known exactly at admission (`kept_tokens` of every chunk SGLang will cut), reserved then
and consumed by the allocation, never reclaimed. Decoded tokens follow SGLang's own
policy instead: admission counts an estimate (`min(max_new - output, CLIP)` for the new
request, that times SGLang's `new_token_ratio` for running ones, SGLang's knobs both), and
each decode step tops up one slot per group from what no reservation holds, evicting the
per-group shortfall from the radix tree first and retracting through SGLang when even
that is short. A client that sends no `max_tokens` (SGLang then allows the whole context)
is served like stock: its decode budget is clipped to what the scarcest group can hold.

`BudgetReservation` owns the ledger; its methods are the lifecycle, in the order a
request meets them (who calls each, on which SGLang event: docs/architecture.md):

1. need     `prompt_need` + `decode_estimate`: what the gate asks of each group
2. room     free + evictable - reserved - the running requests' decode estimates
3. reserve  admission assigns the prompt need under the request id
4. bind     SGLang gave the request its row: the reservation moves there
5. consume  an extend takes its kept slots from the row (beyond it: `overdrawn`);
            `decode_need`: the free slots a decode step needs beside the reservations
6. settle   a chunked request's next chunk: the row holds what its remaining chunks need
7. release  the row's leftover returns; reservations of requests SGLang dropped before
            they got a row are cleared
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tangram_sglang.memory.budget import BudgetRule, kept_tokens, pages

logger = logging.getLogger(__name__)


# ---- pure functions of counts --------------------------------------------------------


@dataclass(frozen=True)
class ChunkPlan:
    """How SGLang's chunked prefill cuts a request's new tokens: a first chunk of at most
    `first` tokens (what the batch's chunk budget has left), then chunks of `size` tokens
    (the whole budget: a continuing request is scheduled first in its batch). None: no
    chunking, the new tokens are one segment."""

    first: int | None = None
    size: int | None = None

    @classmethod
    def whole_chunks(cls, size: int | None) -> ChunkPlan:
        """Every chunk takes the whole budget: the fewest chunks, so the smallest need."""
        return cls(size, size)

    def pieces(self, rest: int) -> tuple[tuple[int, int], ...]:
        """(chunk length, how many such chunks) covering `rest` new tokens, in order."""
        if rest < 0:
            raise ValueError(f"chunk plan: {rest} new tokens is negative")
        if self.first is None or rest <= self.first:
            return ((rest, 1),)
        first = max(self.first, 0)
        if self.size is None or self.size <= 0:
            return ((first, 1), (rest - first, 1))
        whole, last = divmod(rest - first, self.size)
        return ((first, 1), (self.size, whole), (last, 1))


def prompt_need(
    extend_len: int, ratios: Sequence[float], rule: BudgetRule, plan: ChunkPlan = ChunkPlan()
) -> tuple[int, ...]:
    """Per group, the slots `extend_len` new tokens keep when extended in the chunks of
    `plan` (each chunk is its own compressed segment), page-rounded."""
    kept = [0] * len(ratios)
    for n, count in plan.pieces(extend_len):
        for g, r in enumerate(ratios):
            kept[g] += count * kept_tokens(n, r, rule)
    return tuple(pages(k, rule.page_size) * rule.page_size for k in kept)


def decode_estimate(remaining: int, clip: int, new_token_ratio: float = 1.0) -> float:
    """SGLang's decode estimate: `min(remaining, clip)` tokens, scaled by its
    `new_token_ratio` for a running request (1.0 for one being admitted)."""
    return min(max(remaining, 0), clip) * new_token_ratio


def short_group(need: Sequence[float], room: Sequence[float]) -> int | None:
    """The first group whose `need` exceeds its `room`, or None when every group fits."""
    for g, (n, r) in enumerate(zip(need, room, strict=True)):
        if n > r:
            return g
    return None


def remaining_decode(req: Any) -> int:
    """Tokens the request may still decode (none for one that finishes at prefill)."""
    if getattr(req, "to_finish", None) is not None:
        return 0
    return max(req.sampling_params.max_new_tokens - len(req.output_ids), 0)


def new_tokens(req: Any) -> int:
    """Tokens the request still has to extend: its fill minus the prefix it holds."""
    return len(req.full_untruncated_fill_ids) - len(req.prefix_indices)


EVENTS = ("never_fit", "recomputed_prefix", "retraction", "stale", "settle_refused")


class ReservationRefused(RuntimeError):
    """A reservation cannot grow: some group has no room left (the message names it)."""


# ---- the ledger ----------------------------------------------------------------------


class BudgetReservation:
    """Per head group, the prompt slots promised to admitted requests and not yet
    allocated: pending (admitted, no row yet) by request id, then per request row."""

    def __init__(
        self, ratios: Sequence[float], rule: BudgetRule, capacity: Sequence[int], max_rows: int
    ) -> None:
        self.ratios = tuple(ratios)
        self.rule = rule
        self.capacity = tuple(int(c) for c in capacity)
        G = len(self.ratios)
        self.pending: dict[str, list[int]] = {}
        self.row_reserved = torch.zeros((G, max_rows + 1), dtype=torch.int64)
        self.overdrawn = torch.zeros(G, dtype=torch.int64)  # extends beyond reservations
        self.events = dict.fromkeys(EVENTS, 0)

    @property
    def num_groups(self) -> int:
        return len(self.ratios)

    def clear(self) -> None:
        self.pending.clear()
        self.row_reserved.zero_()
        self.overdrawn.zero_()

    # 1. need ----------------------------------------------------------------------------

    def prompt_need(self, extend_len: int, plan: ChunkPlan = ChunkPlan()) -> tuple[int, ...]:
        return prompt_need(extend_len, self.ratios, self.rule, plan)

    def need(self, extend_len: int, decode: float, plan: ChunkPlan = ChunkPlan()) -> tuple:
        """What the gate asks of each group: the exact prompt slots plus `decode` (an
        estimate; decoded tokens cost one slot in every group)."""
        return tuple(p + decode for p in self.prompt_need(extend_len, plan))

    def max_decode(self, prompt_len: int, chunk_size: int | None) -> int:
        """The most tokens a request with `prompt_len` new tokens can ever decode: what
        the scarcest group holds beside its prompt (SGLang clips `max_new_tokens` to its
        token pool the same way)."""
        need = self.prompt_need(prompt_len, ChunkPlan.whole_chunks(chunk_size))
        return min(c - n for c, n in zip(self.capacity, need, strict=True))

    # 2. room ----------------------------------------------------------------------------

    def room(
        self, free: Sequence[int], evictable: Sequence[int], decode_offset: float = 0.0
    ) -> tuple[float, ...]:
        """Per group, what admission may still promise: free + evictable slots, less the
        prompt reservations and the decode estimates of requests already admitted."""
        return tuple(
            f + e - r - decode_offset
            for f, e, r in zip(free, evictable, self.reserved(), strict=True)
        )

    def never_fits(
        self,
        prompt_len: int,
        decode: float,
        chunk_size: int | None = None,
        held: Sequence[int] | None = None,
    ) -> str | None:
        """Why `prompt_len` new tokens (in chunks of `chunk_size`) and `decode` decoded
        ones cannot fit even with everything else evicted, with `held[g]` slots of a locked
        prefix in the pools; None when they can."""
        prompt = self.prompt_need(prompt_len, ChunkPlan.whole_chunks(chunk_size))
        held = tuple(held) if held is not None else (0,) * self.num_groups
        total = [p + math.ceil(decode) + h for p, h in zip(prompt, held, strict=True)]
        g = short_group(total, self.capacity)
        if g is None:
            return None
        chunks = f" in chunks of {chunk_size}" if chunk_size and prompt_len > chunk_size else ""
        prefix = f" + {held[g]} of its cached prefix" if held[g] else ""
        decoded = f" + {math.ceil(decode)} decoded" if decode else ""
        return (
            f"tangram: the request can never fit the KV pools: head group {g} (ratio "
            f"{self.ratios[g]:.4g}) needs {prompt[g]} slots for {prompt_len} prompt tokens"
            f"{chunks}{decoded}{prefix} but holds {self.capacity[g]} in all; shorten the prompt"
        )

    # 3. reserve -------------------------------------------------------------------------

    def reserve(self, rid: str, slots: Sequence[int]) -> None:
        """Admission: request `rid` holds exactly `slots[g]` of every group."""
        if len(slots) != self.num_groups or min(slots) < 0:
            raise ValueError(
                f"reserve {rid!r}: slots {list(slots)} must be {self.num_groups} counts >= 0"
            )
        self.pending[rid] = [int(n) for n in slots]

    # 4. bind ----------------------------------------------------------------------------

    def bind(self, rid: str, row: int) -> None:
        """Request `rid` got request row `row`: its pending reservation moves there."""
        held = self.pending.pop(rid, None)
        if held is not None:
            self.row_reserved[:, row] = torch.tensor(held, dtype=torch.int64)

    # 5. consume -------------------------------------------------------------------------

    def consume(self, rows: Sequence[int], used: torch.Tensor) -> None:
        """An extend allocated `used` `[G, len(rows)]` slots for `rows`: take them from the
        rows' reservations; what exceeds them is counted in `overdrawn` and logged."""
        index = torch.as_tensor(list(rows), dtype=torch.int64)
        left = self.row_reserved[:, index] - used
        over = (-left).clamp(min=0).sum(1)
        if over.any():
            self.overdrawn += over
            logger.warning(
                "tangram: rows %s allocated %s group slots beyond their reservations",
                index.tolist(),
                over.tolist(),
            )
        self.row_reserved[:, index] = left.clamp(min=0)

    def decode_need(self, rows: int) -> tuple[int, ...]:
        """Per group, the free slots `rows` requests need to each decode one token without
        touching any prompt reservation."""
        return tuple(rows + r for r in self.reserved())

    # 6. settle --------------------------------------------------------------------------

    def settle(self, row: int, slots: Sequence[int], room: Sequence[float]) -> tuple[int, ...]:
        """A chunked request's next chunk: row `row` now needs exactly `slots[g]` for its
        remaining chunks. Returns the change per group (zeros when SGLang cut the chunk as
        admission planned); refuses growth beyond `room`, changing nothing."""
        target = torch.tensor([int(n) for n in slots], dtype=torch.int64)
        change = target - self.row_reserved[:, row]
        g = short_group(change.tolist(), room)
        if g is not None:
            raise ReservationRefused(
                f"tangram: a chunk cut unlike admission planned needs {int(change[g])} more "
                f"slots of head group {g}, which has room for {max(0, int(room[g]))}"
            )
        self.row_reserved[:, row] = target
        return tuple(int(x) for x in change.tolist())

    # 7. release -------------------------------------------------------------------------

    def release(self, row: int) -> None:
        """The request left its row (finished, aborted or retracted): nothing it still
        reserved stays promised."""
        self.row_reserved[:, row] = 0

    def drop_stale(self, live: Iterable[str]) -> list[str]:
        """Clear the pending reservations of requests not in `live` (SGLang dropped them
        between admission and row binding); returns their ids."""
        stale = sorted(set(self.pending) - set(live))
        for rid in stale:
            logger.info("tangram: cleared the reservation of request %s, which got no row", rid)
            del self.pending[rid]
        self.events["stale"] += len(stale)
        return stale

    # ---- reporting ---------------------------------------------------------------------

    def reserved(self) -> tuple[int, ...]:
        """Per group, prompt slots reserved and not yet allocated (rows and pending)."""
        total = self.row_reserved.sum(1)
        for held in self.pending.values():
            total = total + torch.tensor(held, dtype=torch.int64)
        return tuple(int(x) for x in total.tolist())

    def reserving_requests(self) -> int:
        return int((self.row_reserved.sum(0) > 0).sum()) + len(self.pending)

    def describe(self) -> dict[str, Any]:
        return {
            "reserved": list(self.reserved()),
            "reserved_requests": self.reserving_requests(),
            "overdrawn": self.overdrawn.tolist(),
            **{f"{name}_total": n for name, n in self.events.items()},
        }
