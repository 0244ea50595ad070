"""Touchpoint: admission (`PrefillAdder`), request arrival, row binding and the decode
memory check, for Budget Reservation (`tangram_sglang.admission`).

- `schedule_policy.PrefillAdder` is replaced by `TangramPrefillAdder` (class REPLACE,
  which also rebinds the name in `scheduler`). Under --kv-compression its raw-token gates
  count the logical space, and `add_one_req` first gates on every head group
  (need_g <= free_g + evictable_g - reserved_g, evictable with the request's prefix
  locked) and, once admitted, reserves the need of the extend range SGLang chose;
  `add_chunked_req` reserves each further chunk's kept slots.
- `allocation.alloc_req_slots` (AFTER): a request's pending reservation moves to the row
  SGLang just gave it; the allocation hooks consume it, `release_row` frees the rest.
- `Scheduler.init_req_max_new_tokens` (AROUND): a request that cannot fit even an empty
  cache is aborted with SGLang's own `set_finish_with_abort` path (the client gets a 400,
  the server keeps serving).
- `ScheduleBatch.check_decode_mem` (AROUND): when SGLang's raw-token check fails, evict
  per group before reporting a shortfall, so reserved requests are not retracted.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.admission import (
    decode_budget,
    evictable_group_slots,
    never_fits,
    short_group,
    turn_need,
)
from tangram_sglang.allocator import TangramAllocator

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

    def add_one_req(self, req: Any, has_chunked_req: bool, truncation_align_size: Any):
        allocator = self._tangram()
        if allocator is None:
            return super().add_one_req(req, has_chunked_req, truncation_align_size)
        max_new = decode_budget(req)
        extend = len(req.full_untruncated_fill_ids) - len(req.prefix_indices)
        # A chunk of the prompt keeps at most what the whole rest keeps (kept_g is monotone).
        need = turn_need(extend, max_new, allocator)
        with self._lock_node(req.last_node):
            room = allocator.room(evictable_group_slots(self.tree_cache, allocator))
        if short_group(need, room) is not None:
            return AddReqResult.NO_TOKEN
        before = len(self.can_run_list)
        result = super().add_one_req(req, has_chunked_req, truncation_align_size)
        if len(self.can_run_list) > before and self.can_run_list[-1] is req:
            allocator.reserve(req.rid, turn_need(req.extend_range.length, max_new, allocator))
        return result

    def add_chunked_req(self, req: Any):
        allocator = self._tangram()
        before = len(self.can_run_list)
        result = super().add_chunked_req(req)
        if allocator is not None and len(self.can_run_list) > before:
            # The decode budget was reserved with the first chunk; this chunk's kept slots
            # are reserved here, without a gate (SGLang must run a started chunked request).
            allocator.reserve(req.rid, turn_need(req.extend_range.length, 0, allocator))
        return result


def bind_reservations(result: Any, req_to_token_pool: Any, reqs: Any, *args: Any, **kw: Any):
    tree_cache = args[0] if args else kw.get("tree_cache")
    allocator = getattr(tree_cache, "token_to_kv_pool_allocator", None)
    if isinstance(allocator, TangramAllocator):
        for req in reqs:
            allocator.bind_reservation(req.rid, req.req_pool_idx)
    return result


def refuse_never_fitting(original: Any, self: Any, req: Any) -> Any:
    result = original(self, req)
    allocator = self.token_to_kv_pool_allocator
    if isinstance(allocator, TangramAllocator) and req.to_finish is None:
        reason = never_fits(len(req.origin_input_ids), decode_budget(req), allocator)
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
