"""SGLang attention backend `tangram` (torch path): attention over ragged head groups, with
compression per layer, inside the layer.

Extend, per request and per head group: the new tokens attend to the group's compressed
prefix (the row's group slots) plus themselves, causally (`reference.ragged_extend`
semantics), computed with SGLang torch_native's own call (`scaled_dot_product_attention`
with `enable_gqa` over a query padded to the key length, `is_causal`), so at ratio 1.0
the result is stock torch_native's. Then the segments' K/V go to their group slots: when
some segment is compressed, the configured scorer scores every segment's new tokens
(post-RoPE q/k/v) in one batched pass (`Scorer.score_batch`) and `select_batch` keeps
exactly each group's budget per head (all n tokens of a segment that does not compress);
otherwise every token goes to every group. Both paths select with these same batched
calls, per layer with device ops only (the index tables they read depend only on host-known
counts and are built once per forward, in `init_forward_metadata` and `TritonPath.stage`,
or by the first layer's device ops): a per-segment loop costs tens of small launches per
segment and layer, and any host read of the device a stall per layer.

After the last layer, each compressed segment's group slots are re-owned (`KeptOwners`,
`TangramAllocator.assign_owners`): group slot j moves to the logical slot of the latest
token any layer's member head keeps there, so a radix match that ends inside the segment
reuses exactly the group slots that hold only earlier tokens.

Decode: the token's K/V go to its new slot in every group, then each head attends over
its group's slots (`reference.ragged_decode` semantics). The torch path gathers each
group's slots for the whole batch once per layer (`_TorchDecodeBatch`, built from the
allocator's host lengths) and gives each request its contiguous share: the tensors
torch_native's per-request gather makes, at a quarter of the Python work per group.

FP8 pools (`--kv-cache-dtype fp8_*`): new K/V are stored `quantize`d with the layer's
scales (SGLang's convention, `ragged_kv`); the scorer reads the unquantized K; reads are
dequantized. An extend's own new tokens are attended as stored on the torch path (stock
torch_native writes them first and reads them back) and unquantized on the Triton path
(as SGLang's Triton extend kernel does).

The slots come from the per-forward state the allocation hooks attached to SGLang's batch
(`patches/allocation.py`); this backend only reads it.

Three paths compute the same function (`--tangram-kernels`, `kernels=` or
`TANGRAM_BACKEND_KERNELS`; default triton on CUDA, torch elsewhere): the torch path above
(CPU serving; exact torch_native at ratio 1.0); `TritonPath`: AOT ragged decode, one
extend launch for the whole batch, one scatter launch for the kept tokens (its arguments
built on the device from the batched selection, `SelectionScatter`); and
`FlashInferPath`: its decode attention through FlashInfer's paged decode with the AOT
splits. All read the lengths the allocator keeps: decode the pool's `group_lens` (the
allocator writes them together with its host mirror `row_lens` wherever a row's length
changes), extend the prefix lengths of the forward state (`group_lens` already counts the
new segment's slots).

CUDA graphs (Triton and FlashInfer paths, decode only; `TANGRAM_CUDA_GRAPH=0` keeps them
off). SGLang's decode graph runner calls `init_cuda_graph_state` once, then per batch
size `init_forward_metadata_out_graph(in_capture=True)` and captures the forward; before
each replay it calls `init_forward_metadata_out_graph` with the batch padded to the
captured size. A decode forward reads its per-step inputs (rows, scatter index arguments,
counts) from `DecodeGraphInputs`, static device buffers whose contents are refilled from
the allocation hooks' forward state before the replay; padded entries read request row 0
(length 0 in every group, a zero output) and write their K/V to slot 0 of every group (a
padding slot), so they touch no real row or slot. Extend stays eager.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.radix_attention import AttentionType
from torch.nn.functional import scaled_dot_product_attention

from tangram_sglang.attention.aot_plan import AotPlan
from tangram_sglang.compress import SCORERS, SegmentBatch, check_budgets, select_batch
from tangram_sglang.compress.write import write_selected
from tangram_sglang.config import KERNEL_CHOICES, TangramConfig
from tangram_sglang.memory import staging
from tangram_sglang.memory.allocator import (
    ExtendSegment,
    ForwardState,
    TangramAllocator,
    TangramKVPool,
)
from tangram_sglang.memory.pool import RaggedPool
from tangram_sglang.memory.ragged_kv import dequantize, is_fp8, quantize

if TYPE_CHECKING:
    from tangram_sglang.attention.flashinfer_path import FlashInferRaggedDecode
    from tangram_sglang.kernels.scatter import SelectionScatter

BACKEND = "tangram"
KERNELS_ENV = "TANGRAM_BACKEND_KERNELS"
CUDA_GRAPH_ENV = "TANGRAM_CUDA_GRAPH"  # "0": decode runs eagerly even on CUDA
CPU_SMS = 4  # AOT plan width when the Triton path runs without CUDA (interpreter tests)
PADDING_ROW = 0  # SGLang's req_to_token row 0 (and our row 0): never a request's
DUMMY_SLOT = 0  # slot 0 of every group: a padding slot, never handed to a request


def choose_kernels(kernels: str | None, device: torch.device) -> str:
    """The attention path: the argument (`--tangram-kernels`), else
    `TANGRAM_BACKEND_KERNELS`, else triton on CUDA and torch elsewhere."""
    choice = (
        kernels or os.environ.get(KERNELS_ENV) or ("triton" if device.type == "cuda" else "torch")
    )
    if choice not in KERNEL_CHOICES:
        raise ValueError(
            f"attention backend 'tangram': kernels {choice!r} (argument or {KERNELS_ENV}) is "
            f"not one of {', '.join(KERNEL_CHOICES)}"
        )
    return choice


def cuda_graph_blocker(device: str, kernels: str | None = None) -> str | None:
    """Why decode cannot run in CUDA graphs on `device` with `kernels` (None: it can).
    Graphs need the Triton or FlashInfer path on CUDA: the torch path reads host lengths
    per request and layer."""
    switch = os.environ.get(CUDA_GRAPH_ENV, "1")
    if switch not in ("0", "1"):
        raise ValueError(f"{CUDA_GRAPH_ENV}={switch!r} must be 0 (graphs off) or 1 (default)")
    if switch == "0":
        return f"{CUDA_GRAPH_ENV}=0"
    if device.split(":")[0] != "cuda":
        return f"device {device} (graphs need the Triton path on CUDA)"
    if choose_kernels(kernels, torch.device("cuda")) == "torch":
        return "the torch path (it cannot be captured)"
    return None


def _new_output(like: torch.Tensor) -> torch.Tensor:
    """The attention output buffer (one place, so tests can poison it)."""
    return torch.empty_like(like)


def _as_range(index: Sequence[int]) -> slice | None:
    """`index` as a slice when it is consecutive ints (else None)."""
    start, count = index[0], len(index)
    return slice(start, start + count) if list(index) == list(range(start, start + count)) else None


def _pick(x: torch.Tensor, dim: int, index: Sequence[int]) -> torch.Tensor:
    """`x` restricted to `index` along `dim`: a view when the indices are a range (as stock
    torch_native's tensors are), a gather otherwise."""
    span = _as_range(index)
    if span is not None:
        return x.narrow(dim, span.start, span.stop - span.start)
    return x.index_select(dim, torch.tensor(index, dtype=torch.long, device=x.device))


def layer_scales(layer, dtype: torch.dtype) -> tuple[float, float]:
    """The layer's K/V scales in a pool of `dtype`: the checkpoint's, as SGLang applies
    them, in an FP8 pool where both are set; 1.0 otherwise."""
    k, v = getattr(layer, "k_scale_float", None), getattr(layer, "v_scale_float", None)
    if not is_fp8(dtype) or k is None or v is None:
        return 1.0, 1.0
    return float(k), float(v)


def _put(out: torch.Tensor, b: int, heads: Sequence[int], value: torch.Tensor) -> None:
    """`out[b, heads] = value`: a slice copy when the heads are a range (`_pick`'s view)."""
    span = _as_range(heads)
    out[b : b + 1, span if span is not None else list(heads)] = value


def _num_q_heads(model_runner, pool: RaggedPool) -> int:
    """Query heads per rank: the model's GQA ratio times the pool's kv heads."""
    config = model_runner.model_config
    return config.num_attention_heads // config.get_total_num_kv_heads() * pool.layout.num_kv_heads


@dataclass(frozen=True)
class _DecodeBatch:
    """A decode forward staged for the kernels, shared by every layer."""

    rows: torch.Tensor  # [B] int32
    write: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # scatter_selected's index args
    # The pool's group_lens [G, R+1] as allocated for this step. The kernels read this copy:
    # under overlap scheduling the next step's allocation updates the pool's while this
    # step may still run (SGLang orders the host's next writes after the forward's staging
    # only, its WAR barrier).
    lens: torch.Tensor


@dataclass(frozen=True)
class _ExtendBatch:
    """An extend forward staged for the kernels, shared by every layer."""

    rows: torch.Tensor  # [B] int32
    extend_lens: torch.Tensor  # [B] int32
    max_extend_len: int
    prefix_lens: torch.Tensor  # [G, R+1] int32: the batch rows' prefix lengths
    slots: tuple[torch.Tensor, ...]  # per group, the segments' slots concatenated
    scatter: SelectionScatter | None  # the kept tokens' scatter (None: nothing compresses)


@dataclass(frozen=True)
class _TorchDecodeBatch:
    """A decode forward for the torch path, built once for all layers from the allocator's
    host lengths (no device read): per group, the batch's slots concatenated, row b's at
    `index[g][offsets[g][b]:offsets[g][b + 1]]`."""

    index: tuple[torch.Tensor, ...]
    offsets: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, pool: RaggedPool, row_lens: torch.Tensor, rows: Sequence[int]):
        lens = row_lens[:, list(rows)].tolist()
        index = tuple(
            torch.cat([pool.req_to_slot[g, r, :n] for r, n in zip(rows, group, strict=True)])
            for g, group in enumerate(lens)
        )
        offsets = tuple(tuple(itertools.accumulate(group, initial=0)) for group in lens)
        return cls(index, offsets)


