"""Pool layout: where each (layer, kv_head) lives and how a KV byte budget splits.

Pure arithmetic shared by `RaggedPool` (which allocates these sizes) and the `plan`
command (which reports them), so the numbers a user plans with are the ones served.

Group g owns one slot index space; slot s of group g holds, for every layer l, the K and
V rows of the heads `heads[g][l]` (in that order). A group's slot therefore costs
sum_l |heads[g][l]| * head_dim * 2 * dtype_bytes bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tangram_sglang.offline.profile import Profile


@dataclass(frozen=True)
class PoolLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    heads: tuple[tuple[tuple[int, ...], ...], ...]
    ratios: tuple[float, ...]

    @classmethod
    def from_profile(cls, profile: Profile, target_ratio: float | None = None) -> PoolLayout:
        m = profile.model
        heads = tuple(
            tuple(tuple(sorted(g.heads_in_layer(layer))) for layer in range(m.num_layers))
            for g in profile.groups
        )
        return cls(
            m.num_layers, m.num_kv_heads, m.head_dim, heads, profile.group_ratios(target_ratio)
        )

    @property
    def num_groups(self) -> int:
        return len(self.heads)

    def heads_in(self, group: int, layer: int) -> tuple[int, ...]:
        return self.heads[group][layer]

    def shards(self, tp_size: int) -> tuple[PoolLayout, ...]:
        """Every tensor-parallel rank's `shard`, in rank order."""
        return tuple(self.shard(rank, tp_size) for rank in range(tp_size))

    def shard(self, rank: int, tp_size: int) -> PoolLayout:
        """The part of every group that tensor-parallel rank `rank` stores, its heads
        renumbered from 0 as the rank's attention layers number them. Groups and ratios
        stay global (a group may hold no head on some rank), so every rank reserves the
        same slots per request."""
        own = rank_heads(rank, self.num_kv_heads, tp_size)
        local = {h: i for i, h in enumerate(own)}
        heads = tuple(
            tuple(tuple(local[h] for h in layer if h in local) for layer in group)
            for group in self.heads
        )
        return replace(self, num_kv_heads=len(own), heads=heads)

    def locate(self, layer: int, head: int) -> tuple[int, int]:
        """(group, row within that group's layer buffer) of one kv head."""
        for g in range(self.num_groups):
            members = self.heads[g][layer]
            if head in members:
                return g, members.index(head)
        raise KeyError(f"(layer {layer}, head {head}) is in no group")

    def slot_bytes(self, group: int, dtype_bytes: int) -> int:
        rows = sum(len(h) for h in self.heads[group])
        return rows * self.head_dim * 2 * dtype_bytes

    def group_bytes(
        self, slots: Sequence[int], dtype_bytes: int, page_size: int = 1
    ) -> tuple[int, ...]:
        """K and V bytes of each group holding `slots` usable slots plus its padding page."""
        return tuple((n + page_size) * self.slot_bytes(g, dtype_bytes) for g, n in enumerate(slots))

    def full_token_bytes(self, dtype_bytes: int) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * dtype_bytes

    def _split_budget(
        self, total_bytes: int, demand: Sequence[float], dtype_bytes: int, page_size: int = 1
    ) -> tuple[int, ...]:
        """Slots per group so that, for `demand` (slots per unit of work), groups run out
        together; each count is rounded down to whole pages."""
        if len(demand) != self.num_groups:
            raise ValueError(f"demand has {len(demand)} entries for {self.num_groups} groups")
        unit_bytes = sum(d * self.slot_bytes(g, dtype_bytes) for g, d in enumerate(demand))
        if unit_bytes <= 0:
            raise ValueError("demand must be positive for at least one group")
        units = total_bytes / unit_bytes
        return tuple(int(units * d) // page_size * page_size for d in demand)

    def pool_slots(
        self, total_bytes: int, demand: Sequence[float], dtype_bytes: int, page_size: int = 1
    ) -> tuple[int, ...]:
        """Usable slots per group of a pool whose storage, padding page included, fits in
        `total_bytes` (what `RaggedPool.from_budget` allocates and `plan` reports)."""
        if any(d < 0 for d in demand):
            raise ValueError(f"demand {tuple(demand)} has a negative entry")
        slot_bytes = [self.slot_bytes(g, dtype_bytes) for g in range(self.num_groups)]
        padding = page_size * sum(slot_bytes)
        if total_bytes <= padding:
            raise ValueError(
                f"total_bytes {total_bytes} does not even cover the padding pages ({padding} bytes)"
            )
        slots = list(self._split_budget(total_bytes - padding, demand, dtype_bytes, page_size))
        # _split_budget floors in floating point; shave a page where rounding overshot.
        while sum(self.group_bytes(slots, dtype_bytes, page_size)) > total_bytes:
            g = max(range(len(slots)), key=lambda i: slots[i] * slot_bytes[i])
            slots[g] -= page_size
        return tuple(slots)


def rank_heads(rank: int, num_kv_heads: int, tp_size: int) -> tuple[int, ...]:
    """The model's kv heads that TP rank `rank` holds, split as SGLang's QKV projection
    splits them: contiguous blocks, or one replicated head per rank when there are fewer
    heads than ranks."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is not in 0..{tp_size - 1}")
    if num_kv_heads < tp_size:
        if tp_size % num_kv_heads:
            raise ValueError(f"--tp-size {tp_size} is not a multiple of {num_kv_heads} kv heads")
        return (rank * num_kv_heads // tp_size,)
    if num_kv_heads % tp_size:
        raise ValueError(f"{num_kv_heads} kv heads do not split evenly over --tp-size {tp_size}")
    per = num_kv_heads // tp_size
    return tuple(range(rank * per, (rank + 1) * per))


def agreed_pool_slots(
    shards: Sequence[PoolLayout],
    total_bytes: int,
    demand: Sequence[float],
    dtype_bytes: int,
    page_size: int = 1,
) -> tuple[int, ...]:
    """Slots per group that every rank's pool can hold in `total_bytes`: the element-wise
    least of each rank's `pool_slots`. SGLang schedules every TP rank from the same inputs
    with no exchange, so admission must see the same capacities everywhere; each rank
    computes them all from the profile. A rank whose heads are lighter leaves the rest of
    its bytes unused (docs/architecture.md, "Tensor parallelism", has the figures)."""
    per_rank = [s.pool_slots(total_bytes, demand, dtype_bytes, page_size) for s in shards]
    return tuple(min(column) for column in zip(*per_rank, strict=True))


def sessions_that_fit(slots: Sequence[int], per_session: Sequence[int]) -> int:
    """How many identical sessions fit at once: the first group to run out decides."""
    return min(s // p for s, p in zip(slots, per_session, strict=True) if p > 0)
