"""Budget Reservation at admission: SGLang's real PrefillAdder (our subclass, installed by
the plugin's hooks) admits a request only while every head group can hold its exact
prompt need plus SGLang's decode estimate, reserves the prompt need, allocation consumes
it exactly, release returns the rest; eviction takes only each group's shortfall."""

from __future__ import annotations

import random
from array import array
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from test_allocator import RULE, make_allocator
from test_radix import VOCAB, Turn, match

from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.memory.radix import TangramRadixCache
from tangram_sglang.memory.reservation import short_group
from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

ROWS = 16


@pytest.fixture(scope="module", autouse=True)
def plugin_hooks():
    """The plugin's hooks applied, and a published ServerArgs (PrefillAdder reads it)."""
    from sglang.srt.runtime_context import get_context

    from tangram_sglang import plugin

    plugin.register()
    from tangram_sglang import patches

    patches.apply_all()
    from sglang.srt.runtime_context import get_parallel

    override = get_context().override_server_args()
    override.install()
    with get_parallel().override(tp_rank=0):  # Req.set_finish_with_abort logs on rank 0
        yield
    override.restore()


def make_cache(seed: int, slots: int, logical: int = 20_000):
    allocator = make_allocator(seed, logical=logical, slots=slots)
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(ROWS, 1024, "cpu", False),
        token_to_kv_pool_allocator=allocator,
        page_size=1,
    )
    return TangramRadixCache(params), allocator


def make_adder(cache, allocator):
    from sglang.srt.managers.schedule_policy import PrefillAdder

    adder = PrefillAdder(1, cache, allocator, SimpleNamespace(reqs=[]), 1.0, 10**9, None)
    assert type(adder).__name__ == "TangramPrefillAdder", (
        f"the plugin did not replace SGLang's PrefillAdder (got {type(adder).__name__})"
    )
    return adder


def make_req(rid: str, tokens, max_new: int):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    return Req(rid, "", array("q", tokens), SamplingParams(max_new_tokens=max_new))


def offer(adder, cache, req):
    from sglang.srt.managers.schedule_policy import AddReqResult

    req.init_next_round_input(cache)
    result = adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None)
    return result == AddReqResult.CONTINUE, result


def random_tokens(rng: random.Random, n: int, base: int = 0) -> list[int]:
    """Token ids from [base, base + VOCAB): the `Turn` helper keys the tree with lists and a
    Req with arrays, which SGLang refuses to compare, so their vocabularies stay apart."""
    return [base + rng.randrange(VOCAB) for _ in range(n)]


REQUESTS = st.lists(st.tuples(st.integers(1, 120), st.integers(0, 60)), min_size=1, max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), slots=st.integers(20, 300), shapes=REQUESTS)
def test_admission_stops_at_the_first_request_some_group_cannot_hold(seed, slots, shapes):
    cache, allocator = make_cache(seed, slots)
    adder = make_adder(cache, allocator)
    rng = random.Random(seed)
    reqs = [make_req(f"r{i}", random_tokens(rng, n), m) for i, (n, m) in enumerate(shapes)]
    budget = allocator.budget
    held, offset = [0] * budget.num_groups, 0
    for i, req in enumerate(reqs):
        prompt = budget.prompt_need(len(req.origin_input_ids))
        decode = req.sampling_params.max_new_tokens  # below SGLang's clip (4096)
        room = [s - h - offset for s, h in zip(allocator.pool.slots, held, strict=True)]
        never = short_group([p + decode for p in prompt], allocator.pool.slots) is not None
        admitted, result = offer(adder, cache, req)
        if never:  # aborted instead of waiting forever: a one-token prefill that finishes
            assert req.to_finish is not None and "can never fit" in req.to_finish.message, (
                f"seed {seed}: request {i} needs {prompt} + {decode} of capacity "
                f"{allocator.pool.slots} and was not aborted (to_finish {req.to_finish})"
            )
            prompt, decode = budget.prompt_need(1), 0
        overflow = short_group([p + decode for p in prompt], room)
        assert admitted == (overflow is None), (
            f"seed {seed}: request {i} needs {prompt} + {decode} with room {room} per group "
            f"(ratios {allocator.ratios}); adder answered {result}"
        )
        if not admitted:
            break
        held = [h + p for h, p in zip(held, prompt, strict=True)]
        offset += decode
        assert list(budget.reserved()) == held and adder.decode_offset == offset, (
            f"seed {seed}: after request {i} the ledger reserves {budget.reserved()} and "
            f"counts {adder.decode_offset} decode slots; the admitted requests need {held} "
            f"and {offset}"
        )
    assert adder.can_run_list == reqs[: len(adder.can_run_list)]
    assert list(allocator.pool.free_slots()) == list(allocator.pool.slots), "admission allocated"


