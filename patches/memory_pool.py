"""Touchpoint: memory-pool creation (`KVCacheConfigurator`). Under --kv-compression the KV
bytes SGLang sized for its full-KV token count go to the ragged head-group pools instead
of `MHATokenToKVPool`, behind a `TangramAllocator` of logical slots; SGLang's token
capacity (`max_total_num_tokens`) becomes the logical space.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.config import ConfigError, TangramConfig
from tangram_sglang.memory.allocator import TangramAllocator, build_tangram_pools
from tangram_sglang.memory.layout import rank_heads
from tangram_sglang.offline.capacity import serving_sessions

from . import Hook

logger = logging.getLogger(__name__)

TARGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"


def init_pools(
    original: Any, self: Any, *, sizes: Any, req_to_token_pool: Any, token_to_kv_pool_allocator: Any
) -> Any:
    config = TangramConfig.from_server_args(self.server_args)
    if not config.enabled:
        return original(
            self,
            sizes=sizes,
            req_to_token_pool=req_to_token_pool,
            token_to_kv_pool_allocator=token_to_kv_pool_allocator,
        )
    if self.is_draft_worker or req_to_token_pool is not None:
        raise ConfigError(f"--kv-compression {config.mode} does not support draft workers")
    from sglang.srt.mem_cache.kv_cache_configurator import _InitializedPools

    profile = config.validate(self.server_args.model_path)
    tp_rank, tp_size = _check_model(profile, self)
    req_to_token_pool = self._build_req_to_token_pool(max_num_reqs=sizes.max_running_requests)
    table = req_to_token_pool.req_to_token
    workload = config.serving_workload(table.shape[1])
    kv_pool, allocator = build_tangram_pools(
        profile,
        config.ratio,
        config.scorer_method(profile),
        full_tokens=sizes.max_total_num_tokens,
        dtype=self.kv_cache_dtype,
        device=self.device,
        max_requests=table.shape[0] - 1,
        max_context=table.shape[1],
        workload=workload,
        tp_rank=tp_rank,
        tp_size=tp_size,
        fusion=config.fusion_threshold,
        cut_reuse=config.cut_reuse,  # > 0 is refused with TP (patches/server_args.py)
    )
    pool = kv_pool.pool
    full, tangram = serving_sessions(
        pool.slots, pool.layout.ratios, allocator.rule, sizes.max_total_num_tokens, workload
    )
    logger.info(
        "tangram: sessions that fit at once (%d turns: a %d-token first prompt, %d user + %d "
        "answer tokens per turn; the pools are split for them): %d at full KV, %d in the "
        "head-group pools",
        workload.turns,
        workload.context + workload.user_tokens,
        workload.user_tokens,
        workload.answer_tokens,
        full,
        tangram,
    )
    logger.info(
        "tangram: %s KV bytes for %d full-KV tokens -> %d logical slots; %s; request tables "
        "(req_to_slot [%d, %d, %d] int32 + group_lens) %s bytes",
        f"{pool.total_bytes():,}",
        sizes.max_total_num_tokens,
        allocator.size,
        {k: pool.describe()[k] for k in ("ratios", "slots", "bytes_per_group")},
        *pool.req_to_slot.shape,
        f"{pool.table_bytes():,}",
    )
    return _InitializedPools(
        req_to_token_pool=req_to_token_pool,
        token_to_kv_pool=kv_pool,
        token_to_kv_pool_allocator=allocator,
    )


def _check_model(profile: Any, configurator: Any) -> tuple[int, int]:
    """The profile describes the model the runner loaded: every layer, and this TP rank's
    share of the kv heads. Returns (rank, ranks) of attention tensor parallelism."""
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    rank, ranks = parallel.attn_tp_rank, parallel.attn_tp_size
    m = profile.model
    try:
        own = len(rank_heads(rank, m.num_kv_heads, ranks))
    except ValueError as e:
        raise ConfigError(f"--kv-compression with tensor parallelism: {e}") from None
    kv_heads = configurator.model_config.get_num_kv_heads(ranks)
    layers = configurator.layer_info.num_effective_layers
    if (kv_heads, layers, configurator.model_config.head_dim) != (own, m.num_layers, m.head_dim):
        raise ConfigError(
            f"--kv-compression: the loaded model has {layers} layers x {kv_heads} kv heads of "
            f"dim {configurator.model_config.head_dim} on each of {ranks} rank(s), the profile "
            f"describes {m.num_layers} x {m.num_kv_heads} of dim {m.head_dim} ({own} per rank)"
        )
    return rank, ranks


def configure(original: Any, self: Any, **kwargs: Any) -> Any:
    result = original(self, **kwargs)
    allocator = result.token_to_kv_pool_allocator
    if isinstance(allocator, TangramAllocator):
        return msgspec.structs.replace(result, max_total_num_tokens=allocator.size)
    return result


HOOKS = (
    Hook(f"{TARGET}._init_pools", init_pools, HookType.AROUND),
    Hook(f"{TARGET}.configure", configure, HookType.AROUND),
)
