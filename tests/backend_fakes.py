"""Stand-ins for what SGLang hands an attention backend (model runner, ForwardBatch,
RadixAttention layer), shared by the backend tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from tangram_sglang.memory.allocator import TangramAllocator


def fake_layer(layer_id: int, num_q_heads: int, num_kv_heads: int, head_dim: int):
    """A causal decoder `RadixAttention` layer as the backend reads it."""
    return SimpleNamespace(
        layer_id=layer_id,
        tp_q_head_num=num_q_heads,
        tp_k_head_num=num_kv_heads,
        tp_v_head_num=num_kv_heads,
        qk_head_dim=head_dim,
        v_head_dim=head_dim,
        head_dim=head_dim,
        scaling=head_dim**-0.5,
        is_cross_attention=False,
        attn_type=AttentionType.DECODER,
        sliding_window_size=-1,
    )


def fake_batch(mode: ForwardMode, rows, state=None):
    """A `ForwardBatch` of request rows `rows`, carrying the allocation `state` as SGLang's
    batch does under the plugin (patches/allocation.py)."""
    extend_lens = None
    if state is not None and state.mode == "extend":
        extend_lens = [s.extend_len for s in state.segments]
    return SimpleNamespace(
        forward_mode=mode,
        req_pool_indices=torch.tensor(rows),
        batch_size=len(rows),
        extend_seq_lens_cpu=extend_lens,
        tangram_state=state,
    )


def fake_runner(allocator: TangramAllocator, num_q_heads: int):
    """A model runner holding the tangram pools, for a model with `num_q_heads` q heads."""
    kv_heads = allocator.pool.layout.num_kv_heads
    return SimpleNamespace(
        token_to_kv_pool=allocator.get_kvcache(),
        token_to_kv_pool_allocator=allocator,
        model_config=SimpleNamespace(
            num_attention_heads=num_q_heads, get_total_num_kv_heads=lambda: kv_heads
        ),
    )