def test_reservations_are_what_allocation_consumes_and_release_returns_the_rest():
    from sglang.srt.mem_cache import allocation

    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=2_000)
    start = allocator.pool.free_slots()
    adder = make_adder(cache, allocator)
    reqs = [
        make_req(f"r{i}", random_tokens(rng, rng.randint(1, 150)), rng.randint(1, 40))
        for i in range(rng.randint(2, 6))
    ]
    for req in reqs:
        assert offer(adder, cache, req)[0], f"seed {seed}: {req.rid} refused in a roomy pool"
    budget = allocator.budget
    reserved = budget.reserved()
    allocation.alloc_req_slots(cache.req_to_token_pool, reqs, cache)  # the plugin binds rows
    assert budget.pending == {}, f"seed {seed}: reservations left unbound {budget.pending}"
    assert budget.reserved() == reserved, f"seed {seed}: binding changed the reservation"
    for req in reqs:
        new = allocator.alloc(len(req.origin_input_ids))
        allocator.begin_extend([req.req_pool_idx], [new[:0]], [new])
        req.logical = [new]
    used = [s - f for s, f in zip(start, allocator.pool.free_slots(), strict=True)]
    assert used == list(reserved) and budget.reserved() == (0,) * len(start), (
        f"seed {seed}: admission reserved {reserved}, the prompts used {used}, "
        f"{budget.reserved()} left"
    )
    decoded = [rng.randint(0, req.sampling_params.max_new_tokens) for req in reqs]
    for step in range(max(decoded)):
        live = [r for r, d in zip(reqs, decoded, strict=True) if d > step]
        new = allocator.alloc(len(live))
        allocator.begin_decode([r.req_pool_idx for r in live], new)
        for r, slot in zip(live, new.split(1), strict=True):
            r.logical.append(slot)
    assert budget.reserved() == (0,) * len(start) and budget.overdrawn.tolist() == [0] * len(
        start
    ), f"seed {seed}: decode touched the ledger: {budget.describe()}"
    assert allocator.describe()["reserved"] == [0] * len(start)
    for req in reqs:
        allocator.free(torch.cat(req.logical))
        allocator.release_row(req.req_pool_idx)
    assert allocator.pool.free_slots() == start, f"seed {seed}: release did not free every slot"
    assert allocator.describe()["reserved_requests"] == 0


def test_evictable_group_slots_are_what_evicting_the_tree_frees():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=600, logical=800)
    turns = []
    for row in range(1, 4):
        turn = Turn(cache, allocator, random_tokens(rng, rng.randint(10, 60)), row)
        turn.decode(rng, rng.randint(0, 5))
        turn.finish()
        turns.append(turn)
    locked = Turn(cache, allocator, turns[0].tokens + random_tokens(rng, 5), 4)
    evictable = cache.evictable_group_slots()
    before = allocator.pool.free_slots()
    cache.evict(EvictParams(num_tokens=10**9))
    freed = [a - b for a, b in zip(allocator.pool.free_slots(), before, strict=True)]
    assert list(evictable) == freed, (
        f"seed {seed}: counted {evictable} evictable group slots, evicting freed {freed}"
    )
    assert min(evictable) > 0 or cache.evictable_size() == 0
    locked.finish()


