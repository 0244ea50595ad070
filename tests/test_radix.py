"""Radix cache `tangram`: SGLang's RadixCache over logical slots; a match may end inside a
compressed segment and reuses the group slots that hold only earlier tokens.

Drives the real `RadixCache` machinery (match, split, insert, lock, evict, and the stock
`cache_finished_req` / our `cache_unfinished_req`) with the real `TangramAllocator`.
"""

from __future__ import annotations

import collections
import random
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from test_allocator import make_allocator, random_selections, record_owners

from tangram_sglang.attention.backend import KeptOwners
from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool
from tangram_sglang.memory.budget import BudgetRule
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.memory.radix import TangramRadixCache
from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

VOCAB = 50


def tree_over(allocator, width: int = 256) -> TangramRadixCache:
    """SGLang's tree with our overrides over `allocator` (8 request rows of `width`)."""
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(8, width, "cpu", False),
        token_to_kv_pool_allocator=allocator,
        page_size=1,
    )
    return TangramRadixCache(params)


def make_cache(seed: int, slots: int = 600):
    allocator = make_allocator(seed, logical=800, slots=slots)
    return tree_over(allocator), allocator


class Request:
    """What admission's match passes as `req` (only its identity is read)."""


def match(cache, tokens, req: Request | None = None):
    return cache.match_prefix(MatchPrefixParams(key=RadixKey(list(tokens)), req=req))


def path_len(node) -> int:
    total = 0
    while node.parent is not None:
        total += len(node.key)
        node = node.parent
    return total


class Latest:
    """Per (group, group slot): the latest token position the slot holds for any head and
    layer (what a match's prefix slots must stay below)."""

    def __init__(self):
        self.position = {}

    def record(self, g: int, slots, positions) -> None:
        for slot, pos in zip(slots.tolist(), positions.tolist(), strict=True):
            self.position[(g, slot)] = pos

    def check(self, allocator, prefix, where: str) -> None:
        for g, slots in enumerate(allocator.compact(prefix)):
            latest = [self.position[(g, slot)] for slot in slots.tolist()]
            assert all(p < len(prefix) for p in latest), (
                f"{where}: a prefix of {len(prefix)} tokens reuses group {g} slots holding "
                f"tokens up to position {max(latest)}"
            )


def extend_with_owners(allocator, row, prefix, new, gen, latest=None, evict=None):
    """`begin_extend`, then what the backend does after the forward: random per-(layer,
    head) selections decide the owners of a compressed segment's group slots."""
    segment = allocator.begin_extend([row], [prefix], [new], evict).segments[0]
    owners = KeptOwners([segment], allocator.pool.num_groups)
    if segment.compress:
        chosen = random_selections(allocator, segment.extend_len, segment.kept, gen)
        owners = record_owners(allocator, segment, chosen)
        owners.apply(allocator)
    if latest is not None:
        for g, slots in enumerate(segment.slots):
            at = owners.owners[0][g]
            if at is None:
                at = torch.arange(segment.extend_len - len(slots), segment.extend_len)
            latest.record(g, slots, at + len(prefix))
    return segment


