"""Logical slots for SGLang, head-group slots for the KV: what SGLang's scheduler sees.

SGLang's `req_to_token`, `out_cache_loc`, `prefix_indices` and radix-node values stay
token-level *logical* slots: one per raw token, no KV bytes behind them (SGLang's SWA
allocator keeps a second index space the same way). `TangramAllocator` owns

- the logical allocator (SGLang's `TokenToKVPoolAllocator`),
- the `RaggedPool` (its group allocators hand out group slots, its storage holds the
  K/V, its `req_to_slot`/`group_lens` are the per-request group page tables, rows =
  SGLang's `req_pool_idx`),
- per group `logical_to_group[g]` (0 = none), and per logical slot its position in its
  segment (`seg_pos`).

A *segment* is one request's extend chunk (or one decoded token). An uncompressed segment
maps its logical slots 1:1. A compressed segment of n tokens whose group g keeps k_g maps
each of its k_g group slots to one *owner* logical slot: group slot j holds, for every
(layer, member head), that head's j-th kept token, and its owner is the latest of those
tokens' positions. At allocation the owners are the last k_g logical slots (the latest
any j-th kept token can be); after the forward the backend moves them to the positions
its selections actually kept (`assign_owners`). Owners increase with j, so the logical
slots before any cut m own exactly group slots [0, C_g[m]), each holding only tokens
before m for every head and layer: every prefix of a segment is a causally valid,
lossy prefix, and a radix match may end anywhere. Group slots are owned by their logical
slots: `free(logical)` frees them in every group (SWA's `free_swa` pattern), and a
request row only points at them. `seg_pos` marks where each segment starts (the radix
cache inserts a request's values only where its own segment starts; an uncompressed
segment is a run of one-token segments, any cut of it is clean).

Budget Reservation (`tangram_sglang.memory.reservation`) is the ledger `budget`: an extend
consumes the kept slots its row reserved; a decode step draws one slot per group from what
no reservation holds (`make_decode_room` evicts the per-group shortfall first).

`TangramKVPool` is the `KVCache` SGLang holds. `begin_extend` / `begin_decode` return the
batch's `ForwardState`; the allocation hooks attach it to SGLang's batch, which carries it
to its forward (`patches/allocation.py`), so under overlap scheduling a batch allocated
while the previous one runs cannot hand its state to the wrong forward.

Fast Fusion (`--tangram-fusion`, `tangram_sglang.fusion.serving`): after an extend, a
block of new group slots nearly identical to another request's may *share* it: its
logical slots map to the representative's group slots and its own return to the free
pool. A group slot then has several owners; `extra[g][slot]` counts the owners beyond the
first and `free` releases the slot with its last owner (and unstamps it, so that no later
batch shares a block the pool took back: `fusion.serving.LiveBlocks`). `shared[g]` (host)
is their sum, what the mapped counts hold beyond the distinct slots and what the radix
tree's evictable count must not promise (`radix.evictable_group_slots`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import KVCache

from tangram_sglang.fusion.serving import BatchFusion
from tangram_sglang.memory import staging
from tangram_sglang.memory.budget import (
    BudgetRule,
    Workload,
    kept_tokens,
    serving_workload,
    session_slots,
)
from tangram_sglang.memory.layout import PoolLayout, agreed_pool_slots
from tangram_sglang.memory.pool import PoolExhausted, RaggedPool
from tangram_sglang.memory.reservation import BudgetReservation
from tangram_sglang.memory.split_check import SplitCheck
from tangram_sglang.offline.profile import Profile

logger = logging.getLogger(__name__)

Evict = Callable[[int], None]  # evict this many logical tokens from the radix tree


def positions_within(lens: torch.Tensor) -> torch.Tensor:
    """For runs of host lengths `lens` laid end to end, each element's position in its run
    (`[3, 2]` -> `[0, 1, 2, 0, 1]`)."""
    return torch.arange(int(lens.sum())) - (torch.cumsum(lens, 0) - lens).repeat_interleave(lens)


@dataclass(frozen=True)
class ExtendSegment:
    """One request's new segment in an extend forward.

    `prefix_lens[g]`: group slots of the row before this segment (what the new tokens
    attend to); `slots[g]`: the segment's group slots (k_g of them, in order); `compress`:
    whether the backend selects tokens (else it writes every token to every group), and
    then reports where each group slot's tokens lie (`TangramAllocator.assign_owners`).
    """

    row: int
    extend_len: int
    compress: bool
    prefix_lens: tuple[int, ...]
    slots: tuple[torch.Tensor, ...]
    logical: torch.Tensor  # the segment's logical slots

    @property
    def kept(self) -> tuple[int, ...]:
        return tuple(int(s.numel()) for s in self.slots)


@dataclass(frozen=True)
class ForwardState:
    """What the attention backend needs for the next forward, written at allocation.

    extend: one `ExtendSegment` per request (batch order); decode: `decode_slots` `[G, B]`,
    each row's new group slot per group (already counted in `group_lens`).
    """

    mode: str
    rows: tuple[int, ...]
    segments: tuple[ExtendSegment, ...] = ()
    decode_slots: torch.Tensor | None = None


class TangramKVPool(KVCache):
    """The KV cache SGLang holds: the `RaggedPool` storage behind logical slots.

    SGLang's stock token-indexed buffer API (`get_key_buffer`, `set_kv_buffer`, ...) has
    no meaning here (a logical slot has no bytes); only the `tangram` backend reads and
    writes the ragged storage, so those calls fail with a message that says so.
    """

    def __init__(self, pool: RaggedPool, size: int, method: str = "snapkv") -> None:
        super().__init__(
            size=size,
            page_size=1,
            dtype=pool.dtype,
            layer_num=pool.num_layers,
            device=str(pool.device),
            enable_memory_saver=False,
            start_layer=0,
            end_layer=pool.num_layers - 1,
        )
        self.pool = pool
        self.method = method  # the scorer the backend compresses with
        self.head_num = pool.layout.num_kv_heads
        self.head_dim = pool.layout.head_dim
        self.mem_usage = pool.total_bytes() / (1 << 30)

    def get_kv_size_bytes(self) -> tuple[int, int]:
        half = self.pool.total_bytes() // 2
        return half, half

    def _unsupported(self, name: str) -> Any:
        raise NotImplementedError(
            f"TangramKVPool.{name}: logical slots hold no K/V under --kv-compression; only "
            "the 'tangram' attention backend reads the ragged head-group storage"
        )

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self._unsupported("get_key_buffer")

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self._unsupported("get_value_buffer")

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._unsupported("get_kv_buffer")

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs) -> None:
        self._unsupported("set_kv_buffer")


class TangramAllocator(BaseTokenToKVPoolAllocator):
    """Logical slots for SGLang plus the head-group slots they map to (module docstring)."""

    def __init__(
        self,
        size: int,
        kvcache: TangramKVPool,
        rule: BudgetRule,
        need_sort: bool = False,
        fusion: BatchFusion | None = None,
        cut_reuse: float | None = None,
    ) -> None:
        pool = kvcache.pool
        super().__init__(size, 1, pool.dtype, str(pool.device), kvcache, need_sort)
        self.pool = pool
        self.rule = rule
        self.ratios = tuple(pool.layout.ratios)
        self.logical = TokenToKVPoolAllocator(size, pool.dtype, str(pool.device), None, need_sort)
        G, device = pool.num_groups, pool.device
        self.logical_to_group = torch.zeros((G, size + 1), dtype=torch.int64, device=device)
        self.seg_pos = torch.zeros(size + 1, dtype=torch.int64, device=device)
        self.row_lens = torch.zeros((G, pool.max_requests + 1), dtype=torch.int64)  # host
        self.budget = BudgetReservation(self.ratios, rule, pool.slots, pool.max_requests)
        self.split_check: SplitCheck | None = None  # set where the split's shape is known
        # What a lossy radix cut must keep to be reused (memory/radix.py; None: CUT_REUSE).
        self.cut_reuse = CUT_REUSE if cut_reuse is None else float(cut_reuse)
        self.lossy_cuts = {"reused": 0, "recomputed": 0}  # host: admission's cut decisions
        self.fusion = fusion
        self.extra = (
            [  # per group slot, its owners beyond the first (with fusion only)
                torch.zeros(s + pool.page_size, dtype=torch.int64, device=device)
                for s in pool.slots
            ]
            if fusion is not None
            else []
        )
        self.shared = [0] * G  # host: sum of extra per group
        self.fused = [0] * G  # host: group slots fusion gave back, since start
        self.clear()

    # ---- SGLang's allocator interface (logical slots) --------------------------------

    def available_size(self) -> int:
        """Free logical slots. SGLang evicts `need - available_size()` raw tokens before
        an allocation; the group slots behind them are checked per group afterwards
        (`begin_extend`, `make_decode_room`), which evict only each group's shortfall."""
        return self.logical.available_size()

    def alloc(self, need_size: int) -> torch.Tensor | None:
        return self.logical.alloc(need_size)

    def free(self, free_index: torch.Tensor) -> None:
        """Free logical slots and, in every group, the group slots they map to."""
        if free_index.numel() == 0:
            return
        if not self.is_not_in_free_group:
            self.free_group.append(free_index)
            return
        index = free_index.to(device=self.logical_to_group.device, dtype=torch.int64)
        flat, held = self._compact_batch([index])  # one device read, not one per group
        for g, allocator in enumerate(self.pool.allocators):
            if int(held[g, 0]):
                dead = self._last_owners(g, flat[g, : int(held[g, 0])])
                if self.fusion is not None:
                    self.fusion.live.forget(g, dead)
                allocator.free(dead)
        self.logical_to_group.index_fill_(1, index, 0)
        self.logical.free(index)

    def _last_owners(self, g: int, slots: torch.Tensor) -> torch.Tensor:
        """Of group `g`'s `slots` whose owners are being freed (a slot once per owner),
        the ones losing their last owner; the others keep the rest (`extra` drops). Without
        shared slots, all of them, with no device work."""
        if self.shared[g] == 0:
            return slots
        touched, hits = torch.unique(slots, return_counts=True)
        extra = self.extra[g][touched]
        self.extra[g][touched] = (extra - hits).clamp_min(0)
        dead = touched[hits > extra]
        self.shared[g] -= int(slots.numel()) - int(dead.numel())
        return dead

    def clear(self) -> None:
        self.logical.clear()
        self.pool.clear()
        self.logical_to_group.zero_()
        self.seg_pos.zero_()
        self.row_lens.zero_()
        for extra in self.extra:
            extra.zero_()
        if self.fusion is not None:
            self.fusion.live.clear()
        self.shared = [0] * self.pool.num_groups
        self.budget.clear()
        self.is_not_in_free_group = True
        self.free_group = []

    def resize(self, config: Any) -> None:
        raise NotImplementedError("TangramAllocator cannot be resized (--kv-compression)")

    # ---- segments --------------------------------------------------------------------

    def starts_segment(self, logical: torch.Tensor, at: int) -> bool:
        """Whether position `at` of `logical` is the first token of a segment (or the end)."""
        return at >= logical.numel() or int(self.seg_pos[int(logical[at])]) == 0

    def kept(self, extend_len: int) -> tuple[int, ...]:
        """Group slots a segment of `extend_len` new tokens keeps in each group."""
        return tuple(kept_tokens(extend_len, r, self.rule) for r in self.ratios)

    def _new_segments(
        self, logical: torch.Tensor, lengths: Sequence[int], compressed: Sequence[bool]
    ) -> None:
        """Record consecutive segments of `lengths` over `logical` (concatenated). A segment
        that keeps every token in every group maps each token to its own slots, so any cut
        of it is clean: its tokens are recorded as segments of one token (as decoded ones),
        and the radix tree may join another request's prefix anywhere inside it."""
        runs = torch.as_tensor(list(lengths), dtype=torch.int64)
        cuts = torch.as_tensor(list(compressed), dtype=torch.int64).repeat_interleave(runs)
        positions = positions_within(runs) * cuts
        index = logical.to(device=self.seg_pos.device, dtype=torch.int64)
        self.seg_pos[index] = staging.to_device(positions, self.seg_pos.device)

    def assign_owners(self, segment: ExtendSegment, owners: Sequence[torch.Tensor | None]) -> None:
        """After the forward of compressed `segment`: per group, `owners[g]` `[k_g]` holds
        for each group slot the latest position (within the segment) of the tokens the
        group's heads keep there over all layers (None: leave the group as allocated).
        Each group slot moves to the logical slot at that position; the set of group slots
        a segment holds is unchanged, only which of its logical slots own them."""
        device = self.logical_to_group.device
        width = max([1, *(o.numel() for o in owners if o is not None)])
        latest = torch.full((len(owners), 1, width), -1, dtype=torch.int64, device=device)
        for g, owner in enumerate(owners):
            if owner is None:
                continue
            if owner.numel() != segment.slots[g].numel():
                raise ValueError(
                    f"assign_owners(row {segment.row}): group {g} got {owner.numel()} owners "
                    f"for {segment.slots[g].numel()} group slots"
                )
            latest[g, 0, : owner.numel()] = owner
        groups = [g for g, owner in enumerate(owners) if owner is not None]
        self.assign_owners_batch([segment], latest, groups)

    def assign_owners_batch(
        self, segments: Sequence[ExtendSegment], latest: torch.Tensor, groups: Iterable[int]
    ) -> None:
        """`assign_owners` for every compressed segment of a forward at once, from the
        backend's `latest` `[G, S, W]` (segment s's k_g owners in `latest[g, s, :k_g]`) for
        the `groups` some member head selected in: a few device ops per group however many
        segments (their logical slots are disjoint), so the host work after an extend does
        not grow with the batch."""
        device, width = self.logical_to_group.device, latest.shape[2]
        for g in sorted(groups):
            picked = [i for i, seg in enumerate(segments) if seg.compress and seg.slots[g].numel()]
            if not picked:
                continue
            kept = torch.tensor([segments[i].slots[g].numel() for i in picked])
            if int(kept.max()) > width:
                raise ValueError(f"assign_owners: group {g} keeps {int(kept.max())} > {width}")
            lens = torch.tensor([segments[i].extend_len for i in picked])
            cell = torch.tensor(picked).repeat_interleave(kept) * width + positions_within(kept)
            base = (torch.cumsum(lens, 0) - lens).repeat_interleave(kept)
            cell, base = staging.to_device(torch.stack((cell, base)), device)
            logical = torch.cat([segments[i].logical for i in picked]).to(device).long()
            at = latest[g].reshape(-1)[cell] + base  # each group slot's owner within `logical`
            slots = torch.cat([segments[i].slots[g] for i in picked])
            self.logical_to_group[g].index_fill_(0, logical, 0)
            self.logical_to_group[g].index_put_(
                (logical[at],), slots.to(device=device, dtype=self.logical_to_group.dtype)
            )

    # ---- Fast Fusion -----------------------------------------------------------------

    def fuse(self, state: ForwardState) -> None:
        """After an extend forward stored (and owned) its KV: per group, the batch's new
        blocks that pass the fusion guard share the slots of an earlier request's block at
        the same position, in this batch or left by an earlier one; the blocks that shared
        nothing become the live representatives for later batches."""
        if self.fusion is None or state.mode != "extend":
            return
        for g in range(self.pool.num_groups):
            pairs = self.fusion.pairs(
                g,
                [seg.slots[g] for seg in state.segments],
                [seg.prefix_lens[g] for seg in state.segments],
            )
            if pairs.member.numel():
                self.share(g, pairs.member, pairs.rep, state.segments)
            self.fusion.live.add(g, pairs.new_reps)

    def share(
        self,
        g: int,
        member: torch.Tensor,
        rep: torch.Tensor,
        segments: Sequence[ExtendSegment],
    ) -> None:
        """Group `g`'s `member` slots (new in `segments`) stop holding K/V: the logical
        slot owning each now maps to the matching `rep` slot, the segments' rows read it,
        and the member slots return to the free pool. Reservations are untouched: the rows
        consumed their kept slots, and the pool simply has more free."""
        device = self.logical_to_group.device
        member, rep = member.to(device).long(), rep.to(device).long()
        logical = torch.cat([seg.logical.reshape(-1) for seg in segments]).to(device).long()
        owner_of = torch.zeros_like(self.extra[g])
        owner_of[self.logical_to_group[g, logical]] = logical  # unmapped ones write slot 0
        self.logical_to_group[g, owner_of[member]] = rep
        remap = torch.arange(self.extra[g].numel(), device=device)
        remap[member] = rep
        rows = staging.to_device(torch.tensor([seg.row for seg in segments]), device)
        table = self.pool.req_to_slot[g]
        table[rows] = remap[table[rows].long()].to(table.dtype)
        self.extra[g].index_add_(0, rep, torch.ones_like(rep))
        self.pool.allocators[g].free(member)
        self.shared[g] += int(member.numel())
        self.fused[g] += int(member.numel())

    # ---- group rows ------------------------------------------------------------------

    def split_facts(self, head: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """`group_counts(head)` and whether `tail` (the logical slots after a cut) starts a
        segment, so that the cut is clean (True when `tail` is empty): one device read."""
        device = self.logical_to_group.device
        counts = (self.logical_to_group[:, head.to(device).long()] > 0).sum(1)
        first = self.seg_pos[tail[:1].to(device).long()]
        both = torch.cat((counts, (first == 0).long())).cpu()
        return both[: self.pool.num_groups], bool(both[self.pool.num_groups :].all())

    def lossy_cut(self, prefix: torch.Tensor) -> int | None:
        """For logical slots `prefix` that end inside a compressed segment: the segment's
        start within `prefix` if the cut keeps, in some group, less than `cut_reuse` of the
        group slots a fresh compression of the segment's part before it would keep; None
        if the cut is worth reusing. The cut keeps, per group, only the slots that all the
        group's heads filled with earlier tokens (the owners), and one head that kept
        little before the cut empties the group for all (two device reads; rare)."""
        m = int(prefix.numel())
        if m == 0:
            return None
        start = m - 1 - int(self.seg_pos[prefix[m - 1 :].to(self.seg_pos.device).long()].item())
        counts = self.group_counts(prefix[start:]).tolist()
        fresh = self.kept(m - start)
        if all(c >= self.cut_reuse * f for c, f in zip(counts, fresh, strict=True)):
            self.lossy_cuts["reused"] += 1
            return None
        self.lossy_cuts["recomputed"] += 1
        return start

    def group_counts(self, logical: torch.Tensor) -> torch.Tensor:
        """Per group, how many group slots the logical slots `logical` map to (host `[G]`)."""
        if logical.numel() == 0:
            return torch.zeros(self.pool.num_groups, dtype=torch.int64)
        index = logical.to(self.logical_to_group.device).long()
        return (self.logical_to_group[:, index] > 0).sum(1).cpu()

    def compact(self, logical: torch.Tensor) -> list[torch.Tensor]:
        """Per group, the group slots `logical` maps to, in order (zeros dropped)."""
        flat, held = self._compact_batch([logical])
        return [flat[g, : int(held[g, 0])] for g in range(self.pool.num_groups)]

    def _compact_batch(self, prefixes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The group slots of every prefix at once: per group, the mapped ones of all
        prefixes in order, first (`[G, P]`, P the prefixes' logical slots; the rest is
        padding), and how many each prefix holds (host `[G, B]`). How many is data (the
        owners): one device read for the whole batch, not one per request and group."""
        G, B = self.pool.num_groups, len(prefixes)
        device = self.logical_to_group.device
        sizes = torch.tensor([int(p.numel()) for p in prefixes], dtype=torch.int64)
        if int(sizes.sum()) == 0:
            empty = torch.zeros((G, 0), dtype=torch.int64, device=device)
            return empty, torch.zeros((G, B), dtype=torch.int64)
        index = torch.cat([p.reshape(-1) for p in prefixes]).to(device).long()
        mapped = self.logical_to_group[:, index]
        held = mapped > 0
        owner = staging.to_device(torch.arange(B).repeat_interleave(sizes), device)
        counts = torch.zeros((G, B), dtype=torch.int64, device=device)
        counts.index_add_(1, owner, held.long())
        order = torch.sort((~held).to(torch.uint8), dim=1, stable=True).indices
        return mapped.gather(1, order), torch.tensor(counts.tolist(), dtype=torch.int64)

    def _store_lens(self, rows: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """The one place a row's group lengths change: the host copy (scheduling decisions)
        and the pool's device table (what the kernels read), through one staged copy of
        `[rows; lens]` (`[1 + G, B]`), which it returns."""
        self.row_lens[:, rows] = lens
        staged = staging.to_device(torch.cat((rows[None, :], lens)), self.pool.device)
        self.pool.group_lens[:, staged[0]] = staged[1:].to(torch.int32)
        return staged

    def rebuild_row(self, row: int, logical: torch.Tensor) -> None:
        """Point request row `row` at the group slots of its logical slots `logical`."""
        flat, held = self._compact_batch([logical])
        self._check_width([row], held)
        staged = self._store_lens(torch.tensor([row]), held)
        self._write_prefix_blocks(staged[0], flat, held)

    def release_row(self, row: int) -> None:
        """A released request no longer reads its row; the slots stay with the tree, and
        what is left of its reservation returns to admission."""
        self._store_lens(
            torch.tensor([row]), torch.zeros((self.pool.num_groups, 1), dtype=torch.int64)
        )
        self.budget.release(row)

    def row_slots(self, row: int) -> list[torch.Tensor]:
        return [
            self.pool.req_to_slot[g, row, : int(self.row_lens[g, row])].long()
            for g in range(self.pool.num_groups)
        ]

    # ---- allocation for a forward ----------------------------------------------------

    def _ensure_free(self, needs: Sequence[int], evict: Evict | None, what: str) -> None:
        """Evict from the tree until every group has `needs[g]` free slots, else raise. A
        round may free only logical slots that own no group slot (the front of a compressed
        segment): eviction goes on while it frees anything."""
        while True:
            free = self.pool.free_slots()
            shortfall = max(n - f for n, f in zip(needs, free, strict=True))
            if shortfall <= 0:
                return
            if evict is not None:
                logical = self.logical.available_size()
                evict(shortfall)
                if self.logical.available_size() != logical:
                    continue
            short = [g for g, (n, f) in enumerate(zip(needs, free, strict=True)) if n > f]
            detail = "; ".join(
                f"group {g} needs {needs[g]} slots, {free[g]} free of {self.pool.slots[g]}"
                for g in short
            )
            raise PoolExhausted(
                f"tangram {what}: {detail} (nothing left to evict from the radix cache); "
                "lower the load or raise --max-total-tokens / --mem-fraction-static"
            )

    def make_decode_room(self, rows: int, evict: Evict | None) -> bool:
        """Evict until `rows` requests can each decode one token in every group without
        touching a prompt reservation; False if the tree cannot free enough (SGLang then
        retracts)."""
        try:
            self._ensure_free(self.budget.decode_need(rows), evict, "decode")
        except PoolExhausted:
            return False
        return True

    def begin_extend(
        self,
        rows: Sequence[int],
        prefixes: Sequence[torch.Tensor],
        new: Sequence[torch.Tensor],
        evict: Evict | None = None,
    ) -> ForwardState:
        """Admit one extend batch: per request, its row from the prefix's group slots, and
        its new segment's group slots (k_g per group, owned by its last k_g logical slots
        until the forward moves them). Returns the forward state it sets. A few device ops
        per group for the whole batch: host work per extend does not grow per request."""
        rows = [int(r) for r in rows]
        lengths = [int(x.numel()) for x in new]
        kept = [self.kept(n) for n in lengths]
        G, B = self.pool.num_groups, len(rows)
        needs = [sum(k[g] for k in kept) for g in range(G)]
        self._ensure_free(needs, evict, "extend")
        if not rows:
            return ForwardState("extend", ())
        device = self.logical_to_group.device
        logical = torch.cat([x.reshape(-1) for x in new]).to(device).long()
        compress = [any(c < n for c in k) for n, k in zip(lengths, kept, strict=True)]
        self._new_segments(logical, lengths, compress)
        flat, held = self._compact_batch(prefixes)
        k = torch.tensor(kept, dtype=torch.int64).reshape(B, G).T  # host [G, B]
        lens = held + k
        self._check_width(rows, lens)
        got = [self.pool.allocators[g].alloc(needs[g]) for g in range(G)]
        staged = self._store_lens(torch.tensor(rows, dtype=torch.int64), lens)
        tables = self._new_slot_tables(rows, lengths, held, k)
        self._write_prefix_blocks(staged[0], flat, held)  # before the new slots behind them
        for g in range(G):
            rows_g, cols_g, owner_g = tables[g]
            self.logical_to_group[g].index_fill_(0, logical, 0)  # no scalar copy
            self.logical_to_group[g, logical[owner_g]] = got[g].to(self.logical_to_group.dtype)
            self.pool.req_to_slot[g, rows_g, cols_g] = got[g].to(torch.int32)
        segments, split = [], [got[g].split(k[g].tolist()) for g in range(G)]
        prefix_lens = held.T.tolist()  # host: no device read
        for i, (row, logical_i, n) in enumerate(zip(rows, new, lengths, strict=True)):
            segments.append(
                ExtendSegment(
                    row=row,
                    extend_len=n,
                    compress=compress[i],
                    prefix_lens=tuple(prefix_lens[i]),
                    slots=tuple(split[g][i] for g in range(G)),
                    logical=logical_i,
                )
            )
        self.budget.consume(rows, k)
        return ForwardState("extend", tuple(rows), tuple(segments))

    def _check_width(self, rows: Sequence[int], lens: torch.Tensor) -> None:
        """Refuse rows longer than the request tables (host `lens` `[G, B]`)."""
        width = self.pool.max_context
        if lens.numel() == 0 or int(lens.max()) <= width:
            return
        g, i = divmod(int(lens.argmax()), lens.shape[1])
        raise ValueError(
            f"request row {rows[i]}: group {g} would hold {int(lens[g, i])} slots, more than "
            f"the pool's max_context {width}"
        )

    def _new_slot_tables(
        self, rows: Sequence[int], lengths: Sequence[int], held: torch.Tensor, k: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group, where the batch's new group slots go (in request order, as one
        `alloc` hands them out): their rows and columns in the request tables (after each
        row's prefix) and their owners' positions in the batch's new logical slots (each
        segment's last k_g), built on the host and staged in one copy."""
        G = self.pool.num_groups
        lens = torch.tensor(list(lengths), dtype=torch.int64)
        ends = torch.cumsum(lens, 0)
        host_rows = torch.tensor(list(rows), dtype=torch.int64)
        parts, sizes = [], []
        for g in range(G):
            kg = k[g]
            within = positions_within(kg)
            parts.append(
                torch.stack(
                    (
                        host_rows.repeat_interleave(kg),
                        held[g].repeat_interleave(kg) + within,
                        (ends - kg).repeat_interleave(kg) + within,
                    )
                )
            )
            sizes.append(int(kg.sum()))
        staged = staging.to_device(torch.cat(parts, 1), self.pool.device)
        return [tuple(t) for t in staged.split(sizes, 1)]

    def _write_prefix_blocks(
        self, rows: torch.Tensor, flat: torch.Tensor, held: torch.Tensor
    ) -> None:
        """Each group's prefix slots into the head of each row (`rows` on the device, `flat`
        and host `held` `[G, B]` from `_compact_batch`): one staged copy of where each
        prefix starts in `flat`, then per group one padded gather and one write; the padding
        lands past each row's prefix, where its new slots are written next."""
        if held.numel() == 0 or int(held.max()) == 0:
            return
        starts = staging.to_device(torch.cumsum(held, 1) - held, flat.device)
        for g in range(self.pool.num_groups):
            width = int(held[g].max())
            if width == 0:
                continue
            index = starts[g][:, None] + torch.arange(width, device=flat.device)[None, :]
            index.clamp_(max=flat.shape[1] - 1)
            self.pool.req_to_slot[g, rows, :width] = flat[g][index].to(torch.int32)

    def begin_decode(
        self, rows: Sequence[int], new: torch.Tensor, evict: Evict | None = None
    ) -> ForwardState:
        """One decoded token per row: one new slot in every group, appended to the row."""
        rows = [int(r) for r in rows]
        if new.numel() != len(rows):
            raise ValueError(f"decode: {new.numel()} new logical slots for {len(rows)} rows")
        G = self.pool.num_groups
        self._ensure_free([len(rows)] * G, evict, "decode")
        index = new.to(self.logical_to_group.device).long()
        self.seg_pos.index_fill_(0, index, 0)  # each decoded token is a segment of its own
        host_rows = torch.tensor(rows, dtype=torch.int64)
        lens = self.row_lens[:, host_rows]
        if lens.numel() and int(lens.max()) >= self.pool.max_context:
            raise ValueError(
                f"decode: a row reached the pool's max_context {self.pool.max_context}"
            )
        slots = torch.stack([self.pool.allocators[g].alloc(len(rows)) for g in range(G)])
        self.logical_to_group[:, index] = slots.to(self.logical_to_group.device)
        staged = self._store_lens(host_rows, lens + 1)  # [rows; lens + 1] on the device
        groups = torch.arange(G, device=self.pool.device)[:, None]
        self.pool.req_to_slot[groups, staged[0][None, :], staged[1:] - 1] = slots.to(
            device=self.pool.device, dtype=torch.int32
        )
        return ForwardState("decode", tuple(rows), decode_slots=slots)

    # ---- reporting and checks --------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The pool's split and free counts, plus the logical space (for /server_info)."""
        return {
            **self.pool.describe(),
            "logical_slots": self.size,
            "logical_free": self.logical.available_size(),
            "sink": self.rule.sink,
            "window": self.rule.window,
            **self.budget.describe(),
            "split": self.split_check.describe() if self.split_check else None,
            "lossy_cuts": {"share": self.cut_reuse, **self.lossy_cuts},
            "fusion": None
            if self.fusion is None
            else {
                "threshold": self.fusion.threshold,
                "block": self.fusion.block,
                "shared_owners": list(self.shared),
                "slots_given_back": list(self.fused),
                "live_blocks": len(self.fusion.live),
            },
        }

    def mapped_counts(self) -> tuple[int, ...]:
        """Group slots each group has handed to logical slots (a shared slot once)."""
        owners = (self.logical_to_group[:, 1:] > 0).sum(1).tolist()
        return tuple(int(x) - s for x, s in zip(owners, self.shared, strict=True))

    def count_leaks(self) -> list[str]:
        """Per group: free + mapped must equal capacity (the cheap half of `leaks`)."""
        problems = []
        for g, (mapped, free) in enumerate(
            zip(self.mapped_counts(), self.pool.free_slots(), strict=True)
        ):
            if mapped + free != self.pool.slots[g]:
                problems.append(
                    f"group {g}: {mapped} mapped + {free} free != {self.pool.slots[g]} slots"
                )
        return problems

    def leaks(self) -> list[str]:
        """Per group: free + mapped must equal capacity and no slot may be mapped twice or
        both mapped and free. Returns one readable line per broken group (empty: fine)."""
        problems = []
        logical_free = torch.cat((self.logical.free_pages, self.logical.release_pages)).long()
        for g, allocator in enumerate(self.pool.allocators):
            mapped = self.logical_to_group[g, 1:]
            owners = (mapped > 0).nonzero().flatten() + 1
            slots = mapped[mapped > 0]
            free = torch.cat((allocator.free_pages, allocator.release_pages)).long()
            distinct, owners_per_slot = torch.unique(slots, return_counts=True)
            extra = self.extra[g][distinct] if self.extra else torch.zeros_like(distinct)
            if not torch.equal(owners_per_slot - 1, extra):
                problems.append(f"group {g}: a group slot's owners differ from its owner count")
            counted = int(self.extra[g].sum()) if self.extra else 0
            if counted != self.shared[g]:
                problems.append(
                    f"group {g}: {self.shared[g]} shared owners recorded, {counted} counted"
                )
            if torch.isin(slots, free).any():
                problems.append(f"group {g}: a mapped group slot is also free")
            if torch.isin(owners, logical_free.to(owners.device)).any():
                problems.append(f"group {g}: a free logical slot still maps a group slot")
            if distinct.numel() + free.numel() != self.pool.slots[g]:
                problems.append(
                    f"group {g}: {distinct.numel()} mapped + {free.numel()} free != "
                    f"{self.pool.slots[g]} slots"
                )
        return problems


LOGICAL_CAP = 16  # the logical space is at most this many times the full-KV token count
# With Fast Fusion the logical space holds at least this many times the full-KV tokens: a
# fused token costs a logical slot but no group slot, and SGLang's raw-token gate counts
# logical slots (the per-group gates of Budget Reservation still bound the bytes).
FUSION_LOGICAL = 4
# A radix match ending inside a compressed segment is reused only if every group keeps at
# least this share of what compressing that part afresh keeps (--tangram-cut-reuse;
# memory/radix.py, "lossy cuts"). Off by default: a refused cut leaves the request's own
# turn uncacheable (it straddles the tree's end), so a shared system prompt judged lossy
# would cost every later session its radix hits.
CUT_REUSE = 0.0


def build_tangram_pools(
    profile: Profile,
    ratio: float | None,
    method: str,
    full_tokens: int,
    dtype: torch.dtype,
    device: str | torch.device,
    max_requests: int,
    max_context: int,
    workload: Workload | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    fusion: float | None = None,
    cut_reuse: float | None = None,
) -> tuple[TangramKVPool, TangramAllocator]:
    """The pools for the KV bytes SGLang sized for `full_tokens` uncompressed tokens.

    The bytes are split over the head groups so that they run out together for sessions
    of `workload` (default `serving_workload(max_context)`): decoded tokens cost a slot
    in every group, so a split by the group ratios alone would starve the most compressed
    group first in a chat. The logical space holds as many raw tokens as the most
    compressed group could represent (full tokens / smallest ratio, at most `LOGICAL_CAP`
    times full), so SGLang's raw-token gates, which count logical slots, are never
    tighter than the per-group ones.
    `req_to_slot` is `[G, max_requests + 1, width]` with width the smaller of
    `max_context` and the largest group: a row holds distinct slots of its group, so it
    never holds more than the group has (SGLang's context length is often far longer).
    Under tensor parallelism each rank stores its own heads (`PoolLayout.shard`) with the
    slot counts every rank can hold (`agreed_pool_slots`). `fusion`: the Fast Fusion
    threshold (None: off); it widens the logical space (`FUSION_LOGICAL`). `cut_reuse`:
    what a lossy radix cut must keep to be reused (None: `CUT_REUSE`).
    """
    shards = PoolLayout.from_profile(profile, ratio).shards(tp_size)
    layout = shards[tp_rank]
    nbytes = torch.empty((), dtype=dtype).element_size()
    budget = full_tokens * layout.full_token_bytes(nbytes)
    rule = BudgetRule(sink=profile.calibration.sink, window=profile.calibration.window)
    workload = workload or serving_workload(max_context)
    demand = session_slots(workload.turn_shapes(), layout.ratios, rule)
    slots = agreed_pool_slots(shards, budget, demand, nbytes)
    width = max(1, min(max_context, max(slots)))
    pool = RaggedPool(layout, slots, dtype, device, max_requests, width)
    logical = int(full_tokens / min(layout.ratios))
    if fusion is not None:
        logical = max(logical, FUSION_LOGICAL * full_tokens)
    logical = min(logical, LOGICAL_CAP * full_tokens)
    kv_pool = TangramKVPool(pool, logical, method)
    batch_fusion = None if fusion is None else BatchFusion(pool, fusion)
    allocator = TangramAllocator(logical, kv_pool, rule, fusion=batch_fusion, cut_reuse=cut_reuse)
    allocator.split_check = SplitCheck(workload, layout.ratios, rule)
    return kv_pool, allocator
