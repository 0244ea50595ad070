"""Budget Reservation through SGLang's own scheduling steps: chunked prefill, cached
prefixes that leave no room, decode top-ups, abort and retraction.

`MiniScheduler` runs the steps of SGLang's `Scheduler` on real SGLang objects with the
plugin's hooks applied: `Req`, our `PrefillAdder` (`add_chunked_req` first, then
`add_one_req` per waiting request), `alloc_req_slots` (binds reservations), the `tangram`
radix cache (`cache_unfinished_req` between chunks and after prefill) and
`release_kv_cache` (finish, abort, retraction), and `ScheduleBatch.check_decode_mem` (our
per-group hook) before each decode step, retracting as `retract_decode` does while it
fails. Only the forward is left out: allocation calls `TangramAllocator.begin_extend` /
`begin_decode` as the allocation hooks do, and sampled tokens are random.
"""

from __future__ import annotations

import random
from array import array
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from tangram_sglang.patches.invariants import STRICT_ENV, idle_problems, pool_leaks
from test_admission import make_req, plugin_hooks  # noqa: F401  (the fixture)
from test_allocator import RULE

from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool
from tangram_sglang.memory.budget import kept_tokens
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.memory.radix import TangramRadixCache
from tangram_sglang.memory.reservation import ChunkPlan, prompt_need
from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.profile import ModelIdentity

VOCAB = 200
ROWS, CONTEXT = 16, 1024
LOGICAL = 20_000


def make_cache(seed: int, slots: int, ratio: float = 0.4, spread: float = 0.8):
    """The `tangram` radix cache over a three-group synthetic profile, `slots` per group."""
    model = ModelIdentity("test", 2, 8, 4, 4, f"s{seed}")
    profile = synthetic_profile(model, ratio, spread=spread, seed=seed, max_groups=3)
    layout = PoolLayout.from_profile(profile)
    pool = RaggedPool(layout, [slots] * layout.num_groups, torch.float32, "cpu", ROWS, CONTEXT)
    allocator = TangramAllocator(LOGICAL, TangramKVPool(pool, LOGICAL), RULE)
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(ROWS, CONTEXT, "cpu", False),
        token_to_kv_pool_allocator=allocator,
        page_size=1,
    )
    return TangramRadixCache(params), allocator


def cached_slots(cache, tokens) -> list[int]:
    """Per group, the slots of the cached prefix a request for `tokens` would match."""
    key = RadixKey(array("q", tokens), limit=len(tokens) - 1)
    return cache.allocator.group_counts(
        cache.match_prefix(MatchPrefixParams(key=key)).device_indices
    ).tolist()