class Turn:
    """One request: match, extend its rest as one segment, decode, then finish by inserting
    (what SGLang's cache_finished_req does, duplicates freed by the caller)."""

    def __init__(self, cache, allocator, tokens, row, gen=None, latest=None):
        self.cache, self.allocator, self.tokens, self.row = cache, allocator, list(tokens), row
        self.latest = latest
        m = match(cache, self.tokens)
        self.prefix, self.node = m.device_indices, m.last_device_node
        cache.inc_lock_ref(self.node)
        self.values = [self.prefix]
        rest = len(self.tokens) - len(self.prefix)
        evict = lambda n: cache.evict(EvictParams(num_tokens=n))  # noqa: E731
        new = allocator.alloc(rest)
        gen = gen or torch.Generator().manual_seed(0)
        extend_with_owners(allocator, row, self.prefix, new, gen, latest, evict)
        self.values.append(new)

    def decode(self, rng, count):
        for _ in range(count):
            self.tokens.append(rng.randrange(VOCAB))
            new = self.allocator.alloc(1)
            evict = lambda n: self.cache.evict(EvictParams(num_tokens=n))  # noqa: E731
            state = self.allocator.begin_decode([self.row], new, evict)
            if self.latest is not None:
                for g, slot in enumerate(state.decode_slots[:, 0]):
                    self.latest.record(g, slot[None], torch.tensor([len(self.tokens) - 1]))
            self.values.append(new)

    def finish(self):
        values = torch.cat(self.values)
        result = self.cache.insert(InsertParams(key=RadixKey(self.tokens), value=values))
        self.allocator.free(values[len(self.prefix) : result.prefix_len])
        self.cache.dec_lock_ref(self.node)
        self.allocator.release_row(self.row)


def test_random_multi_turn_traces_reuse_only_earlier_tokens_and_free_everything():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    latest = Latest()
    cache, allocator = make_cache(seed)
    start = (allocator.pool.free_slots(), allocator.available_size())
    conversations = [[rng.randrange(VOCAB) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    for step in range(30):
        # Up to three requests in flight at once: shared prefixes insert duplicates.
        batch = []
        for row in range(1, rng.randint(1, 3) + 1):
            c = rng.randrange(len(conversations))
            cut = rng.randint(1, len(conversations[c]))
            tokens = conversations[c][:cut] + [
                rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))
            ]
            turn = Turn(cache, allocator, tokens, row, gen, latest)
            latest.check(allocator, turn.prefix, f"seed {seed} step {step}")
            assert path_len(turn.node) == len(turn.prefix), (
                f"seed {seed} step {step}: match node ends at {path_len(turn.node)}, "
                f"prefix is {len(turn.prefix)}"
            )
            batch.append((c, turn))
        for _, turn in batch:
            turn.decode(rng, rng.randint(0, 6))
        rng.shuffle(batch)
        for c, turn in batch:
            turn.finish()
            conversations[c] = turn.tokens
            assert allocator.leaks() == [], f"seed {seed} step {step}: {allocator.leaks()}"
    assert cache.protected_size() == 0
    cache.evict(EvictParams(num_tokens=10**9))
    assert cache.evictable_size() == 0 and cache.total_size() == 0
    assert (allocator.pool.free_slots(), allocator.available_size()) == start, (
        f"seed {seed}: free counts {allocator.pool.free_slots()} after evicting everything, "
        f"started at {start[0]}"
    )


def test_a_match_inside_a_compressed_segment_reuses_the_slots_before_the_cut():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    latest = Latest()
    cache, allocator = make_cache(seed)
    start = allocator.pool.free_slots()
    system = [rng.randrange(VOCAB) for _ in range(rng.randint(10, 30))]
    first_turn = [rng.randrange(VOCAB) for _ in range(12)]
    first = Turn(cache, allocator, system + first_turn, 1, gen, latest)
    segment_slots = allocator.compact(first.values[1])
    first.decode(rng, 3)
    first.finish()
    # Another session with the same system prompt: its match ends inside the first turn.
    cut = len(system)
    m = match(cache, system + [VOCAB])
    assert m.device_indices.numel() == cut and path_len(m.last_device_node) == cut, (
        f"seed {seed}: a match of the {cut}-token system prompt gave {m.device_indices.numel()}"
    )
    latest.check(allocator, m.device_indices, f"seed {seed}")
    for g, slots in enumerate(allocator.compact(m.device_indices)):
        assert torch.equal(slots, segment_slots[g][: len(slots)]), (
            f"seed {seed}: group {g} reuses {slots.tolist()}, not a prefix of the turn's slots"
        )
    # Its own turn starts with another token than the first session's (else the match
    # rightly goes one token further).
    second_turn = [rng.randrange(VOCAB) for _ in range(8)]
    if second_turn[0] == first_turn[0]:
        second_turn[0] = (second_turn[0] + 1) % VOCAB
    second = Turn(cache, allocator, system + second_turn, 2, gen, latest)
    assert len(second.prefix) == cut, f"seed {seed}: the second session reused {len(second.prefix)}"
    second.finish()
    assert cache.check_evictable_count() is None and allocator.leaks() == []
    cache.evict(EvictParams(num_tokens=10**9))
    assert allocator.pool.free_slots() == start, f"seed {seed}: slots leaked"


