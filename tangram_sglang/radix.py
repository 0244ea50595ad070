"""Radix cache `tangram`: SGLang's own `RadixCache` over logical slots, matching only whole
compressed segments.

The tree keys raw tokens and its values are `TangramAllocator`'s logical slots, so
insert, split, lock and evict are SGLang's. Three rules keep every prefix a request
adopts made of complete segments (a group slot is a compressed position whose content
differs per head, so half a segment means nothing):

- `match_prefix` cuts a match back to its longest valid prefix (`valid_prefix_len`) by
  matching again with the key truncated there, so SGLang splits the node at that point.
- `insert` of a request whose own segment straddles the end of what the tree already
  holds (two requests computed overlapping text with different segment boundaries)
  inserts nothing new and reports the whole key as present, so the caller frees the
  request's own slots instead of hanging half a segment in the tree.
- `cache_unfinished_req` adopts the tree's slots only when the joined prefix is valid,
  and then re-points the request's group rows at them (its own duplicates are freed).

Eviction and duplicate frees go through `TangramAllocator.free`, which frees every group.
Page size 1 only.
"""

from __future__ import annotations

import dataclasses

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from tangram_sglang.allocator import TangramAllocator


class TangramRadixCache(RadixCache):
    def __init__(self, params: CacheInitParams) -> None:
        if not isinstance(params.token_to_kv_pool_allocator, TangramAllocator):
            raise TypeError(
                "radix cache 'tangram' needs the TangramAllocator (--kv-compression), got "
                f"{type(params.token_to_kv_pool_allocator).__name__}"
            )
        if params.page_size != 1:
            raise ValueError(f"radix cache 'tangram' serves page size 1, not {params.page_size}")
        super().__init__(params)

    @property
    def allocator(self) -> TangramAllocator:
        return self.token_to_kv_pool_allocator

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        result = super().match_prefix(params)
        matched = result.device_indices
        valid = self.allocator.valid_prefix_len(matched)
        if valid == matched.numel():
            return result
        if valid == 0:
            return self._empty_match_result
        return super().match_prefix(dataclasses.replace(params, key=params.key[:valid]))

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
        if not self._joins_cleanly(key, kv_indices):
            # Keep the request's own slots; its final insert (cache_finished_req) decides.
            req.prefix_indices = kv_indices.to(dtype=torch.int64, copy=True)
            return
        super().cache_unfinished_req(req, chunked)
        row = req.req_pool_idx
        self.allocator.rebuild_row(row, self.req_to_token_pool.req_to_token[row, : len(key)])

    def evictable_group_slots(self) -> tuple[int, ...]:
        """Per group, the group slots that evicting every unlocked node would free.

        Walks the tree (O(nodes + evictable tokens)) and maps the evictable logical slots
        through `logical_to_group`; admission calls it once per candidate request.
        """
        values, stack = [], [self.root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root_node and node.lock_ref == 0 and node.value is not None:
                values.append(node.value)
        G = self.allocator.pool.num_groups
        if not values:
            return (0,) * G
        index = torch.cat(values).to(self.allocator.logical_to_group.device).long()
        counts = (self.allocator.logical_to_group[:, index] > 0).sum(1)
        return tuple(int(x) for x in counts.tolist())

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
        """Whether taking the tree's values for the present prefix of `key` and `value` for
        the rest leaves only complete segments on the path."""
        present, tree_values = self._present(key)
        if self.allocator.valid_prefix_len(tree_values) != present:
            return False
        return self.allocator.starts_segment(value[: len(key)], present)


def make_tangram_tree(ctx):
    """`register_radix_cache_backend('tangram', ...)` factory. With --disable-radix-cache
    SGLang still calls the named factory; its default chain then gives the chunk cache,
    which frees through the same allocator."""
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    if ctx.disable_radix_cache:
        return default_radix_cache_factory(ctx)
    return TangramRadixCache(ctx.params)
