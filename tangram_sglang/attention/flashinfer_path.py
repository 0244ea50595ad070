"""Ragged decode through FlashInfer's paged decode: the comparison baseline and fallback.

FlashInfer attends over one paged cache with one head count, so ragged groups map to one
`BatchDecodeWithPagedKVCacheWrapper` per (group, heads of that group in a layer) shape:
group g's layer-l buffer `[S_g + P, n_{g,l}, D]` viewed as pages `[pages, P, n, D]`,
page ids `slot // P` read from `req_to_slot`, the layer's q heads of those kv heads
gathered in and the outputs scattered back.

Two schedules (`mode`):
- `replan`: FlashInfer's own split-kv schedule, recomputed by `plan()` every step for
  every shape (what any length-driven planner must do): the baseline for AOT. Like
  SGLang's FlashInfer backend for GQA >= 4, it uses the tensor-core decode kernels.
- `aot`: the splits come from `AotPlan`. Each request's pages in group g are cut into
  S_g chunks (the same chunk rule as our Triton kernel); each chunk is a virtual
  request of FlashInfer's tensor-core decode with split-kv disabled, whose plan depends
  only on the virtual batch size, so it is computed once per batch size and reused.
  Per step only the device-side metadata (virtual indptr, last page lengths, page ids)
  is rebuilt from `group_lens`/`req_to_slot` with torch ops (no host sync, capturable
  in a CUDA graph); the chunk partials are combined by `merge_partials`.

Both keep a fixed batch size per instance; make one per captured batch size. An empty
chunk becomes a one-token request on the padding page 0, masked out of the merge.
flashinfer is imported lazily: this module loads on CPU, where the path is unavailable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tangram_sglang.attention.aot_plan import AotPlan
from tangram_sglang.kernels.decode import merge_partials
from tangram_sglang.memory.ragged_kv import RaggedKV

MODES = ("replan", "aot")
WORKSPACE_BYTES = 256 * 1024 * 1024


def flashinfer_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class _Shape:
    """One (layer, group) slice: its paged K/V views and its q heads."""

    group: int
    heads: int
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    q_index: torch.Tensor


class _GroupMeta:
    """Page-table buffers of one group, shared by all of the group's wrappers."""

    def __init__(self, rows: int, max_pages: int, device: torch.device) -> None:
        self.indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
        self.indices = torch.zeros(max_pages + 1, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(rows, dtype=torch.int32, device=device)
        self.empty = torch.zeros(rows, dtype=torch.bool, device=device)


class FlashInferRaggedDecode:
    """Ragged decode of a fixed batch size through FlashInfer (see the module docstring)."""

    def __init__(
        self,
        layers: Sequence[RaggedKV],
        plan: AotPlan,
        capacity: Sequence[int],
        page_size: int,
        batch: int,
        max_context: int,
        sm_scale: float,
        mode: str = "aot",
        q_dtype: torch.dtype | None = None,
        workspace: torch.Tensor | None = None,
    ) -> None:
        import flashinfer

        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if len(layers) != plan.num_layers:
            raise ValueError(f"{len(layers)} layers given for a plan of {plan.num_layers}")
        if len(capacity) != len(plan.ratios):
            raise ValueError(f"capacity has {len(capacity)} entries for {len(plan.ratios)} groups")
        if any(c % page_size for c in capacity):
            raise ValueError(f"capacity {list(capacity)} must be whole pages of {page_size}")
        if batch < 1:
            raise ValueError(f"batch {batch} must be >= 1")
        self.plan, self.mode, self.batch = plan, mode, batch
        self.page_size, self.sm_scale = page_size, sm_scale
        self.max_context = max_context
        device = layers[0].k.device
        self.device = device
        self.dtype = layers[0].k.dtype
        self.q_dtype = q_dtype or self.dtype
        self.head_dim = layers[0].k.shape[1]
        self.req_to_slot = layers[0].req_to_slot
        self.group_lens = layers[0].group_lens
        self.shapes = [self._layer_shapes(layer, kv, capacity) for layer, kv in enumerate(layers)]
        groups = len(plan.ratios)
        bucket = plan.bucket(batch)
        self.splits = plan.splits[bucket] if mode == "aot" else (1,) * groups
        self.max_pages = -(-max_context // page_size)
        self.meta = [
            _GroupMeta(batch * self.splits[g], batch * (self.max_pages + self.splits[g]), device)
            for g in range(groups)
        ]
        self.workspace = (
            workspace
            if workspace is not None
            else torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        )
        self.wrappers = {}
        for shapes in self.shapes:
            for s in shapes:
                key = (s.group, s.heads)
                if key in self.wrappers:
                    continue
                m = self.meta[s.group]
                # replan: FlashInfer's CUDA-graph mode (fixed buffers, padded split-kv grid),
                # as SGLang runs it. aot: plain mode, planned once on our own buffers, which
                # run() then reads live; its unsplit grid is exactly the virtual batch (the
                # CUDA-graph mode pads that grid and, with split-kv disabled, leaves the
                # padding blocks' request ids unset: seen as illegal addresses on the H100).
                graph_mode = mode == "replan"
                self.wrappers[key] = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace,
                    "NHD",
                    use_cuda_graph=graph_mode,
                    use_tensor_cores=True,
                    paged_kv_indptr_buffer=m.indptr if graph_mode else None,
                    paged_kv_indices_buffer=m.indices if graph_mode else None,
                    paged_kv_last_page_len_buffer=m.last_page_len if graph_mode else None,
                )
        gqa = plan.gqa
        self._out = {
            key: torch.empty(
                (batch * self.splits[key[0]], key[1] * gqa, self.head_dim),
                dtype=self.q_dtype,
                device=device,
            )
            for key in self.wrappers
        }
        self._lse = {
            key: torch.empty(
                (batch * self.splits[key[0]], key[1] * gqa), dtype=torch.float32, device=device
            )
            for key in self.wrappers
        }
        self._merged = {
            key: torch.empty(
                (batch, key[1] * gqa, self.head_dim), dtype=self.q_dtype, device=device
            )
            for key in self.wrappers
        }
        self._planned = False

    def _layer_shapes(self, layer: int, kv: RaggedKV, capacity: Sequence[int]) -> list[_Shape]:
        base = kv.head_base.cpu().tolist()
        gqa, p, dim = self.plan.gqa, self.page_size, self.head_dim
        shapes = []
        for g in range(len(capacity)):
            members = [h for h, gg in enumerate(self.plan.group_of[layer]) if gg == g]
            if not members:
                continue
            n = len(members)
            start = min(base[h] for h in members)
            rows = capacity[g] * n
            k = kv.k[start : start + rows].view(capacity[g] // p, p, n, dim)
            v = kv.v[start : start + rows].view(capacity[g] // p, p, n, dim)
            q_index = torch.tensor(
                [h * gqa + i for h in members for i in range(gqa)],
                dtype=torch.long,
                device=kv.k.device,
            )
            shapes.append(_Shape(g, n, k, v, q_index))
        return shapes

    # ---- per-step metadata ------------------------------------------------------------

    def _page_table(self, g: int, req_rows: torch.Tensor) -> torch.Tensor:
        """`[B, max_pages]` page ids of each request in group g (slot // page_size)."""
        p = self.page_size
        table = self.req_to_slot[g, req_rows.long(), : self.max_pages * p : p]
        return (table // p).to(torch.int32)

    def _scatter_pages(
        self, g: int, src: torch.Tensor, count: torch.Tensor, start: torch.Tensor
    ) -> None:
        """indices[start[v] + j] = src[v, j] for j < count[v] (rows v of src), compactly."""
        meta = self.meta[g]
        col = torch.arange(src.shape[1], device=self.device)
        sink = meta.indices.shape[0] - 1
        dst = torch.where(col[None, :] < count[:, None], start[:, None] + col[None, :], sink)
        meta.indices.scatter_(0, dst.reshape(-1), src.reshape(-1))

    def prepare(self, req_rows: torch.Tensor, lens_host: torch.Tensor | None = None) -> None:
        """Per-step metadata. `aot`: device-only (capturable). `replan`: also `plan()` for
        every shape, which needs the host's lengths `lens_host` `[G, B]` (as SGLang keeps
        `seq_lens_cpu`)."""
        if req_rows.shape != (self.batch,):
            raise ValueError(f"req_rows must be [{self.batch}], got {tuple(req_rows.shape)}")
        if self.mode == "aot":
            self._prepare_aot(req_rows)
            if not self._planned:
                self._plan_all()  # once, on the buffers just filled; never again
            return
        if lens_host is None:
            raise ValueError("replan mode needs lens_host [G, B] (the host's group lengths)")
        self._prepare_replan(req_rows, torch.as_tensor(lens_host).to(torch.int64))
        self._plan_all()

    def _prepare_aot(self, req_rows: torch.Tensor) -> None:
        """Virtual request (b, s) = chunk s of request b's pages (the kernel's chunk rule).
        An empty chunk gets one page of the padding page 0 (FlashInfer is not asked to
        attend over nothing) and is masked out of the merge by `empty`."""
        p = self.page_size
        for g, meta in enumerate(self.meta):
            splits = self.splits[g]
            lens = self.group_lens[g, req_rows.long()].long()
            npages = (lens + p - 1) // p
            chunk = torch.clamp((lens + splits - 1) // splits, min=self.plan.min_chunk)
            chunk_pages = (chunk + p - 1) // p
            s = torch.arange(splits, device=self.device)
            first = torch.minimum(s[None, :] * chunk_pages[:, None], npages[:, None])
            last = torch.minimum((s[None, :] + 1) * chunk_pages[:, None], npages[:, None])
            empty = last <= first
            count = torch.where(empty, 1, last - first).reshape(-1)
            ends = torch.cumsum(count, 0)
            meta.indptr[1:].copy_(ends)
            meta.indptr[:1].zero_()
            width = self._chunk_pages_bound(splits)
            j = torch.arange(width, device=self.device)
            col = (first[:, :, None] + j).clamp(max=self.max_pages - 1).reshape(self.batch, -1)
            src = torch.gather(self._page_table(g, req_rows), 1, col).view(-1, width)
            src = torch.where(empty.reshape(-1, 1), 0, src)
            self._scatter_pages(g, src, count, ends - count)
            tail = lens - (npages - 1) * p
            last_len = torch.where(last == npages[:, None], tail[:, None], p)
            meta.last_page_len.copy_(torch.where(empty, 1, last_len).reshape(-1))
            meta.empty.copy_(empty.reshape(-1))

    def _chunk_pages_bound(self, splits: int) -> int:
        """Most pages one chunk can hold at this instance's max_context (host-known)."""
        longest = -(-self.max_context // splits)
        return -(-max(longest, self.plan.min_chunk) // self.page_size) + 1

    def _prepare_replan(self, req_rows: torch.Tensor, lens_host: torch.Tensor) -> None:
        p = self.page_size
        self._host = []
        for g in range(len(self.meta)):
            lens = lens_host[g]
            npages = (lens + p - 1) // p
            indptr = torch.zeros(self.batch + 1, dtype=torch.int32)
            indptr[1:] = torch.cumsum(npages, 0)
            last = torch.where(npages > 0, lens - (npages - 1) * p, 0).to(torch.int32)
            npages_dev = npages.to(self.device, non_blocking=True)
            start_dev = indptr[:-1].to(self.device, non_blocking=True).long()
            self._scatter_pages(g, self._page_table(g, req_rows), npages_dev, start_dev)
            self._host.append((indptr, last, int(indptr[-1])))

    def _plan_all(self) -> None:
        gqa = self.plan.gqa
        for (g, n), wrapper in self.wrappers.items():
            meta = self.meta[g]
            if self.mode == "aot":  # the schedule depends on the virtual batch size only
                indptr, indices, last = meta.indptr, meta.indices, meta.last_page_len
                extra = {"disable_split_kv": True}
            else:
                indptr, last, total = self._host[g]
                indices = meta.indices[:total]
                extra = {}
            wrapper.plan(
                indptr,
                indices,
                last,
                n * gqa,
                n,
                self.head_dim,
                self.page_size,
                q_data_type=self.q_dtype,
                kv_data_type=self.dtype,
                sm_scale=self.sm_scale,
                **extra,
            )
        self._planned = True

    # ---- attention ----------------------------------------------------------------------

    def run(self, layer: int, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Decode attention of `layer` for q `[B, Hq, D]` into out `[B, Hq, D]`."""
        if q.shape[0] != self.batch:
            raise ValueError(f"q has batch {q.shape[0]}, this instance serves {self.batch}")
        for s in self.shapes[layer]:
            key = (s.group, s.heads)
            splits = self.splits[s.group]
            q_g = q.index_select(1, s.q_index)
            if splits > 1:  # virtual request (b, s) at row b * splits + s
                q_g = q_g[:, None].expand(-1, splits, -1, -1).reshape(-1, *q_g.shape[1:])
            o, lse = self._out[key], self._lse[key]
            if self.mode == "replan":
                self.wrappers[key].run(q_g, (s.k_pages, s.v_pages), out=o)
            else:
                self.wrappers[key].run(q_g, (s.k_pages, s.v_pages), out=o, lse=lse, return_lse=True)
                lse.masked_fill_(self.meta[s.group].empty[:, None], float("-inf"))
                merged = self._merged[key]
                nq = s.heads * self.plan.gqa
                merge_partials(
                    o,
                    lse,
                    None,
                    merged,
                    None,
                    partial_strides=(
                        splits * nq * self.head_dim,
                        self.head_dim,
                        nq * self.head_dim,
                    ),
                    lse_strides=(splits * nq, 1, nq),
                    gqa=1,
                    max_splits=splits,
                    uniform_splits=splits,
                    lse_base2=True,
                )
                o = merged
            out.index_copy_(1, s.q_index, o)
        return out