class MiniScheduler:
    """SGLang's scheduling loop without the model (module docstring). One `step` is one
    scheduler iteration: a prefill batch if the adder admits any request, else a decode
    step of the running requests. It records, per request, what admission reserved and
    what allocation used, and checks every chunk against the row's reservation."""

    def __init__(self, cache, allocator, chunk_size, rng, new_token_ratio=1.0):
        self.cache, self.allocator, self.chunk_size, self.rng = cache, allocator, chunk_size, rng
        self.new_token_ratio = new_token_ratio  # SGLang's estimate of a running request's decode
        self.waiting, self.running, self.chunked, self.done = [], [], None, []
        self.reserved_at_admission, self.used = {}, {}
        self.chunks = {}  # rid -> extend lengths, in order
        self.settled = []  # reservation changes at continuation chunks (none expected)
        self.retracted = []  # rids, once per retraction

    def submit(self, req):
        """A request arrives: SGLang clips its decode budget, and our hook aborts it (a
        one-token prefill that answers with the error) if it can never fit."""
        from sglang.srt.managers.scheduler import Scheduler

        arrival = SimpleNamespace(
            max_new_tokens_limit=None,
            max_req_len=CONTEXT,
            max_total_num_tokens=self.allocator.size,
            server_args=SimpleNamespace(dcp_size=1),
            page_size=1,
            token_to_kv_pool_allocator=self.allocator,
            chunked_prefill_size=self.chunk_size,
        )
        Scheduler.init_req_max_new_tokens(arrival, req)
        self.waiting.append(req)

    def idle(self) -> bool:
        return not (self.waiting or self.running or self.chunked)

    def step(self) -> list:
        """One iteration; returns the requests admitted in it."""
        from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder

        if self.chunked is not None:  # stash_chunked_request
            self.cache.cache_unfinished_req(self.chunked, chunked=True)
        adder = PrefillAdder(
            1, self.cache, self.allocator, SimpleNamespace(reqs=list(self.running)),
            self.new_token_ratio, 10**9, self.chunk_size,
        )  # fmt: skip
        if self.chunked is not None:
            self.chunked.init_next_round_input()
            row_before = self.budget.row_reserved[:, self.chunked.req_pool_idx].clone()
            continuing = self.chunked
            self.chunked = adder.add_chunked_req(self.chunked)
            change = self.budget.row_reserved[:, continuing.req_pool_idx] - row_before
            self.settled.append(change.tolist())
        for req in self.waiting:
            req.init_next_round_input(self.cache)
            result = adder.add_one_req(req, self.chunked is not None, None)
            if adder.can_run_list and adder.can_run_list[-1] is req:
                pending = self.budget.pending.get(req.rid, [0] * self.groups)
                self.reserved_at_admission[req.rid] = list(pending)
            if result != AddReqResult.CONTINUE:
                break
        batch = adder.can_run_list
        self.waiting = [r for r in self.waiting if r not in batch]
        if adder.new_chunked_req is not None:
            self.chunked = adder.new_chunked_req
        if self.chunked is not None:
            self.chunked.inflight_middle_chunks += 1
        if batch:
            self._extend(batch)
        elif self.running:
            self._decode()
        return batch

    @property
    def groups(self) -> int:
        return self.allocator.pool.num_groups

    @property
    def budget(self):
        return self.allocator.budget

    def _evict(self, n: int) -> None:
        self.cache.evict(EvictParams(num_tokens=n))

    def _extend(self, batch) -> None:
        from sglang.srt.managers.schedule_batch import ReqKvInfo
        from sglang.srt.mem_cache import allocation

        rows = allocation.alloc_req_slots(self.cache.req_to_token_pool, batch, self.cache)
        table = self.cache.req_to_token_pool.req_to_token
        prefixes, new = [], []
        for req, row in zip(batch, rows, strict=True):
            start, end = req.extend_range.start, req.extend_range.end
            logical = self.allocator.alloc(end - start)
            table[row, :start] = req.prefix_indices.to(torch.int32)
            table[row, start:end] = logical.to(torch.int32)
            prefixes.append(req.prefix_indices)
            new.append(logical)
        before = self.budget.row_reserved[:, rows].clone()
        state = self.allocator.begin_extend(rows, prefixes, new, self._evict)
        for i, (req, segment) in enumerate(zip(batch, state.segments, strict=True)):
            kept = torch.tensor(segment.kept)
            assert (kept <= before[:, i]).all(), (
                f"{req.rid}: a chunk of {segment.extend_len} tokens keeps {kept.tolist()} "
                f"group slots, the row reserved only {before[:, i].tolist()}"
            )
            self._use(req, kept)
            self.chunks.setdefault(req.rid, []).append(segment.extend_len)
            end = req.extend_range.end
            req.kv = req.kv or ReqKvInfo(kv_allocated_len=end, swa_evicted_seqlen=0)
            req.kv.kv_allocated_len = req.kv_committed_len = end
            if req.inflight_middle_chunks > 0:
                req.inflight_middle_chunks -= 1
                continue
            req.output_ids.append(self.rng.randrange(VOCAB))
            if self._finished(req):
                self._release(req)
            else:
                self.cache.cache_unfinished_req(req)
                self.running.append(req)

    def _decode(self) -> None:
        from sglang.srt.managers.schedule_batch import ScheduleBatch

        def fits() -> bool:
            batch = SimpleNamespace(
                token_to_kv_pool_allocator=self.allocator,
                tree_cache=self.cache,
                reqs=self.running,
                new_tokens_required_next_decode=lambda selected=None: len(self.running),
            )
            return ScheduleBatch.check_decode_mem(batch)

        while not fits():  # retract_decode: the request with the fewest outputs first
            victim = min(self.running, key=lambda r: len(r.output_ids))
            if len(self.running) == 1:
                raise AssertionError(f"{victim.rid} alone cannot decode: admission over-promised")
            self.retract(victim)
            self.retracted.append(victim.rid)
        table = self.cache.req_to_token_pool.req_to_token
        rows = [r.req_pool_idx for r in self.running]
        new = self.allocator.alloc(len(rows))
        for req, slot in zip(self.running, new, strict=True):
            table[req.req_pool_idx, req.kv_committed_len] = int(slot)
        self.allocator.begin_decode(rows, new, self._evict)
        for req in list(self.running):
            req.kv_committed_len += 1
            req.kv.kv_allocated_len += 1
            req.output_ids.append(self.rng.randrange(VOCAB))
            if self._finished(req):
                self.running.remove(req)
                self._release(req)

    def _use(self, req, slots) -> None:
        self.used[req.rid] = self.used.get(req.rid, torch.zeros_like(slots)) + slots

    def _finished(self, req) -> bool:
        aborted = req.to_finish is not None
        return aborted or len(req.output_ids) >= req.sampling_params.max_new_tokens

    def _release(self, req, insert: bool = True) -> None:
        from sglang.srt.mem_cache import common

        common.release_kv_cache(req, self.cache, is_insert=insert)
        self.done.append(req)

    def abort_chunked(self) -> None:
        """`process_pending_chunked_abort`: the chunked request stops between chunks."""
        req, self.chunked = self.chunked, None
        self._release(req, insert=False)

    def retract(self, req) -> None:
        """`retract_decode`: free the request's KV and queue it again, outputs kept."""
        self.running.remove(req)
        self._release(req, insert=False)
        self.done.remove(req)
        req.reset_for_retract()
        self.waiting.insert(0, req)

    def assert_idle_and_clean(self, start, seed) -> None:
        allocator, cache = self.allocator, self.cache
        budget = allocator.budget
        assert budget.reserved() == (0,) * self.groups and budget.pending == {}, (
            f"seed {seed}: idle with {budget.reserved()} still reserved"
        )
        assert budget.overdrawn.tolist() == [0] * self.groups, (
            f"seed {seed}: an extend went beyond its reservation by {budget.overdrawn}"
        )
        assert allocator.leaks() == [], f"seed {seed}: {allocator.leaks()}"
        assert idle_problems(allocator, cache) == [], (
            f"seed {seed}: {idle_problems(allocator, cache)}"
        )
        assert cache.protected_size() == 0, f"seed {seed}: a finished request holds a lock"
        cache.evict(EvictParams(num_tokens=10**9))
        assert allocator.pool.free_slots() == start, (
            f"seed {seed}: {allocator.pool.free_slots()} free after evicting everything, "
            f"started at {start}"
        )


