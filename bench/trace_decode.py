"""CTA timeline of our decode step on the GPU: where a layer's time goes.

An instrumented copy of `tangram_sglang.kernels.decode` (built from its source at run time,
so the kernels measured are the project's, plus three timer reads) records per program
of the split and merge kernels: start, end of the PDL wait, end (`%globaltimer`, ns) and
the SM. The step (36 layers) is captured in a CUDA graph and replayed as in
`bench/kernels.py`; the last replay's timeline is summarized per layer: the split
kernel's first start / last wait end / last end, the merge's, and the gaps between them,
as medians over layers. Times are relative to the layer's first split start.

    python bench/trace_decode.py --points 4x8192x0.25,4x32768x0.1 --variant NAME
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as bench  # noqa: E402  (bench/kernels.py)

TIMERS = """

@triton.jit
def _now():
    return tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _smid():
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def _trace(Trace, slot, t0, t1):
    t2 = _now()
    tl.store(Trace + slot * 4, t0)
    tl.store(Trace + slot * 4 + 1, t1)
    tl.store(Trace + slot * 4 + 2, t2)
    tl.store(Trace + slot * 4 + 3, _smid().to(tl.int64))


TRACE = {"buf": None, "launches": []}  # launches: (kernel, first row, programs)


def _trace_args(kernel, n, device):
    # The launch's rows in the trace buffer, which grows (an eager step sizes it before
    # the captured one).
    base = sum(count for _, _, count in TRACE["launches"])
    TRACE["launches"].append((kernel, base, n))
    if TRACE["buf"] is None or TRACE["buf"].numel() < 4 * (base + n):
        TRACE["buf"] = torch.zeros((8 * (base + n),), dtype=torch.int64, device=device)
    return {"Trace": TRACE["buf"], "trace_base": base}
