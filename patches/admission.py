"""Touchpoint: Budget Reservation in SGLang's scheduler; thin glue around the ledger
`tangram_sglang.memory.reservation.BudgetReservation` (`allocator.budget`), in lifecycle order.

- `Scheduler.init_req_max_new_tokens` (AROUND): as SGLang clips `max_new_tokens` to its
  token pool, clip it to what the scarcest head group holds beside the prompt; a prompt
  that cannot fit even an empty cache is aborted through SGLang's `set_finish_with_abort`
  (the client gets a 400 naming the group, the server keeps serving).
- `schedule_policy.PrefillAdder` -> `TangramPrefillAdder` (class REPLACE, which rebinds the
  name in `scheduler` too). `add_one_req` gates every group on need <= room (prompt slots
  over the chunks SGLang will cut plus SGLang's decode estimate, against free + evictable
  with the request's prefix locked, less reservations and the decode estimates of running
  and admitted requests), then reserves the prompt need. A request whose locked prefix
  leaves it no room, ever, recomputes that prefix (decoded tokens are uncompressed, so a
  long cached answer can cost more than recompressing it); one that cannot fit even then
  is aborted: no request waits forever. `add_chunked_req` settles a continuing request's
  reservation on what its remaining chunks need (no change when SGLang cut the chunk as
  planned; growth beyond room is refused and logged). A new adder clears reservations
  left by requests that never got a row.
- `allocation.alloc_req_slots` (AFTER): bind the reservation to the request's row; the
  allocation hooks consume it, `release` returns the rest.
- `ScheduleBatch.check_decode_mem` (AROUND): after SGLang's logical check, evict each
  group's shortfall so the step can top up one slot per group without touching a prompt
  reservation; False sends SGLang to `retract_decode`, whose releases return exactly.
- `ScheduleBatch.retract_decode` (AFTER): count retractions.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS, AddReqResult, PrefillAdder
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import TangramAllocator
from tangram_sglang.memory.radix import TangramRadixCache, evictable_group_slots
from tangram_sglang.memory.reservation import (
    ChunkPlan,
    ReservationRefused,
    decode_estimate,
    new_tokens,
    remaining_decode,
    short_group,
)

from . import Hook
from .allocation import _evictor

logger = logging.getLogger(__name__)


class TangramPrefillAdder(PrefillAdder):
    """SGLang's PrefillAdder plus the per-group Budget Reservation gate (module docstring);
    stock behaviour when the allocator is not a TangramAllocator."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_size = self.rem_chunk_tokens  # the batch's whole chunk budget (or None)
        self.decode_offset = 0.0  # decode estimates of running and admitted requests
        allocator = self._tangram()
        if allocator is None:
            return
        allocator.budget.drop_stale(())  # the last round's batch bound every live one
        running = self.running_batch.reqs if self.running_batch is not None else ()
        self.decode_offset = sum(
            decode_estimate(remaining_decode(r), CLIP_MAX_NEW_TOKENS, self.new_token_ratio)
            for r in running
        )

    def _tangram(self) -> TangramAllocator | None:
        allocator = self.token_to_kv_pool_allocator
        return allocator if isinstance(allocator, TangramAllocator) else None

    def add_one_req(self, req: Any, has_chunked_req: bool, truncation_align_size: Any):
        allocator = self._tangram()
        if allocator is None:
            return super().add_one_req(req, has_chunked_req, truncation_align_size)
        plan = self._plan(truncation_align_size)
        if not self._fits(req, allocator, plan) and not (
            self._unblock(req, allocator) and self._fits(req, allocator, plan)
        ):
            return AddReqResult.NO_TOKEN
        before = len(self.can_run_list)
        result = super().add_one_req(req, has_chunked_req, truncation_align_size)
        if len(self.can_run_list) > before and self.can_run_list[-1] is req:
            chosen = ChunkPlan(req.extend_range.length, self.chunk_size)
            allocator.budget.reserve(req.rid, allocator.budget.prompt_need(new_tokens(req), chosen))
            self.decode_offset += self._decode(req)
        return result

    def add_chunked_req(self, req: Any):
        allocator = self._tangram()
        before = len(self.can_run_list)
        result = super().add_chunked_req(req)
        if allocator is not None and len(self.can_run_list) > before:
            # SGLang must run a started chunked request, so there is no gate: admission
            # reserved every chunk of its plan, and this chunk is the plan's next one.
            budget = allocator.budget
            plan = ChunkPlan(req.extend_range.length, self.chunk_size)
            room = budget.room(
                allocator.pool.free_slots(),
                evictable_group_slots(self.tree_cache, allocator.pool.num_groups),
                self.decode_offset,
            )
            try:
                change = budget.settle(
                    req.req_pool_idx, budget.prompt_need(new_tokens(req), plan), room
                )
            except ReservationRefused as refused:
                budget.events["settle_refused"] += 1
                logger.warning("%s; request %s runs the chunk on what it holds", refused, req.rid)
            else:
                if any(change):
                    logger.info(
                        "tangram: request %s got a chunk of %d tokens, not the planned %s; its "
                        "reservation changed by %s group slots",
                        req.rid,
                        req.extend_range.length,
                        min(self.chunk_size or 0, new_tokens(req)),
                        list(change),
                    )
            self.decode_offset += self._decode(req)
        return result

    def _decode(self, req: Any) -> float:
        """SGLang's decode estimate of a request being admitted."""
        return decode_estimate(remaining_decode(req), CLIP_MAX_NEW_TOKENS)

    def _plan(self, truncation_align_size: Any) -> ChunkPlan:
        """The chunks SGLang's add_one_req cuts for a request admitted now."""
        first = self.rem_chunk_tokens
        if first is not None and truncation_align_size:
            first = truncation_align_size * (first // truncation_align_size)
        return ChunkPlan(first, self.chunk_size)

    def _fits(self, req: Any, allocator: TangramAllocator, plan: ChunkPlan) -> bool:
        """Whether every group has room for the request now (its prefix locked)."""
        need = allocator.budget.need(new_tokens(req), self._decode(req), plan)
        with self._lock_node(req.last_node):
            evictable = evictable_group_slots(self.tree_cache, allocator.pool.num_groups)
        room = allocator.budget.room(allocator.pool.free_slots(), evictable, self.decode_offset)
        return short_group(need, room) is None

    def _never_fits(self, req: Any, allocator: TangramAllocator) -> str | None:
        held = allocator.group_counts(req.prefix_indices).tolist()
        return allocator.budget.never_fits(
            new_tokens(req), self._decode(req), self.chunk_size, held
        )

    def _unblock(self, req: Any, allocator: TangramAllocator) -> bool:
        """A request that can never fit with its locked prefix recomputes it; one that
        cannot fit even then is aborted. Returns whether the request changed."""
        if self._never_fits(req, allocator) is None:
            return False  # it fits once running requests finish: wait
        tree = self.tree_cache
        if len(req.prefix_indices) and isinstance(tree, TangramRadixCache):
            logger.info(
                "tangram: request %s recomputes its %d cached prefix tokens: with them "
                "locked it can never fit (%s)",
                req.rid,
                len(req.prefix_indices),
                self._never_fits(req, allocator),
            )
            allocator.budget.events["recomputed_prefix"] += 1
            tree.recompute(req)
            req.init_next_round_input(tree)
        reason = self._never_fits(req, allocator)
        if reason is not None:
            allocator.budget.events["never_fit"] += 1
            req.set_finish_with_abort(reason)
            req.init_next_round_input(tree)
        return True


def bind_reservations(result: Any, req_to_token_pool: Any, reqs: Any, *args: Any, **kw: Any):
    tree_cache = args[0] if args else kw.get("tree_cache")
    allocator = getattr(tree_cache, "token_to_kv_pool_allocator", None)
    if isinstance(allocator, TangramAllocator):
        for req in reqs:
            allocator.budget.bind(req.rid, req.req_pool_idx)
    return result


def clip_decode_or_refuse(original: Any, self: Any, req: Any) -> Any:
    result = original(self, req)
    # A Scheduler built another way (SGLang's own tests) may have no allocator: stock.
    allocator = getattr(self, "token_to_kv_pool_allocator", None)
    if not isinstance(allocator, TangramAllocator) or req.to_finish is not None:
        return result
    budget = allocator.budget
    chunk_size = getattr(self, "chunked_prefill_size", None)
    prompt = len(req.origin_input_ids)
    most = budget.max_decode(prompt, chunk_size)
    if most < 1:
        budget.events["never_fit"] += 1
        req.set_finish_with_abort(budget.never_fits(prompt, 1, chunk_size))
    elif req.sampling_params.max_new_tokens > most:
        req.sampling_params.max_new_tokens = most
    return result


def check_decode_mem(original: Any, self: Any, selected_indices: Any = None) -> bool:
    fits = original(self, selected_indices)
    allocator = self.token_to_kv_pool_allocator
    if not fits or not isinstance(allocator, TangramAllocator):
        return fits
    rows = self.new_tokens_required_next_decode(selected_indices)  # page size 1: one each
    return allocator.make_decode_room(rows, _evictor(self.tree_cache))


def count_retractions(result: Any, self: Any, *args: Any, **kwargs: Any) -> Any:
    allocator = self.token_to_kv_pool_allocator
    if isinstance(allocator, TangramAllocator):
        retracted, _, aborted = result
        allocator.budget.events["retraction"] += len(retracted) + len(aborted)
    return result


HOOKS = (
    Hook(
        "sglang.srt.managers.schedule_policy.PrefillAdder",
        TangramPrefillAdder,
        HookType.REPLACE,
    ),
    Hook("sglang.srt.mem_cache.allocation.alloc_req_slots", bind_reservations, HookType.AFTER),
    Hook(
        "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens",
        clip_decode_or_refuse,
        HookType.AROUND,
    ),
    Hook(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.check_decode_mem",
        check_decode_mem,
        HookType.AROUND,
    ),
    Hook(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.retract_decode",
        count_retractions,
        HookType.AFTER,
    ),
)