def unfinished_req(cache, allocator, tokens, row):
    """A request right after its prefill (what SGLang hands cache_unfinished_req)."""
    new = allocator.alloc(len(tokens))
    allocator.begin_extend([row], [new[:0]], [new])
    cache.req_to_token_pool.req_to_token[row, : len(tokens)] = new.to(torch.int32)
    return SimpleNamespace(
        req_pool_idx=row,
        origin_input_ids=list(tokens),
        output_ids=[],
        extra_key=None,
        cache_protected_len=0,
        last_node=cache.root_node,
        prefix_indices=new[:0],
        priority=0,
        get_fill_ids=lambda: list(tokens),
        own=new,
    )


def test_twin_requests_adopt_the_first_insert_and_straddling_ones_keep_their_own():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed)
    start = allocator.pool.free_slots()
    prompt = [rng.randrange(VOCAB) for _ in range(25)]
    a = unfinished_req(cache, allocator, prompt, 1)
    twin = unfinished_req(cache, allocator, prompt, 2)
    longer = unfinished_req(cache, allocator, prompt + [rng.randrange(VOCAB) for _ in range(9)], 3)
    for req in (a, twin, longer):
        cache.cache_unfinished_req(req)
    assert torch.equal(twin.prefix_indices, a.own), f"seed {seed}: twin did not adopt a's slots"
    for g, (mine, theirs) in enumerate(
        zip(allocator.row_slots(2), allocator.row_slots(1), strict=True)
    ):
        assert torch.equal(mine, theirs), f"seed {seed}: twin's group {g} row not re-pointed"
    assert torch.equal(longer.prefix_indices, longer.own), (
        f"seed {seed}: the request whose segment straddles a's insert gave up its own slots"
    )
    assert allocator.leaks() == [], f"seed {seed}: {allocator.leaks()}"
    for req in (a, twin, longer):
        cache.cache_finished_req(req, kv_len_to_handle=len(req.origin_input_ids))
        allocator.release_row(req.req_pool_idx)
    assert match(cache, longer.origin_input_ids).device_indices.numel() == 25
    cache.evict(EvictParams(num_tokens=10**9))
    assert allocator.pool.free_slots() == start, f"seed {seed}: slots leaked"