def random_tokens(rng, n):
    return [rng.randrange(VOCAB) for _ in range(n)]


def run_until_idle(sched, limit=2_000):
    for _ in range(limit):
        if sched.idle():
            return
        sched.step()
    raise AssertionError(f"not idle after {limit} steps: a request waits forever")


# ---- chunked prefill -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rest=st.integers(0, 500),
    first=st.one_of(st.none(), st.integers(0, 80)),
    size=st.integers(1, 80),
    ratio=st.floats(0.05, 1.0),
)
def test_chunk_plan_needs_what_sglangs_chunking_keeps(rest, first, size, ratio):
    plan = ChunkPlan(first, size if first is not None else None)
    chunks, left = [], rest
    while left > 0:  # SGLang: a first chunk of what the budget has left, then whole budgets
        n = left if first is None else min(left, size if chunks else max(first, 0))
        chunks.append(n)
        left -= n
    chunks = [n for n in chunks if n]
    pieces = [n for n, count in plan.pieces(rest) for _ in range(count) if n]
    assert pieces == chunks, f"plan {plan} cuts {rest} into {pieces}, SGLang into {chunks}"
    kept = sum(kept_tokens(n, ratio, RULE) for n in chunks)
    assert prompt_need(rest, (ratio,), RULE, plan) == (kept,), (
        f"plan {plan}: need {prompt_need(rest, (ratio,), RULE, plan)}, chunks keep {kept}"
    )


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_prefill_reserves_every_chunk_at_admission_and_leaks_nothing(chunk_size):
    """Long prompts, several requests at once, chunk size 16 or 64, a compressed
    three-group profile: every chunk fits what its row still reserves, admission reserved
    exactly what the request's chunks then used, the continuation chunks never change a
    reservation, and the pools return to their start."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=rng.randint(400, 900))
    start = allocator.pool.free_slots()
    sched = MiniScheduler(cache, allocator, chunk_size, rng)
    history = random_tokens(rng, 40)
    for i in range(rng.randint(4, 7)):
        shared = history[: rng.randint(0, len(history))]  # radix hits on some prompts
        prompt = shared + random_tokens(rng, rng.randint(1, 260))
        sched.submit(make_req(f"r{i}", prompt, rng.randint(1, 12)))
        history = prompt
    run_until_idle(sched)
    for req in sched.done:
        reserved = sched.reserved_at_admission[req.rid]
        used = sched.used[req.rid].tolist()
        assert reserved == used, (
            f"seed {seed}: {req.rid} (chunks {sched.chunks[req.rid]}) reserved {reserved}, "
            f"its chunks used {used}"
        )
    chunked = [rid for rid, chunks in sched.chunks.items() if len(chunks) > 1]
    assert chunked, f"seed {seed}: no request was chunked"
    assert all(not any(c) for c in sched.settled), (
        f"seed {seed}: continuation chunks changed reservations {sched.settled}"
    )
    sched.assert_idle_and_clean(start, seed)


def test_abort_between_chunks_and_retraction_release_exactly():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=1_500)
    start = allocator.pool.free_slots()
    sched = MiniScheduler(cache, allocator, 32, rng)
    sched.submit(make_req("long", random_tokens(rng, 300), 5))
    for i in range(3):
        sched.submit(make_req(f"r{i}", random_tokens(rng, rng.randint(10, 30)), 20))
    sched.step()
    sched.step()
    assert sched.chunked is not None and sched.chunked.rid == "long", f"seed {seed}: setup"
    row = sched.chunked.req_pool_idx
    sched.abort_chunked()
    assert allocator.budget.row_reserved[:, row].tolist() == [0] * sched.groups, (
        f"seed {seed}: the aborted chunked request's row still reserves slots"
    )
    while not sched.running:
        sched.step()
    sched.step()
    victim = rng.choice(sched.running)
    row = victim.req_pool_idx
    sched.retract(victim)
    assert allocator.budget.row_reserved[:, row].tolist() == [0] * sched.groups, (
        f"seed {seed}: the retracted request's row still reserves slots"
    )
    run_until_idle(sched)
    assert len(victim.output_ids) == victim.sampling_params.max_new_tokens, (
        f"seed {seed}: the retracted request did not finish after re-admission"
    )
    sched.assert_idle_and_clean(start, seed)


def test_decode_beyond_the_estimate_evicts_then_retracts_and_every_request_finishes():
    """SGLang's optimistic decode estimate (new_token_ratio 0.1 for running requests)
    admits more than the pools can decode to the end: each decode step tops up one slot
    per group, evicting first, then retracting through the per-group check; retracted
    requests come back, finish with every token, and the pools return to their start."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=rng.randint(300, 450))
    start = allocator.pool.free_slots()
    sched = MiniScheduler(cache, allocator, None, rng, new_token_ratio=0.1)
    for i in range(8):
        sched.submit(
            make_req(f"r{i}", random_tokens(rng, rng.randint(5, 40)), rng.randint(60, 120))
        )
    run_until_idle(sched, limit=5_000)
    assert sched.retracted, f"seed {seed}: the setup never ran short (no retraction)"
    for req in sched.done:
        assert (
            req.to_finish is None and len(req.output_ids) == req.sampling_params.max_new_tokens
        ), (
            f"seed {seed}: {req.rid} ended with {len(req.output_ids)} of "
            f"{req.sampling_params.max_new_tokens} tokens ({req.to_finish})"
        )
    sched.assert_idle_and_clean(start, seed)


