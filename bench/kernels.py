"""Decode-attention kernel benchmark: ragged AOT decode against full-KV and replanning paths.

Qwen3-4B shapes (36 layers, 32 q / 8 kv heads, head_dim 128, bf16 KV, page size 16) at
batch x context x kept ratio. One decode step is the 36 layers' attention, captured in a
CUDA graph per method and replayed; a step's time is the median of CUDA-event times
around [host work of the step + replay], so per-step planning is charged to the method
that needs it. Methods:
- `flashinfer_full`: FlashInfer paged decode over the full KV (tensor cores, as SGLang's
  FlashInfer backend for GQA 4), planned once (its best case: no per-step plan).
- `sglang_triton_full`: SGLang's Triton `decode_attention_fwd` over the full KV, kv splits
  from SGLang's own `get_num_kv_splits_triton` (max 8, the server default).
- `ragged_replan`: the ragged pool through FlashInfer, one wrapper per (group, heads in a
  layer) shape, `plan()` for every shape every step (timed including the plans).
- `ragged_aot_flashinfer`: the ragged pool through FlashInfer with our AOT splits, planned
  once per batch size; per-step metadata on the device, inside the graph.
- `ragged_aot` (ours): `tangram_sglang.kernels.decode` driven by the AOT table, in the
  launch variant (`VARIANTS`: `DecodeLaunch` + plan knobs) that `--variant` names; with
  `--variant sweep` every variant is timed on `SWEEP_POINTS` first (outputs checked
  against the first variant's) and each batch size runs with its fastest.
`--dry-run` needs no GPU: it checks the arguments, builds every variant's plan and device
tables on the CPU and prints a CTA model per point (CTAs, busy CTAs, longest vs mean CTA).

Ragged profiles are synthetic (no calibrated Qwen3-4B profile exists on the GPU box): per
(layer, head) kept ratios log-normal (sigma 0.8), 2% of heads (6 of 288) pinned at 1.0,
the rest scaled so that the head-weighted mean of the group ratios equals the kept
fraction, grouped into 4 global groups as calibration would; 100% is one group.
Lengths per group are `budget.kept_tokens(context, ratio)` (sink 4, window 32).

The bandwidth floor of a point is its KV bytes read per step over the device-to-device
copy bandwidth measured in the same run (bytes read + written / time). Layers cycle
through enough distinct KV buffers that the working set is >= 4x the L2 cache.
`layer_copy` measures, per point, the floor's own operation at the layer's size: a step of
36 device copies that each move one layer's KV bytes (half read, half written), so the
start and tail of 36 dependent launches are in it: the floor's practical counterpart
where a layer reads little.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tangram_sglang.kernels.decode import (
    DecodeLaunch,
    DecodeSchedule,
    DecodeWorkspace,
    decode_attention,
)

from tangram_sglang.attention.aot_plan import DEFAULT_MAX_SPLITS, AotPlan
from tangram_sglang.memory.budget import BudgetRule, kept_tokens
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.memory.ragged_kv import RaggedKV
from tangram_sglang.models.synthetic import profile_from_table
from tangram_sglang.offline.profile import Calibration, ModelIdentity, Profile, uniform_profile

QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 2560,
    "head_dim": 128,
    "intermediate_size": 9728,
    "vocab_size": 151936,
}
RULE = BudgetRule(sink=4, window=32)
DTYPE = torch.bfloat16
FULL_METHODS = ("flashinfer_full", "sglang_triton_full")
RAGGED_METHODS = ("ragged_aot", "ragged_replan", "ragged_aot_flashinfer")
REFERENCE_METHODS = ("layer_copy",)
COPY_MAX_LAYER_BYTES = 1 << 30  # layer_copy runs where one layer reads at most this


@dataclass(frozen=True)
class Variant:
    """One launch variant of our kernel: how to launch (`DecodeLaunch`) and the plan knobs
    (CTAs per SM, split cap, smallest chunk)."""

    launch: DecodeLaunch
    waves: float = 4.0
    max_splits: int = DEFAULT_MAX_SPLITS
    min_chunk: int = 128

    def describe(self) -> dict:
        return {
            **dataclasses.asdict(self.launch),
            "waves": self.waves,
            "max_splits": self.max_splits,
            "min_chunk": self.min_chunk,
        }


def _variant(
    merge: str,
    n: int,
    w: int,
    s: int,
    waves: float,
    pdl: bool = True,
    bf: bool = True,
    min_chunk: int = 128,
    cap: int = DEFAULT_MAX_SPLITS,
    trig: str = "wait",
    tile: int = 8192,
    regs: int | None = None,
    pf: int = 0,
) -> tuple[str, Variant]:
    name = f"{merge}-n{n}-w{w}-s{s}-waves{waves:g}"
    name += f"-mc{min_chunk}" if min_chunk != 128 else ""
    name += f"-cap{cap}" if cap != DEFAULT_MAX_SPLITS else ""
    name += f"-t{tile}" if tile != 8192 else ""
    name += f"-r{regs}" if regs else ""
    name += "-bf" if bf else ""
    name += "-pdl" if pdl else ""
    name += f"-{trig}" if trig != "wait" else ""
    name += f"-pf{pf}" if pf else ""
    launch = DecodeLaunch(
        block_n=n,
        num_warps=w,
        num_stages=s,
        merge=merge,
        merge_tile=tile,
        pdl=pdl,
        trigger=trig,
        batch_fastest=bf,
        max_regs=regs,
        prefetch=pf,
    )
    return name, Variant(launch, waves, cap, min_chunk)


# Our kernel's launch variants. `--variant sweep` measures them on SWEEP_POINTS first and
# runs the matrix with each batch size's fastest. LEGACY is the 2026-11-23 default (splits
# capped at 64), kept for comparison; names spell the knobs (kernel|fused merge, BLOCK_N,
# warps, stages, waves, min_chunk, split cap, merge tile, -bf: batch-fastest grid, -pdl:
# programmatic dependent launch, -start/-end: where a program lets the next launch start
# (default: after its wait), -rN: split-kernel register cap, -pfN: L2 prefetch of each
# program's first N tokens before the PDL wait).
LEGACY = "n64-w4-s2-merge-kernel-waves4"
VARIANTS = {
    LEGACY: Variant(DecodeLaunch(), 4.0, 64, 128),
    **dict(
        [
            _variant("kernel", 64, 4, 2, 4, pdl=False, bf=False),
            _variant("kernel", 64, 4, 3, 4),
            _variant("kernel", 64, 4, 4, 4),
            _variant("kernel", 32, 4, 3, 4),
            _variant("kernel", 64, 4, 3, 8),
            _variant("kernel", 64, 8, 3, 4),
            _variant("kernel", 32, 4, 3, 4, trig="start"),
            _variant("kernel", 32, 4, 3, 4, trig="end"),
            _variant("kernel", 64, 4, 4, 4, trig="start"),
            _variant("kernel", 64, 4, 4, 4, trig="end"),
            _variant("kernel", 64, 4, 4, 4, trig="end", tile=32768),
            _variant("fused", 32, 4, 3, 4, trig="end"),
            _variant("fused", 64, 4, 4, 4, trig="end"),
            _variant("kernel", 32, 4, 3, 4, regs=96),
            _variant("kernel", 32, 4, 3, 4.5, regs=96),
            _variant("kernel", 32, 4, 3, 4, regs=72),
            _variant("kernel", 32, 4, 3, 6.5, regs=72),
            _variant("kernel", 64, 4, 4, 3.8, regs=128),
            _variant("fused", 32, 4, 3, 4, trig="end", regs=72),
            _variant("fused", 32, 4, 3, 6.5, trig="end", regs=72),
            _variant("kernel", 32, 4, 3, 4.5, regs=96, pf=64),
            _variant("kernel", 32, 4, 3, 4.5, regs=96, trig="start", pf=32),
            _variant("kernel", 32, 4, 3, 4.5, regs=96, trig="start", pf=64),
            _variant("kernel", 32, 4, 3, 4.5, regs=96, trig="start", pf=128),
            _variant("kernel", 64, 4, 4, 3.8, regs=128, trig="start", pf=64),
            _variant("kernel", 64, 4, 4, 4, trig="end", pf=64),
            _variant("fused", 32, 4, 3, 4, trig="start", regs=72, pf=64),
            _variant("kernel", 32, 4, 3, 4.5, regs=96, trig="start"),
            _variant("kernel", 32, 4, 3, 2.4, regs=96, trig="start", pf=64),
            _variant("kernel", 64, 4, 4, 3.8, regs=128, trig="start"),
            _variant("kernel", 64, 4, 4, 3.8, regs=128, trig="start", pf=32),
            _variant("kernel", 64, 4, 4, 3.8, regs=128, trig="end", pf=64),
        ]
    ),
}
# (batch, context, kept) where the sweep times every variant, most telling first: the
# worst floor ratio (b4/8K/25%), batch 64 at 128K (long-context streaming), the 3x anchor,
# the other small points that missed 1.5x, batch 64 at 32K, full KV at batch 4 and 16 (long
# chunks: a variant that wins short ones may lose there).
SWEEP_DIFF_TOL = 2e-2  # outputs are bf16 means of N(0, 1) values: rounding is ~1e-3
SWEEP_POINTS = (
    (4, 8192, 0.25),
    (64, 131072, 0.25),
    (4, 32768, 0.25),
    (16, 8192, 0.1),
    (4, 32768, 0.1),
    (64, 32768, 0.25),
    (4, 32768, 1.0),
    (16, 32768, 1.0),
)


class NotApplicable(Exception):
    """A method that cannot run at this point (the reason is recorded, not an error)."""


# ---- profiles ------------------------------------------------------------------------


def qwen3_4b() -> ModelIdentity:
    return ModelIdentity.from_hf_config(QWEN3_4B)


def synthetic_layout(
    model: ModelIdentity, kept: float, seed: int = 0, grouping: str = "global"
) -> tuple[PoolLayout, dict]:
    """Layout whose head-weighted mean group ratio is `kept` (see the module docstring)."""
    if kept >= 1.0:
        profile = uniform_profile(model, 1.0)
        return PoolLayout.from_profile(profile), describe(profile)
    rng = np.random.default_rng(seed)
    shape = (model.num_layers, model.num_kv_heads)
    raw = rng.lognormal(0.0, 0.8, size=shape)
    full = rng.choice(raw.size, size=max(1, raw.size // 50), replace=False)

    def build(scale: float) -> Profile:
        mean = np.clip(raw / raw.mean() * scale, 0.005, 1.0)
        mean.reshape(-1)[full] = 1.0
        calib = Calibration(0, kept, seed, 2.0, RULE.sink, RULE.window, "synthetic-lognormal-0.8")
        return profile_from_table(model, mean, 0.05 * mean, "ada-snapkv", calib, 4, grouping)

    lo, hi = 1e-4, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if mean_group_ratio(build(mid)) < kept:
            lo = mid
        else:
            hi = mid
    profile = build(lo)
    return PoolLayout.from_profile(profile), describe(profile)


def mean_group_ratio(profile: Profile) -> float:
    total = sum(len(g.heads) * g.ratio for g in profile.groups)
    return total / (profile.model.num_layers * profile.model.num_kv_heads)


def describe(profile: Profile) -> dict:
    return {
        "mean_group_ratio": round(mean_group_ratio(profile), 4),
        "group_ratios": [round(g.ratio, 4) for g in profile.groups],
        "heads_per_group": [len(g.heads) for g in profile.groups],
        "grouping": profile.grouping,
        "waste_pct": profile.extra.get("waste_pct"),
    }


# ---- storage -------------------------------------------------------------------------


class Storage:
    """Ragged KV for `batch` requests of one context length, per the pool contract."""

    def __init__(
        self,
        layout: PoolLayout,
        batch: int,
        context: int,
        page: int,
        l2_bytes: int,
        mem_budget: int,
        device: str = "cuda",
    ) -> None:
        groups, layers, dim = layout.num_groups, layout.num_layers, layout.head_dim
        self.layout, self.batch, self.page, self.l2_bytes = layout, batch, page, l2_bytes
        self.lens = [kept_tokens(context, r, RULE) for r in layout.ratios]
        pages = [-(-n // page) for n in self.lens]
        self.capacity = [batch * p * page + page for p in pages]  # + the padding page
        rows = [
            sum(self.capacity[g] * len(layout.heads[g][layer]) for g in range(groups))
            for layer in range(layers)
        ]
        layer_bytes = max(rows) * dim * 2 * DTYPE.itemsize
        copies = min(layers, max(1, math.ceil(4 * l2_bytes / layer_bytes)))
        copies = max(1, min(copies, mem_budget // layer_bytes))
        if layer_bytes > mem_budget:
            raise MemoryError(f"one layer needs {layer_bytes / 1e9:.1f} GB > budget")
        self.copies = copies
        self.k_bufs = [
            torch.randn(max(rows), dim, device=device, dtype=DTYPE) for _ in range(copies)
        ]
        self.v_bufs = [
            torch.randn(max(rows), dim, device=device, dtype=DTYPE) for _ in range(copies)
        ]
        width = -(-max([*self.lens, 1]) // page) * page
        self.req_to_slot = torch.zeros((groups, batch + 1, width), dtype=torch.int32, device=device)
        self.group_lens = torch.zeros((groups, batch + 1), dtype=torch.int32, device=device)
        for g in range(groups):
            n, p = self.lens[g], pages[g]
            perm = torch.randperm(batch * p, device=device).view(batch, p) + 1
            slots = (perm[:, :, None] * page + torch.arange(page, device=device)).view(batch, -1)
            self.req_to_slot[g, 1:, : p * page] = slots.to(torch.int32)
            self.group_lens[g, 1:] = n
        self.req_rows = torch.arange(1, batch + 1, dtype=torch.int32, device=device)
        self.layers = []
        for layer in range(layers):
            group = torch.zeros(layout.num_kv_heads, dtype=torch.int32)
            base = torch.zeros(layout.num_kv_heads, dtype=torch.int64)
            stride = torch.zeros(layout.num_kv_heads, dtype=torch.int32)
            start = 0
            for g in range(groups):
                members = layout.heads[g][layer]
                for j, h in enumerate(members):
                    group[h], base[h], stride[h] = g, start + j, len(members)
                start += self.capacity[g] * len(members)
            c = layer % copies
            self.layers.append(
                RaggedKV(
                    self.k_bufs[c][: rows[layer]],
                    self.v_bufs[c][: rows[layer]],
                    group.to(device),
                    base.to(device),
                    stride.to(device),
                    self.req_to_slot,
                    self.group_lens,
                )
            )
        self.layer_bytes = [
            sum(
                batch * self.lens[g] * dim * 2 * DTYPE.itemsize * len(layout.heads[g][layer])
                for g in range(groups)
            )
            for layer in range(layers)
        ]
        self.kv_bytes = sum(self.layer_bytes)
        self.lens_host = torch.tensor(self.lens, dtype=torch.int64)[:, None].expand(-1, batch)


# ---- timing --------------------------------------------------------------------------


def capture(step) -> torch.cuda.CUDAGraph:
    step()  # compiles / JITs, eagerly
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return graph


def time_steps(graph: torch.cuda.CUDAGraph, host=None, budget_s: float = 0.5) -> dict:
    """Median ms of [host work + replay] per step, CUDA events around both."""

    def one() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if host is not None:
            host()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    first = one()
    reps = int(min(40, max(3, budget_s * 1e3 / max(first, 1e-3))))
    times = [one() for _ in range(reps)]
    return {"ms": statistics.median(times), "reps": reps, "spread_ms": max(times) - min(times)}


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    src = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


# ---- methods -------------------------------------------------------------------------


def load_sglang_decode():
    """SGLang's Triton decode kernel and its split heuristic. The package import pulls in
    much of SGLang; if that fails here, the two kernel files are loaded by path."""
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
        from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

        return decode_attention_fwd, get_num_kv_splits_triton, "import"
    except Exception as exc:  # noqa: BLE001
        reason = f"by path ({type(exc).__name__}: {exc})"
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("sglang is not installed")
    root = Path(list(spec.submodule_search_locations)[0])
    for name in (
        "sglang",
        "sglang.kernels",
        "sglang.kernels.ops",
        "sglang.kernels.ops.attention",
        "sglang.srt",
    ):
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    utils = types.ModuleType("sglang.srt.utils")
    utils.is_hip = lambda: False
    sys.modules["sglang.srt.utils"] = utils

    def load(name: str, rel: str):
        s = importlib.util.spec_from_file_location(name, root / rel)
        module = importlib.util.module_from_spec(s)
        sys.modules[name] = module
        s.loader.exec_module(module)
        return module

    load("sglang.kernels.ops.attention.score_mod", "kernels/ops/attention/score_mod.py")
    meta = load("sglang.kernels.ops.attention.metadata", "kernels/ops/attention/metadata.py")
    dec = load(
        "sglang.kernels.ops.attention.decode_attention", "kernels/ops/attention/decode_attention.py"
    )
    return dec.decode_attention_fwd, meta.get_num_kv_splits_triton, reason


Q_SEED = 20261123


class Methods:
    """Builds each method's step (36 layers) over one Storage."""

    def __init__(
        self, store: Storage, plan: AotPlan, variant: Variant, sm_count: int, sglang_decode=None
    ) -> None:
        self.store, self.plan, self.variant = store, plan, variant
        self.sm_count, self.sglang_decode = sm_count, sglang_decode
        model_q = plan.num_q_heads
        # One query per Storage, whatever the variant: the sweep compares their outputs.
        seeded = torch.Generator(device="cuda").manual_seed(Q_SEED)
        self.q = torch.randn(
            store.batch, model_q, 128, device="cuda", dtype=DTYPE, generator=seeded
        )
        self.scale = 1 / math.sqrt(128)
        self.outs: dict[str, torch.Tensor] = {}

    def _out(self, name: str) -> torch.Tensor:
        self.outs[name] = torch.zeros_like(self.q)
        return self.outs[name]

    def ragged_aot(self, empty: bool = False):
        """Our step; `empty`: the same launches over zero lengths (no KV read), the step's
        fixed cost (launches, table reads, merges of empty partials, tails)."""
        store, launch = self.store, self.variant.launch
        schedule = DecodeSchedule(self.plan, "cuda")
        ws = DecodeWorkspace(schedule, store.batch, 128, "cuda")
        out = self._out("ragged_aot_empty" if empty else "ragged_aot")
        works = [schedule.layer(store.batch, layer) for layer in range(len(store.layers))]
        layers = store.layers
        if empty:
            zeros = torch.zeros_like(store.group_lens)
            layers = [dataclasses.replace(kv, group_lens=zeros) for kv in layers]

        def step() -> None:
            for kv, work in zip(layers, works, strict=True):
                decode_attention(
                    self.q,
                    kv,
                    store.req_rows,
                    self.scale,
                    work,
                    ws,
                    out=out,
                    launch=launch,
                )

        return (
            capture(step),
            None,
            {"ctas_per_layer": round(statistics.mean(w.num_items for w in works) * store.batch, 1)},
        )

    def ragged_aot_empty(self):
        return self.ragged_aot(empty=True)

    def layer_copy(self):
        """Per layer, one device copy moving that layer's KV bytes (half of them read, half
        written: the floor's copy bandwidth counts both), sources cycling through distinct
        buffers covering >= 4x L2."""
        store = self.store
        sizes = [n // DTYPE.itemsize // 2 for n in store.layer_bytes]
        widest = max(sizes)
        if 2 * widest * DTYPE.itemsize > COPY_MAX_LAYER_BYTES:
            raise NotApplicable(f"a layer reads more than {COPY_MAX_LAYER_BYTES >> 20} MiB")
        copies = min(len(sizes), max(1, -(-4 * store.l2_bytes // (widest * DTYPE.itemsize))))
        srcs = [torch.randn(widest, device="cuda", dtype=DTYPE) for _ in range(copies)]
        dst = torch.empty(widest, device="cuda", dtype=DTYPE)

        def step() -> None:
            for layer, n in enumerate(sizes):
                dst[:n].copy_(srcs[layer % copies][:n])

        return capture(step), None, {"copy_sources": copies}

    def _flashinfer(self, mode: str):
        from tangram_sglang.attention.flashinfer_path import FlashInferRaggedDecode

        store = self.store
        fi = FlashInferRaggedDecode(
            store.layers,
            self.plan,
            store.capacity,
            store.page,
            store.batch,
            store.req_to_slot.shape[2],
            self.scale,
            mode=mode,
            q_dtype=DTYPE,
        )
        out = self._out(f"ragged_{mode}" if mode == "replan" else "ragged_aot_flashinfer")
        fi.prepare(store.req_rows, store.lens_host)

        def step() -> None:
            if mode == "aot":
                fi.prepare(store.req_rows)
            for layer in range(len(store.layers)):
                fi.run(layer, self.q, out)

        graph = capture(step)
        host = (lambda: fi.prepare(store.req_rows, store.lens_host)) if mode == "replan" else None
        return graph, host, {"plans_per_step": len(fi.wrappers) if mode == "replan" else 0}

    def ragged_replan(self):
        return self._flashinfer("replan")

    def ragged_aot_flashinfer(self):
        return self._flashinfer("aot")

    def flashinfer_full(self):
        import flashinfer

        store = self.store
        (n,) = store.lens
        p, batch = store.page, store.batch
        pages = -(-n // p)
        table = store.req_to_slot[0, 1:, : pages * p : p] // p
        indices = table.reshape(-1).to(torch.int32)
        indptr = torch.arange(batch + 1, dtype=torch.int32) * pages
        last = torch.full((batch,), n - (pages - 1) * p, dtype=torch.int32)
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=True,
            paged_kv_indptr_buffer=indptr.cuda(),
            paged_kv_indices_buffer=indices.clone(),
            paged_kv_last_page_len_buffer=last.cuda(),
        )
        wrapper.plan(
            indptr,
            indices,
            last,
            32,
            8,
            128,
            p,
            q_data_type=DTYPE,
            kv_data_type=DTYPE,
            sm_scale=self.scale,
        )
        cap = store.capacity[0]
        caches = [
            (kv.k.view(cap // p, p, 8, 128), kv.v.view(cap // p, p, 8, 128)) for kv in store.layers
        ]
        out = self._out("flashinfer_full")

        def step() -> None:
            for cache in caches:
                wrapper.run(self.q, cache, out=out)

        return capture(step), None, {}

    def sglang_triton_full(self):
        decode_fwd, num_splits_kernel, how = self.sglang_decode
        store = self.store
        if store.capacity[0] * 8 * 128 >= 2**31:
            raise NotApplicable(
                f"{store.capacity[0]} slots x 1024 elements >= 2^31: SGLang's Triton decode "
                "computes KV offsets in int32 (run 2 of 2026-11-23 hit an illegal address)"
            )
        (n,) = store.lens
        batch, max_splits = store.batch, 8
        kv_indptr = (torch.arange(batch + 1, device="cuda") * n).to(torch.int32)
        kv_indices = store.req_to_slot[0, 1:, :n].reshape(-1).contiguous()
        seq_lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
        num_kv_splits = torch.empty(batch, dtype=torch.int32, device="cuda")
        num_splits_kernel[(1,)](
            num_kv_splits,
            seq_lens,
            batch,
            1,
            32,
            8,
            max_splits,
            self.sm_count,
            MAX_NUM_SEQ=max(256, 1 << (batch - 1).bit_length()),
        )
        logits = torch.empty(batch, 32, max_splits, 128, dtype=torch.float32, device="cuda")
        lse = torch.empty(batch, 32, max_splits, dtype=torch.float32, device="cuda")
        cap = store.capacity[0]
        bufs = [(kv.k.view(cap, 8, 128), kv.v.view(cap, 8, 128)) for kv in store.layers]
        out = self._out("sglang_triton_full")

        def step() -> None:
            for k, v in bufs:
                decode_fwd(
                    self.q,
                    k,
                    v,
                    out,
                    kv_indptr,
                    kv_indices,
                    logits,
                    lse,
                    num_kv_splits,
                    max_splits,
                    self.scale,
                    1.0,
                    1.0,
                )

        splits = num_kv_splits.float().mean().item()
        return capture(step), None, {"num_kv_splits": splits, "sglang_load": how}


def run_method(methods: Methods, name: str, budget_s: float) -> dict:
    torch.cuda.synchronize()
    t0 = time.time()
    try:
        graph, host, extra = getattr(methods, name)()
        timing = time_steps(graph, host, budget_s)
        if name == "ragged_replan":  # the same step without the host planning
            timing["gpu_only_ms"] = time_steps(graph, None, budget_s / 2)["ms"]
        del graph
        return {**timing, **extra, "setup_s": round(time.time() - t0, 1)}
    except NotApplicable as exc:
        return {"not_applicable": str(exc)}
    except Exception as exc:  # noqa: BLE001  (one failing method must not end the run)
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def out_diff(methods: Methods, name: str, ref: str = "ragged_aot") -> float | None:
    if name == ref or name not in methods.outs or ref not in methods.outs:
        return None
    return float((methods.outs[name].float() - methods.outs[ref].float()).abs().max())


# ---- driver ---------------------------------------------------------------------------


def point_order(batches, contexts):
    """Target points first (b4/32K, batch 64), the biggest last, so a cut-short run still
    answers the questions that matter."""
    points = [(b, c) for b in batches for c in contexts]
    return sorted(points, key=lambda bc: (bc != (4, 32768), bc[0] != 64, bc[0] * bc[1]))


def variant_plan(layout: PoolLayout, num_q_heads: int, sm_count: int, variant: Variant) -> AotPlan:
    return AotPlan.build(
        layout,
        num_q_heads,
        sm_count,
        waves=variant.waves,
        max_splits=variant.max_splits,
        min_chunk=variant.min_chunk,
    )


def sweep_candidates(spec: str) -> list[str] | None:
    """Variant names that `--variant` asks for (None if one is unknown)."""
    if spec == "sweep":
        return list(VARIANTS)
    names = spec.removeprefix("sweep:").split(",") if spec.startswith("sweep:") else [spec]
    if not names or any(n not in VARIANTS for n in names):
        return None
    return names


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.mean(math.log(x) for x in xs))


def pick_variants(sweep: list[dict], candidates: list[str]) -> dict:
    """Fastest variant per batch size (geomean over that batch's sweep points that every
    variant finished) and overall; a variant with an error at a point, or whose output
    differs from the first variant's (bf16 rounding aside), is out."""
    points = sorted({(r["batch"], r["context"], r["kept"]) for r in sweep})
    ms = {
        (r["variant"], r["batch"], r["context"], r["kept"]): r.get("ms")
        for r in sweep
        if r.get("max_abs_diff_vs_first", 0.0) <= SWEEP_DIFF_TOL
    }

    def best(subset: list[tuple]) -> str | None:
        scores = {
            n: geomean([ms[(n, *p)] for p in subset])
            for n in candidates
            if subset and all(ms.get((n, *p)) for p in subset)
        }
        return min(scores, key=scores.get) if scores else None

    overall = best(points) or candidates[0]
    by_batch = {}
    for batch in sorted({p[0] for p in points}):
        name = best([p for p in points if p[0] == batch])
        if name:
            by_batch[str(batch)] = name
    return {"overall": overall, "by_batch": by_batch}


def sweep_variants(
    candidates, kept_list, layouts, args, l2, mem_budget, plan_for, sm_count, start, result
) -> dict:
    """Time every candidate at each SWEEP_POINTS point (point by point, so a cut-short
    sweep still compares all variants on the points it reached)."""
    batches = {int(x) for x in args.batches.split(",")}
    for batch, context, kept in SWEEP_POINTS:
        if batch not in batches or kept not in layouts:
            continue
        if time.time() - start > args.sweep_budget_s:
            result.setdefault("sweep_not_run", []).append([batch, context, kept])
            continue
        layout = layouts[kept][0]
        try:
            store = Storage(layout, batch, context, args.page_size, l2, mem_budget)
        except (MemoryError, torch.OutOfMemoryError) as exc:
            result.setdefault("sweep_not_run", []).append([batch, context, kept, str(exc)[:100]])
            torch.cuda.empty_cache()
            continue
        floor_ms = store.kv_bytes / result["copy_bandwidth_GBps"] / 1e6
        first = None  # the first variant's output: every other one must agree with it
        for name in candidates:
            v = VARIANTS[name]
            m = Methods(store, plan_for(layout, v), v, sm_count)
            r = run_method(m, "ragged_aot", args.time_per_method_s)
            r.update(variant=name, batch=batch, context=context, kept=kept)
            if "ms" in r:
                r["ratio_to_floor"] = round(r["ms"] / floor_ms, 3)
                out = m.outs["ragged_aot"].float()
                if first is None:
                    first = out.clone()
                r["max_abs_diff_vs_first"] = float((out - first).abs().max())
            fixed = run_method(m, "ragged_aot_empty", args.time_per_method_s)
            if "ms" in fixed:
                r["fixed_ms"] = fixed["ms"]
            result["variant_sweep"].append(r)
            print(
                f"  sweep b{batch} {context // 1024}K {int(kept * 100)}% {name:40s} "
                f"{r.get('ms', r.get('error'))}",
                flush=True,
            )
            del m
        del store
        torch.cuda.empty_cache()
    return pick_variants(result["variant_sweep"], candidates)


def cta_model(plan: AotPlan, layout: PoolLayout, batch: int, context: int, block_n: int) -> dict:
    """What the kernel's chunk rule makes of a plan at one point, per layer (host-side
    model, no GPU): CTAs launched, CTAs with tokens, and tiles of the longest CTA vs the
    mean over CTAs with tokens (the imbalance the tail pays for)."""
    lens = [kept_tokens(context, r, RULE) for r in layout.ratios]
    b = plan.bucket(batch)
    launched, busy, longest, tiles = 0, 0, 0, 0
    for layer in range(plan.num_layers):
        for g in plan.group_of[layer]:
            splits, n = plan.splits[b][g], lens[g]
            chunk = -(-max(-(-n // splits), plan.min_chunk) // block_n) * block_n
            full, rest = divmod(n, chunk)
            launched += splits * batch
            busy += (full + (rest > 0)) * batch
            longest = max(longest, chunk // block_n if full else -(-rest // block_n))
            tiles += -(-n // block_n) * batch  # upper bound per head (+ partial tiles)
    return {
        "ctas_per_layer": launched / plan.num_layers,
        "busy_ctas_per_layer": busy / plan.num_layers,
        "longest_cta_tiles": longest,
        "mean_busy_cta_tiles": round(tiles / max(busy, 1), 2),
        "partial_MB": round(
            batch * plan.bucket_max_splits(b) * plan.num_q_heads * (128 + 1) * 4 / 2**20, 2
        ),
    }


def dry_run(args, candidates: list[str]) -> int:
    """CPU check of the benchmark's host side: arguments, synthetic profiles, every
    candidate variant's plan and device tables, and the CTA model at each point."""
    model = qwen3_4b()
    sm_count = 132
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    kept_list = sorted((float(x) for x in args.kept.split(",")), reverse=True)
    layouts = {k: synthetic_layout(model, k) for k in kept_list}
    print(f"dry run: {len(candidates)} variants, points {point_order(batches, contexts)}")
    for k, (_, info) in layouts.items():
        print(f"  kept {k}: {info}")
    for name in candidates:
        v = VARIANTS[name]
        print(f"variant {name}: {v.describe()}")
        for kept in kept_list:
            layout = layouts[kept][0]
            plan = variant_plan(layout, model.num_q_heads, sm_count, v)
            schedule = DecodeSchedule(plan, "cpu")
            DecodeWorkspace(schedule, max(batches), layout.head_dim, "cpu")
            for batch in batches:
                splits = plan.splits[plan.bucket(batch)]
                for context in contexts:
                    m = cta_model(plan, layout, batch, context, v.launch.block_n)
                    print(f"  kept {kept} b{batch} {context // 1024}K splits {splits}: {m}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="4,16,64")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--kept", default="0.1,0.25,0.5,1.0")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting points after")
    ap.add_argument("--time-per-method-s", type=float, default=0.3)
    ap.add_argument(
        "--variant",
        default="sweep",
        help="a VARIANTS key; 'sweep' (all of them) or 'sweep:NAME,NAME,...' times them on "
        "SWEEP_POINTS first and runs each batch size with its fastest",
    )
    ap.add_argument(
        "--sweep-budget-s", type=float, default=200, help="start no sweep point after this"
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: check the arguments, build every variant's plan and device tables on "
        "the CPU and print its CTA model per point",
    )
    ap.add_argument(
        "--methods", default=",".join(RAGGED_METHODS + FULL_METHODS + REFERENCE_METHODS)
    )
    ap.add_argument("--no-grouping-compare", action="store_true")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/)")
    ap.add_argument("--command", default=" ".join(sys.argv))
    ap.add_argument("--render", metavar="JSON", help="only write JSON's markdown table (no GPU)")
    args = ap.parse_args(argv)
    candidates = sweep_candidates(args.variant)
    if candidates is None:
        ap.error(f"--variant {args.variant!r}: unknown; one of {', '.join(VARIANTS)} or sweep")
    if args.dry_run:
        return dry_run(args, candidates)
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render_markdown(json.loads(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
        return 0
    start = time.time()
    date = dt.date.today().isoformat()
    out_path = Path(args.out or f"bench/results/kernels-{date}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    sm_count, l2 = props.multi_processor_count, props.L2_cache_size
    model = qwen3_4b()
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    kept_list = sorted((float(x) for x in args.kept.split(",")), reverse=True)
    wanted = set(args.methods.split(","))

    def versions() -> dict:
        import triton

        found = {"torch": torch.__version__, "triton": triton.__version__}
        for mod in ("flashinfer", "sglang"):
            try:
                found[mod] = importlib.import_module(mod).__version__
            except Exception as exc:  # noqa: BLE001
                found[mod] = f"unavailable ({type(exc).__name__})"
        return found

    sglang_decode = None
    if "sglang_triton_full" in wanted:
        try:
            sglang_decode = load_sglang_decode()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            print(f"SGLang Triton decode unavailable: {exc}")
    bw = copy_bandwidth()
    print(f"device {props.name}: {sm_count} SMs, L2 {l2 >> 20} MiB, copy {bw / 1e9:.0f} GB/s")
    free, _ = torch.cuda.mem_get_info()
    mem_budget = int(free * 0.55)
    layouts = {k: synthetic_layout(model, k) for k in kept_list}
    result = {
        "device": props.name,
        "date": date,
        "command": args.command,
        "versions": versions(),
        "sm_count": sm_count,
        "l2_bytes": l2,
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "page_size": args.page_size,
        "dtype": "bfloat16",
        "model": QWEN3_4B,
        "profiles": {str(k): info for k, (_, info) in layouts.items()},
        "variant_sweep": [],
        "rows": [],
        "not_run": [],
    }

    def save() -> None:
        result["summary"] = summarize(result)
        out_path.write_text(json.dumps(result, indent=1))

    def plan_for(layout: PoolLayout, variant: Variant) -> AotPlan:
        return variant_plan(layout, model.num_q_heads, sm_count, variant)

    # 1. Our kernel's launch variant per batch size, from a timed sweep over all variants.
    if len(candidates) > 1:
        chosen = sweep_variants(
            candidates, kept_list, layouts, args, l2, mem_budget, plan_for, sm_count, start, result
        )
    else:
        chosen = {"overall": candidates[0], "by_batch": {}}
    result["chosen_variant"] = {
        **chosen,
        "configs": {
            n: VARIANTS[n].describe() for n in {chosen["overall"], *chosen["by_batch"].values()}
        },
    }
    print(f"variants: {chosen}")
    save()

    def variant_for(batch: int) -> Variant:
        return VARIANTS[chosen["by_batch"].get(str(batch), chosen["overall"])]

    # 2. The sweep.
    for batch, context in point_order(batches, contexts):
        for kept in kept_list:
            if time.time() - start > args.budget_s:
                result["not_run"].append({"batch": batch, "context": context, "kept": kept})
                continue
            layout, info = layouts[kept]
            try:
                store = Storage(layout, batch, context, args.page_size, l2, mem_budget)
            except (MemoryError, torch.OutOfMemoryError) as exc:
                result["not_run"].append(
                    {"batch": batch, "context": context, "kept": kept, "why": str(exc)[:200]}
                )
                torch.cuda.empty_cache()
                continue
            variant = variant_for(batch)
            methods = Methods(store, plan_for(layout, variant), variant, sm_count, sglang_decode)
            names = [n for n in RAGGED_METHODS + REFERENCE_METHODS if n in wanted]
            if kept >= 1.0:
                names += [
                    n
                    for n in FULL_METHODS
                    if n in wanted and (n != "sglang_triton_full" or sglang_decode)
                ]
            floor_ms = store.kv_bytes / bw * 1e3
            for name in names:
                r = run_method(methods, name, args.time_per_method_s)
                row = {
                    "batch": batch,
                    "context": context,
                    "kept": kept,
                    "mean_group_ratio": info["mean_group_ratio"],
                    "method": name,
                    "kv_bytes": store.kv_bytes,
                    "floor_ms": round(floor_ms, 4),
                    "kv_copies": store.copies,
                    **r,
                }
                if "ms" in r:
                    row["ratio_to_floor"] = round(r["ms"] / floor_ms, 3)
                    row["achieved_GBps"] = round(store.kv_bytes / r["ms"] / 1e6, 1)
                if name == "ragged_aot":
                    row["variant"] = next(n for n, v in VARIANTS.items() if v == variant)
                result["rows"].append(row)
                print(
                    f"b{batch:<3d} ctx{context:<7d} kept {kept:<5} {name:22s} "
                    f"{r.get('ms', r.get('error', r.get('not_applicable')))} "
                    f"(floor {floor_ms:.3f} ms)",
                    flush=True,
                )
            for row in result["rows"][-len(names) :]:
                row["max_abs_diff_vs_ours"] = out_diff(methods, row["method"])
            del methods, store
            torch.cuda.empty_cache()
            save()
    # 3. DESIGN 5b: the same point with per-layer-balanced groups (one FlashInfer shape
    # per group), if time is left.
    compare = not args.no_grouping_compare and "ragged_aot" in wanted
    if compare and time.time() - start < args.budget_s and 0.25 in kept_list:
        layout, info = synthetic_layout(model, 0.25, grouping="per-layer")
        result["profiles"]["0.25@per-layer"] = info
        store = Storage(layout, 16, 32768, args.page_size, l2, mem_budget)
        variant = variant_for(16)
        methods = Methods(store, plan_for(layout, variant), variant, sm_count)
        floor_ms = store.kv_bytes / bw * 1e3
        for name in [n for n in ("ragged_aot", "ragged_replan") if n in wanted]:
            r = run_method(methods, name, args.time_per_method_s)
            row = {
                "batch": 16,
                "context": 32768,
                "kept": 0.25,
                "grouping": "per-layer",
                "mean_group_ratio": info["mean_group_ratio"],
                "method": f"{name}@per-layer",
                "kv_bytes": store.kv_bytes,
                "floor_ms": round(floor_ms, 4),
                **r,
            }
            if "ms" in r:
                row["ratio_to_floor"] = round(r["ms"] / floor_ms, 3)
            result["rows"].append(row)
            print(f"per-layer groups b16 32K 25% {name}: {r.get('ms', r.get('error'))}")
        del methods, store
        torch.cuda.empty_cache()
    save()
    out_path.with_suffix(".md").write_text(render_markdown(result))
    print(render_markdown(result))
    print(f"wrote {out_path} and {out_path.with_suffix('.md')}")
    return 0


def _ms(rows, batch, context, kept, method):
    for r in rows:
        if (r["batch"], r["context"], r["kept"], r["method"]) == (batch, context, kept, method):
            return r.get("ms")
    return None


def summarize(result: dict) -> dict:
    rows = result["rows"]
    full = _ms(rows, 4, 32768, 1.0, "flashinfer_full")
    ours = _ms(rows, 4, 32768, 0.25, "ragged_aot")
    speedup = round(full / ours, 3) if full and ours else None
    big = [r for r in rows if r["method"] == "ragged_aot" and "ms" in r and r["kv_bytes"] >= 1e9]
    worst = max(big, key=lambda r: r["ratio_to_floor"]) if big else None
    b64 = {}
    for r in rows:
        if r["method"] == "ragged_aot" and r["batch"] == 64 and r["kept"] < 1.0 and "ms" in r:
            replan = _ms(rows, 64, r["context"], r["kept"], "ragged_replan")
            if replan:
                b64[f"{r['context']}@{r['kept']}"] = round(replan / r["ms"], 3)
    vs_copy = {}
    for r in big:
        copy = _ms(rows, r["batch"], r["context"], r["kept"], "layer_copy")
        if copy:
            vs_copy[f"b{r['batch']}/{r['context']}@{r['kept']}"] = round(r["ms"] / copy, 3)
    aot_min = min(b64.values()) if b64 else None
    geo = round(math.exp(statistics.mean(math.log(x) for x in b64.values())), 3) if b64 else None
    return {
        "device": result["device"],
        "date": result["date"],
        "speedup_vs_flashinfer_full_25pct_b4_32k": speedup,
        "worst_ratio_to_bandwidth_floor": worst["ratio_to_floor"] if worst else None,
        "worst_point": {k: worst[k] for k in ("batch", "context", "kept")} if worst else None,
        "ours_vs_layer_copy": vs_copy,
        "aot_vs_replan_geomean_b64": geo,
        "aot_vs_replan_min_b64": aot_min,
        "aot_vs_replan_definition": "over batch-64 points with kept < 100%: ragged_replan ms "
        "(host plan() + kernels, a serving step's wall time) / ragged_aot ms",
        "aot_vs_replan_points_b64": b64,
        "targets": {
            "speedup_ge_3": speedup is not None and speedup >= 3.0,
            "floor_ratio_le_1.5": worst is not None and worst["ratio_to_floor"] <= 1.5,
            "aot_vs_replan_geomean_ge_1.3": geo is not None and geo >= 1.3,
            "aot_vs_replan_min_ge_0.97": aot_min is not None and aot_min >= 0.97,
        },
    }


COLUMNS = (
    ("layer_copy", "36 layer-sized copies"),
    ("ragged_aot", "ours (AOT)"),
    ("ragged_replan", "ragged replan"),
    ("ragged_aot_flashinfer", "ragged AOT-FlashInfer"),
    ("flashinfer_full", "FlashInfer full"),
    ("sglang_triton_full", "SGLang Triton full"),
)


def render_markdown(result: dict) -> str:
    """The results table: ms per decode step (36 layers) and, in brackets, x the floor."""
    s = result.get("summary") or summarize(result)
    lines = [
        f"# Decode attention kernels, {result['device']}, {result['date']}",
        "",
        f"Command (on the GPU machine): `{result['command']}`  ",
        f"Versions: {json.dumps(result['versions'])}  ",
        f"Copy bandwidth (read + write): {result['copy_bandwidth_GBps']} GB/s; "
        f"{result['sm_count']} SMs; page size {result['page_size']}; bf16 KV; Qwen3-4B shapes "
        "(36 layers, 32 q / 8 kv heads, head_dim 128).  ",
        f"Our kernel's launch variant: {describe_chosen(result.get('chosen_variant', {}))}.",
        "",
        "Time per decode step (all 36 layers, CUDA graph replay + the step's host work), "
        "median, in ms; `[x]` = time / bandwidth floor. Full-KV baselines are measured at "
        "kept 100% (they read all KV whatever the kept ratio). `replan (gpu)` is the same "
        "step without its host `plan()` calls.",
        "",
        "| batch | context | kept | KV GB | floor ms | "
        + " | ".join(t for _, t in COLUMNS)
        + " | replan (gpu) | plans/step |",
        "|" + "---|" * (5 + len(COLUMNS) + 2),
    ]
    extra = [r for r in result["rows"] if "@" in r["method"]]
    rows = [r for r in result["rows"] if "@" not in r["method"]]
    keys = sorted({(r["batch"], r["context"], r["kept"]) for r in rows})
    for b, c, k in keys:
        group = {r["method"]: r for r in rows if (r["batch"], r["context"], r["kept"]) == (b, c, k)}
        any_row = next(iter(group.values()))
        cells = []
        for method, _ in COLUMNS:
            r = group.get(method)
            if r is None:
                cells.append("")
            elif "ms" in r:
                cells.append(f"{r['ms']:.3f} [{r['ratio_to_floor']:.2f}]")
            elif "not_applicable" in r:
                cells.append("n/a (int32 offsets)" if "int32" in r["not_applicable"] else "n/a")
            else:
                cells.append("error")
        replan = group.get("ragged_replan", {})
        gpu = replan.get("gpu_only_ms")
        cells.append(f"{gpu:.3f}" if gpu else "")
        cells.append(str(replan.get("plans_per_step", "")))
        lines.append(
            f"| {b} | {c // 1024}K | {int(k * 100)}% | {any_row['kv_bytes'] / 1e9:.2f} | "
            f"{any_row['floor_ms']:.3f} | " + " | ".join(cells) + " |"
        )
    lines += _extra_sections(result)
    if extra:
        lines += [
            "",
            "Per-layer-balanced groups (DESIGN 5b), same point with the global "
            "groups in the table above:",
            "",
        ]
        for r in extra:
            got = f"{r['ms']:.3f} ms [{r['ratio_to_floor']:.2f}]" if "ms" in r else "error"
            lines.append(
                f"- b{r['batch']} {r['context'] // 1024}K {int(r['kept'] * 100)}% "
                f"{r['method']}: {got}, plans/step {r.get('plans_per_step', '')}"
            )
    lines += ["", "Summary:", "", "```", json.dumps(s, indent=1), "```"]
    if result.get("not_run"):
        lines += ["", f"Not run (time or memory): {result['not_run']}"]
    return "\n".join(lines) + "\n"


def describe_chosen(chosen: dict) -> str:
    """The chosen variant(s): one name (older results), or overall plus per batch size."""
    if "name" in chosen:
        return f"`{chosen['name']}` (chosen by the variant sweep in the JSON)"
    by_batch = ", ".join(f"b{b}: `{n}`" for b, n in chosen.get("by_batch", {}).items())
    text = f"`{chosen.get('overall')}`"
    return text + (f"; per batch size (sweep winners) {by_batch}" if by_batch else "")


def _extra_sections(result: dict) -> list[str]:
    """Sections that a combined results file may carry: the AOT-FlashInfer pass, the
    launch-variant sweep and notes on the device runs."""
    lines: list[str] = []
    fi_rows = result.get("aot_flashinfer_pass", {}).get("rows", [])
    if fi_rows:
        lines += [
            "",
            "FlashInfer driven by our AOT splits (separate pass, same call):",
            "",
            "| batch | context | kept | ours ms [x floor] | AOT-FlashInfer ms [x floor] |",
            "|---|---|---|---|---|",
        ]
        for b, c, k in sorted({(r["batch"], r["context"], r["kept"]) for r in fi_rows}):
            cell = {
                r["method"]: r
                for r in fi_rows
                if (r["batch"], r["context"], r["kept"]) == (b, c, k)
            }
            got = [
                f"{cell[m]['ms']:.3f} [{cell[m]['ratio_to_floor']:.2f}]"
                if m in cell and "ms" in cell[m]
                else "error"
                for m in ("ragged_aot", "ragged_aot_flashinfer")
            ]
            lines.append(f"| {b} | {c // 1024}K | {int(k * 100)}% | {got[0]} | {got[1]} |")
    sweep = result.get("variant_sweep", [])
    if sweep:
        points = list(dict.fromkeys((r["batch"], r["context"], r["kept"]) for r in sweep))
        lines += [
            "",
            f"Launch-variant sweep of our kernel ({result.get('variant_sweep_note', '')}"
            "), ms per step [x floor where known]; `fixed` = the same launches over zero "
            "lengths (no KV read):",
            "",
            "| variant | "
            + " | ".join(f"b{b} {c // 1024}K {int(k * 100)}%" for b, c, k in points)
            + " |",
            "|---|" + "---|" * len(points),
        ]
        for name in dict.fromkeys(r["variant"] for r in sweep):
            got = {(r["batch"], r["context"], r["kept"]): r for r in sweep if r["variant"] == name}
            cells = []
            for p in points:
                r = got.get(p, {})
                if r.get("ms") is None:
                    cells.append("error" if "error" in r else "")
                elif "ratio_to_floor" in r:
                    cells.append(f"{r['ms']:.3f} [{r['ratio_to_floor']:.2f}]")
                else:
                    cells.append(f"{r['ms']:.3f}")
                if r.get("fixed_ms") is not None:
                    cells[-1] += f", fixed {r['fixed_ms']:.3f}"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    runs = result.get("runs", [])
    if runs:
        lines += ["", "Device runs:", ""] + [f"- {note}" for note in runs]
    return lines


if __name__ == "__main__":
    sys.exit(main())