def test_caching_a_request_keeps_the_decode_slot_overlap_allocated_ahead():
    """Under overlap scheduling SGLang allocates a request's next decode token before it
    caches the request's prefill (`cache_unfinished_req` runs with the previous batch's
    results). The request's group rows must keep that token: rebuilt from the prompt
    alone, the next decode would overwrite its slot and attention would miss a token."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed)
    prompt = [rng.randrange(VOCAB) for _ in range(20)]
    first = unfinished_req(cache, allocator, prompt, 1)
    cache.cache_unfinished_req(first)  # in the tree: the twin below adopts these slots
    req = unfinished_req(cache, allocator, prompt, 2)
    ahead = allocator.alloc(1)
    allocator.begin_decode([2], ahead)
    cache.req_to_token_pool.req_to_token[2, len(prompt)] = int(ahead)
    req.kv = SimpleNamespace(kv_allocated_len=len(prompt) + 1)
    before = [slots[-1] for slots in allocator.row_slots(2)]
    cache.cache_unfinished_req(req)
    rows = allocator.row_slots(2)
    assert torch.equal(req.prefix_indices, first.own), f"seed {seed}: no adoption tested"
    for g, (slots, theirs) in enumerate(zip(rows, allocator.row_slots(1), strict=True)):
        assert slots.numel() == theirs.numel() + 1, f"seed {seed}: group {g} lost a slot"
        assert torch.equal(slots[:-1], theirs), f"seed {seed}: group {g} not re-pointed"
        assert slots[-1] == before[g], f"seed {seed}: group {g} dropped the decode slot"


def test_incremental_evictable_group_slots_equal_a_full_walk_on_random_traces():
    """The O(1) per-group evictable count (kept up to date on insert, split, lock, unlock
    and evict) equals a walk of the tree after every step of a random multi-turn trace
    with requests in flight, shared prefixes and partial evictions."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=800)
    conversations = [[rng.randrange(VOCAB) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    live, rows = [], list(range(1, 9))

    def check(step, what):
        counted, walked = cache.evictable_group_slots(), cache.recount_evictable_group_slots()
        assert counted == walked, (
            f"seed {seed} step {step} after {what}: counted {counted} evictable group slots, "
            f"a walk finds {walked}"
        )

    for step in range(80):
        op = rng.random()
        if op < 0.4 and rows:
            c = rng.randrange(len(conversations))
            cut = rng.randint(1, len(conversations[c]))
            tokens = conversations[c][:cut] + [
                rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))
            ]
            live.append((c, Turn(cache, allocator, tokens, rows.pop())))
            check(step, "a match, lock and extend")
        elif op < 0.6 and live:
            rng.choice(live)[1].decode(rng, rng.randint(1, 6))
            check(step, "decoding")
        elif op < 0.85 and live:
            c, turn = live.pop(rng.randrange(len(live)))
            turn.finish()
            rows.append(turn.row)
            conversations[c] = turn.tokens if len(turn.tokens) < 120 else turn.tokens[:20]
            check(step, "an insert and unlock")
        else:
            cache.evict(EvictParams(num_tokens=rng.randint(1, 60)))
            check(step, "an eviction")
    for _, turn in live:
        turn.finish()
    check("end", "finishing every request")
    cache.evict(EvictParams(num_tokens=10**9))
    assert cache.evictable_group_slots() == (0,) * allocator.pool.num_groups, (
        f"seed {seed}: an empty tree still counts {cache.evictable_group_slots()} group slots"
    )