"""

# (anchor, replacement) pairs: each anchor must occur exactly once in the module source.
EDITS = [
    ('TRIGGERS = ("start", "wait", "end")', 'TRIGGERS = ("start", "wait", "end")' + TIMERS),
    (
        "    LINE_ELEMS: tl.constexpr,\n):\n",
        "    LINE_ELEMS: tl.constexpr,\n    Trace,\n    trace_base,\n):\n",
    ),
    (
        "        item = tl.program_id(0)\n        b = tl.program_id(1)\n",
        "        item = tl.program_id(0)\n        b = tl.program_id(1)\n    t0 = _now()\n"
        "    t1 = t0\n",
    ),
    (
        "        gdc_wait()\n        if TRIGGER == 1:\n            gdc_launch_dependents()\n",
        "        gdc_wait()\n        t1 = _now()\n        if TRIGGER == 1:\n"
        "            gdc_launch_dependents()\n",
    ),
    (
        "                tl.atomic_xchg(Arrivals + b * num_kv_heads + h, 0)\n",
        "                tl.atomic_xchg(Arrivals + b * num_kv_heads + h, 0)\n"
        "    _trace(Trace, trace_base + tl.program_id(0) * tl.num_programs(1)"
        " + tl.program_id(1), t0, t1)\n",
    ),
    (
        "    USE_PDL: tl.constexpr,\n    TRIGGER: tl.constexpr,\n):\n",
        "    USE_PDL: tl.constexpr,\n    TRIGGER: tl.constexpr,\n    Trace,\n    trace_base,\n):\n",
    ),
    (
        "    hq = tl.program_id(1)\n",
        "    hq = tl.program_id(1)\n    t0 = _now()\n    t1 = t0\n",
    ),
    (
        "        gdc_wait()\n        if TRIGGER != 0:\n",
        "        gdc_wait()\n        t1 = _now()\n        if TRIGGER != 0:\n",
    ),
    (
        "            WRITE_LSE,\n        )\n\n\ndef merge_shape",
        "            WRITE_LSE,\n        )\n    _trace(Trace, trace_base + (tl.program_id(0) * "
        "tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2), t0, "
        "t1)\n\n\ndef merge_shape",
    ),
    (
        "        BATCH_FASTEST=launch.batch_fastest,\n",
        "        BATCH_FASTEST=launch.batch_fastest,\n"
        "        **_trace_args('split', grid[0] * grid[1], q.device),\n",
    ),
    (
        "            TRIGGER=TRIGGERS.index(launch.trigger),\n            num_warps=4,\n",
        "            TRIGGER=TRIGGERS.index(launch.trigger),\n"
        "            **_trace_args('merge', batch * hq * (block_d // merge_d), q.device),\n"
        "            num_warps=4,\n",
    ),
]


TRACED_PATH = Path(tempfile.gettempdir()) / "tangram_traced_decode.py"


def traced_module() -> types.ModuleType:
    """The decode module with timer reads; written to a file (Triton's jit needs source)."""
    import tangram_sglang.kernels.decode as decode

    src = Path(decode.__file__).read_text()
    for anchor, new in EDITS:
        if src.count(anchor) != 1:
            raise RuntimeError(f"anchor found {src.count(anchor)} times: {anchor!r}")
        src = src.replace(anchor, new)
    path = TRACED_PATH
    path.write_text(src)
    import importlib.util

    spec = importlib.util.spec_from_file_location("tangram_traced_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tangram_traced_decode"] = module
    spec.loader.exec_module(module)
    return module


def summary(rows: torch.Tensor, base: float) -> dict:
    """One launch's rows [n, 4] (start, wait end, end in ns; SM) -> µs after `base` (the
    layer's first split start), the programs' busy time after their wait, and the most
    programs one SM ran."""
    t = rows[:, :3].double()
    busy = t[:, 2] - t[:, 1]
    return {
        "first_start": (t[:, 0].min().item() - base) / 1e3,
        "last_start": (t[:, 0].max().item() - base) / 1e3,
        "first_wait": (t[:, 1].min().item() - base) / 1e3,
        "last_wait": (t[:, 1].max().item() - base) / 1e3,
        "median_end": (t[:, 2].median().item() - base) / 1e3,
        "last_end": (t[:, 2].max().item() - base) / 1e3,
        "median_busy": busy.median().item() / 1e3,
        "max_busy": busy.max().item() / 1e3,
        "max_per_sm": int(torch.bincount(rows[:, 3].long()).max().item()),
    }


def trace_point(
    mod, batch: int, context: int, kept: float, variant_name: str, l2: int, empty: bool
) -> dict:
    model = bench.qwen3_4b()
    layout, _ = bench.synthetic_layout(model, kept)
    variant = bench.VARIANTS[variant_name]
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    plan = bench.variant_plan(layout, model.num_q_heads, sm_count, variant)
    free, _ = torch.cuda.mem_get_info()
    store = bench.Storage(layout, batch, context, 16, l2, int(free * 0.5))
    dim = layout.head_dim
    schedule = mod.DecodeSchedule(plan, "cuda")
    ws = mod.DecodeWorkspace(schedule, batch, dim, "cuda")
    works = [schedule.layer(batch, layer) for layer in range(len(store.layers))]
    layers_kv = store.layers
    if empty:  # the same launches over zero lengths: the step's fixed cost
        zeros = torch.zeros_like(store.group_lens)
        layers_kv = [dataclasses.replace(kv, group_lens=zeros) for kv in layers_kv]
    q = torch.randn(batch, model.num_q_heads, dim, device="cuda", dtype=bench.DTYPE)
    out = torch.zeros_like(q)

    launches = mod.TRACE["launches"]

    def step() -> None:
        launches.clear()
        for kv, work in zip(layers_kv, works, strict=True):
            mod.decode_attention(
                q, kv, store.req_rows, dim**-0.5, work, ws, out=out, launch=variant.launch
            )

    mod.TRACE["buf"] = None
    step()  # eager: compiles, and sizes the trace buffer
    torch.cuda.synchronize()
    sized = mod.TRACE["buf"]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    assert mod.TRACE["buf"] is sized, "the trace buffer grew during capture"
    times = bench.time_steps(graph, None, 0.3)
    graph.replay()
    torch.cuda.synchronize()
    buf = mod.TRACE["buf"].view(-1, 4).cpu()
    # Per layer: its split launch, then its merge launch (none with the fused merge).
    layers = []
    for kernel, first, n in launches:
        if kernel == "split":
            layers.append({"rows": {"split": buf[first : first + n]}})
        else:
            layers[-1]["rows"][kernel] = buf[first : first + n]
    base = [e["rows"]["split"][:, 0].min().item() for e in layers]
    rel = []
    for i, e in enumerate(layers):
        r = {}
        for kernel, rows_i in e["rows"].items():
            r |= {f"{kernel}_{k}": v for k, v in summary(rows_i, base[i]).items()}
        if i + 1 < len(layers):
            nxt = summary(layers[i + 1]["rows"]["split"], base[i])
            r["next_split_first_start"] = nxt["first_start"]
            r["next_split_first_wait"] = nxt["first_wait"]
            r["next_split_last_wait"] = nxt["last_wait"]
        rel.append(r)
    median = {k: round(statistics.median(r[k] for r in rel if k in r), 2) for k in rel[0]}
    last = layers[-1]["rows"]
    step_us = (last.get("merge", last["split"])[:, 2].max().item() - base[0]) / 1e3
    return {
        "point": f"b{batch}/{context}@{kept}" + (" empty" if empty else ""),
        "variant": variant_name,
        "graph_ms": times["ms"],
        "traced_step_us": round(step_us, 1),
        "layer_median_us": median,
        "kv_MB_per_layer": round(store.kv_bytes / len(works) / 1e6, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="4x8192x0.25,4x32768x0.1,16x8192x0.1")
    ap.add_argument("--variants", default="kernel-n64-w4-s4-waves4-bf-pdl-end")
    ap.add_argument("--empty", action="store_true", help="also trace zero lengths")
    ap.add_argument("--out", default="/tmp/trace.json")
    args = ap.parse_args()
    mod = traced_module()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = []
    for name in args.variants.split(","):
        for p in args.points.split(","):
            b, c, k = p.split("x")
            for empty in (False, True) if args.empty else (False,):
                r = trace_point(mod, int(b), int(c), float(k), name, l2, empty)
                print(json.dumps(r), flush=True)
                results.append(r)
                torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
