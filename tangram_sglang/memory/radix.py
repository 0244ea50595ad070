"""Radix cache `tangram`: SGLang's own `RadixCache` over logical slots.

The tree keys raw tokens and its values are `TangramAllocator`'s logical slots, so
match, insert, split, lock and evict are SGLang's. A match may end anywhere, also inside
a compressed segment: the logical slots before the cut own exactly the group slots that
hold only earlier tokens for every head and layer (the allocator's owners), so the
request reuses that lossy prefix (fewer kept tokens than a fresh compression of it would
keep, never a later token) and SGLang's split gives head and tail node the group slots
their logical slots own. Two rules keep what a request adds consistent:

- `insert` of a request whose own compressed segment straddles the end of what the tree
  already holds (two requests computed overlapping text with different segment
  boundaries) inserts nothing new and reports the whole key as present, so the caller
  frees the request's own slots: past the cut, such a segment's group slots may still
  hold, for some heads, tokens the tree's prefix already holds. A segment that kept every
  token is cut cleanly anywhere (the allocator records it as one-token segments): its
  tail is inserted as stock SGLang inserts it.
- `cache_unfinished_req` adopts the tree's slots only when the request's own values
  join them cleanly (as above) and the tree's slots cost no more, in any group, than
  the request's own (admission counted the tree's as evictable), and then re-points the
  request's group rows at them (its own duplicates are freed).

A lossy cut costs accuracy where one head kept little before it: the cut keeps, per group,
only the slots every head of the group filled with earlier tokens, so that head empties
the group for all (docs/architecture.md, "What a lossy cut costs": near-copies of a
needle document on SmolLM2). With `--tangram-cut-reuse SHARE` > 0, admission's
match (the one that passes `req`) reuses a cut inside a compressed segment only if every
group keeps at least SHARE of what a fresh compression of the segment's part before the
cut keeps (`TangramAllocator.lossy_cut`); otherwise it ends at the segment's start, a
clean cut, and the request recomputes the rest; its own segment then straddles the
tree's end and is not cached (the first rule above), which is why the default is 0
(always reuse): a shared system prompt judged lossy would cost every later session its
radix hits. Cuts at
segment boundaries (every later turn of a session: the whole history) are exact and never
judged; whether a node ends at a clean cut is kept on the host (`_clean_end`, read at the
split that makes the node), so a clean match reads nothing more. Under tensor
parallelism the ranks hold other heads and would judge a cut differently: refused there.

Eviction and duplicate frees go through `TangramAllocator.free`, which frees every group.
Page size 1 only.

Admission reads, per group, the group slots that evicting every unlocked node would free
(`evictable_group_slots`). It is kept as SGLang keeps `evictable_size_`, incrementally:
each node's group-slot counts are taken when it is created or split (its logical slots
are mapped by then and stay mapped while it lives), and added to or taken from the total
where SGLang moves a node in or out of the evictable set (new leaf, lock, unlock, delete).
`check_evictable_count` compares it with a full walk, once per tree state (the idle check).
A request whose matched prefix leaves it no room can be made to `recompute` it: it neither
matches nor adopts cached slots from then on.

The count rides on private `RadixCache` methods, so a renamed or re-signed one in another
SGLang would make it drift silently (admission would over-promise). `self_test()` runs at
start-up under --kv-compression: every overridden method must exist in SGLang with our
parameters, and insert, split, lock, unlock and evict on a tiny tree must keep the count
equal to a walk; otherwise compression is refused, naming the method.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from tangram_sglang.memory.allocator import TangramAllocator


class TangramRadixCache(RadixCache):
    def __init__(self, params: CacheInitParams) -> None:
        if not isinstance(params.token_to_kv_pool_allocator, TangramAllocator):
            raise TypeError(
                "radix cache 'tangram' needs the TangramAllocator (--kv-compression), got "
                f"{type(params.token_to_kv_pool_allocator).__name__}"
            )
        if params.page_size != 1:
            raise ValueError(f"radix cache 'tangram' serves page size 1, not {params.page_size}")
        self._recompute: weakref.WeakSet = weakref.WeakSet()
        super().__init__(params)

    @property
    def allocator(self) -> TangramAllocator:
        return self.token_to_kv_pool_allocator

    def reset(self) -> None:
        super().reset()
        self._node_slots: dict = {}  # TreeNode -> host [G] group slots of its value
        self._clean_end: dict = {}  # TreeNode -> whether its end is a clean cut (host)
        self._evictable_slots = torch.zeros(self.allocator.pool.num_groups, dtype=torch.int64)
        self._edits, self._checked = 0, -1  # tree edits so far; edits at the last check

    def recompute(self, req) -> None:
        """From now on `req` neither matches nor adopts cached slots: it computes its whole
        prompt itself (admission's way out when its cached prefix leaves it no room)."""
        self._recompute.add(req)

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        if params.req is not None and params.req in self._recompute:
            return self._empty_match_result
        result = super().match_prefix(params)
        node = result.last_device_node
        if self.allocator.cut_reuse <= 0 or params.req is None or self._clean_end.get(node, True):
            return result  # (SGLang's own matches of what a request just inserted pass no req)
        start = self.allocator.lossy_cut(result.device_indices)
        if start is None:
            return result
        # Too lossy: the match ends where the cut segment starts (a clean cut).
        return super().match_prefix(dataclasses.replace(params, key=params.key[:start]))

    def insert(self, params: InsertParams) -> InsertResult:
        if self.disable or params.key is None or params.value is None:
            return super().insert(params)
        if not self._joins_cleanly(params.key, params.value):
            return InsertResult(prefix_len=len(params.key), last_device_node=self.root_node)
        return super().insert(params)

    def cache_unfinished_req(self, req, chunked: bool = False) -> None:
        if self.disable:
            return
        token_ids = req.get_fill_ids()
        kv_indices = self.req_to_token_pool.req_to_token[req.req_pool_idx, : len(token_ids)]
        key = RadixKey(token_ids, req.extra_key, is_bigram=self.is_eagle)
        protected, (present, tree_values) = req.cache_protected_len, self._present(key)
        if (
            req in self._recompute
            or not self.allocator.starts_segment(kv_indices[: len(key)], present)
            or self._adopting_costs_more(kv_indices, protected, present, tree_values)
        ):
            # Keep the request's own slots; its final insert (cache_finished_req) decides.
            req.prefix_indices = kv_indices.to(dtype=torch.int64, copy=True)
            return
        super().cache_unfinished_req(req, chunked)
        if present <= protected:
            return  # the tree took the request's own slots: its row is unchanged
        # The tree's slots replaced the request's duplicates: its row up to every slot
        # allocated for it (under overlap scheduling its next decode token may already be
        # allocated and appended to its group rows).
        row = req.req_pool_idx
        kv = getattr(req, "kv", None)
        allocated = max(len(key), getattr(kv, "kv_allocated_len", 0) or 0)
        self.allocator.rebuild_row(row, self.req_to_token_pool.req_to_token[row, :allocated])

    def evictable_group_slots(self) -> tuple[int, ...]:
        """Per group, the group slots that evicting every unlocked node would free (O(G):
        the count is kept up to date as nodes come, go, lock and unlock)."""
        return tuple(int(x) for x in self._evictable_slots.tolist())

    def check_evictable_count(self) -> str | None:
        """What is wrong with the incremental count (None: it equals a full walk). Walks
        only when the tree changed since the last call: the idle check calls it on every
        turn of the scheduler's idle loop."""
        if self._checked == self._edits:
            return None
        self._checked = self._edits
        counted, walked = self.evictable_group_slots(), self.recount_evictable_group_slots()
        if counted == walked:
            return None
        return f"the radix tree counts {list(counted)} evictable group slots, a walk {list(walked)}"

    def recount_evictable_group_slots(self) -> tuple[int, ...]:
        """The same count by walking the tree and mapping the evictable logical slots
        (O(nodes + evictable tokens)): the check of the incremental count."""
        values, stack = [], [self.root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root_node and node.lock_ref == 0 and node.value is not None:
                values.append(node.value)
        G = self.allocator.pool.num_groups
        if not values:
            return (0,) * G
        return tuple(int(x) for x in self.allocator.group_counts(torch.cat(values)).tolist())

    # ---- the incremental evictable count: SGLang's tree edits, plus the group slots ----

    def _insert_helper(self, node, key, value, priority=0, chunked=False):
        prefix_len, last = super()._insert_helper(node, key, value, priority, chunked)
        if prefix_len < len(key):  # the rest of the key became a new, unlocked leaf
            slots = self.allocator.group_counts(last.value)
            self._node_slots[last] = slots
            self._clean_end[last] = True  # a cached key ends after a whole segment
            self._evictable_slots += slots
        self._edits += 1
        return prefix_len, last

    def _split_node(self, key, child, split_len):
        whole = self._node_slots[child]
        head = super()._split_node(key, child, split_len)
        self._node_slots[head], self._clean_end[head] = self.allocator.split_facts(
            head.value, child.value
        )
        self._node_slots[child] = whole - self._node_slots[head]
        self._edits += 1
        return head  # same lock count as child: the evictable total is unchanged

    def inc_lock_ref(self, node):
        if not self.disable:
            self._evictable_slots -= self._path_slots(node, lock_ref=0)
            self._edits += 1
        return super().inc_lock_ref(node)

    def dec_lock_ref(self, node, params=None):
        if not self.disable:
            self._evictable_slots += self._path_slots(node, lock_ref=1)
            self._edits += 1
        return super().dec_lock_ref(node, params)

    def _delete_leaf(self, node) -> None:
        super()._delete_leaf(node)
        self._evictable_slots -= self._node_slots.pop(node)
        self._clean_end.pop(node, None)
        self._edits += 1

    def _path_slots(self, node, lock_ref: int) -> torch.Tensor:
        """Group slots of the nodes from `node` up to the root whose lock count is
        `lock_ref` (the ones SGLang's lock or unlock walk moves across the boundary)."""
        total = torch.zeros_like(self._evictable_slots)
        while node is not self.root_node:
            if node.lock_ref == lock_ref:
                total += self._node_slots[node]
            node = node.parent
        return total

    # ---- helpers ---------------------------------------------------------------------

    def _present(self, key: RadixKey) -> tuple[int, torch.Tensor]:
        """How much of `key` the tree holds, and those values (no node is split)."""
        node, values, matched = self.root_node, [], 0
        while len(key):
            child = node.children.get(key.child_key(self.page_size))
            if child is None:
                break
            n = child.key.match(key, page_size=self.page_size)
            values.append(child.value[:n])
            matched += n
            if n < len(child.key):
                break
            node, key = child, key[n:]
        if not values:
            return 0, torch.empty((0,), dtype=torch.int64, device=self.device)
        return matched, torch.cat(values)

    def _joins_cleanly(self, key: RadixKey, value: torch.Tensor) -> bool:
        """Whether `value` starts one of its segments where the tree's present prefix of
        `key` ends (any prefix of the tree's values is valid; the request's rest must not
        begin inside one of its own compressed segments)."""
        return self.allocator.starts_segment(value[: len(key)], self._present(key)[0])

    def _adopting_costs_more(
        self, value: torch.Tensor, protected: int, present: int, tree_values: torch.Tensor
    ) -> bool:
        """Whether the tree's slots for the key's `[protected, present)` (`tree_values`, its
        present prefix), which adopting would lock, hold more group slots in some group than
        the request's own there, which it would free (another request cached the same tokens
        segmented differently, e.g. decoded one by one). Adopting then would shrink the room
        admission promised to others."""
        if present <= protected:
            return False
        theirs = self.allocator.group_counts(tree_values[protected:present])
        mine = self.allocator.group_counts(value[protected:present])
        return bool((theirs > mine).any())


def evictable_group_slots(tree_cache, num_groups: int) -> tuple[int, ...]:
    """Per group, slots freed by evicting a tree's whole evictable part (0 without a
    `tangram` tree: the chunk cache holds nothing evictable). Under Fast Fusion a shared
    slot is counted once per owner but freed once, by its last: the tree's count less the
    owners beyond the first (`TangramAllocator.shared`) is what eviction surely frees."""
    if not isinstance(tree_cache, TangramRadixCache) or tree_cache.disable:
        return (0,) * num_groups
    shared = tree_cache.allocator.shared
    return tuple(
        max(0, n - s) for n, s in zip(tree_cache.evictable_group_slots(), shared, strict=True)
    )


OVERRIDDEN = (
    "reset",
    "match_prefix",
    "insert",
    "cache_unfinished_req",
    "_insert_helper",
    "_split_node",
    "inc_lock_ref",
    "dec_lock_ref",
    "_delete_leaf",
)


def override_problems() -> list[str]:
    """Overridden `RadixCache` methods that SGLang lacks or that take other parameters."""
    problems = []
    for name in OVERRIDDEN:
        theirs = RadixCache.__dict__.get(name)
        if theirs is None:
            problems.append(f"SGLang's RadixCache.{name} is gone (tangram-sglang overrides it)")
            continue
        want = list(inspect.signature(theirs).parameters)
        have = list(inspect.signature(TangramRadixCache.__dict__[name]).parameters)
        if want != have:
            problems.append(
                f"SGLang's RadixCache.{name} takes ({', '.join(want)}), tangram-sglang's "
                f"override ({', '.join(have)})"
            )
    return problems


def self_test() -> list[str]:
    """Check the overrides, then run insert, split, lock, unlock and evict on a tiny tree
    and compare the incremental evictable group-slot count with a walk after each; one
    line per problem (empty: the radix cache is sound on this SGLang)."""
    problems = override_problems()
    if problems:
        return problems
    step, method = "build", "__init__"
    try:
        cache, allocator = _tiny_tree()
        start = allocator.pool.free_slots()
        for step, (method, run) in _STEPS.items():
            run(cache, allocator)
            counted, walked = cache.evictable_group_slots(), cache.recount_evictable_group_slots()
            stale = _stale_nodes(cache)
            if counted != walked or stale:
                return [
                    f"radix self-test: after {step} the tree counts {list(counted)} evictable "
                    f"group slots, a walk {list(walked)}, and {stale} node(s) have no or wrong "
                    f"group-slot counts (check SGLang's RadixCache.{method})"
                ]
        if allocator.pool.free_slots() != start:
            return [
                f"radix self-test: {allocator.pool.free_slots()} group slots free after "
                f"evicting everything, {start} at the start (check SGLang's RadixCache.evict)"
            ]
    except Exception as exc:  # a changed SGLang may fail anywhere in its tree code
        return [f"radix self-test: {step} failed: {exc!r} (check SGLang's RadixCache.{method})"]
    return []


FIRST, SECOND = list(range(1, 13)), list(range(1, 6)) + list(range(100, 107))


def _match(cache: TangramRadixCache, tokens: list[int]) -> MatchResult:
    return cache.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))