def test_a_request_keeps_its_own_slots_when_the_cached_ones_cost_more():
    """Another request cached the same tokens decoded one by one (a slot per token in
    every group); a request that computed them as one compressed segment must not swap
    its slots for those: that would lock more than it frees and shrink the room
    admission promised to others."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed)
    first = Turn(cache, allocator, [rng.randrange(VOCAB) for _ in range(10)], 1)
    first.decode(rng, 31)
    first.finish()  # cached: the 10-token segment and 30 one-token segments
    tokens = first.tokens[:40]
    req = unfinished_req(cache, allocator, tokens, 2)  # the same 40 tokens, one segment
    theirs = allocator.group_counts(match(cache, tokens).device_indices).tolist()
    mine = allocator.group_counts(req.own).tolist()
    room = allocator.budget.room(allocator.pool.free_slots(), cache.evictable_group_slots())
    cache.cache_unfinished_req(req)
    assert torch.equal(req.prefix_indices, req.own), (
        f"seed {seed}: the request adopted cached slots costing {theirs} for its own {mine}"
    )
    after = allocator.budget.room(allocator.pool.free_slots(), cache.evictable_group_slots())
    assert all(a >= b for a, b in zip(after, room, strict=True)), (
        f"seed {seed}: caching the request shrank the room from {room} to {after}"
    )
    cache.cache_finished_req(req, kv_len_to_handle=len(tokens))
    allocator.release_row(2)
    assert allocator.leaks() == [], f"seed {seed}: {allocator.leaks()}"


def test_the_start_up_self_test_passes_and_names_a_drifting_or_missing_override(monkeypatch):
    from sglang.srt.mem_cache.radix_cache import RadixCache

    from tangram_sglang.memory import radix

    assert radix.self_test() == [], radix.self_test()
    monkeypatch.setattr(
        TangramRadixCache,
        "_split_node",
        lambda self, key, child, n: RadixCache._split_node(self, key, child, n),
    )  # SGLang renamed the hook point: our bookkeeping no longer runs on a split
    problems = radix.self_test()
    assert problems and "RadixCache._split_node" in problems[0], problems
    monkeypatch.undo()
    monkeypatch.delattr(RadixCache, "_delete_leaf")
    assert radix.override_problems() == [
        "SGLang's RadixCache._delete_leaf is gone (tangram-sglang overrides it)"
    ]
    monkeypatch.undo()
    monkeypatch.setattr(RadixCache, "dec_lock_ref", lambda self, node, params, extra: None)
    assert any(
        "dec_lock_ref takes (self, node, params, extra)" in p for p in radix.override_problems()
    )


# What caching a turn reads from the device (on the GPU each is a sync, which overlap
# scheduling cannot hide): where the request's segment starts (`starts_segment` in the
# clean-join check reads a slot, then its position) and how many group slots a new leaf or
# a split node's head holds (`group_counts`). To remove with host-side counts
# (docs/architecture.md, host work per step); a new read fails here.
RADIX_WAITS = {
    "insert": {"read allocator.py:starts_segment": 2, "read allocator.py:group_counts": 1},
    # A match that splits a node reads the head's counts and whether the cut is clean;
    # a cut inside a compressed segment reads where the segment starts and what the cut
    # keeps (`lossy_cut`), and one too lossy splits again at the segment's start.
    "split": {
        "read allocator.py:split_facts": 2,
        "read allocator.py:lossy_cut": 2,
        "read allocator.py:group_counts": 1,
    },
    "evict": {"read allocator.py:_compact_batch": 1},
}


def test_caching_a_turn_reads_the_device_only_at_known_sites(monkeypatch):
    """Insert a compressed turn, split it by a match inside it, evict a leaf: the device
    reads of each, counted as tests/host_reads.py `SyncCounter` counts (which tensors would
    live on the GPU)."""
    from host_reads import SyncCounter

    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed)
    counter = SyncCounter()
    counter.mark(
        allocator.logical_to_group,
        allocator.seg_pos,
        allocator.logical.free_pages,
        *(a.free_pages for a in allocator.pool.allocators),
        cache.req_to_token_pool.req_to_token,
    )
    tokens = [rng.randrange(VOCAB) for _ in range(rng.randint(30, 60))]
    counts = {}
    with counter.counting(monkeypatch):
        values = allocator.alloc(len(tokens))
        counter.mark(values)
        allocator.begin_extend([1], [values[:0]], [values])
        counter.events.clear()
        cache.insert(InsertParams(key=RadixKey(tokens), value=values))
        counts["insert"], counter.events[:] = by_site(counter.events), []
        match(cache, tokens[: rng.randint(5, len(tokens) - 5)], Request())
        counts["split"], counter.events[:] = by_site(counter.events), []
        cache.evict(EvictParams(num_tokens=1))
        counts["evict"] = by_site(counter.events)
    assert counter.ops > 0, "the counter saw no op: it counted nothing"
    for case, found in counts.items():
        waits = {s: n for s, n in found.items() if not s.startswith("staged")}
        new = {s: n for s, n in waits.items() if n > RADIX_WAITS[case].get(s, 0)}
        assert not new, f"seed {seed}: new device reads when the tree does {case}: {new} ({waits})"


def by_site(events) -> dict[str, int]:
    return dict(collections.Counter(f"{kind} {where}" for kind, where in events))


def test_requests_prefilled_together_keep_their_own_tails_where_nothing_was_compressed():
    """Two requests sharing a prefix, prefilled in one batch at ratio 1.0 (segments keep
    every token): whichever finishes second keeps its own tail in the tree, as stock
    SGLang does; only a compressed segment cut by the tree's end is given up."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    model = ModelIdentity("test", 2, 8, 4, 4, f"u{seed}")
    pool = RaggedPool(
        PoolLayout.from_profile(uniform_profile(model, 1.0)), [600], torch.float32, "cpu", 8, 256
    )
    allocator = TangramAllocator(800, TangramKVPool(pool, 800), BudgetRule(sink=2, window=3))
    cache = tree_over(allocator)
    shared = [rng.randrange(VOCAB) for _ in range(rng.randint(5, 30))]
    tails = [[rng.randrange(VOCAB) for _ in range(rng.randint(5, 30))] for _ in range(2)]
    tails[1][0] = (tails[0][0] + 1) % VOCAB  # the two part right after the shared prefix
    keys = [shared + tail for tail in tails]
    new = [allocator.alloc(len(k)) for k in keys]
    allocator.begin_extend([1, 2], [x[:0] for x in new], new)
    for row, (key, values) in enumerate(zip(keys, new, strict=True), start=1):
        result = cache.insert(InsertParams(key=RadixKey(key), value=values))
        allocator.free(values[: result.prefix_len])  # SGLang frees the duplicates
        allocator.release_row(row)
    for key in keys:
        held = match(cache, key).device_indices.numel()
        assert held == len(key), f"seed {seed}: the tree holds {held} of a {len(key)}-token key"
    assert allocator.leaks() == [], f"seed {seed}: {allocator.leaks()}"


