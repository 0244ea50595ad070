"""SGLang attention backend `tangram` (torch path): attention over ragged head groups, with
compression per layer, inside the layer.

Extend, per request and per head group: the new tokens attend to the group's compressed
prefix (the row's group slots) plus themselves, causally (`reference.ragged_extend`
semantics), computed with SGLang torch_native's own call (`scaled_dot_product_attention`
with `enable_gqa` over a query padded to the key length, `is_causal`), so at ratio 1.0
the result is stock torch_native's. Then the segment's K/V go to its group slots: when it
is compressed, the configured scorer scores the new tokens (post-RoPE q/k/v) and
`select` keeps exactly each group's budget per head (`write_selected`); otherwise every
token goes to every group.

Decode: the token's K/V go to its new slot in every group, then each head attends over
its group's slots (`reference.ragged_decode` semantics).

The slots come from the per-forward state the allocation hooks wrote on `TangramKVPool`;
this backend only reads it. The Triton kernels replace this path in a later slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType
from torch.nn.functional import scaled_dot_product_attention

from tangram_sglang.allocator import ExtendSegment, ForwardState, TangramAllocator, TangramKVPool
from tangram_sglang.compress import SCORERS, select
from tangram_sglang.compress.write import write_selected

BACKEND = "tangram"


def _pick(x: torch.Tensor, dim: int, index: Sequence[int]) -> torch.Tensor:
    """`x` restricted to `index` along `dim`: a view when the indices are a range (as stock
    torch_native's tensors are), a gather otherwise."""
    if list(index) == list(range(index[0], index[0] + len(index))):
        return x.narrow(dim, index[0], len(index))
    return x.index_select(dim, torch.tensor(index, dtype=torch.long, device=x.device))


class TangramAttnBackend(AttentionBackend):
    def __init__(self, model_runner, method: str | None = None) -> None:
        super().__init__()
        kv_pool = model_runner.token_to_kv_pool
        allocator = model_runner.token_to_kv_pool_allocator
        if not isinstance(kv_pool, TangramKVPool) or not isinstance(allocator, TangramAllocator):
            raise ValueError(
                "attention backend 'tangram' serves the ragged head-group pools only: start "
                "the server with --kv-compression tangram or uniform"
            )
        self.kv_pool = kv_pool
        self.pool = kv_pool.pool
        self.allocator = allocator
        self.scorer = SCORERS[method or kv_pool.method]()
        self.state: ForwardState | None = None
        layout = self.pool.layout
        # Per layer, per group: kv heads stored there (ascending).
        self.members = [
            [layout.heads[g][layer] for g in range(layout.num_groups)]
            for layer in range(layout.num_layers)
        ]

    # ---- metadata --------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.state = None
            return
        if mode.is_mixed() or not (mode.is_decode() or mode.is_extend()):
            raise NotImplementedError(f"attention backend 'tangram' does not run {mode} batches")
        state, self.kv_pool.forward_state = self.kv_pool.forward_state, None
        expected = "decode" if mode.is_decode() else "extend"
        rows = tuple(int(r) for r in forward_batch.req_pool_indices.tolist())
        if state is None or state.mode != expected or state.rows != rows:
            raise RuntimeError(
                f"tangram: the {expected} forward of rows {rows} has no matching allocation "
                f"state (found {None if state is None else (state.mode, state.rows)}); the "
                "allocation hooks must run right before each forward (overlap scheduling off)"
            )
        self.state = state

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    # ---- forward ---------------------------------------------------------------------

    def _check_layer(self, layer, k, save_kv_cache: bool) -> None:
        if not save_kv_cache or k is None:
            raise NotImplementedError(
                "attention backend 'tangram' must write the layer's new K/V itself "
                "(save_kv_cache=False or shared K/V is not supported)"
            )
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError("attention backend 'tangram' serves causal decoders only")
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            raise NotImplementedError("attention backend 'tangram' has no sliding-window layers")
        if layer.qk_head_dim != layer.v_head_dim:
            raise NotImplementedError("attention backend 'tangram' needs equal K and V head dims")

    def _shapes(self, q, k, v, layer):
        d = layer.qk_head_dim
        return (
            q.reshape(-1, layer.tp_q_head_num, d),
            k.reshape(-1, layer.tp_k_head_num, d),
            v.reshape(-1, layer.tp_v_head_num, d),
        )

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._check_layer(layer, k, save_kv_cache)
        q_, k_, v_ = self._shapes(q, k, v, layer)
        out = torch.empty_like(q_)
        start = 0
        for segment in self.state.segments:
            tokens = slice(start, start + segment.extend_len)
            start += segment.extend_len
            out[tokens] = self._extend_attention(q_[tokens], k_[tokens], v_[tokens], layer, segment)
            self._store_segment(q_[tokens], k_[tokens], v_[tokens], layer.layer_id, segment)
        return out.reshape(q_.shape[0], -1)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._check_layer(layer, k, save_kv_cache)
        q_, k_, v_ = self._shapes(q, k, v, layer)
        slots = self.state.decode_slots
        self.pool.write_tokens(layer.layer_id, [slots[g] for g in range(len(slots))], k_, v_)
        query = q_.movedim(0, 1)  # [Hq, B, D], as torch_native slices it
        out = torch.empty_like(q_)
        gqa = layer.tp_q_head_num // layer.tp_k_head_num
        for b, row in enumerate(self.state.rows):
            for g, heads in enumerate(self.members[layer.layer_id]):
                if not heads:
                    continue
                q_heads = [h * gqa + i for h in heads for i in range(gqa)]
                length = int(self.allocator.row_lens[g, row])
                keys, values = self._group_kv(layer.layer_id, g, row, length)
                o = scaled_dot_product_attention(
                    _pick(query, 0, q_heads)[:, b : b + 1].unsqueeze(0),
                    keys.movedim(0, 1).unsqueeze(0),
                    values.movedim(0, 1).unsqueeze(0),
                    enable_gqa=gqa > 1,
                    scale=layer.scaling,
                )
                out[b : b + 1, q_heads] = o.squeeze(0).movedim(1, 0).to(out.dtype)
        return out.reshape(q_.shape[0], -1)

    # ---- pieces ----------------------------------------------------------------------

    def _group_kv(self, layer: int, g: int, row: int, length: int):
        """K and V `[length, n_{g,l}, D]` of the row's first `length` slots in group g."""
        slots = self.pool.req_to_slot[g, row, :length].long()
        return self.pool.k_buffer(g, layer)[slots], self.pool.v_buffer(g, layer)[slots]

    def _extend_attention(self, q, k, v, layer, segment: ExtendSegment) -> torch.Tensor:
        """`[n, Hq, D]`: new tokens over each group's prefix slots plus themselves (causal)."""
        n = q.shape[0]
        out = torch.empty_like(q)
        gqa = layer.tp_q_head_num // layer.tp_k_head_num
        for g, heads in enumerate(self.members[layer.layer_id]):
            if not heads:
                continue
            q_heads = [h * gqa + i for h in heads for i in range(gqa)]
            prefix = segment.prefix_lens[g]
            k_pre, v_pre = self._group_kv(layer.layer_id, g, segment.row, prefix)
            keys = torch.cat((k_pre.to(k.dtype), _pick(k, 1, heads))).movedim(0, 1)
            values = torch.cat((v_pre.to(v.dtype), _pick(v, 1, heads))).movedim(0, 1)
            query = q.new_zeros((len(q_heads), prefix + n, q.shape[2]))
            query[:, prefix:] = _pick(q, 1, q_heads).movedim(0, 1)
            o = scaled_dot_product_attention(
                query.unsqueeze(0),
                keys.unsqueeze(0),
                values.unsqueeze(0),
                enable_gqa=gqa > 1,
                scale=layer.scaling,
                is_causal=True,
            )
            out[:, q_heads] = o.squeeze(0)[:, prefix:].movedim(1, 0)
        return out

    def _store_segment(self, q, k, v, layer: int, segment: ExtendSegment) -> None:
        """Write the segment's K/V to its group slots: the selected tokens, or all of them."""
        if not segment.compress:
            self.pool.write_tokens(layer, list(segment.slots), k, v)
            return
        scores = self.scorer.score(q, k, v)
        group_of = self.pool.head_group[layer].tolist()
        kept = [segment.kept[g] for g in group_of]
        selected = select(scores, kept, self.allocator.rule)
        write_selected(self.pool, layer, segment.row, k, v, selected, list(segment.slots))


def create_tangram_backend(model_runner) -> TangramAttnBackend:
    """`register_attention_backend('tangram')` factory."""
    return TangramAttnBackend(model_runner)
