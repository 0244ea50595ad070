"""SelectionScatter (the scatter's arguments built on the device from `select_batch`'s
padded selection of a whole extend forward) says what `pack_selection` says from the
per-head token lists: the same rows, slots and counts wherever the kernel reads."""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tangram_sglang.kernels.scatter import SelectionScatter, pack_selection  # noqa: E402


def random_forward(rng: random.Random, groups: int, heads: int):
    """Segments (lengths, k_g per group, consecutive slots per group) and a layer's
    selection: per segment and head, k_{g(h)} ascending indices, then -1."""
    lens = [rng.randint(1, 40) for _ in range(rng.randint(1, 6))]
    kept = [[rng.randint(1, n) for _ in range(groups)] for n in lens]
    width = max(max(row) for row in kept)
    head_group = [rng.randrange(groups) for _ in range(heads)]
    selected = torch.full((len(lens), heads, width), -1, dtype=torch.int64)
    for s, n in enumerate(lens):
        for h, g in enumerate(head_group):
            pick = sorted(rng.sample(range(n), kept[s][g]))
            selected[s, h, : len(pick)] = torch.tensor(pick)
    slots = [torch.randperm(1000)[: sum(row[g] for row in kept)] + 8 for g in range(groups)]
    return lens, kept, width, head_group, selected, slots


@pytest.mark.parametrize("trial", range(20))
def test_device_packing_equals_host_packing(trial):
    seed = random.randrange(2**31)
    rng = random.Random(seed)
    groups, heads = rng.randint(1, 4), rng.randint(1, 6)
    lens, kept, width, head_group, selected, slots = random_forward(rng, groups, heads)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    plan = SelectionScatter.build(starts, kept, slots, width, "cpu")
    token_index, group_slots, counts = plan.args(selected, torch.tensor(head_group))
    # Host packing: per head, the segments' kept rows of k/v concatenated in batch order.
    per_head = [
        torch.cat([selected[s, h, : kept[s][g]] + starts[s] for s in range(len(lens))])
        for h, g in enumerate(head_group)
    ]
    want_index, want_slots, want_counts = pack_selection(per_head, slots, head_group, "cpu")
    what = f"seed {seed}: lens {lens} kept {kept} head_group {head_group}"
    assert torch.equal(counts.long(), want_counts.long()), f"{what}: counts {counts.tolist()}"
    for g, count in enumerate(want_counts.tolist()):
        assert torch.equal(group_slots[g, :count], want_slots[g, :count]), f"{what}: group {g}"
    for h, g in enumerate(head_group):
        count = int(want_counts[g])
        assert torch.equal(token_index[h, :count], want_index[h, :count]), (
            f"{what}: head {h} rows {token_index[h, :count].tolist()}, expected "
            f"{want_index[h, :count].tolist()}"
        )


def test_inconsistent_counts_are_refused_by_name():
    slots = [torch.arange(5) + 8]
    with pytest.raises(ValueError, match="group 0: \\(5,\\) slots for 6 kept tokens"):
        SelectionScatter.build([0, 4], [[4], [2]], slots, 4, "cpu")
    with pytest.raises(ValueError, match="exceeds the width 3"):
        SelectionScatter.build([0, 4], [[4], [1]], slots, 3, "cpu")
    plan = SelectionScatter.build([0, 4], [[4], [1]], slots, 4, "cpu")
    with pytest.raises(ValueError, match="selected must be"):
        plan.args(torch.zeros((2, 3, 5), dtype=torch.int64), torch.zeros(3, dtype=torch.int32))