def test_a_match_inside_a_compressed_turn_is_reused_only_if_it_keeps_enough():
    """A cut keeps, per group, the slots all its heads filled before it. Owners at the
    segment's end (every head kept only late tokens) leave a cut at its middle almost
    nothing: admission's match (`req` given) then ends at the segment's start, unless
    --tangram-cut-reuse is 0; owners spread over the segment keep about a fresh
    compression's share and are reused; a clean cut is always reused; SGLang's own
    matches (no `req`) are never shortened."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed)
    n = rng.randint(60, 120)
    tokens = [rng.randrange(VOCAB) for _ in range(n)]
    values = allocator.alloc(n)
    segment = allocator.begin_extend([1], [values[:0]], [values]).segments[0]
    assert segment.compress, f"seed {seed}: the segment keeps every token"
    spread = rng.random() < 0.5
    if spread:  # the j-th of k kept slots owned by position ~ j * n / k
        owners = [torch.div(torch.arange(k) * n, k, rounding_mode="floor") for k in segment.kept]
        allocator.assign_owners(segment, owners)
    cache.insert(InsertParams(key=RadixKey(tokens), value=values))
    allocator.release_row(1)
    m = n // 2
    keeps = allocator.group_counts(values[:m]).tolist()
    fresh = allocator.kept(m)
    lossy = any(c < 0.5 * f for c, f in zip(keeps, fresh, strict=True))
    assert lossy != spread, f"seed {seed}: keeps {keeps} of a fresh {fresh} (spread {spread})"
    for share in (0.5, 0.0):
        allocator.cut_reuse = share
        reused = len(match(cache, tokens[:m], Request()).device_indices)
        expected = 0 if lossy and share > 0 else m
        assert reused == expected, (
            f"seed {seed}: a cut at {m} of {n} keeping {keeps} of a fresh {fresh} at share "
            f"{share}: reused {reused}, expected {expected}"
        )
    assert len(match(cache, tokens[:m]).device_indices) == m, "SGLang's own match shortened"
    allocator.cut_reuse = 1.0
    follow = tokens + [rng.randrange(VOCAB) for _ in range(5)]
    assert len(match(cache, follow, Request()).device_indices) == n, (
        f"seed {seed}: the whole turn (a clean cut) was not reused at share 1.0"
    )
    cache.evict(EvictParams(num_tokens=10**9))
    assert allocator.leaks() == [], f"seed {seed}: {allocator.leaks()}"
