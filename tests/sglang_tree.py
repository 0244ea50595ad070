"""SGLang's own radix-cache tests, run against `TangramRadixCache` at ratio 1.0.

SGLang's tests build their tree with `RadixCache.create_simulated(...)` or
`RadixCache(params)`, over a mock or a plain allocator, with slot values they make up.
`install()` puts `SimulatedTangramTree` in `RadixCache`'s place before they import it, so
the same tests drive a `TangramRadixCache` over a ratio-1.0 `TangramAllocator`:

- every value the tree is given (insert, cache_unfinished_req, cache_finished_req) is
  first mapped to one group slot per group, as a ratio-1.0 extend would have mapped it;
- every free the tree makes goes through the `TangramAllocator` (which frees the group
  slots) and is passed on to the test's own allocator, so a mock records it and a real
  one stays the test's ledger;
- after each test (`pytest_runtest_call`), every tree it built must still count its
  evictable group slots as a full walk does (`check_evictable_count`).

`python tests/sglang_tree.py PYTEST-ARGS...` runs pytest that way; the compatibility gate
(`test_sglang_compat.py`) runs SGLang's radix files so and compares with stock.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import InsertParams, InsertResult
from sglang.srt.mem_cache.cache_init_params import CacheInitParams

from tangram_sglang.memory.allocator import TangramAllocator, TangramKVPool
from tangram_sglang.memory.budget import BudgetRule
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.memory.radix import TangramRadixCache
from tangram_sglang.offline.profile import ModelIdentity, uniform_profile

SLOTS = 8192  # logical and group slots: above every value SGLang's tests make up
ROWS = 16


class MirroredAllocator(TangramAllocator):
    """A ratio-1.0, two-group allocator whose frees are also passed to `mirror`."""

    def __init__(self, mirror) -> None:
        identity = ModelIdentity("sglang-tests", 1, 4, 2, 4, "")
        layout = PoolLayout.from_profile(uniform_profile(identity, 1.0))
        pool = RaggedPool(layout, [SLOTS] * layout.num_groups, torch.float32, "cpu", ROWS, 1024)
        super().__init__(SLOTS, TangramKVPool(pool, SLOTS), BudgetRule(sink=1, window=1))
        self.mirror, self._depth = mirror, 0

    def map_as_extended(self, logical: torch.Tensor) -> None:
        """Map each not yet mapped logical slot of `logical` to one group slot per group
        and take it off the logical free list (what a ratio-1.0 extend does)."""
        index = torch.unique(logical.to(torch.int64).flatten())
        index = index[(index > 0) & (self.logical_to_group[0, index.clamp(0, SLOTS)] == 0)]
        if index.numel() == 0:
            return
        for g, allocator in enumerate(self.pool.allocators):
            self.logical_to_group[g, index] = allocator.alloc(index.numel())
        free = self.logical.free_pages
        self.logical.free_pages = free[~torch.isin(free, index)]

    def free(self, free_index: torch.Tensor) -> None:
        self._passed_on("free", free_index)

    def free_segment(self, free_index: torch.Tensor, *, start_pos: int) -> None:
        self._passed_on("free_segment", free_index, start_pos=start_pos)

    def _passed_on(self, name: str, index: torch.Tensor, **kwargs) -> None:
        """Run our own `name`, then the mirror's (only the outermost call: our
        free_segment calls our free)."""
        self._depth += 1
        try:
            getattr(TangramAllocator, name)(self, index, **kwargs)
        finally:
            self._depth -= 1
        if self._depth == 0 and self.mirror is not None:
            getattr(self.mirror, name)(index, **kwargs)


class SimulatedTangramTree(TangramRadixCache):
    """`RadixCache` as SGLang's tests build it, served by `TangramRadixCache`."""

    built: list[SimulatedTangramTree] = []

    def __init__(self, params: CacheInitParams) -> None:
        allocator = MirroredAllocator(params.token_to_kv_pool_allocator)
        super().__init__(dataclasses.replace(params, token_to_kv_pool_allocator=allocator))
        SimulatedTangramTree.built.append(self)

    @classmethod
    def create_simulated(
        cls,
        disable: bool = False,
        mock_allocator=None,
        page_size: int = 1,
        enable_kv_cache_events: bool = False,
    ) -> SimulatedTangramTree:
        return cls(
            CacheInitParams(
                disable=disable,
                req_to_token_pool=None,
                token_to_kv_pool_allocator=mock_allocator,
                page_size=page_size,
                enable_kv_cache_events=enable_kv_cache_events,
            )
        )

    def insert(self, params: InsertParams) -> InsertResult:
        if not self.disable and params.key is not None:
            value = params.value
            if value is None:  # SGLang's fallback: the token ids are the values
                value = torch.tensor(params.key.token_ids[: len(params.key)], dtype=torch.int64)
            self.allocator.map_as_extended(value)
        return super().insert(params)

    def cache_unfinished_req(self, req, chunked: bool = False) -> None:
        self._map_request(req)
        super().cache_unfinished_req(req, chunked)

    def cache_finished_req(self, req, *args, **kwargs) -> None:
        self._map_request(req)
        super().cache_finished_req(req, *args, **kwargs)

    def _map_request(self, req) -> None:
        if not self.disable and self.req_to_token_pool is not None:
            row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
            self.allocator.map_as_extended(row[: len(req.get_fill_ids())])


class CountCheck:
    """pytest plugin: after each test, every tree it built counts as a walk does."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        SimulatedTangramTree.built.clear()
        result = yield
        problems = [
            problem
            for tree in SimulatedTangramTree.built
            if not tree.disable and (problem := tree.check_evictable_count())
        ]
        SimulatedTangramTree.built.clear()
        assert not problems, "; ".join(problems)
        return result


def install() -> None:
    """Put `SimulatedTangramTree` where SGLang's tests import `RadixCache` from."""
    import sglang.srt.mem_cache.radix_cache as radix_cache

    radix_cache.RadixCache = SimulatedTangramTree


if __name__ == "__main__":
    install()
    sys.exit(pytest.main(sys.argv[1:], plugins=[CountCheck()]))
