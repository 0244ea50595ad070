"""Touchpoint: admission (`PrefillAdder`), request arrival, row binding and the decode
memory check, for Budget Reservation (`tangram_sglang.admission`).

- `schedule_policy.PrefillAdder` is replaced by `TangramPrefillAdder` (class REPLACE,
  which also rebinds the name in `scheduler`). Under --kv-compression its raw-token gates
  count the logical space, and `add_one_req` first gates on every head group
  (need_g <= free_g + evictable_g - reserved_g, evictable with the request's prefix
  locked, need over the chunks SGLang will cut) and, once admitted, reserves the need of
  every chunk of the plan that starts with the chunk SGLang chose, plus the decode budget.
  A request refused because its locked prefix leaves it no room in some group, ever,
  recomputes that prefix instead (a cached prefix of uncompressed decoded tokens costs
  more than recompressing it; the request fits from scratch, `init_req_max_new_tokens`
  checked that); if even that cannot fit, it is aborted. No request waits forever.
  `add_chunked_req` settles a continuing request's reservation on what its remaining
  chunks need (no change when SGLang cut the chunk as planned).
- `allocation.alloc_req_slots` (AFTER): a request's pending reservation moves to the row
  SGLang just gave it; the allocation hooks consume it, `release_row` frees the rest.
- `Scheduler.init_req_max_new_tokens` (AROUND): a request that cannot fit even an empty
  cache (its prompt in whole chunks of --chunked-prefill-size) is aborted with SGLang's
  own `set_finish_with_abort` path (the client gets a 400, the server keeps serving).
- `ScheduleBatch.check_decode_mem` (AROUND): when SGLang's raw-token check fails, evict
  per group before reporting a shortfall, so reserved requests are not retracted.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.admission import (
    ChunkPlan,
    decode_budget,
    evictable_group_slots,
    never_fits,
    new_tokens,
    short_group,
    turn_need,
)
from tangram_sglang.allocator import TangramAllocator
from tangram_sglang.radix import TangramRadixCache

from . import Hook
from .allocation import _evictor

logger = logging.getLogger(__name__)


class TangramPrefillAdder(PrefillAdder):
    """SGLang's PrefillAdder plus the per-group Budget Reservation gate (module docstring);
    stock behaviour when the allocator is not a TangramAllocator."""

    def _tangram(self) -> TangramAllocator | None:
        allocator = self.token_to_kv_pool_allocator
        return allocator if isinstance(allocator, TangramAllocator) else None

    def _logical_room(self, offset: float) -> float:
        allocator = self.token_to_kv_pool_allocator
        return allocator.logical_available_size() + self.tree_cache.evictable_size() - offset

    @property
    def rem_total_tokens(self):
        if self._tangram() is None:
            return super().rem_total_tokens
        return self._logical_room(self.rem_total_token_offset)

    @property
    def cur_rem_tokens(self):
        if self._tangram() is None:
            return super().cur_rem_tokens
        return self._logical_room(self.cur_rem_token_offset)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_size = self.rem_chunk_tokens  # the batch's whole chunk budget (or None)

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
            allocator.reserve(
                req.rid, turn_need(new_tokens(req), decode_budget(req), allocator, chosen)
            )
        return result

    def add_chunked_req(self, req: Any):
        allocator = self._tangram()
        before = len(self.can_run_list)
        result = super().add_chunked_req(req)
        if allocator is not None and len(self.can_run_list) > before:
            # SGLang must run a started chunked request, so there is no gate: admission
            # reserved every chunk of its plan, and this chunk is the plan's next one.
            plan = ChunkPlan(req.extend_range.length, self.chunk_size)
            need = turn_need(new_tokens(req), decode_budget(req), allocator, plan)
            change = allocator.settle(req.rid, req.req_pool_idx, need)
            if any(change):
                logger.warning(
                    "tangram: request %s got a chunk of %d tokens, not the planned %s; its "
                    "reservation changed by %s group slots",
                    req.rid,
                    req.extend_range.length,
                    min(self.chunk_size or 0, new_tokens(req)),
                    list(change),
                )
        return result

    def _plan(self, truncation_align_size: Any) -> ChunkPlan:
        """The chunks SGLang's add_one_req cuts for a request admitted now."""
        first = self.rem_chunk_tokens
        if first is not None and truncation_align_size:
            first = truncation_align_size * (first // truncation_align_size)
        return ChunkPlan(first, self.chunk_size)

    def _fits(self, req: Any, allocator: TangramAllocator, plan: ChunkPlan) -> bool:
        """Whether every group has room for the request now (its prefix locked)."""
        need = turn_need(new_tokens(req), decode_budget(req), allocator, plan)
        with self._lock_node(req.last_node):
            room = allocator.room(evictable_group_slots(self.tree_cache, allocator))
        return short_group(need, room) is None

    def _never_fits(self, req: Any, allocator: TangramAllocator) -> str | None:
        held = allocator.group_counts(req.prefix_indices).tolist()
        return never_fits(new_tokens(req), decode_budget(req), allocator, self.chunk_size, held)

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
            tree.recompute(req)
            req.init_next_round_input(tree)
        reason = self._never_fits(req, allocator)
        if reason is not None:
            req.set_finish_with_abort(reason)
            req.init_next_round_input(tree)
        return True


def bind_reservations(result: Any, req_to_token_pool: Any, reqs: Any, *args: Any, **kw: Any):
    tree_cache = args[0] if args else kw.get("tree_cache")
    allocator = getattr(tree_cache, "token_to_kv_pool_allocator", None)
    if isinstance(allocator, TangramAllocator):
        for req in reqs:
            allocator.bind_reservation(req.rid, req.req_pool_idx)
    return result


def refuse_never_fitting(original: Any, self: Any, req: Any) -> Any:
    result = original(self, req)
    # A Scheduler built another way (SGLang's own tests) may have no allocator: stock.
    allocator = getattr(self, "token_to_kv_pool_allocator", None)
    if isinstance(allocator, TangramAllocator) and req.to_finish is None:
        chunk_size = getattr(self, "chunked_prefill_size", None)
        reason = never_fits(len(req.origin_input_ids), decode_budget(req), allocator, chunk_size)
        if reason is not None:
            req.set_finish_with_abort(reason)
    return result


def check_decode_mem(original: Any, self: Any, selected_indices: Any = None) -> bool:
    if original(self, selected_indices):
        return True
    allocator = self.token_to_kv_pool_allocator
    if not isinstance(allocator, TangramAllocator):
        return False
    needed = self.new_tokens_required_next_decode(selected_indices)
    if allocator.logical_available_size() < needed:
        return False
    return allocator.make_room([needed] * allocator.pool.num_groups, _evictor(self.tree_cache))


HOOKS = (
    Hook(
        "sglang.srt.managers.schedule_policy.PrefillAdder",
        TangramPrefillAdder,
        HookType.REPLACE,
    ),
    Hook("sglang.srt.mem_cache.allocation.alloc_req_slots", bind_reservations, HookType.AFTER),
    Hook(
        "sglang.srt.managers.scheduler.Scheduler.init_req_max_new_tokens",
        refuse_never_fitting,
        HookType.AROUND,
    ),
    Hook(
        "sglang.srt.managers.schedule_batch.ScheduleBatch.check_decode_mem",
        check_decode_mem,
        HookType.AROUND,
    ),
)
