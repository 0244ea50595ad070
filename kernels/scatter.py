"""Fused gather/scatter of selected tokens into their head groups' slots (one layer).

Same function as `tangram_sglang.compress.write.write_selected`, in one launch for all
heads (and, concatenated, all requests of a batch): the i-th kept token of kv head h
(`token_index[h, i]`, a row of `k_new`/`v_new`) goes to the i-th new slot of h's group
(`group_slots[g, i]`), at h's member row `head_base[h] + slot * head_stride[h]`. Every
head of a group keeps the group's count (`counts[g]`), so one `group_lens` serves the
group. Grid (Hkv, ceil(max count / BLOCK)).

`SelectionScatter` builds those arguments for a whole extend forward from
`select_batch`'s padded selection on the device (no host sync per layer);
`pack_selection` does it from per-head lists on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tangram_sglang.memory import staging
from tangram_sglang.memory.ragged_kv import RaggedKV


@triton.jit
def _scatter_kernel(
    KNew,
    VNew,
    K,
    V,
    TokenIndex,
    GroupSlots,
    Counts,
    HeadGroup,
    HeadBase,
    HeadStride,
    stride_knt,
    stride_knh,
    stride_vnt,
    stride_vnh,
    stride_kr,
    stride_vr,
    stride_ti_h,
    stride_gs_g,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
):
    h = tl.program_id(0)
    blk = tl.program_id(1)
    g = tl.load(HeadGroup + h).to(tl.int64)
    base = tl.load(HeadBase + h).to(tl.int64)
    stride = tl.load(HeadStride + h).to(tl.int64)
    count = tl.load(Counts + g)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs < count
    tok = tl.load(TokenIndex + h * stride_ti_h + offs, mask=mask, other=0).to(tl.int64)
    slot = tl.load(GroupSlots + g * stride_gs_g + offs, mask=mask, other=0).to(tl.int64)
    row = base + slot * stride
    m2 = mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(KNew + tok[:, None] * stride_knt + h * stride_knh + offs_d[None, :], mask=m2)
    v = tl.load(VNew + tok[:, None] * stride_vnt + h * stride_vnh + offs_d[None, :], mask=m2)
    tl.store(K + row[:, None] * stride_kr + offs_d[None, :], k.to(K.dtype.element_ty), mask=m2)
    tl.store(V + row[:, None] * stride_vr + offs_d[None, :], v.to(V.dtype.element_ty), mask=m2)


def pack_selection(
    selected: Sequence[torch.Tensor],
    group_slots: Sequence[torch.Tensor],
    head_group: Sequence[int],
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`select()`'s per-head token lists and the per-group new slots as the padded tensors
    `scatter_selected` takes: token_index `[Hkv, M]`, group_slots `[G, M]`, counts `[G]`.

    Raises ValueError naming the head if a head kept a different number of tokens than
    its group has slots (the reservation invariant).
    """
    if len(selected) != len(head_group):
        raise ValueError(f"selected has {len(selected)} entries for {len(head_group)} kv heads")
    counts = [int(s.shape[0]) for s in group_slots]
    for h, (sel, g) in enumerate(zip(selected, head_group, strict=True)):
        if not 0 <= g < len(group_slots):
            raise ValueError(f"head_group[{h}] = {g} is not a group of group_slots")
        if sel.dim() != 1 or sel.shape[0] != counts[g]:
            raise ValueError(
                f"kv head {h} kept {tuple(sel.shape)} tokens but its group {g} has "
                f"{counts[g]} slots; every head of a group keeps exactly the group's budget"
            )
    width = max([1, *counts])
    token_index = torch.zeros((len(selected), width), dtype=torch.int64)
    slots = torch.zeros((len(group_slots), width), dtype=torch.int64)
    for h, sel in enumerate(selected):
        token_index[h, : sel.shape[0]] = sel.cpu().long()
    for g, s in enumerate(group_slots):
        slots[g, : s.shape[0]] = s.cpu().long()
    as_dev = {"device": device}
    return (
        token_index.to(**as_dev),
        slots.to(**as_dev),
        torch.tensor(counts, dtype=torch.int32).to(**as_dev),
    )


