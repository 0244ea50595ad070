"""Summarize SGLang's torch-profiler traces (`/start_profile` with `profile_by_stage`) as
markdown: per trace (EXTEND or DECODE steps of one server), the wall span, the GPU time in
kernels and how busy the GPU was over the span, kernel launches, the kernels that took the
most GPU time, and the host's torch ops (how many; the most called) - the per-step host
work. Compact enough to come back from the device machine in place of the
traces themselves (tens of MB each).

    python bench/device/profile_summary.py DIR [DIR ...] > profile.md
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}


def summarize(path: Path, top: int = 12) -> dict:
    """Span, GPU kernel time, launches and the top kernels of one chrome trace."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X"]
    if not events:
        return {"trace": path.name, "events": 0}
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e.get("dur", 0) for e in events)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    launches = graph_launches = 0
    for e in events:
        if e.get("cat") in GPU_CATS or e.get("cat") == "cpu_op":
            entry = (by_kernel if e.get("cat") in GPU_CATS else by_op)[e["name"][:90]]
            entry[0] += e.get("dur", 0)
            entry[1] += 1
        elif e.get("cat") in ("cuda_runtime", "cuda_driver"):
            launches += e["name"] in LAUNCHES
            graph_launches += e["name"] == "cudaGraphLaunch"
    gpu = sum(t for t, _ in by_kernel.values())
    ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "trace": path.name,
        "span_ms": (end - start) / 1000,
        "gpu_ms": gpu / 1000,
        "gpu_busy": gpu / max(end - start, 1),
        "kernel_launches": launches,
        "graph_launches": graph_launches,
        "top": [(name, t / 1000, n) for name, (t, n) in ranked],
        "cpu_ops": sum(n for _, n in by_op.values()),
        "top_ops": [(name, t / 1000, n) for name, (t, n) in ops],
    }


def markdown(label: str, s: dict) -> str:
    if not s.get("events", 1):
        return f"### {label}: {s['trace']}\n\nno events\n"
    lines = [
        f"### {label}: {s['trace']}",
        "",
        f"span {s['span_ms']:.1f} ms, GPU kernels {s['gpu_ms']:.1f} ms "
        f"({100 * s['gpu_busy']:.0f}% busy), {s['kernel_launches']} kernel launches, "
        f"{s['graph_launches']} graph launches, {s['cpu_ops']} host ops",
        "",
        "| kernel | GPU ms | calls |",
        "|---|---|---|",
        *(f"| `{name}` | {ms:.2f} | {n} |" for name, ms, n in s["top"]),
        "",
        "| host op (most called) | ms (inclusive) | calls |",
        "|---|---|---|",
        *(f"| `{name}` | {ms:.2f} | {n} |" for name, ms, n in s["top_ops"]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="folders of *.trace.json.gz (one per server)")
    args = ap.parse_args()
    for d in map(Path, args.dirs):
        for trace in sorted(d.glob("*.trace.json*")):
            print(markdown(d.name, summarize(trace)))


if __name__ == "__main__":
    main()
