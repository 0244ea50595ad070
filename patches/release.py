"""Touchpoint: a request releasing its KV (`mem_cache.common.release_kv_cache`). SGLang
caches or frees its logical slots (which frees their group slots) and returns its
`req_pool_idx`; the row's group lengths are reset with it. A finished request's turn is
counted against the session shape the pools were split for (`memory/split_check.py`),
which logs, when the traffic has another shape, the `--tangram-workload` it has.
"""

from __future__ import annotations

import logging
from typing import Any

from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.memory.allocator import TangramAllocator

from . import Hook

logger = logging.getLogger(__name__)


def release_kv_cache(original: Any, req: Any, tree_cache: Any, *args: Any, **kwargs: Any) -> Any:
    row = req.req_pool_idx
    result = original(req, tree_cache, *args, **kwargs)
    allocator = tree_cache.token_to_kv_pool_allocator
    if row is not None and isinstance(allocator, TangramAllocator):
        allocator.release_row(row)
        done = req.finished() and not isinstance(req.finished_reason, FINISH_ABORT)
        if allocator.split_check is not None and done:
            cached = int(req.cached_tokens or 0)
            line = allocator.split_check.observe(
                len(req.origin_input_ids) - cached, len(req.output_ids), cached
            )
            if line:
                logger.warning(line)
    return result


HOOKS = (Hook("sglang.srt.mem_cache.common.release_kv_cache", release_kv_cache, HookType.AROUND),)