def _split(cache: TangramRadixCache, allocator: TangramAllocator) -> None:
    """A second request shares 5 tokens with the first: SGLang splits its node."""
    if not hasattr(cache, "_empty_match_result"):
        raise AttributeError("RadixCache has no _empty_match_result (tangram-sglang reads it)")
    prefix = _match(cache, SECOND[:5]).device_indices
    _cache_turn(cache, allocator, SECOND, torch.cat((prefix, allocator.alloc(7))))


_STEPS = {  # step: (the SGLang method our count rides on, the step)
    "insert": (
        "_insert_helper",
        lambda cache, allocator: _cache_turn(cache, allocator, FIRST, allocator.alloc(12)),
    ),
    "split": ("_split_node", _split),
    "lock": (
        "inc_lock_ref",
        lambda cache, _: cache.inc_lock_ref(_match(cache, SECOND).last_device_node),
    ),
    "unlock": (
        "dec_lock_ref",
        lambda cache, _: cache.dec_lock_ref(_match(cache, SECOND).last_device_node),
    ),
    "evict": ("_delete_leaf", lambda cache, _: cache.evict(EvictParams(num_tokens=10**6))),
}


def _stale_nodes(cache: TangramRadixCache) -> int:
    """Nodes whose recorded group-slot counts are missing or differ from their value's."""
    stale, stack = 0, list(cache.root_node.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        recorded = cache._node_slots.get(node)
        actual = cache.allocator.group_counts(node.value)
        stale += recorded is None or not torch.equal(recorded, actual)
    return stale


def _tiny_tree() -> tuple[TangramRadixCache, TangramAllocator]:
    """A one-group tree at ratio 0.5 on the CPU: compressed segments map fewer group slots
    than logical ones, so a wrong count shows."""
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    from tangram_sglang.memory.allocator import TangramKVPool
    from tangram_sglang.memory.budget import BudgetRule
    from tangram_sglang.memory.layout import PoolLayout
    from tangram_sglang.memory.pool import RaggedPool
    from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

    layout = PoolLayout.from_profile(
        uniform_profile(ModelIdentity("self-test", 1, 2, 1, 4, ""), 0.5)
    )
    pool = RaggedPool(layout, [64], torch.float32, "cpu", 4, 64)
    allocator = TangramAllocator(128, TangramKVPool(pool, 128), BudgetRule(sink=1, window=1))
    params = CacheInitParams(
        disable=False,
        req_to_token_pool=ReqToTokenPool(4, 64, "cpu", False),
        token_to_kv_pool_allocator=allocator,
        page_size=1,
    )
    return TangramRadixCache(params), allocator


def _cache_turn(cache: TangramRadixCache, allocator: TangramAllocator, tokens, values) -> None:
    """Extend a request's new tokens as one segment on row 1 and insert it, freeing what
    the tree already held (as SGLang's cache_finished_req does)."""
    done = cache.match_prefix(MatchPrefixParams(key=RadixKey(tokens))).device_indices.numel()
    allocator.budget.reserve("self-test", allocator.budget.prompt_need(len(tokens) - done))
    allocator.budget.bind("self-test", 1)
    allocator.begin_extend([1], [values[:done]], [values[done:]])
    result = cache.insert(InsertParams(key=RadixKey(tokens), value=values))
    allocator.free(values[done : result.prefix_len])
    allocator.release_row(1)


def make_tangram_tree(ctx):
    """`register_radix_cache_backend('tangram', ...)` factory. With --disable-radix-cache
    SGLang still calls the named factory; its default chain then gives the chunk cache,
    which frees through the same allocator."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    if ctx.disable_radix_cache:
        return default_radix_cache_factory(ctx)
    return TangramRadixCache(ctx.params)
