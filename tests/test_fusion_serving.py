"""Fast Fusion in the pools: blocks of an extend batch share an earlier request's group
slots (guarded), the shared slots are reference-counted, and the accounting stays exact."""

from __future__ import annotations

import random

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
from sglang.srt.mem_cache.radix_cache import RadixKey
from test_radix import tree_over

from tangram_sglang.fusion.serving import BLOCK, BatchFusion
from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool
from tangram_sglang.memory.budget import BudgetRule
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.memory.radix import evictable_group_slots
from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

RULE = BudgetRule(sink=2, window=3)


def make_allocator(seed: int, threshold: float, compressed: bool, slots: int = 600):
    model = ModelIdentity("test", 3, 8, 4, 8, f"f{seed}")
    if compressed:
        profile = synthetic_profile(model, 0.5, spread=0.6, seed=seed, max_groups=3)
    else:
        profile = uniform_profile(model, 1.0)
    layout = PoolLayout.from_profile(profile)
    pool = RaggedPool(layout, [slots] * layout.num_groups, torch.float32, "cpu", 8, 512)
    logical = 4 * slots
    return TangramAllocator(
        logical, TangramKVPool(pool, logical), RULE, fusion=BatchFusion(pool, threshold)
    )


def document_kv(doc: int, n: int, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[n, heads, dim]` of a document's tokens: equal documents, equal KV."""
    gen = torch.Generator().manual_seed(1000 + doc)
    return torch.randn(n, heads, dim, generator=gen), torch.randn(n, heads, dim, generator=gen)


def store(a: TangramAllocator, segment, kv_per_layer) -> None:
    """Write each group's kept tokens of the segment (the first k_g positions' KV)."""
    pool = a.pool
    for layer, (k, v) in enumerate(kv_per_layer):
        for g in range(pool.num_groups):
            heads = list(pool.heads_in(g, layer))
            if heads:
                n = segment.slots[g].numel()
                pool.write(layer, g, segment.slots[g], k[:n, heads], v[:n, heads])


def layer_kv(doc: int, n: int, a: TangramAllocator, noise: float = 0.0, seed: int = 0):
    layout = a.pool.layout
    out = []
    gen = torch.Generator().manual_seed(seed)
    for layer in range(layout.num_layers):
        k, v = document_kv(doc * 100 + layer, n, layout.num_kv_heads, layout.head_dim)
        if noise:
            k = k + noise * torch.randn(k.shape, generator=gen)
            v = v + noise * torch.randn(v.shape, generator=gen)
        out.append((k, v))
    return out


def extend(a: TangramAllocator, rows, lengths, docs, noise=None, seed=0):
    """One extend batch of fresh requests, its KV stored, then fused; returns the state
    and each request's logical slots."""
    new = [a.alloc(n) for n in lengths]
    state = a.begin_extend(rows, [x[:0] for x in new], new)
    for i, segment in enumerate(state.segments):
        eps = 0.0 if noise is None else noise[i]
        store(a, segment, layer_kv(docs[i], lengths[i], a, eps, seed + i))
    a.fuse(state)
    return state, new


def read_row(a: TangramAllocator, row: int, g: int, layer: int) -> torch.Tensor:
    """The K a row reads in group g and layer (through its table), `[len, heads, dim]`."""
    slots = a.pool.req_to_slot[g, row, : int(a.row_lens[g, row])].long()
    return a.pool.k_buffer(g, layer)[slots]


def test_a_prompt_sent_twice_in_one_batch_is_stored_once_at_threshold_one():
    seed = random.randrange(10_000)
    a = make_allocator(seed, 1.0, compressed=False)
    start = a.pool.free_slots()
    n = random.randint(2 * BLOCK, 5 * BLOCK - 1)
    other = random.randint(BLOCK, 4 * BLOCK)
    state, new = extend(a, [1, 2, 3], [n, n, other], docs=[7, 7, 8])
    whole = (n // BLOCK) * BLOCK
    used = [s - f for s, f in zip(start, a.pool.free_slots(), strict=True)]
    assert used == [2 * n + other - whole] * a.pool.num_groups, f"seed {seed}: used {used}"
    assert a.shared == [whole] * a.pool.num_groups, f"seed {seed}: shared {a.shared}"
    for g in range(a.pool.num_groups):
        one, two = (a.pool.req_to_slot[g, r, :n] for r in (1, 2))
        assert torch.equal(one[:whole], two[:whole]), f"seed {seed}: group {g} not shared"
        assert not (set(one[whole:].tolist()) & set(two[whole:].tolist())), "tail shared"
        for layer in range(a.pool.num_layers):
            if a.pool.heads_in(g, layer):
                assert torch.equal(read_row(a, 1, g, layer), read_row(a, 2, g, layer))
    assert a.leaks() == [] and a.count_leaks() == [], f"seed {seed}: {a.leaks()}"
    order = [new[0], new[1], new[2]]
    random.shuffle(order)
    for logical in order:  # whichever owner goes first, the slot stays for the other
        a.free(logical)
        assert a.leaks() == [] and a.count_leaks() == [], f"seed {seed}: {a.leaks()}"
    assert a.pool.free_slots() == start and a.shared == [0] * a.pool.num_groups


def test_different_prompts_share_nothing_at_threshold_one():
    a = make_allocator(random.randrange(10_000), 1.0, compressed=False)
    extend(a, [1, 2], [3 * BLOCK, 3 * BLOCK], docs=[1, 2])
    assert a.shared == [0] * a.pool.num_groups and a.fused == [0] * a.pool.num_groups


def cosine_and_ratio(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    return float(x @ y / (x.norm() * y.norm())), float(y.norm() / x.norm())


@pytest.mark.parametrize("compressed", [False, True])
def test_each_fused_block_reads_a_block_within_the_threshold_in_every_layer(compressed):
    seed = random.randrange(10_000)
    tau = random.uniform(0.9, 0.995)
    a = make_allocator(seed, tau, compressed)
    n = 6 * BLOCK
    noise = [0.0, 0.02, 0.1, 0.3, 1.0]  # near copies of document 3 down to unrelated
    rows = list(range(1, len(noise) + 1))
    state, _ = extend(a, rows, [n] * len(rows), docs=[3] * len(rows), noise=noise, seed=seed)
    assert sum(a.fused) > 0, f"seed {seed}: the 2% copy fused nowhere at tau {tau:.3f}"
    checked = 0
    for i, segment in enumerate(state.segments):
        own = layer_kv(3, n, a, noise[i], seed + i)
        for g in range(a.pool.num_groups):
            k_g = segment.slots[g].numel()
            table = a.pool.req_to_slot[g, segment.row, :k_g].long()
            moved = table != segment.slots[g].to(table.device).long()
            for b in range(k_g // BLOCK):
                block = slice(b * BLOCK, (b + 1) * BLOCK)
                if not moved[block].any():
                    continue
                assert moved[block].all(), f"seed {seed}: a block moved in part"
                for layer in range(a.pool.num_layers):
                    heads = list(a.pool.heads_in(g, layer))
                    if not heads:
                        continue
                    for which, buffer in ((0, a.pool.k_buffer), (1, a.pool.v_buffer)):
                        mine = own[layer][which][:k_g, heads][block]
                        read = buffer(g, layer)[table[block]]
                        cos, ratio = cosine_and_ratio(mine, read)
                        assert cos >= tau - 1e-5 and tau - 1e-5 <= ratio <= 1 / tau + 1e-5, (
                            f"seed {seed}: row {segment.row} group {g} block {b} layer "
                            f"{layer}: cosine {cos:.4f}, norm ratio {ratio:.4f}, tau {tau:.4f}"
                        )
                        checked += 1
    assert checked, f"seed {seed}: no fused block checked"
    assert a.leaks() == [], f"seed {seed}: {a.leaks()}"


def test_reference_counts_under_random_admit_decode_and_free_traces():
    """Batches of requests over a few documents (duplicates fuse at 1.0, near copies at
    tau), decode steps, and frees of arbitrary pieces in arbitrary order: after every
    step each slot's owners equal its count, free + distinct mapped == capacity, and the
    pools end where they started."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    compressed = rng.random() < 0.5
    a = make_allocator(seed, rng.choice([1.0, 0.97]), compressed, slots=2000)
    start = (a.pool.free_slots(), a.available_size())
    live: list[torch.Tensor] = []
    rows = list(range(1, 9))
    for step in range(12):
        batch = rng.sample(rows, rng.randint(2, 4))
        lengths = [rng.choice([BLOCK, 2 * BLOCK, 3 * BLOCK + 5]) for _ in batch]
        docs = [rng.randint(0, 2) for _ in batch]
        noise = [rng.choice([0.0, 0.0, 0.01]) for _ in batch]
        _, new = extend(a, batch, lengths, docs, noise, seed=seed + step)
        live += new
        decoded = a.alloc(len(batch))
        a.begin_decode(batch, decoded)
        live.append(decoded)
        while live and rng.random() < 0.5:
            piece = live.pop(rng.randrange(len(live)))
            cut = rng.randint(0, piece.numel())
            for part in (piece[:cut], piece[cut:]):
                a.free(part)
        problems = a.leaks() + a.count_leaks()
        assert problems == [], f"seed {seed} step {step}: {problems}"
    assert sum(a.fused) > 0, f"seed {seed}: nothing fused in 12 batches of 3 documents"
    for piece in live:
        a.free(piece)
    assert a.leaks() == [] and (a.pool.free_slots(), a.available_size()) == start, (
        f"seed {seed}: {a.leaks()}"
    )
    assert a.shared == [0] * a.pool.num_groups


def test_a_scaled_copy_is_not_read_in_place_of_its_own_block():
    """Cosine 1 is not enough: a member reads the representative as stored, so a copy at
    1.5x the norm (ratio 0.67) stays unfused at any threshold above that."""
    seed = random.randrange(10_000)
    a = make_allocator(seed, 0.9, compressed=False)
    n = 3 * BLOCK
    new = [a.alloc(n) for _ in range(2)]
    state = a.begin_extend([1, 2], [x[:0] for x in new], new)
    kv = layer_kv(5, n, a)
    store(a, state.segments[0], kv)
    store(a, state.segments[1], [(1.5 * k, 1.5 * v) for k, v in kv])
    a.fuse(state)
    assert a.fused == [0] * a.pool.num_groups, f"seed {seed}: a 1.5x copy was fused"


def test_the_radix_tree_promises_only_what_evicting_shared_slots_frees():
    """Two cached requests whose blocks share slots: the tree counts each owner, eviction
    frees each slot once; admission's count (`radix.evictable_group_slots`) is the latter."""
    seed = random.randrange(10_000)
    a = make_allocator(seed, 1.0, compressed=False)
    cache = tree_over(a, width=512)
    n = random.randint(2, 4) * BLOCK
    _, new = extend(a, [1, 2], [n, n], docs=[4, 4])  # same KV under different token keys
    for i, logical in enumerate(new):
        cache.insert(
            InsertParams(key=RadixKey([1000 * (i + 1) + t for t in range(n)]), value=logical)
        )
        a.release_row(i + 1)
    G = a.pool.num_groups
    counted = cache.evictable_group_slots()
    promised = evictable_group_slots(cache, G)
    before = a.pool.free_slots()
    cache.evict(EvictParams(num_tokens=10**9))
    freed = tuple(f - b for f, b in zip(a.pool.free_slots(), before, strict=True))
    assert counted == (2 * n,) * G and promised == freed == (n,) * G, (
        f"seed {seed}: tree counts {counted}, promises {promised}, eviction freed {freed}"
    )
    assert a.leaks() == [] and a.shared == [0] * G


def extend_chunk(a: TangramAllocator, row: int, prefix: torch.Tensor, doc: int, total: int, n: int):
    """One extend batch of one request: the next `n` tokens of document `doc` (of `total`)
    after its `prefix` logical slots, stored at their positions, then fused."""
    new = a.alloc(n)
    state = a.begin_extend([row], [prefix], [new])
    at = slice(prefix.numel(), prefix.numel() + n)
    store(a, state.segments[0], [(k[at], v[at]) for k, v in layer_kv(doc, total, a)])
    a.fuse(state)
    return torch.cat((prefix, new))


def test_a_copy_prefilled_in_later_chunks_shares_the_live_blocks_of_an_earlier_batch():
    """Chunked prefill puts copies in different batches at offsets that are not block
    multiples: blocks are cut at row positions, so a later chunk's blocks still meet the
    earlier request's blocks at the same positions, and read them."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    a = make_allocator(seed, 1.0, compressed=False)
    start = a.pool.free_slots()
    n = rng.randint(4, 7) * BLOCK + rng.randrange(BLOCK)
    first = extend_chunk(a, 1, a.alloc(0), 9, n, n)  # batch 1: the whole document
    assert a.fused == [0] * a.pool.num_groups
    cut = rng.randrange(1, BLOCK)  # batch 2: the copy's first `cut` tokens; batch 3: the rest
    second = extend_chunk(a, 2, a.alloc(0), 9, n, cut)
    second = extend_chunk(a, 2, second, 9, n, n - cut)
    shared = (n // BLOCK - 1) * BLOCK  # the copy's whole blocks after its first chunk
    assert a.fused == [shared] * a.pool.num_groups, f"seed {seed}: cut {cut}: {a.fused}"
    for g in range(a.pool.num_groups):
        one, two = (a.pool.req_to_slot[g, r, :n] for r in (1, 2))
        blocks = slice(BLOCK, BLOCK + shared)
        assert torch.equal(one[blocks], two[blocks]), f"seed {seed}: group {g} not shared"
        for layer in range(a.pool.num_layers):
            if a.pool.heads_in(g, layer):
                assert torch.equal(read_row(a, 1, g, layer), read_row(a, 2, g, layer))
    for logical in rng.sample([first, second], 2):
        a.free(logical)
        assert a.leaks() == [] and a.count_leaks() == [], f"seed {seed}: {a.leaks()}"
    assert a.pool.free_slots() == start and a.shared == [0] * a.pool.num_groups


def test_a_block_whose_slots_went_back_to_the_pool_is_never_shared_again():
    """The earlier request is freed and other KV reuses its slots: the copy that follows
    finds no live block to read (not the refilled slots), stores its own KV and reads it."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    n = 4 * BLOCK
    a = make_allocator(seed, 1.0, compressed=False, slots=3 * n)
    first = extend_chunk(a, 1, a.alloc(0), 9, n, n)
    assert len(a.fusion.live) == 4 * a.pool.num_groups
    a.free(first)
    a.release_row(1)
    other = extend_chunk(a, 3, a.alloc(0), 5, 2 * n, 2 * n)
    copy = extend_chunk(a, 2, a.alloc(0), 9, n, n) if rng.random() < 0.5 else None
    if copy is None:  # or with the refilled slots given back first
        a.free(other)
        copy = extend_chunk(a, 2, a.alloc(0), 9, n, n)
    assert a.fused == [0] * a.pool.num_groups, f"seed {seed}: shared a freed block"
    own = layer_kv(9, n, a)
    for g in range(a.pool.num_groups):
        for layer in range(a.pool.num_layers):
            heads = list(a.pool.heads_in(g, layer))
            if heads:
                assert torch.equal(read_row(a, 2, g, layer), own[layer][0][:, heads]), (
                    f"seed {seed}: group {g} layer {layer} reads another document's K"
                )
    assert a.leaks() == [] and a.count_leaks() == []
