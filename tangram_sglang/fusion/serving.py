"""Fast Fusion while serving: which new blocks of an extend batch read another request's.

After an extend forward has stored its KV, the batch's new group slots are cut into
blocks of `BLOCK` consecutive slots of one segment, aligned to the row's positions (a
block starts at a multiple of `BLOCK` of the row's group slots, as vLLM pages count from
a request's start; the partial blocks at a segment's ends stay unfused). Each block may
join a *representative* block at the same position: one of an earlier request of the
batch (batch fusion), or one an earlier batch left in the pool (`LiveBlocks`: fusion
across batches, so copies that SGLang's chunked prefill puts in different batches still
share). A block joins the most similar representative that passes the guard, and then
stops holding its own K/V: its slots return to the group's free pool and its rows read
the representative's slots (`TangramAllocator.share`). Blocks that joined nobody are
representatives for later requests and later batches.

Why raw sharing and a norm guard instead of the paper's shared direction + member norms:
a member reads the representative's stored block as it is, so the pools, the radix cache
(whose cached KV is never rewritten: the reference implementation's lesson) and every
attention kernel stay as they are, with no per-read scale table and no host work per
decode step. The decoded member is then the representative itself, so the guard bounds
that directly, per feature (K and V of every layer the group has heads in):
cos(member, representative) >= tau, and the norm ratio within [tau, 1 / tau]. Its
relative L2 error is then at most sqrt(1 + rho^2 - 2 rho tau) for the ratio rho, about
sqrt(2 (1 - tau)) near rho = 1.
Tau >= 1.0 fuses only bit-identical blocks (the same tokens at the same positions after
the same prefix, e.g. one prompt sent twice in a batch): lossless, outputs unchanged.

The unit is the group slot (one head group across every layer: what a pool can free), so
the guard holds in every layer of the group, the edge layers included: the paper leaves
its first and last two layers unfused, which a slot shared in all layers cannot, and
checking them is the stricter choice (docs/architecture.md, "Fast Fusion").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tangram_sglang.fusion.merge import check_thresholds
from tangram_sglang.memory.pool import RaggedPool

BLOCK = 16  # slots per fused block: the paper's vLLM page
EXACT_COSINE = 1.0 - 1e-6  # tau 1.0: candidates within float rounding, then compared bit by bit
PER_POSITION = 4  # live representatives kept per position and group (the newest)
POSITIONS = 1 << 13  # positions a group remembers (128K tokens of 16; least recently used go)


@dataclass(frozen=True)
class Blocks:
    """Full blocks of group slots `[N, block]` (host int64) with their positions `[N]`."""

    slots: torch.Tensor
    position: torch.Tensor

    @classmethod
    def empty(cls, block: int) -> Blocks:
        none = torch.zeros(0, dtype=torch.int64)
        return cls(none.reshape(0, block), none)

    def __len__(self) -> int:
        return self.slots.shape[0]

    def __getitem__(self, index: torch.Tensor) -> Blocks:
        return Blocks(self.slots[index], self.position[index])


@dataclass(frozen=True)
class SlotPairs:
    """Per fused slot, the member slot that is given up and the slot it reads instead;
    and the batch's blocks that are representatives now (for `LiveBlocks.add`)."""

    member: torch.Tensor  # [M] int64
    rep: torch.Tensor  # [M] int64
    new_reps: Blocks

    @classmethod
    def empty(cls, device: torch.device | str, new_reps: Blocks) -> SlotPairs:
        none = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(none, none, new_reps)