# ---- a cached prefix that leaves no room -----------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 32])
def test_a_request_whose_cached_prefix_leaves_no_room_recomputes_it_instead_of_waiting(
    chunk_size,
):
    """Turn 1 is a short prompt with a long answer: decoded tokens are never compressed,
    so its cached history holds about one slot per token in every group. Turn 2 (that
    history plus a user message) with a decode budget such that history + need exceeds
    some group's capacity but the whole prompt recompressed fits: it must be admitted at
    once (recomputing the history), not wait forever on an idle server, and, chunked,
    must not take the history back between chunks."""
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=250, ratio=0.2, spread=0.5)  # ratios < 0.9
    start = allocator.pool.free_slots()
    sched = MiniScheduler(cache, allocator, chunk_size, rng)
    turn1 = make_req("turn1", random_tokens(rng, 10), 150)
    sched.submit(turn1)
    run_until_idle(sched)
    prompt = list(turn1.origin_input_ids) + list(turn1.output_ids) + random_tokens(rng, 10)
    held = cached_slots(cache, prompt)  # turn 1 but its last answer token: 11 new tokens
    budget = allocator.budget
    with_prefix = [h + n for h, n in zip(held, budget.prompt_need(11), strict=True)]
    alone = budget.prompt_need(len(prompt), ChunkPlan.whole_chunks(chunk_size))
    lo = min(s - w for s, w in zip(allocator.pool.slots, with_prefix, strict=True)) + 1
    hi = min(s - a for s, a in zip(allocator.pool.slots, alone, strict=True))
    assert 0 < lo <= hi, (
        f"seed {seed}: test setup: ratios {allocator.ratios} {held=} {with_prefix=} {alone=}"
    )
    turn2 = make_req("turn2", prompt, rng.randint(lo, hi))
    sched.submit(turn2)
    admitted = sched.step()
    assert turn2 in admitted, (
        f"seed {seed}: with {held} history slots locked the request needs "
        f"{budget.need(11, turn2.sampling_params.max_new_tokens)} of "
        f"{allocator.pool.slots}; recomputed it needs "
        f"{[a + turn2.sampling_params.max_new_tokens for a in alone]}, yet it was not "
        "admitted on an idle server"
    )
    assert turn2.extend_range.start == 0 and turn2.to_finish is None, (
        f"seed {seed}: admitted with a {turn2.extend_range.start}-token prefix (or aborted)"
    )
    row = turn2.req_pool_idx
    while not turn2.output_ids:
        sched.step()
    assert allocator.row_lens[:, row].tolist() == list(alone), (
        f"seed {seed}: after its prefill turn 2 holds {allocator.row_lens[:, row].tolist()} "
        f"group slots, its recompressed prompt keeps {alone}: it took cached slots back"
    )
    run_until_idle(sched)
    sched.assert_idle_and_clean(start, seed)


