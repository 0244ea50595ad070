"""Write a layer's kept new tokens into the group slots allocated for their segment.

All heads of a group keep the same number of tokens (the group's budget, `kept_g(n)`)
but not the same tokens: the i-th kept token of head h goes to the i-th slot of its
group, at the head's member row. So a group's slot i holds, per member head, that head's
i-th kept token, and one `group_lens` serves the whole group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tangram_sglang.memory.pool import RaggedPool


def write_selected(
    pool: RaggedPool,
    layer: int,
    row: int,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    selected: Sequence[torch.Tensor],
    group_slots: Sequence[torch.Tensor],
) -> None:
    """Gather each kv head's `selected` tokens of `k_new`/`v_new` `[T, Hkv, D]` into
    `group_slots[g]` (the segment's group slots, e.g. `ExtendSegment.slots` as
    `TangramAllocator.begin_extend` allocated them).

    Raises ValueError naming layer, group and head if a member head kept a different
    number of tokens than its group has slots.
    """
    layout = pool.layout
    expected = (k_new.shape[0], layout.num_kv_heads, layout.head_dim)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if tuple(x.shape) != expected:
            raise ValueError(
                f"write_selected(layer {layer}): {name} is {tuple(x.shape)}, "
                f"expected {expected} ([T, kv_heads, head_dim])"
            )
    if len(selected) != layout.num_kv_heads:
        raise ValueError(
            f"write_selected(layer {layer}, row {row}): selected has "
            f"{len(selected)} entries for {layout.num_kv_heads} kv heads"
        )
    if len(group_slots) != layout.num_groups:
        raise ValueError(
            f"write_selected(layer {layer}, row {row}): group_slots has "
            f"{len(group_slots)} entries for {layout.num_groups} groups"
        )
    for g in range(layout.num_groups):
        count = group_slots[g].shape[0]
        for h in layout.heads[g][layer]:
            if selected[h].dim() != 1 or selected[h].shape[0] != count:
                raise ValueError(
                    f"write_selected(layer {layer}, row {row}): group {g} has {count} slots "
                    f"but kv head {h} kept {tuple(selected[h].shape)} tokens; every head of "
                    "a group keeps exactly the group's budget"
                )
    for g in range(layout.num_groups):
        members = layout.heads[g][layer]
        if not members:
            continue
        tokens = torch.stack([selected[h] for h in members], dim=1).to(k_new.device).long()
        heads = torch.tensor(members, dtype=torch.long, device=k_new.device)
        pool.write(layer, g, group_slots[g], k_new[tokens, heads], v_new[tokens, heads])
