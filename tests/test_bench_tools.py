"""The GPU benchmarks' host sides on the CPU: the kernel benchmark's dry run (every launch
variant's plan and device tables) and the CTA-timeline tool's instrumented kernels (its
source edits must each apply once to the current decode module)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str, monkeypatch):
    """bench/NAME.py as module NAME (bench/ first on sys.path, as when run as a script);
    both undone after the test."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_kernel_bench_dry_run_builds_every_variant(capsys, monkeypatch) -> None:
    bench = load("kernels", monkeypatch)
    args = ["--dry-run", "--batches", "4", "--contexts", "8192", "--kept", "0.25"]
    assert bench.main([*args, "--variant", "sweep"]) == 0
    printed = capsys.readouterr().out
    for name in bench.VARIANTS:
        assert f"variant {name}:" in printed
    assert any(v.launch.prefetch for v in bench.VARIANTS.values())


def test_trace_tool_instruments_the_current_kernels(tmp_path, monkeypatch) -> None:
    load("kernels", monkeypatch)
    trace = load("trace_decode", monkeypatch)
    monkeypatch.setattr(trace, "TRACED_PATH", tmp_path / "traced_decode.py")
    module = trace.traced_module()
    for kernel in (module._split_kernel, module._merge_kernel):
        assert kernel.arg_names[-2:] == ["Trace", "trace_base"]
    source = (tmp_path / "traced_decode.py").read_text()
    assert source.count("_trace(Trace, trace_base") == 2
    assert source.count("t1 = _now()") == 2