def test_a_cached_prefix_that_still_fits_is_kept():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=600)
    sched = MiniScheduler(cache, allocator, None, rng)
    turn1 = make_req("turn1", random_tokens(rng, 40), 8)
    sched.submit(turn1)
    run_until_idle(sched)
    prompt = list(turn1.origin_input_ids) + list(turn1.output_ids) + random_tokens(rng, 10)
    turn2 = make_req("turn2", prompt, 8)
    sched.submit(turn2)
    assert turn2 in sched.step(), f"seed {seed}: a roomy follow-up turn was not admitted"
    assert turn2.extend_range.start == len(prompt) - 11, (
        f"seed {seed}: the follow-up turn reused {turn2.extend_range.start} tokens, expected "
        f"the whole history ({len(prompt) - 11})"
    )
    run_until_idle(sched)


def test_idle_check_names_a_leftover_reservation_and_a_drifted_count():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=500)
    sched = MiniScheduler(cache, allocator, None, rng)
    sched.submit(make_req("a", random_tokens(rng, 30), 3))
    run_until_idle(sched)
    assert idle_problems(allocator, cache) == [], f"seed {seed}: {idle_problems(allocator, cache)}"
    allocator.budget.reserve("ghost", [1] * sched.groups)
    problems = idle_problems(allocator, cache)
    assert len(problems) == 1 and "1 unbound request(s) reserve" in problems[0], problems
    allocator.budget.drop_stale(())
    cache._evictable_slots[0] += 1  # a drift; the check walks on the next tree edit
    assert idle_problems(allocator, cache) == [], "walked again without a tree edit"
    cache.evict(EvictParams(num_tokens=1))
    problems = idle_problems(allocator, cache)
    assert len(problems) == 1 and "evictable group slots, a walk" in problems[0], problems