@dataclass(frozen=True)
class SelectionScatter:
    """`scatter_selected`'s arguments for all segments of an extend forward.

    What depends only on host-known counts (each segment's first row, its k_g per group,
    the segments' group slots) is built once per forward (`build`); per layer, `args` maps
    the layer's selection `[S, Hkv, W]` (`select_batch`: token indices within each
    segment, -1 past the head's budget) to token_index `[Hkv, M]` with device ops only: a
    head of group g lists segment 0's kept rows, then segment 1's, ..., as `group_slots[g]`
    lists their slots.
    """

    starts: torch.Tensor  # [S] int64: each segment's first row of k_new/v_new
    positions: torch.Tensor  # [G, S, W] int64: column of (segment, i) in a group-g head's
    # token_index row; M (a spare column, cut off) past the segment's k_g
    group_slots: torch.Tensor  # [G, M] int64
    counts: torch.Tensor  # [G] int32

    @classmethod
    def build(
        cls,
        starts: Sequence[int],
        kept: Sequence[Sequence[int]],
        group_slots: Sequence[torch.Tensor],
        width: int,
        device: torch.device | str,
    ) -> SelectionScatter:
        """`kept[s][g]`: group g's budget in segment s (<= `width`, the selection's width);
        `group_slots[g]`: the segments' group-g slots concatenated in segment order."""
        if len(kept) != len(starts) or not kept:
            raise ValueError(f"kept has {len(kept)} rows for {len(starts)} segments (need >= 1)")
        table = torch.tensor(kept, dtype=torch.int64).T  # [G, S]
        if table.shape[0] != len(group_slots):
            raise ValueError(f"kept has {table.shape[0]} groups, group_slots {len(group_slots)}")
        counts = table.sum(1)
        for g, (slots, count) in enumerate(zip(group_slots, counts.tolist(), strict=True)):
            if slots.dim() != 1 or slots.shape[0] != count:
                raise ValueError(f"group {g}: {tuple(slots.shape)} slots for {count} kept tokens")
        if int(table.max()) > width:
            raise ValueError(f"a budget of {int(table.max())} exceeds the width {width}")
        m = max(1, int(counts.max()))
        offsets = table.cumsum(1) - table  # [G, S]: first column of each segment
        i = torch.arange(width)
        positions = torch.where(i < table[..., None], offsets[..., None] + i, m)
        slots = torch.zeros((len(group_slots), m), dtype=torch.int64, device=device)
        for g, s in enumerate(group_slots):
            slots[g, : s.shape[0]] = s.to(device)
        return cls(
            staging.to_device(torch.tensor(starts, dtype=torch.int64), device),
            staging.to_device(positions, device),
            slots,
            staging.to_device(counts.to(torch.int32), device),
        )

    def args(
        self, selected: torch.Tensor, head_group: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """token_index, group_slots, counts for a layer whose kv head h is in group
        `head_group[h]` (a device tensor) and kept `selected[:, h]`."""
        s, width = self.positions.shape[1:]
        if selected.dim() != 3 or selected.shape[0] != s or selected.shape[2] != width:
            raise ValueError(f"selected must be [{s}, Hkv, {width}], got {tuple(selected.shape)}")
        heads = selected.shape[1]
        if tuple(head_group.shape) != (heads,):
            raise ValueError(f"head_group must be [{heads}], got {tuple(head_group.shape)}")
        rows = (selected + self.starts[:, None, None]).transpose(0, 1).reshape(heads, -1)
        where = self.positions.index_select(0, head_group).view(heads, -1)
        m = self.group_slots.shape[1]
        token_index = torch.zeros((heads, m + 1), dtype=torch.int64, device=selected.device)
        token_index.scatter_(1, where, rows)
        return token_index[:, :m], self.group_slots, self.counts


def scatter_selected(
    kv: RaggedKV,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    token_index: torch.Tensor,
    group_slots: torch.Tensor,
    counts: torch.Tensor,
    block: int = 32,
) -> None:
    """Write kept tokens of `k_new`/`v_new` `[T, Hkv, D]` into the layer storage of `kv`.

    token_index `[Hkv, M]` (int, rows of k_new), group_slots `[G, M]` (int slots),
    counts `[G]` (int32, <= M); entries past a group's count are ignored.
    """
    hkv = kv.head_group.shape[0]
    dim = kv.k.shape[1]
    if k_new.dim() != 3 or k_new.shape[1:] != (hkv, dim) or v_new.shape != k_new.shape:
        raise ValueError(
            f"k_new/v_new must be [T, {hkv}, {dim}], got {tuple(k_new.shape)} and "
            f"{tuple(v_new.shape)}"
        )
    if token_index.dim() != 2 or token_index.shape[0] != hkv:
        raise ValueError(f"token_index must be [{hkv}, M], got {tuple(token_index.shape)}")
    width = token_index.shape[1]
    if group_slots.dim() != 2 or group_slots.shape[1] != width:
        raise ValueError(f"group_slots must be [G, {width}], got {tuple(group_slots.shape)}")
    if counts.shape != (group_slots.shape[0],):
        raise ValueError(f"counts must be [{group_slots.shape[0]}], got {tuple(counts.shape)}")
    for name, t in (
        ("k_new", k_new),
        ("v_new", v_new),
        ("token_index", token_index),
        ("group_slots", group_slots),
        ("kv.k", kv.k),
        ("kv.v", kv.v),
    ):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    if width == 0 or hkv == 0:
        return
    _scatter_kernel[(hkv, triton.cdiv(width, block))](
        k_new,
        v_new,
        kv.k,
        kv.v,
        token_index,
        group_slots,
        counts,
        kv.head_group,
        kv.head_base,
        kv.head_stride,
        k_new.stride(0),
        k_new.stride(1),
        v_new.stride(0),
        v_new.stride(1),
        kv.k.stride(0),
        kv.v.stride(0),
        token_index.stride(0),
        group_slots.stride(0),
        HEAD_DIM=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK=block,
        num_warps=4,
    )