@dataclass(frozen=True)
class _SegmentBudgets:
    """An extend forward's segments as the batched scorer and `select_batch` read them,
    built once per forward (when some segment compresses) so that layers only index it."""

    segments: SegmentBatch
    kept: torch.Tensor  # [S, G] int64 on the device: k_g per segment (n: no compression)
    width: int  # the largest budget: the selection's width

    @classmethod
    def build(cls, segments: Sequence[ExtendSegment], rule, device) -> _SegmentBudgets:
        lens = [s.extend_len for s in segments]
        kept = [s.kept for s in segments]
        check_budgets(lens, kept, rule)
        starts = [sum(lens[:i]) for i in range(len(lens))]
        return cls(
            SegmentBatch(starts, lens, device),
            staging.to_device(torch.tensor(kept, dtype=torch.int64), device),
            max(max(k) for k in kept),
        )


class KeptOwners:
    """Per compressed segment of an extend forward and per group, the running maximum over
    layers and member heads of the position each group slot's kept token has (what
    `TangramAllocator.assign_owners` needs once the last layer has selected).

    Held as one device tensor `latest` `[G, S, W]` (-1 where nothing is kept yet), so a
    layer's update for all segments is one device op (`update_batch`)."""

    def __init__(
        self,
        segments: Sequence[ExtendSegment],
        num_groups: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.segments = tuple(segments)
        width = max((max(s.kept, default=0) for s in self.segments), default=0)
        self.latest = torch.full(
            (num_groups, len(self.segments), max(width, 1)), -1, dtype=torch.int64, device=device
        )
        self.seen: set[int] = set()  # groups with a member head in some updated layer

    def update_batch(
        self, chosen: torch.Tensor, head_group: torch.Tensor, members: Sequence[Sequence[int]]
    ) -> None:
        """Every segment kept `chosen[s, h]` (`select_batch`: ascending, -1 padded) for kv
        head h of group `head_group[h]` (device) in a layer whose group g holds kv heads
        `members[g]` (host: which groups this layer touches)."""
        s, heads, width = chosen.shape
        if s != len(self.segments) or width > self.latest.shape[2]:
            raise ValueError(
                f"KeptOwners: selection {tuple(chosen.shape)} for {len(self.segments)} "
                f"segments of at most {self.latest.shape[2]} kept tokens"
            )
        index = head_group.long()[:, None, None].expand(heads, s, width)
        self.latest[:, :, :width].scatter_reduce_(0, index, chosen.transpose(0, 1), "amax")
        self.seen |= {g for g, hs in enumerate(members) if hs}

    @property
    def owners(self) -> list[list[torch.Tensor | None]]:
        """Per segment and group: `[k_g]` positions, or None (no member head yet)."""
        return [
            [self.latest[g, i, :k] if g in self.seen else None for g, k in enumerate(segment.kept)]
            for i, segment in enumerate(self.segments)
        ]

    def apply(self, allocator: TangramAllocator) -> None:
        allocator.assign_owners_batch(self.segments, self.latest, self.seen)


class DecodeGraphInputs:
    """Static device buffers for a decode step's inputs, sized for the largest captured
    batch: a captured graph reads them at fixed addresses, and `fill` rewrites their
    contents (outside the graph) before each replay. Entries past the step's real rows
    are padding: request row 0 and the dummy slot 0 of every group."""

    def __init__(self, max_batch: int, num_kv_heads: int, group_lens: torch.Tensor) -> None:
        num_groups, device = group_lens.shape[0], group_lens.device
        self.max_batch = max_batch
        self.rows = torch.full((max_batch,), PADDING_ROW, dtype=torch.int32, device=device)
        # Token i of the step is row i of k/v for every kv head: constant.
        self.token_index = (
            torch.arange(max_batch, device=device).expand(num_kv_heads, max_batch).contiguous()
        )
        self.slots = torch.full(
            (num_groups, max_batch), DUMMY_SLOT, dtype=torch.int64, device=device
        )
        self.counts = torch.zeros((num_groups,), dtype=torch.int32, device=device)
        self.lens = torch.zeros_like(group_lens)  # the pool's group_lens, copied per step

    def fill(self, batch: int, state: ForwardState | None, lens: torch.Tensor) -> _DecodeBatch:
        """Write the step's rows and slots (none: all padding) into the first `batch`
        entries; return the views a forward of `batch` tokens reads."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(
                f"tangram: graph batch {batch} is outside 1..{self.max_batch} (the "
                "max_bs given to init_cuda_graph_state)"
            )
        real = 0 if state is None else len(state.rows)
        if real > batch:
            raise ValueError(f"tangram: {real} decode rows do not fit a graph of batch {batch}")
        rows = torch.full((batch,), PADDING_ROW, dtype=torch.int32)
        if real:
            rows[:real] = torch.tensor(state.rows, dtype=torch.int32)
        self.rows[:batch].copy_(staging.to_device(rows, self.rows.device))
        if real:
            self.slots[:, :real].copy_(state.decode_slots)
        self.slots[:, real:batch].fill_(DUMMY_SLOT)
        self.counts.fill_(batch)
        self.lens.copy_(lens)
        return _DecodeBatch(
            self.rows[:batch],
            (self.token_index[:, :batch], self.slots[:, :batch], self.counts),
            self.lens,
        )


class TritonPath:
    """Ragged attention with the Triton kernels.

    The AOT plan, its device tables and the decode workspace are built once, here, from
    the pool's layout and the device's SM count; a decode step only picks the bucket of
    its batch size. Per forward, `stage` moves the rows, lengths and slots to the device
    once for all layers.
    """

    def __init__(self, pool: RaggedPool, num_q_heads: int, num_sms: int, max_batch: int) -> None:
        # Imported here, not at module level: Triton reads TRITON_INTERPRET when a kernel
        # module is first imported, and the torch path must not need Triton at all.
        from tangram_sglang.kernels import decode, extend, scatter

        self.kernels = (decode, extend, scatter)
        self.pool = pool
        self.plan = AotPlan.build(pool.layout, num_q_heads, num_sms, waves=decode.DEFAULT_WAVES)
        self.schedule = decode.DecodeSchedule(self.plan, pool.device)
        self.workspace = decode.DecodeWorkspace(
            self.schedule, max_batch, pool.layout.head_dim, pool.device
        )
        self.batch: _DecodeBatch | _ExtendBatch | None = None
        self.graph_inputs: DecodeGraphInputs | None = None

    def init_graphs(self, max_batch: int) -> None:
        """Static decode inputs for graphs of up to `max_batch` tokens; the workspace grows
        to that batch here, once, before anything is captured."""
        decode, _, _ = self.kernels
        if max_batch > self.workspace.max_batch:
            self.workspace = decode.DecodeWorkspace(
                self.schedule, max_batch, self.pool.layout.head_dim, self.pool.device
            )
        self.graph_inputs = DecodeGraphInputs(
            max_batch, self.plan.num_kv_heads, self.pool.group_lens
        )

    def stage_graph(self, batch: int, state: ForwardState | None) -> None:
        """A graph-sized decode step: its inputs in the static buffers (no new tensors
        reach the kernels, so a captured graph replays it)."""
        if self.graph_inputs is None:
            raise RuntimeError(
                "tangram: CUDA-graph metadata before init_cuda_graph_state (SGLang calls "
                "it before capture)"
            )
        self.batch = self.graph_inputs.fill(batch, state, self.pool.group_lens)

    def stage(self, state: ForwardState, budgets: _SegmentBudgets | None = None) -> None:
        """Move the forward's rows, lengths and slots to the device once for all layers;
        an extend where some segment compresses also gets its kept tokens' scatter, laid out
        like `budgets` (the batched selection's segments and width)."""
        device = self.pool.device
        rows = staging.to_device(torch.tensor(state.rows, dtype=torch.int32), device)
        if state.mode == "decode":
            groups, batch = state.decode_slots.shape
            heads = self.plan.num_kv_heads
            token_index = torch.arange(batch, device=device).expand(heads, batch)
            counts = torch.full((groups,), batch, dtype=torch.int32, device=device)
            slots = state.decode_slots.to(device=device, dtype=torch.int64)
            self.batch = _DecodeBatch(
                rows, (token_index, slots, counts), self.pool.group_lens.clone()
            )
            return
        segments = state.segments
        lens = [s.extend_len for s in segments]
        prefix_lens = torch.zeros_like(self.pool.group_lens)
        prefix = torch.tensor([s.prefix_lens for s in segments], dtype=torch.int32).T
        prefix_lens[:, rows.long()] = staging.to_device(prefix, device)
        slots = tuple(
            torch.cat([s.slots[g].to(device) for s in segments])
            for g in range(self.pool.num_groups)
        )
        scatter = None
        if budgets is not None:
            kept = [s.kept for s in segments]
            starts = budgets.segments.starts
            scatter = self.kernels[2].SelectionScatter.build(
                starts, kept, slots, budgets.width, device
            )
        self.batch = _ExtendBatch(
            rows,
            staging.to_device(torch.tensor(lens, dtype=torch.int32), device),
            max(lens, default=0),
            prefix_lens,
            slots,
            scatter,
        )

    def decode(self, q, k, v, layer) -> torch.Tensor:
        """`k`/`v` as stored (`quantize`d with the layer's scales)."""
        decode, _, scatter = self.kernels
        view = self.pool.layer_view(layer.layer_id, *layer_scales(layer, self.pool.dtype))
        kv = replace(view, group_lens=self.batch.lens)
        scatter.scatter_selected(kv, k, v, *self.batch.write)
        out = _new_output(q)
        work = self.schedule.layer(q.shape[0], layer.layer_id)
        decode.decode_attention(
            q, kv, self.batch.rows, layer.scaling, work, self.workspace, out=out
        )
        return out

    def extend(self, q, k, v, layer) -> torch.Tensor:
        """Attention over the prefixes (at their pre-segment lengths, dequantized) plus the
        new tokens (unquantized `k`/`v`)."""
        _, extend, _ = self.kernels
        b = self.batch
        view = self.pool.layer_view(layer.layer_id, *layer_scales(layer, self.pool.dtype))
        kv = replace(view, group_lens=b.prefix_lens)
        out = _new_output(q)
        launch = extend.serving_launch(b.max_extend_len, q.element_size())
        extend.extend_attention(
            q, k, v, b.extend_lens, kv, b.rows, layer.scaling, b.max_extend_len, out=out, **launch
        )
        return out

    def store(self, k, v, layer: int, selected: torch.Tensor) -> None:
        """Write the batch's kept tokens (`selected` `[S, Hkv, W]`, `select_batch`'s indices
        within each segment; `k`/`v` as stored) to the segments' slots in one launch, device
        ops only."""
        _, _, scatter = self.kernels
        kv = self.pool.layer_view(layer)
        scatter.scatter_selected(kv, k, v, *self.batch.scatter.args(selected, kv.head_group))


class FlashInferPath(TritonPath):
    """Decode attention through FlashInfer's paged decode kernels with the AOT plan's splits
    (`FlashInferRaggedDecode` in mode aot: one instance per batch size, planned once, then
    only device-side metadata per step, so decode graphs capture it); extend and the K/V
    writes run on the Triton kernels."""

    def __init__(self, pool: RaggedPool, num_q_heads: int, num_sms: int, max_batch: int) -> None:
        super().__init__(pool, num_q_heads, num_sms, max_batch)
        if is_fp8(pool.dtype):
            raise ValueError("--tangram-kernels flashinfer does not read FP8 pools (use triton)")
        self.sm_scale = pool.layout.head_dim**-0.5  # FlashInfer plans with it
        self.decoders: dict[int, FlashInferRaggedDecode] = {}
        self.decoder: FlashInferRaggedDecode | None = None
        self.float_workspace: torch.Tensor | None = None  # shared: split-kv is off

    def _decoder(self, batch: int) -> FlashInferRaggedDecode:
        if batch not in self.decoders:
            from tangram_sglang.attention.flashinfer_path import (
                WORKSPACE_BYTES,
                FlashInferRaggedDecode,
            )

            pool = self.pool
            if self.float_workspace is None:
                self.float_workspace = torch.empty(
                    WORKSPACE_BYTES, dtype=torch.uint8, device=pool.device
                )
            self.decoders[batch] = FlashInferRaggedDecode(
                [pool.layer_view(layer) for layer in range(pool.num_layers)],
                self.plan,
                [s + pool.page_size for s in pool.slots],
                pool.page_size,
                batch,
                pool.max_context,
                self.sm_scale,
                mode="aot",
                workspace=self.float_workspace,
            )
        return self.decoders[batch]

    def stage(self, state: ForwardState, budgets: _SegmentBudgets | None = None) -> None:
        super().stage(state, budgets)
        if state.mode == "decode":
            self.decoder = self._decoder(len(state.rows))
            self.decoder.prepare(self.batch.rows)

    def stage_graph(self, batch: int, state: ForwardState | None) -> None:
        super().stage_graph(batch, state)
        self.decoder = self._decoder(batch)
        self.decoder.prepare(self.batch.rows)

    def decode(self, q, k, v, layer) -> torch.Tensor:
        """`k`/`v` as stored; the kernels read the pool's lengths as `prepare` saw them."""
        if layer.scaling != self.sm_scale:
            raise NotImplementedError(
                f"--tangram-kernels flashinfer plans with scale head_dim**-0.5; layer "
                f"{layer.layer_id} scales by {layer.scaling} (use triton)"
            )
        _, _, scatter = self.kernels
        scatter.scatter_selected(self.pool.layer_view(layer.layer_id), k, v, *self.batch.write)
        return self.decoder.run(layer.layer_id, q, _new_output(q))


class TangramAttnBackend(AttentionBackend):
    def __init__(
        self,
        model_runner,
        method: str | None = None,
        kernels: str | None = None,
        num_sms: int | None = None,
    ) -> None:
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
        self._last_state: ForwardState | None = None  # a state serves one forward only
        self.owners: KeptOwners | None = None
        self.budgets: _SegmentBudgets | None = None
        self.torch_decode: _TorchDecodeBatch | None = None
        layout = self.pool.layout
        # Per layer, per group: kv heads stored there (ascending); per layer, head -> group.
        self.members = [
            [layout.heads[g][layer] for g in range(layout.num_groups)]
            for layer in range(layout.num_layers)
        ]
        self.group_of = [self.pool.head_group[layer].tolist() for layer in range(layout.num_layers)]
        self.kernels = choose_kernels(kernels, self.pool.device)
        self.triton: TritonPath | None = None
        if self.kernels != "torch":
            if num_sms is None:
                cuda = self.pool.device.type == "cuda"
                props = torch.cuda.get_device_properties(self.pool.device) if cuda else None
                num_sms = props.multi_processor_count if cuda else CPU_SMS
            path = FlashInferPath if self.kernels == "flashinfer" else TritonPath
            self.triton = path(
                self.pool, _num_q_heads(model_runner, self.pool), num_sms, self.pool.max_requests
            )

    # ---- metadata --------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        """Eager forwards (every extend; a decode no captured graph serves)."""
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.state = None
            return
        if mode.is_mixed() or not (mode.is_decode() or mode.is_extend()):
            raise NotImplementedError(f"attention backend 'tangram' does not run {mode} batches")
        expected = "decode" if mode.is_decode() else "extend"
        self.state = self._take_state(forward_batch, expected, int(forward_batch.batch_size))
        segments = self.state.segments
        self.owners = self.budgets = None
        if expected == "extend":
            self.owners = KeptOwners(segments, self.pool.num_groups, self.pool.device)
        if any(s.compress for s in segments):
            self.budgets = _SegmentBudgets.build(segments, self.allocator.rule, self.pool.device)
        if self.triton is not None:
            self.triton.stage(self.state, self.budgets)
        elif expected == "decode":
            self.torch_decode = _TorchDecodeBatch.build(
                self.pool, self.allocator.row_lens, self.state.rows
            )

    def _take_state(self, forward_batch, expected: str, batch_size: int) -> ForwardState:
        """The allocation state SGLang's batch carries to this forward, checked against
        what the host knows of the forward (no device read): its mode, its number of
        requests, each extend's length, and that no earlier forward used it."""
        state = getattr(forward_batch, "tangram_state", None)
        found = None if state is None else (state.mode, len(state.rows))
        problem = None
        if state is None:
            problem = "no allocation preceded it"
        elif state is self._last_state:
            problem = "its allocation state served an earlier forward"
        elif state.mode != expected or len(state.rows) != batch_size:
            problem = f"its batch carries the state of a {found[0]} of {found[1]} requests"
        elif expected == "extend":
            lens = getattr(forward_batch, "extend_seq_lens_cpu", None)
            if lens is not None and list(lens) != [s.extend_len for s in state.segments]:
                problem = f"its extend lengths {list(lens)} differ from the allocation's"
        if problem:
            raise RuntimeError(
                f"tangram: the {expected} forward of {batch_size} requests has no matching "
                f"allocation state: {problem} (the allocation hooks must run for every batch)"
            )
        self._last_state = state
        return state

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        if self.triton is None:
            raise NotImplementedError(
                "attention backend 'tangram': the torch path cannot run in CUDA graphs (use "
                f"the Triton path, or {CUDA_GRAPH_ENV}=0)"
            )
        self.triton.init_graphs(max_bs)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False) -> None:
        """The decode graph runner, before capturing (`in_capture`: a dummy batch, every
        entry padding) or replaying a graph of `forward_batch.batch_size` tokens (the
        step's real rows first, then `num_padding` padded entries). Runs outside the
        graph: the row check below may read the device."""
        mode = forward_batch.forward_mode
        if not mode.is_decode():
            raise NotImplementedError(
                f"attention backend 'tangram' captures decode batches only, not {mode}"
            )
        if self.triton is None:
            raise NotImplementedError(
                "attention backend 'tangram': the torch path cannot run in CUDA graphs"
            )
        batch = int(forward_batch.batch_size)
        actual = getattr(forward_batch, "actual_forward_mode", mode)
        if in_capture or actual.is_idle():
            self.state = None
        else:
            real = batch - int(getattr(forward_batch, "num_padding", 0))
            self.state = self._take_state(forward_batch, "decode", real)
        self.triton.stage_graph(batch, self.state)

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
        if self.triton is not None and layer.tp_q_head_num != self.triton.plan.num_q_heads:
            raise ValueError(
                f"attention backend 'tangram': layer {layer.layer_id} has {layer.tp_q_head_num} "
                f"q heads but the AOT plan was built for {self.triton.plan.num_q_heads}"
            )

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
        stored = self._stored(k_, v_, layer)
        if self.triton is not None:
            out = self.triton.extend(q_, k_, v_, layer)
            self._store_batch(q_, k_, v_, stored, layer.layer_id)
        else:
            # As stock torch_native, which writes the chunk first and reads it back: the new
            # tokens are attended as stored (identical unless the pool is FP8).
            k_scale, v_scale = layer_scales(layer, self.pool.dtype)
            k_read = dequantize(stored[0], k_.dtype, k_scale)
            v_read = dequantize(stored[1], v_.dtype, v_scale)
            out = _new_output(q_)
            start = 0
            for segment in self.state.segments:
                tokens = slice(start, start + segment.extend_len)
                start += segment.extend_len
                out[tokens] = self._extend_attention(
                    q_[tokens], k_read[tokens], v_read[tokens], layer, segment
                )
            self._store_segments(q_, k_, v_, stored, layer.layer_id)
        if layer.layer_id == self.pool.num_layers - 1:
            self.owners.apply(self.allocator)
            self.allocator.fuse(self.state)  # Fast Fusion, once the batch's KV is owned
        return out.reshape(q_.shape[0], -1)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._check_layer(layer, k, save_kv_cache)
        q_, k_, v_ = self._shapes(q, k, v, layer)
        k_store, v_store = self._stored(k_, v_, layer)
        if self.triton is not None:
            return self.triton.decode(q_, k_store, v_store, layer).reshape(q_.shape[0], -1)
        slots = self.state.decode_slots
        groups = [slots[g] for g in range(len(slots))]
        lid = layer.layer_id
        self.pool.write_tokens(lid, groups, k_store, v_store)
        query = q_.movedim(0, 1)  # [Hq, B, D], as torch_native slices it
        out = _new_output(q_)
        gqa = layer.tp_q_head_num // layer.tp_k_head_num
        k_scale, v_scale = layer_scales(layer, self.pool.dtype)
        batch = self.torch_decode
        for g, heads in enumerate(self.members[lid]):
            if not heads:
                continue
            # One gather per group and layer; row b attends to its contiguous rows of it,
            # the tensors (values, shapes, strides) torch_native's per-request gather makes.
            keys = dequantize(self.pool.k_buffer(g, lid)[batch.index[g]], q_.dtype, k_scale)
            values = dequantize(self.pool.v_buffer(g, lid)[batch.index[g]], q_.dtype, v_scale)
            q_heads = [h * gqa + i for h in heads for i in range(gqa)]
            q_group = _pick(query, 0, q_heads)
            offsets = batch.offsets[g]
            for b in range(len(offsets) - 1):
                rows = slice(offsets[b], offsets[b + 1])
                o = scaled_dot_product_attention(
                    q_group[:, b : b + 1].unsqueeze(0),
                    keys[rows].movedim(0, 1).unsqueeze(0),
                    values[rows].movedim(0, 1).unsqueeze(0),
                    enable_gqa=gqa > 1,
                    scale=layer.scaling,
                )
                _put(out, b, q_heads, o.squeeze(0).movedim(1, 0))
        return out.reshape(q_.shape[0], -1)

    # ---- pieces ----------------------------------------------------------------------

    def _stored(self, k, v, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' K/V as the pool stores them (FP8: divided by the layer's scales)."""
        k_scale, v_scale = layer_scales(layer, self.pool.dtype)
        dtype = self.pool.dtype
        return quantize(k, dtype, k_scale), quantize(v, dtype, v_scale)

    def _group_kv(self, layer, g: int, row: int, length: int, dtype: torch.dtype):
        """K and V `[length, n_{g,l}, D]` of the row's first `length` slots in group g, read
        as `dtype` (dequantized)."""
        slots = self.pool.req_to_slot[g, row, :length].long()
        k_scale, v_scale = layer_scales(layer, self.pool.dtype)
        index = layer.layer_id
        return (
            dequantize(self.pool.k_buffer(g, index)[slots], dtype, k_scale),
            dequantize(self.pool.v_buffer(g, index)[slots], dtype, v_scale),
        )

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
            k_pre, v_pre = self._group_kv(layer, g, segment.row, prefix, k.dtype)
            keys = torch.cat((k_pre, _pick(k, 1, heads))).movedim(0, 1)
            values = torch.cat((v_pre, _pick(v, 1, heads))).movedim(0, 1)
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

    def _select(self, q, k, v, layer: int) -> torch.Tensor:
        """`[S, Hkv, W]`: per segment and kv head, its kept token indices within the segment
        (ascending, exactly its group's budget, then -1; every token of a segment that does
        not compress), also recorded for the owners of the group slots. Device ops only."""
        budgets = self.budgets
        scores = self.scorer.score_batch(q, k, v, budgets.segments)
        head_group = self.pool.head_group[layer]
        chosen = select_batch(
            scores,
            budgets.segments.lengths,
            budgets.kept.index_select(1, head_group),
            self.allocator.rule,
            budgets.width,
        )
        self.owners.update_batch(chosen, head_group, self.members[layer])
        return chosen

    def _store_segments(self, q, k, v, stored, layer: int) -> None:
        """Torch path: write each segment's K/V (`stored`: as the pool stores them) to its
        group slots, the selected tokens of a compressed one (`write_selected`, selected
        from the unquantized `k`), every token of the others."""
        chosen = None if self.budgets is None else self._select(q, k, v, layer)
        k, v = stored
        start = 0
        for index, segment in enumerate(self.state.segments):
            tokens = slice(start, start + segment.extend_len)
            start += segment.extend_len
            if not segment.compress:
                self.pool.write_tokens(layer, list(segment.slots), k[tokens], v[tokens])
                continue
            counts = [segment.kept[g] for g in self.group_of[layer]]
            selected = [chosen[index, h, :c] for h, c in enumerate(counts)]
            write_selected(
                self.pool, layer, segment.row, k[tokens], v[tokens], selected, list(segment.slots)
            )

    def _store_batch(self, q, k, v, stored, layer: int) -> None:
        """Kernel path: every segment's kept tokens (all of an uncompressed one's; `stored`
        as the pool stores them, selected from the unquantized `k`) in one scatter, or
        `write_tokens` when no segment compresses."""
        if self.budgets is None:
            self.pool.write_tokens(layer, list(self.triton.batch.slots), *stored)
            return
        self.triton.store(*stored, layer, self._select(q, k, v, layer))


def create_tangram_backend(model_runner) -> TangramAttnBackend:
    """`register_attention_backend('tangram')` factory (kernels: `--tangram-kernels`)."""
    config = TangramConfig.from_server_args(model_runner.server_args)
    return TangramAttnBackend(model_runner, kernels=config.kernels)