class LiveBlocks:
    """Representative blocks of earlier batches, by position, while the pool holds them.

    A block is readable while every one of its slots carries the stamp it got when it was
    added; a slot losing its last owner is unstamped (`forget`, from the allocator's free),
    so a block is never shared after any of its slots went back to the pool, whatever
    refilled it. Invalid entries are dropped when looked up; at most `per_position` blocks
    per position (the newest) and `positions` positions (least recently used go)."""

    def __init__(
        self, pool: RaggedPool, per_position: int = PER_POSITION, positions: int = POSITIONS
    ) -> None:
        self.device = pool.device
        self.sizes = [s + pool.page_size for s in pool.slots]
        self.per_position = per_position
        self.positions = positions
        self.clear()

    def clear(self) -> None:
        self.stamp = [
            torch.full((n,), -1, dtype=torch.int64, device=self.device) for n in self.sizes
        ]
        self.entries: list[OrderedDict[int, list[tuple[int, torch.Tensor]]]] = [
            OrderedDict() for _ in self.sizes
        ]
        self.next_id = 0

    def __len__(self) -> int:
        return sum(len(v) for group in self.entries for v in group.values())

    def forget(self, g: int, slots: torch.Tensor) -> None:
        """`slots` of group `g` go back to the pool: no block holding one is read again."""
        if self.entries[g] and slots.numel():
            self.stamp[g].index_fill_(0, slots.to(self.device).long(), -1)

    def add(self, g: int, blocks: Blocks) -> None:
        if not len(blocks):
            return
        ids = torch.arange(self.next_id, self.next_id + len(blocks))
        self.next_id += len(blocks)
        self.stamp[g][blocks.slots.to(self.device).reshape(-1)] = ids.repeat_interleave(
            blocks.slots.shape[1]
        ).to(self.device)
        table = self.entries[g]
        for i, (slots, pos) in enumerate(zip(blocks.slots, blocks.position.tolist(), strict=True)):
            kept = table.pop(pos, [])
            kept.append((int(ids[i]), slots))
            table[pos] = kept[-self.per_position :]
        while len(table) > self.positions:
            table.popitem(last=False)

    def lookup(self, g: int, positions: Iterable[int], block: int) -> Blocks:
        """The readable blocks of group `g` at `positions` (one device read)."""
        table = self.entries[g]
        found = [(pos, entry) for pos in positions for entry in table.get(pos, ())]
        if not found:
            return Blocks.empty(block)
        ids = torch.tensor([entry[0] for _, entry in found])
        slots = torch.stack([entry[1] for _, entry in found])
        stamps = self.stamp[g][slots.to(self.device)]
        alive = (stamps == ids.to(self.device)[:, None]).all(1).cpu()
        dead = set(ids[~alive].tolist())
        for pos in {pos for pos, _ in found}:
            kept = [e for e in table[pos] if e[0] not in dead]
            if kept:
                table[pos] = kept
                table.move_to_end(pos)
            else:
                del table[pos]
        position = torch.tensor([pos for pos, _ in found])
        return Blocks(slots, position)[alive]


