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


TRACE = {"buf": None, "next": 0}


def _trace_base(n):
    base = TRACE["next"]
    TRACE["next"] += n
    return base
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
        "        BATCH_FASTEST=launch.batch_fastest,\n        Trace=TRACE['buf'],\n"
        "        trace_base=_trace_base(grid[0] * grid[1]),\n",
    ),
    (
        "            TRIGGER=TRIGGERS.index(launch.trigger),\n            num_warps=4,\n",
        "            TRIGGER=TRIGGERS.index(launch.trigger),\n            Trace=TRACE['buf'],\n"
        "            trace_base=_trace_base(batch * hq * (block_d // merge_d)),\n"
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


def layer_summary(rows: torch.Tensor) -> dict:
    """rows [n, 4] (start, wait end, end, sm) in ns -> first/last times."""
    t = rows[:, :3].double()
    return {
        "first_start": t[:, 0].min().item(),
        "last_start": t[:, 0].max().item(),
        "first_wait": t[:, 1].min().item(),
        "last_wait": t[:, 1].max().item(),
        "median_end": t[:, 2].median().item(),
        "last_end": t[:, 2].max().item(),
        "median_busy": (t[:, 2] - t[:, 1]).median().item(),
        "max_busy": (t[:, 2] - t[:, 1]).max().item(),
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
    schedule = mod.DecodeSchedule(plan, "cuda")
    ws = mod.DecodeWorkspace(schedule, batch, 128, "cuda")
    works = [schedule.layer(batch, layer) for layer in range(len(store.layers))]
    layers_kv = store.layers
    if empty:  # the same launches over zero lengths: the step's fixed cost
        zeros = torch.zeros_like(store.group_lens)
        layers_kv = [dataclasses.replace(kv, group_lens=zeros) for kv in layers_kv]
    q = torch.randn(batch, model.num_q_heads, 128, device="cuda", dtype=bench.DTYPE)
    out = torch.zeros_like(q)
    need = 0
    for w in works:
        _, merge_d = mod.merge_shape(w.block_s, variant.launch.merge_tile, 1, 128)
        need += batch * w.num_items + batch * model.num_q_heads * (128 // merge_d)
    mod.TRACE["buf"] = torch.zeros((need * 4,), device="cuda", dtype=torch.int64)

    def step() -> None:
        mod.TRACE["next"] = 0
        for kv, work in zip(layers_kv, works, strict=True):
            mod.decode_attention(
                q, kv, store.req_rows, 0.088, work, ws, out=out, launch=variant.launch
            )

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    used = mod.TRACE["next"]
    times = bench.time_steps(graph, None, 0.3)
    graph.replay()
    torch.cuda.synchronize()
    buf = mod.TRACE["buf"][: used * 4].view(-1, 4).cpu()
    # Walk the launches in order: split then (kernel merge) merge, per layer.
    layers, at = [], 0
    merge_kernel = variant.launch.merge == "kernel"
    for w in works:
        n = batch * w.num_items
        split = buf[at : at + n]
        at += n
        entry = {"split": layer_summary(split)}
        if merge_kernel:
            _, merge_d = mod.merge_shape(w.block_s, variant.launch.merge_tile, 1, 128)
            m = batch * model.num_q_heads * (128 // merge_d)
            entry["merge"] = layer_summary(buf[at : at + m])
            at += m
        layers.append(entry)
    assert at == used, (at, used)
    base = [e["split"]["first_start"] for e in layers]
    rel = []
    for i, e in enumerate(layers):
        r = {
            f"split_{k}": (v - base[i]) / 1e3
            for k, v in e["split"].items()
            if k not in ("median_busy", "max_busy", "max_per_sm")
        }
        r["split_median_busy"] = e["split"]["median_busy"] / 1e3
        r["split_max_busy"] = e["split"]["max_busy"] / 1e3
        r["split_max_per_sm"] = e["split"]["max_per_sm"]
        if "merge" in e:
            r.update(
                {
                    f"merge_{k}": (v - base[i]) / 1e3
                    for k, v in e["merge"].items()
                    if k not in ("median_busy", "max_busy", "max_per_sm")
                }
            )
        if i + 1 < len(layers):
            r["next_split_first_start"] = (base[i + 1] - base[i]) / 1e3
            r["next_split_last_wait"] = (layers[i + 1]["split"]["last_wait"] - base[i]) / 1e3
            r["next_split_first_wait"] = (layers[i + 1]["split"]["first_wait"] - base[i]) / 1e3
        rel.append(r)
    keys = rel[0].keys()
    median = {k: round(statistics.median(r[k] for r in rel if k in r), 2) for k in keys}
    step_us = (layers[-1].get("merge", layers[-1]["split"])["last_end"] - base[0]) / 1e3
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