def test_the_idle_pool_walk_runs_again_only_after_the_pools_change(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=500)
    sched = MiniScheduler(cache, allocator, None, rng)
    walks = []
    real = allocator.leaks
    monkeypatch.setattr(allocator, "leaks", lambda: walks.append(1) or real())
    assert pool_leaks(allocator, cache) == [] and pool_leaks(allocator, cache) == []
    assert len(walks) == 1, f"seed {seed}: an unchanged idle pool was walked {len(walks)} times"
    sched.submit(make_req("a", random_tokens(rng, 30), 3))
    run_until_idle(sched)
    assert pool_leaks(allocator, cache) == [], f"seed {seed}"
    assert len(walks) == 2, f"seed {seed}: the pools changed but were not walked again"
    allocator.pool.allocators[0].alloc(1)  # a group slot taken outside the mapping: a leak
    problems = pool_leaks(allocator, cache)
    assert len(walks) == 3 and any("group 0" in p for p in problems), (
        f"seed {seed}: a leaked group slot went unreported: {problems}"
    )
    assert pool_leaks(allocator, cache) == problems and len(walks) == 4, "a leak must stay reported"


def test_without_the_strict_flag_the_idle_check_counts_and_still_finds_a_leak(monkeypatch):
    """Default idle check (no per-slot walk): a group slot taken outside the mapping breaks
    that group's count and is reported."""
    monkeypatch.delenv(STRICT_ENV, raising=False)
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=500)
    sched = MiniScheduler(cache, allocator, None, rng)
    monkeypatch.setattr(allocator, "leaks", lambda: pytest.fail("walked without the flag"))
    sched.submit(make_req("a", random_tokens(rng, 30), 3))
    run_until_idle(sched)
    assert pool_leaks(allocator, cache) == [], f"seed {seed}"
    group = rng.randrange(allocator.pool.num_groups)
    allocator.pool.allocators[group].alloc(1)
    problems = pool_leaks(allocator, cache)
    assert any(f"group {group}:" in p for p in problems), f"seed {seed}: {problems}"
