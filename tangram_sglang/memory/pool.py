"""Ragged head-group pools: the K/V storage, its views, one slot allocator per head group.

Group g's heads keep the same tokens, so they share one slot index space, handed out by
SGLang's own `TokenToKVPoolAllocator` (page_size 1) or `PagedTokenToKVPoolAllocator`
(whole pages through `alloc`; their `alloc_extend/alloc_decode` need a GPU kernel and a
SGLang-shaped batch, which nothing here has). The allocators manage indices only; the
bytes live here, laid out as docs/pool-layout.md draws:

- Slots `0..page_size-1` of every group are padding (SGLang's slot-0 convention: padded
  batch entries write there harmlessly), so group g's buffers have `S_g + page_size`
  slots.
- Per layer one contiguous K and one V storage `[rows_l, head_dim]`; group g's view is
  `[S_g + page_size, n_{g,l}, head_dim]` starting at row `base_row[l][g]`, and kv head h
  of layer l (member j of group g) reads slot s at row
  `head_base[l, h] + s * head_stride[l, h]` (= base_row[l][g] + j + s * n_{g,l}).

The per-request group page tables live here too, because attention reads them next to
the storage (`layer_view`): `req_to_slot[g, r, :group_lens[g, r]]` are the group slots
request row r attends to, in token order (rows follow SGLang's `ReqToTokenPool`:
`1..max_requests`, row 0 padding). The pool only zeroes them (`clear`) and keeps no
request ledger: `TangramAllocator` (tangram_sglang/memory/allocator.py) takes the slots from
`allocators[g]`, maps them to logical slots and writes the tables, and
`BudgetReservation` (tangram_sglang/memory/reservation.py) holds what admission promised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from tangram_sglang.memory.layout import PoolLayout, sessions_that_fit
from tangram_sglang.memory.ragged_kv import RaggedKV
from tangram_sglang.offline.profile import Profile


class PoolExhausted(ValueError):
    """Some group has too few free slots for an allocation; nothing was allocated."""


def _as_layout(layout: PoolLayout | Profile, target_ratio: float | None) -> PoolLayout:
    if isinstance(layout, Profile):
        return PoolLayout.from_profile(layout, target_ratio)
    if target_ratio is not None:
        raise ValueError("target_ratio applies to a Profile; a PoolLayout already has ratios")
    return layout


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class RaggedPool:
    """Per-group allocators, per-layer K/V storage, and the per-request slot tables that
    `TangramAllocator` writes."""

    def __init__(
        self,
        layout: PoolLayout | Profile,
        slots: Sequence[int],
        dtype: torch.dtype,
        device: str | torch.device,
        max_requests: int,
        max_context: int,
        page_size: int = 1,
        target_ratio: float | None = None,
    ) -> None:
        self.layout = _as_layout(layout, target_ratio)
        self.page_size = int(page_size)
        self.slots = tuple(int(s) for s in slots)
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_requests = int(max_requests)
        self.max_context = int(max_context)
        self._check_args()
        G, L = self.num_groups, self.layout.num_layers
        self.allocators = [self._make_allocator(s) for s in self.slots]
        self.base_row = self._base_rows()
        rows = [self.base_row[layer][-1] + self._group_rows(G - 1, layer) for layer in range(L)]
        D = self.layout.head_dim
        self.k_storage = [torch.zeros(r, D, dtype=dtype, device=self.device) for r in rows]
        self.v_storage = [torch.zeros(r, D, dtype=dtype, device=self.device) for r in rows]
        self.head_group, self.head_base, self.head_stride = self._head_tables()
        self._head_index = [
            [
                torch.tensor(self.layout.heads[g][layer], dtype=torch.long, device=self.device)
                for layer in range(L)
            ]
            for g in range(G)
        ]

        R1 = self.max_requests + 1
        self.req_to_slot = torch.zeros(
            (G, R1, self.max_context), dtype=torch.int32, device=self.device
        )
        self.group_lens = torch.zeros((G, R1), dtype=torch.int32, device=self.device)

    @classmethod
    def from_budget(
        cls,
        profile_or_layout: PoolLayout | Profile,
        total_bytes: int,
        dtype: torch.dtype,
        device: str | torch.device,
        max_requests: int,
        max_context: int,
        page_size: int = 1,
        target_ratio: float | None = None,
        demand: Sequence[float] | None = None,
    ) -> RaggedPool:
        """A pool whose K/V storage (padding slots included) fits in `total_bytes`, split
        so that groups run out together for `demand` (slots per unit of work per group;
        default the group ratios, i.e. slots per logical token; or a workload's
        `budget.session_slots`)."""
        layout = _as_layout(profile_or_layout, target_ratio)
        demand = tuple(layout.ratios if demand is None else demand)
        slots = layout.pool_slots(total_bytes, demand, _dtype_bytes(dtype), page_size)
        return cls(layout, slots, dtype, device, max_requests, max_context, page_size)

    # ---- construction helpers -------------------------------------------------------

    def _check_args(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size {self.page_size} must be >= 1")
        if len(self.slots) != self.num_groups:
            raise ValueError(f"slots has {len(self.slots)} entries for {self.num_groups} groups")
        for g, s in enumerate(self.slots):
            if s < 0 or s % self.page_size:
                raise ValueError(
                    f"slots[{g}] = {s} must be a non-negative multiple of page_size "
                    f"{self.page_size}"
                )
        if self.max_requests < 1 or self.max_context < 1:
            raise ValueError(
                f"max_requests {self.max_requests} and max_context {self.max_context} must be >= 1"
            )
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype {self.dtype} is not a floating point type")
        every_head = list(range(self.layout.num_kv_heads))
        for layer in range(self.layout.num_layers):
            stored = sorted(h for group in self.layout.heads for h in group[layer])
            if stored != every_head:
                raise ValueError(
                    f"layout: layer {layer} stores kv heads {stored}; every head "
                    f"0..{self.layout.num_kv_heads - 1} must be in exactly one group"
                )

    def _make_allocator(self, size: int) -> BaseTokenToKVPoolAllocator:
        # kvcache=None: the allocators hand out indices; the bytes are this pool's.
        device = str(self.device)
        if self.page_size == 1:
            return TokenToKVPoolAllocator(size, self.dtype, device, None, False)
        return PagedTokenToKVPoolAllocator(size, self.page_size, self.dtype, device, None, False)

    def _group_rows(self, group: int, layer: int) -> int:
        return (self.slots[group] + self.page_size) * len(self.layout.heads[group][layer])

    def _base_rows(self) -> tuple[tuple[int, ...], ...]:
        """`base_row[l][g]`: first storage row of group g in layer l (groups in gid order)."""
        out = []
        for layer in range(self.num_layers):
            starts, row = [], 0
            for g in range(self.num_groups):
                starts.append(row)
                row += self._group_rows(g, layer)
            out.append(tuple(starts))
        return tuple(out)

    def _head_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`head_group`, `head_base`, `head_stride`, each `[L, Hkv]` (see module docstring)."""
        shape = (self.num_layers, self.layout.num_kv_heads)
        group = torch.zeros(shape, dtype=torch.int32)
        base = torch.zeros(shape, dtype=torch.int64)
        stride = torch.zeros(shape, dtype=torch.int32)
        for layer in range(self.num_layers):
            for g in range(self.num_groups):
                members = self.layout.heads[g][layer]
                for j, h in enumerate(members):
                    group[layer, h] = g
                    base[layer, h] = self.base_row[layer][g] + j
                    stride[layer, h] = len(members)
        return group.to(self.device), base.to(self.device), stride.to(self.device)

    # ---- shape and size -------------------------------------------------------------

    @property
    def num_groups(self) -> int:
        return self.layout.num_groups

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    def heads_in(self, group: int, layer: int) -> tuple[int, ...]:
        return self.layout.heads[group][layer]

    def bytes_per_group(self) -> tuple[int, ...]:
        """K and V bytes of each group over all layers, padding slots included."""
        return self.layout.group_bytes(self.slots, _dtype_bytes(self.dtype), self.page_size)

    def total_bytes(self) -> int:
        """K/V storage bytes (the tables `req_to_slot`/`group_lens` are not counted)."""
        return sum(self.bytes_per_group())

    def table_bytes(self) -> int:
        return (self.req_to_slot.numel() + self.group_lens.numel()) * 4

    def sessions_that_fit(self, per_session_slots: Sequence[int]) -> int:
        return sessions_that_fit(self.slots, per_session_slots)

    def describe(self) -> dict[str, Any]:
        return {
            "groups": self.num_groups,
            "ratios": [round(r, 4) for r in self.layout.ratios],
            "heads_per_group": [sum(len(h) for h in hs) for hs in self.layout.heads],
            "slots": list(self.slots),
            "free_slots": list(self.free_slots()),
            "bytes_per_group": list(self.bytes_per_group()),
            "total_bytes": self.total_bytes(),
            "table_bytes": self.table_bytes(),
            "page_size": self.page_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_requests": self.max_requests,
            "max_context": self.max_context,
        }

    # ---- storage views --------------------------------------------------------------

    def k_buffer(self, group: int, layer: int) -> torch.Tensor:
        """`[S_g + page_size, n_{g,l}, head_dim]` view of group `group`'s K in `layer`."""
        return self._view(self.k_storage[layer], group, layer)

    def v_buffer(self, group: int, layer: int) -> torch.Tensor:
        return self._view(self.v_storage[layer], group, layer)

    def _view(self, storage: torch.Tensor, group: int, layer: int) -> torch.Tensor:
        n = len(self.layout.heads[group][layer])
        start = self.base_row[layer][group]
        count = self.slots[group] + self.page_size
        return storage[start : start + count * n].view(count, n, storage.shape[1])

    def layer_view(self, layer: int, k_scale: float = 1.0, v_scale: float = 1.0) -> RaggedKV:
        """What attention reads of `layer`; `k_scale`/`v_scale` are the layer's FP8 scales
        (`ragged_kv.quantize`)."""
        return RaggedKV(
            k=self.k_storage[layer],
            v=self.v_storage[layer],
            head_group=self.head_group[layer],
            head_base=self.head_base[layer],
            head_stride=self.head_stride[layer],
            req_to_slot=self.req_to_slot,
            group_lens=self.group_lens,
            k_scale=k_scale,
            v_scale=v_scale,
        )

    def write(
        self,
        layer: int,
        group: int,
        slots: torch.Tensor,
        k_rows: torch.Tensor,
        v_rows: torch.Tensor,
    ) -> None:
        """Store `k_rows`/`v_rows` `[N, n_{g,l}, head_dim]` of one group at `slots` `[N]`
        (cast to the pool's dtype: callers with FP8 scales pass `ragged_kv.quantize`d rows)."""
        expected = (slots.shape[0], len(self.layout.heads[group][layer]), self.layout.head_dim)
        for name, rows in (("k_rows", k_rows), ("v_rows", v_rows)):
            if tuple(rows.shape) != expected:
                raise ValueError(
                    f"write(layer {layer}, group {group}): {name} is {tuple(rows.shape)}, "
                    f"expected {expected} ([slots, heads of the group in the layer, head_dim])"
                )
        index = slots.to(device=self.device, dtype=torch.long)
        self.k_buffer(group, layer)[index] = k_rows.to(self.dtype)
        self.v_buffer(group, layer)[index] = v_rows.to(self.dtype)

    def write_tokens(
        self, layer: int, group_slots: Sequence[torch.Tensor], k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store every head of every token `k`/`v` `[N, Hkv, head_dim]` (decode, ratio 1):
        group g keeps token i at `group_slots[g][i]`."""
        self._check_groups(group_slots, "group_slots")
        for g in range(self.num_groups):
            index = self._head_index[g][layer]
            if index.numel():
                self.write(layer, g, group_slots[g], k[:, index], v[:, index])

    def _check_groups(self, values: Sequence[Any], name: str) -> None:
        if len(values) != self.num_groups:
            raise ValueError(f"{name} has {len(values)} entries for {self.num_groups} groups")

    # ---- group slots ----------------------------------------------------------------

    def free_slots(self) -> tuple[int, ...]:
        return tuple(a.available_size() for a in self.allocators)

    def clear(self) -> None:
        """Free every slot and empty every row (SGLang's flush; `TangramAllocator.clear`)."""
        for a in self.allocators:
            a.clear()
        self.req_to_slot.zero_()
        self.group_lens.zero_()
