"""`RaggedKV`: the ragged storage contract of one layer, as attention reads it.

Kept apart from `pool.py` (which builds it, on SGLang's allocators) so the kernels, the
FlashInfer path and the kernel benchmark use this one definition without importing SGLang.

An FP8 pool (`--kv-cache-dtype fp8_e4m3` or `fp8_e5m2`) follows SGLang's scale convention
(`MHATokenToKVPool.set_kv_buffer`, the Triton backend's `k_descale`): a layer with
checkpoint scales stores `x / scale` in FP8 and attention reads `stored * scale`; a layer
without them uses scale 1. The pool keeps the FP8 values themselves (no scale tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RaggedKV:
    """What attention reads for one layer (the ragged storage contract).

    `k`, `v`: the layer's storages `[rows, head_dim]`; `head_group`, `head_base`,
    `head_stride`: `[Hkv]` per-head tables; `req_to_slot` `[G, R+1, C]` int32 and
    `group_lens` `[G, R+1]` int32: request rows' slots per group and how many are written;
    `k_scale`, `v_scale`: what a stored value is multiplied by when read (module docstring).
    """

    k: torch.Tensor
    v: torch.Tensor
    head_group: torch.Tensor
    head_base: torch.Tensor
    head_stride: torch.Tensor
    req_to_slot: torch.Tensor
    group_lens: torch.Tensor
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def num_kv_heads(self) -> int:
        return self.head_group.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k.shape[1]

    def head_slots(self, head: int, row: int) -> torch.Tensor:
        """Written slots (token order) of request row `row` as kv head `head` sees them."""
        g = int(self.head_group[head])
        return self.req_to_slot[g, row, : int(self.group_lens[g, row])].long()

    def head_rows(self, head: int, slots: torch.Tensor) -> torch.Tensor:
        """Storage rows of kv head `head` at `slots`."""
        return self.head_base[head] + slots.long() * self.head_stride[head].long()


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`x` as the pool stores it: `x / scale` in `dtype` (a plain cast without a scale)."""
    return (x / scale if scale != 1.0 else x).to(dtype)


def dequantize(stored: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """What attention reads of `stored`: `stored * scale` in `dtype`."""
    out = stored.to(dtype)
    return out * scale if scale != 1.0 else out