def test_admission_counts_evictable_tree_slots_but_not_locked_ones():
    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = make_cache(seed, slots=200, logical=2_000)
    cached = Turn(cache, allocator, random_tokens(rng, 150), 1)
    cached.finish()  # unlocked: every slot it holds is evictable
    free, evictable = allocator.pool.free_slots(), cache.evictable_group_slots()
    # A prompt whose need fits free + evictable in every group but not free alone.
    budget = allocator.budget
    n = next(n for n in range(1, 2_000) if short_group(budget.prompt_need(n), free) is not None)
    need = budget.prompt_need(n)
    assert short_group(need, [f + e for f, e in zip(free, evictable, strict=True)]) is None, (
        f"seed {seed}: test setup: need {need}, free {free}, evictable {evictable}"
    )
    assert offer(
        make_adder(cache, allocator), cache, make_req("a", random_tokens(rng, n, VOCAB), 0)
    )[0], f"seed {seed}: need {need} refused with free {free} + evictable {evictable}"
    adder = make_adder(cache, allocator)
    assert budget.pending == {}, "a new round must clear the reservation of a request never run"
    lock = match(cache, cached.tokens).last_device_node
    cache.inc_lock_ref(lock)  # a running request now holds the cached turn
    admitted, _ = offer(adder, cache, make_req("b", random_tokens(rng, n, VOCAB), 0))
    assert not admitted, f"seed {seed}: need {need} admitted against locked tree slots"
    cache.dec_lock_ref(lock)


def quarter_tree(seed: int, slots: int, width: int):
    """A radix tree over one head group at ratio 0.25 (`slots` slots, rows `width` wide)."""
    model = ModelIdentity("test", 2, 8, 4, 4, f"q{seed}")
    layout = PoolLayout.from_profile(uniform_profile(model, 0.25))
    pool = RaggedPool(layout, [slots], torch.float32, "cpu", 8, width)
    allocator = TangramAllocator(4_000, TangramKVPool(pool, 4_000), RULE)
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(8, width, "cpu", False),
        token_to_kv_pool_allocator=allocator,
        page_size=1,
    )
    return TangramRadixCache(params), allocator


def test_an_extend_evicts_only_each_groups_shortfall_and_keeps_cache_hits():
    """SGLang evicts `need - available_size()` raw tokens before an extend. When that was
    the scarcest group's free count, an extend of n raw tokens evicted n - min(free) cached
    tokens even when its compressed need fit every group. Now nothing is evicted then, and
    under real pressure only the group shortfall is."""
    from sglang.srt.mem_cache.common import evict_from_tree_cache

    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = quarter_tree(seed, slots=200, width=512)
    for row in range(1, 5):
        Turn(cache, allocator, random_tokens(rng, rng.randint(40, 80)), row).finish()
    free, budget = allocator.pool.free_slots(), allocator.budget
    width = allocator.pool.max_context
    fits = [
        n
        for n in range(1, 3_000)
        if short_group(budget.prompt_need(n), [min(f, width) for f in free]) is None
    ]
    n = max(fits)
    assert n > min(free), f"seed {seed}: setup: {n} tokens, free {free}"
    cached = cache.evictable_size()
    evict_from_tree_cache(cache, n)
    new = allocator.alloc(n)
    allocator.begin_extend([5], [new[:0]], [new], lambda k: cache.evict(EvictParams(num_tokens=k)))
    assert cache.evictable_size() == cached, (
        f"seed {seed}: an extend whose {budget.prompt_need(n)} kept slots fit {free} free "
        f"evicted {cached - cache.evictable_size()} cached tokens (the old rule: {n - min(free)})"
    )


def test_decode_check_evicts_per_group_instead_of_retracting():
    """A decode batch fits when free + evictable covers it in every group: the check evicts
    group slots, not raw tokens (at ratio 0.25 a cached raw token frees a quarter slot)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    seed = random.randrange(10_000)
    rng = random.Random(seed)
    cache, allocator = quarter_tree(seed, slots=150, width=256)
    pool = allocator.pool
    for row in range(6):  # six 60-token turns, one tree node each (distinct first tokens)
        Turn(cache, allocator, [row] + random_tokens(rng, 59, 10), 1).finish()
    free, evictable = pool.free_slots(), cache.evictable_group_slots()
    # More than one node's kept slots (19) beyond free, less than one node's 60 tokens.
    needed = free[0] + rng.randint(20, 60)
    assert needed <= free[0] + evictable[0], f"seed {seed}: setup {free} + {evictable}"
    batch = SimpleNamespace(
        token_to_kv_pool_allocator=allocator,
        tree_cache=cache,
        new_tokens_required_next_decode=lambda selected_indices=None: needed,
    )
    assert ScheduleBatch.check_decode_mem(batch), (
        f"seed {seed}: a decode of {needed} tokens refused with free {free} + evictable {evictable}"
    )
    assert pool.free_slots()[0] >= needed, (
        f"seed {seed}: check passed but the group holds only {pool.free_slots()} free"
    )