class BatchFusion:
    """Finds the guarded member -> representative block pairs of one group in a batch,
    against the batch's earlier requests and the live blocks of earlier batches."""

    def __init__(self, pool: RaggedPool, threshold: float, block: int = BLOCK) -> None:
        check_thresholds([threshold])
        if block < 1:
            raise ValueError(f"fusion block {block} must be >= 1")
        self.pool = pool
        self.threshold = float(threshold)
        self.block = int(block)
        self.exact = self.threshold >= 1.0
        self.live = LiveBlocks(pool)

    def blocks(
        self, slots: Sequence[torch.Tensor], starts: Sequence[int]
    ) -> tuple[Blocks, torch.Tensor]:
        """One segment's slots per request (batch order) and the row position of each
        segment's first slot -> the full aligned blocks and each block's request index."""
        cut, position, owner = [], [], []
        for i, (s, start) in enumerate(zip(slots, starts, strict=True)):
            head = -int(start) % self.block
            whole = max(0, s.numel() - head) // self.block
            if whole:
                cut.append(s[head : head + whole * self.block].reshape(whole, self.block))
                position.append(int(start) + head + self.block * torch.arange(whole))
                owner.append(torch.full((whole,), i, dtype=torch.int64))
        if not cut:
            return Blocks.empty(self.block), torch.zeros(0, dtype=torch.int64)
        return Blocks(torch.cat(cut).long().cpu(), torch.cat(position)), torch.cat(owner)

    def features(self, group: int, blocks: torch.Tensor) -> list[torch.Tensor]:
        """K and V of each block in every layer the group has heads in: `[N, F]` each
        (float32; an FP8 pool's per-layer scale changes no cosine or norm ratio)."""
        index = blocks.reshape(-1).to(self.pool.device)
        n = blocks.shape[0]
        out = []
        for layer in range(self.pool.num_layers):
            if not self.pool.heads_in(group, layer):
                continue
            for buffer in (self.pool.k_buffer(group, layer), self.pool.v_buffer(group, layer)):
                out.append(buffer[index].float().reshape(n, -1))
        return out

    def pairs(self, group: int, slots: Sequence[torch.Tensor], starts: Sequence[int]) -> SlotPairs:
        """The fused slot pairs among one group's new `slots` (one tensor per request, in
        batch order, each starting at row position `starts[i]`): member blocks onto
        representatives of earlier requests or earlier batches at the same positions."""
        new, owner = self.blocks(slots, starts)
        device = self.pool.device
        if not len(new):
            return SlotPairs.empty(device, new)
        live = self.live.lookup(group, new.position.unique().tolist(), self.block)
        if not len(live) and int(owner.max()) == int(owner.min()):
            return SlotPairs.empty(device, new)
        every = Blocks(torch.cat((live.slots, new.slots)), torch.cat((live.position, new.position)))
        features = self.features(group, every.slots)
        if not features:
            return SlotPairs.empty(device, new)
        owner = torch.cat((torch.full((len(live),), -1, dtype=torch.int64), owner))
        rep_of = self._representatives(features, owner, every.position)
        member = (rep_of >= 0).nonzero().flatten()
        reps = ((rep_of < 0) & (owner >= 0)).nonzero().flatten()
        dev_slots = every.slots.to(device)
        return SlotPairs(
            dev_slots[member.to(device)].reshape(-1),
            dev_slots[rep_of[member].to(device)].reshape(-1),
            every[reps],
        )

    def _representatives(
        self, features: list[torch.Tensor], owner: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        """Per block, the block it reads instead of its own (-1: its own). Live blocks
        (owner -1) are representatives from the start; then one pass over the batch's
        requests, a request's blocks compared with the representatives before it."""
        unit = [F.normalize(f, dim=1) for f in features]
        norms = [f.norm(dim=1) for f in features]
        rep_of = torch.full((owner.numel(),), -1, dtype=torch.int64)
        is_rep = owner < 0
        for r in torch.unique(owner[owner >= 0]).tolist():
            mine = (owner == r).nonzero().flatten()
            prior = is_rep.nonzero().flatten()
            if prior.numel():
                best = self._best(features, unit, norms, mine, prior, position)
                rep_of[mine] = torch.where(best >= 0, prior[best.clamp_min(0)], -1)
            is_rep[mine[rep_of[mine] < 0]] = True
        return rep_of

    def _best(
        self,
        features: list[torch.Tensor],
        unit: list[torch.Tensor],
        norms: list[torch.Tensor],
        mine: torch.Tensor,
        prior: torch.Tensor,
        position: torch.Tensor,
    ) -> torch.Tensor:
        """For each block of `mine`, the index into `prior` of its most similar block at the
        same position that passes the guard in every feature, or -1 (host `[len(mine)]`).
        Exact mode picks by cosine too (within float rounding of 1) and then keeps only a
        pick that is bit-identical."""
        i, j = (position[mine][:, None] == position[prior][None, :]).nonzero(as_tuple=True)
        none = torch.full((mine.numel(),), -1, dtype=torch.int64)
        if i.numel() == 0:
            return none
        device = unit[0].device
        a, b = mine[i].to(device), prior[j].to(device)
        ok = torch.ones(i.numel(), dtype=torch.bool, device=device)
        score = torch.zeros(i.numel(), device=device)
        tau = EXACT_COSINE if self.exact else self.threshold
        for u, nrm in zip(unit, norms, strict=True):
            cos = (u[a] * u[b]).sum(1)
            ratio = nrm[b] / nrm[a].clamp_min(1e-30)
            ok &= (cos >= tau) & (ratio >= tau) & (ratio <= 1.0 / tau)
            score += cos
        if self.exact:
            for f in features:
                ok &= (f[a] == f[b]).all(1)
        score = torch.where(ok, score, torch.full_like(score, -torch.inf)).cpu()
        top = torch.full((mine.numel(),), -torch.inf).scatter_reduce(0, i, score, "amax")
        hit = torch.isfinite(score) & (score == top[i])
        big = prior.numel()
        pick = torch.full((mine.numel(),), big, dtype=torch.int64).scatter_reduce(
            0, i[hit], j[hit], "amin"
        )
        return torch.where(pick < big, pick, none)
