"""A stand-in for `flashinfer` on machines without it (CPU): the one wrapper the FlashInfer
path calls, computing what FlashInfer's paged decode computes, in float64 torch, from the
page tables it was planned with (read live at `run`, as FlashInfer's plain mode reads the
buffers it was planned on). The log-sum-exp is base 2, as FlashInfer returns it."""

from __future__ import annotations

import math
import sys
import types

import torch


class BatchDecodeWithPagedKVCacheWrapper:
    def __init__(self, workspace: torch.Tensor, layout: str, **_: object) -> None:
        assert layout == "NHD"
        self.planned: tuple | None = None

    def plan(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        last_page_len: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        *,
        sm_scale: float,
        **_: object,
    ) -> None:
        self.planned = (indptr, indices, last_page_len, num_qo_heads // num_kv_heads, sm_scale)

    def run(
        self,
        q: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        out: torch.Tensor,
        lse: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor:
        indptr, indices, last_page_len, gqa, sm_scale = self.planned
        k_pages, v_pages = kv
        page = k_pages.shape[1]
        for i in range(q.shape[0]):
            pages = indices[int(indptr[i]) : int(indptr[i + 1])].long()
            last = int(last_page_len[i])
            assert len(pages) >= 1 and 1 <= last <= page, (
                f"request {i}: {len(pages)} pages, last page length {last} (FlashInfer reads "
                f"1..{page} tokens of a last page, and at least one page)"
            )
            count = (len(pages) - 1) * page + last
            keys = k_pages[pages].flatten(0, 1)[:count].double()  # [count, n, D]
            values = v_pages[pages].flatten(0, 1)[:count].double()
            for h in range(q.shape[1]):
                logits = keys[:, h // gqa] @ q[i, h].double() * sm_scale
                weights = torch.softmax(logits, 0)
                out[i, h] = (weights @ values[:, h // gqa]).to(out.dtype)
                if return_lse:
                    lse[i, h] = float(torch.logsumexp(logits, 0)) / math.log(2)
        return out


def install() -> None:
    """Make `import flashinfer` find this stand-in."""
    module = types.ModuleType("flashinfer")
    module.BatchDecodeWithPagedKVCacheWrapper = BatchDecodeWithPagedKVCacheWrapper
    sys.modules["flashinfer"] = module
