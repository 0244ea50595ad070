"""Multi-turn serving benchmark: named server configurations on one session workload.

Each session (`bench/workloads.py`) advances turn by turn: a turn's prompt is the whole
history (earlier prompts and the server's real answers) plus its new tokens, sent as
`input_ids` to SGLang's native `/generate` with streaming, greedy, `ignore_eos`. At most
`--concurrency` sessions are in flight (a sweep: `--concurrency 1,4,16`); the others
wait for a slot. Per run it records request throughput, output tokens/s, TTFT and ITL
(p50/p90/p99), the prompt tokens each turn found in the radix cache and those re-prefilled
(history the server had to compute again), the most requests SGLang ran at once and how
many waited meanwhile (`/v1/loads`, polled), and the tangram pools (`/server_info`).

Configurations are started one at a time on this CPU machine (`tangram_sglang.cpu.server`;
`--max-total-tokens` sizes the KV pool so stock must evict), or `--url` drives one that is
already running (on the GPU: bench/device/). Writes OUT.json (with a `summary` of ratios
measured in this run), OUT.md and OUT.png (throughput against concurrency, TTFT CDF,
cached share per turn).

    .venv/bin/python bench/serve.py --workload shared-context --sessions 16 --scale 0.05 \\
        --configs stock,uniform-0.25,tangram-0.25 --concurrency 2,8 --out /tmp/serve
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import requests
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads  # noqa: E402

from tangram_sglang.cpu.server import Launch, running_servers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {
    "tiny": ROOT / "profiles" / "tiny-qwen3.ada-snapkv.yaml",
    "smollm2": ROOT / "profiles" / "smollm2-135m-instruct.headkv.yaml",
}
PERCENTILES = (50, 90, 99)
CPU_KV_BYTES = 4  # the CPU servers run fp32 (tangram_sglang/cpu/server.py)


def config_args(name: str, profile: Path, shape: str | None = None) -> tuple[list[str], bool]:
    """Server flags of a named configuration and whether it loads our plugin: `stock`,
    `stock-fp8`, `uniform-R`, `tangram-R`, `tangram-R-fp8` (R the memory share),
    `fastfusion-T`, and `+fusion-T` after a uniform or tangram one (Fast Fusion at
    threshold T); tangram's pools are split for the session `shape`
    (`workloads.pool_shape`) where given."""
    base, _, fusion = name.partition("+fusion-")
    if base.startswith("fastfusion-") and not fusion:
        return ["--kv-compression", "fastfusion", "--tangram-fusion", base.split("-", 1)[1]], True
    if fusion:
        flags, plugins = config_args(base, profile, shape)
        if not plugins:
            raise ValueError(f"configuration {name!r}: +fusion-T needs uniform-R or tangram-R")
        return [*flags, "--tangram-fusion", fusion], True
    parts = name.split("-")
    fp8 = ["--kv-cache-dtype", "fp8_e4m3"] if parts[-1] == "fp8" else []
    if parts[0] == "stock" and len(parts) <= 2:
        return fp8, False
    if parts[0] in ("uniform", "tangram") and len(parts) in (2, 3):
        flags = ["--kv-compression", parts[0], "--tangram-ratio", parts[1]]
        if parts[0] == "tangram":
            flags += ["--tangram-profile", str(profile)]
            flags += ["--tangram-workload", shape] if shape else []
        return flags + fp8, True
    raise ValueError(
        f"configuration {name!r} is not stock[-fp8], uniform-R, tangram-R[-fp8], "
        "fastfusion-T or uniform-R/tangram-R+fusion-T"
    )


def config_launch(name: str, profile: Path, extra: list[str], shape: str | None = None) -> Launch:
    """The CPU server of a named configuration (stock on SGLang's `torch_native`)."""
    flags, plugins = config_args(name, profile, shape)
    return Launch([*flags, *extra], plugins=plugins, attention=None if plugins else "torch_native")


@dataclass
class TurnRecord:
    session: int
    turn: int
    prompt: int
    new: int
    cached: int
    output: int
    ttft_s: float
    itl_s: list[float]
    end_s: float


def stream_generate(
    url: str, ids: list[int], max_tokens: int
) -> tuple[list[int], dict, float, list[float]]:
    """Output ids, meta_info, TTFT and inter-token latencies of one streamed greedy turn."""
    params = {"temperature": 0.0, "max_new_tokens": max_tokens, "ignore_eos": True}
    body = {"input_ids": ids, "sampling_params": params, "stream": True}
    start = time.perf_counter()
    ttft, itl, last, count, out, meta = None, [], start, 0, [], {}
    with requests.post(f"{url}/generate", json=body, stream=True, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            now = time.perf_counter()
            out, meta = chunk.get("output_ids", out), chunk.get("meta_info", meta)
            produced = int(meta.get("completion_tokens", len(out)))
            if produced > count:
                if ttft is None:
                    ttft = now - start
                else:
                    itl += [(now - last) / (produced - count)] * (produced - count)
                count, last = produced, now
    return out, meta, ttft if ttft is not None else time.perf_counter() - start, itl


class LoadPoller:
    """Polls `/v1/loads`: the most requests running at once, and at once with a queue."""

    def __init__(self, url: str, period: float = 0.2) -> None:
        self.url, self.period = url, period
        self.max_running = self.max_running_queued = self.max_waiting = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                loads = requests.get(f"{self.url}/v1/loads", timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            for load in loads.get("loads", loads if isinstance(loads, list) else []):
                running = int(load.get("num_running_reqs", 0))
                waiting = int(load.get("num_waiting_reqs", 0))
                self.max_running = max(self.max_running, running)
                self.max_waiting = max(self.max_waiting, waiting)
                if waiting:
                    self.max_running_queued = max(self.max_running_queued, running)

    def __enter__(self) -> LoadPoller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_sessions(url: str, sessions: list[workloads.Session], concurrency: int, desc: str):
    """Every session turn by turn, at most `concurrency` in flight; records and wall time."""
    slots = threading.Semaphore(concurrency)
    records: list[TurnRecord] = []
    lock = threading.Lock()
    turns = sum(len(s.turns) for s in sessions)
    bar = tqdm(total=turns, desc=desc, leave=False)
    start = time.perf_counter()

    def session(s: workloads.Session) -> None:
        time.sleep(max(0.0, start + s.arrival_s - time.perf_counter()))
        with slots:
            history: list[int] = []
            sent = 0.0
            for t, turn in enumerate(s.turns):
                if t:
                    time.sleep(max(s.think_s[t - 1], sent + s.gap_s - time.perf_counter()))
                prompt, sent = history + turn.new_ids, time.perf_counter()
                out, meta, ttft, itl = stream_generate(url, prompt, turn.max_tokens)
                record = TurnRecord(
                    s.session_id, t, len(prompt), len(turn.new_ids),
                    int(meta.get("cached_tokens", 0)), len(out), ttft, itl,
                    time.perf_counter() - start,
                )  # fmt: skip
                with lock:
                    records.append(record)
                    bar.update()
                history = prompt + list(out)

    with LoadPoller(url) as poller, ThreadPoolExecutor(len(sessions)) as pool:
        list(pool.map(session, sessions))
    bar.close()
    return records, time.perf_counter() - start, poller


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": round(float(np.percentile(values, p)) * 1e3, 2) for p in PERCENTILES}


def summarize(records: list[TurnRecord], wall: float, poller: LoadPoller) -> dict:
    follow = [r for r in records if r.turn]
    turns = max((r.turn for r in records), default=-1) + 1
    share = []
    for t in range(turns):
        at = [r for r in records if r.turn == t]
        share.append(round(sum(r.cached for r in at) / max(1, sum(r.prompt for r in at)), 4))
    return {
        "sessions": len({r.session for r in records}),
        "wall_s": round(wall, 2),
        "requests": len(records),
        "request_throughput": round(len(records) / wall, 3),
        "output_tok_s": round(sum(r.output for r in records) / wall, 1),
        "ttft_ms": pct([r.ttft_s for r in records]),
        "itl_ms": pct([x for r in records for x in r.itl_s]),
        "prompt_tokens": sum(r.prompt for r in records),
        "cached_tokens": sum(r.cached for r in records),
        # history (earlier prompts and answers) a follow-up turn had to compute again
        "reprefilled_tokens": sum(max(0, r.prompt - r.new - r.cached) for r in follow),
        "cached_share_per_turn": share,
        # sessions whose every follow-up turn found its whole history (earlier prompts and
        # answers, but the last answer token) in the radix cache: the sessions held
        "sessions_held": sum(
            all(r.cached >= r.prompt - r.new - 1 for r in follow if r.session == s)
            for s in {r.session for r in records}
        ),
        # SGLang's running batch size (/v1/loads; under overlap it still counts requests
        # that finish in that step)
        "max_running_requests": poller.max_running,
        "max_running_while_queued": poller.max_running_queued,
        "max_waiting_requests": poller.max_waiting,
        "ttft_s_all": sorted(round(r.ttft_s, 4) for r in records),
    }


def pool_state(url: str) -> dict | None:
    try:
        info = requests.get(f"{url}/server_info", timeout=30).json()
    except (requests.RequestException, ValueError):
        return None
    states = info.get("internal_states") or [{}]
    return states[0].get("tangram_pool")


def ratio(runs: dict, ours: str, theirs: str, key) -> float | None:
    if ours not in runs or theirs not in runs:
        return None
    a, b = key(runs[ours]), key(runs[theirs])
    return round(a / b, 3) if a and b else None


def summary_keys(runs: dict[str, dict], args: argparse.Namespace) -> dict:
    """The serving-benchmark issue's summary, at the highest concurrency run."""
    top = {name: r["sweep"][-1] for name, r in runs.items()}

    def thpt(r):
        return r["output_tok_s"]

    return {
        "throughput_ratio_tangram_vs_stock_25pct": ratio(top, "tangram-0.25", "stock", thpt),
        "throughput_ratio_tangram_vs_uniform_25pct": ratio(
            top, "tangram-0.25", "uniform-0.25", thpt
        ),
        "throughput_ratio_tangram_vs_stock_fp8kv_25pct": ratio(
            top, "tangram-0.25", "stock-fp8", thpt
        ),
        "ttft_p50_ratio_tangram_vs_stock": ratio(
            top, "tangram-0.25", "stock", lambda r: r["ttft_ms"]["p50"]
        ),
        "sessions_ratio_tangram_vs_stock_25pct": ratio(
            top, "tangram-0.25", "stock", lambda r: r["sessions_held"]
        ),
        # the ratio above is None where stock held no session at all: the counts
        "sessions_held": {name: r["sessions_held"] for name, r in top.items()},
        "device": args.device,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "workload": args.workload,
    }


def plot(runs: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the GPU image has none: plot the JSON here later (--merge)
        print(f"matplotlib missing: no {path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, run in runs.items():
        sweep = run["sweep"]
        axes[0].plot(
            [r["concurrency"] for r in sweep], [r["output_tok_s"] for r in sweep], "o-", label=name
        )
        ttft = sweep[-1]["ttft_s_all"]
        axes[1].plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
        share = sweep[-1]["cached_share_per_turn"]
        axes[2].plot(range(1, len(share) + 1), share, "o-", label=name)
    axes[0].set(xlabel="sessions in flight (concurrency)", ylabel="output tokens/s", xscale="log")
    axes[1].set(xlabel="TTFT (s), highest concurrency", ylabel="share of turns", xscale="log")
    axes[2].set(xlabel="turn", ylabel="prompt share found cached", ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_table(runs: dict[str, dict]) -> list[str]:
    """One Markdown row per configuration and concurrency level."""
    lines = [
        "| config | sessions in flight | output tok/s | req/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | cached / prompt tokens | re-prefilled | sessions held "
        "| most running (queued) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        for r in run["sweep"]:
            lines.append(
                f"| {name} | {r['concurrency']} | {r['output_tok_s']} | {r['request_throughput']} "
                f"| {r['ttft_ms']['p50']} / {r['ttft_ms']['p99']} "
                f"| {r['itl_ms']['p50']} / {r['itl_ms']['p99']} "
                f"| {r['cached_tokens']:,} / {r['prompt_tokens']:,} | {r['reprefilled_tokens']:,} "
                f"| {r['sessions_held']} / {r['sessions']} "
                f"| {r['max_running_requests']} ({r['max_running_while_queued']}) |"
            )
    return lines


def markdown(record: dict) -> str:
    lines = [
        f"# Serving benchmark, {record['summary']['date']}",
        "",
        f"Device: {record['summary']['device']}; model {record['summary']['model']}; "
        f"workload {record['workload']}. Command: `{record['command']}`",
        "",
        *sweep_table(record["runs"]),
    ]
    lines += ["", "Summary (highest concurrency):", "", "```json",
              json.dumps(record["summary"], indent=1), "```", ""]  # fmt: skip
    return "\n".join(lines)


def model_dir(name: str, work: Path) -> Path:
    if name == "tiny":
        from tangram_sglang.models.tiny import build_tiny_chat_model

        return build_tiny_chat_model(work / "tiny-model")
    if name == "smollm2":
        from tangram_sglang.models import smollm2

        return smollm2.build()
    return Path(name)


def add_server_options(ap: argparse.ArgumentParser) -> None:
    """The options of every session client here: configurations, model, pool, output."""
    ap.add_argument("--configs", default="stock,uniform-0.25,tangram-0.25")
    ap.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    ap.add_argument("--profile", help="tangram profile (default: the model's shipped one)")
    ap.add_argument(
        "--max-total-tokens",
        type=int,
        default=8192,
        help="stock's KV pool in tokens; FP8 configurations get the same bytes",
    )
    ap.add_argument("--server-args", default="", help="extra flags for every server")
    ap.add_argument(
        "--split-for",
        choices=("workload", "default"),
        default="workload",
        help="the session shape tangram's head-group pools are split for: the workload's "
        "mean shape (--tangram-workload) or the server's default",
    )
    ap.add_argument("--url", help="drive this running server (one configuration)")
    ap.add_argument("--name", default="server", help="the configuration --url serves")
    ap.add_argument("--device", default="CPU (2 cores)", help="recorded in the results")
    ap.add_argument("--out", help="writes OUT.json, OUT.md, OUT.png")


def model_and_vocab(args: argparse.Namespace, work: Path) -> tuple[Path, int]:
    """The model folder (built here unless --url serves it) and the token ids to draw."""
    model = model_dir(args.model, work) if not args.url else Path(args.model)
    vocab = 1024
    if (model / "config.json").is_file():
        vocab = min(json.loads((model / "config.json").read_text())["vocab_size"], 49152)
    return model, vocab


def profile_path(args: argparse.Namespace) -> Path:
    return Path(args.profile) if args.profile else PROFILES.get(args.model, PROFILES["tiny"])


def pool_tokens(name: str, max_total_tokens: int, model_kv_bytes: int) -> int:
    """`--max-total-tokens` of a configuration at the same KV bytes as stock's pool of
    `max_total_tokens` tokens at `model_kv_bytes` per element: an FP8 pool (one byte) holds
    `model_kv_bytes` times the tokens (SGLang counts the flag in tokens, not bytes)."""
    return max_total_tokens * model_kv_bytes if name.endswith("-fp8") else max_total_tokens


def server_flags(args: argparse.Namespace, name: str, running: int) -> list[str]:
    """Flags every configuration gets: the pool (`--max-total-tokens`, the same bytes for
    every configuration), the extra server flags and room for `running` requests."""
    tokens = pool_tokens(name, args.max_total_tokens, CPU_KV_BYTES)
    return [
        "--max-total-tokens", str(tokens), *args.server_args.split(),
        "--max-running-requests", str(running),
    ]  # fmt: skip


def config_names(args: argparse.Namespace) -> list[str]:
    return [args.name] if args.url else args.configs.split(",")


@contextmanager
def serving(
    args: argparse.Namespace,
    name: str,
    model: Path,
    running: int,
    logs: Path,
    shape: str | None = None,
) -> Iterator[str]:
    """The URL of configuration `name` for the block: --url's server, or one started here
    (logs under `logs`) with `server_flags` (room for `running` requests) and tangram's
    pools split for the session `shape`."""
    if args.url:
        yield args.url
        return
    flags = server_flags(args, name, running)
    launch = config_launch(name, profile_path(args), flags, shape)
    with running_servers(model, logs, {name: launch}) as servers:
        yield servers[name].url


def run_configs(
    args: argparse.Namespace, model: Path, sessions: list[workloads.Session], levels: list[int]
) -> dict[str, dict]:
    """Each configuration driven through `sessions` at every level: the server at --url, or
    each of --configs started in turn (one server at a time: they share the CPU)."""
    logs = Path(tempfile.mkdtemp(prefix="serve-")) / "logs"
    runs: dict[str, dict] = {}
    shape = split_shape(args, sessions)
    for name in config_names(args):
        with serving(args, name, model, max(levels) + 8, logs, shape) as url:
            runs[name] = drive(url, sessions, levels, name)
        print(f"{name}: " + ", ".join(
            f"c{r['concurrency']} {r['output_tok_s']} tok/s" for r in runs[name]["sweep"]
        ), flush=True)  # fmt: skip
    return runs


def split_shape(args: argparse.Namespace, sessions: list[workloads.Session]) -> str | None:
    """The session shape tangram's pools are split for: the workload's own (an operator
    sizes for their traffic) unless `--split-for default` keeps the server's default."""
    return workloads.pool_shape(sessions) if args.split_for == "workload" else None


def workload_sessions(args: argparse.Namespace, vocab: int) -> list[workloads.Session]:
    if Path(args.workload).is_file():
        return workloads.load(args.workload)
    return workloads.generate(
        args.workload, args.sessions, args.seed, args.scale, args.rate, args.think, vocab
    )


def command_line(script: str, argv: list[str] | None) -> str:
    return " ".join([f"python {script}", *(argv if argv is not None else sys.argv[1:])])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="shared-context", help="a kind or a JSONL file")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.05, help="workload length scale")
    ap.add_argument("--rate", type=float, default=0.0)
    ap.add_argument("--think", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", default="4,16", help="sessions in flight, comma list")
    add_server_options(ap)
    ap.add_argument(
        "--merge", nargs="+", help="combine these OUT.json runs (one configuration each)"
    )
    ap.add_argument("--flags", metavar="CONFIG", help="print a configuration's server flags")
    args = ap.parse_args(argv)
    if not args.flags and not args.out:
        ap.error("--out is required")
    if args.flags:  # the same sessions as a run with these --workload/--model options
        shape = None
        if args.split_for == "workload":
            vocab = model_and_vocab(args, Path(tempfile.mkdtemp(prefix="serve-")))[1]
            shape = split_shape(args, workload_sessions(args, vocab))
        profile = Path(args.profile or PROFILES["tiny"])
        print(" ".join(config_args(args.flags, profile, shape)[0]))
        return 0
    if args.merge:
        return write(merged(args.merge), Path(args.out), args)
    model, vocab = model_and_vocab(args, Path(tempfile.mkdtemp(prefix="serve-")))
    sessions = workload_sessions(args, vocab)
    levels = [int(c) for c in args.concurrency.split(",")]
    record = {
        "command": command_line("bench/serve.py", argv),
        "workload": {
            "kind": args.workload,
            "sessions": len(sessions),
            "scale": args.scale,
            "turns": sum(len(s.turns) for s in sessions),
            "new_prompt_tokens": sum(len(t.new_ids) for s in sessions for t in s.turns),
            "max_total_tokens": None if args.url else args.max_total_tokens,
            "tangram_workload": split_shape(args, sessions),
        },  # fmt: skip
        "runs": run_configs(args, model, sessions, levels),
    }
    return write(record, Path(args.out), args)


def merged(paths: list[str]) -> dict:
    """One record of several runs of the same workload (one configuration each)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    workload = records[0]["workload"]
    for path, r in zip(paths, records, strict=True):
        if r["workload"] != workload:
            raise ValueError(f"{path} ran another workload: {r['workload']} != {workload}")
    return {
        "command": " ; ".join(r["command"] for r in records),
        "workload": workload,
        "runs": {name: run for r in records for name, run in r["runs"].items()},
    }


def write(record: dict, out: Path, args: argparse.Namespace) -> int:
    record["summary"] = summary_keys(record["runs"], args)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = {ext: out.parent / f"{out.name}.{ext}" for ext in ("json", "md", "png")}
    path["json"].write_text(json.dumps(record, indent=1) + "\n")
    path["md"].write_text(markdown(record))
    plot(record["runs"], path["png"])
    print(markdown(record))
    return 0


def drive(url: str, sessions: list[workloads.Session], levels: list[int], name: str) -> dict:
    sweep = []
    for level in levels:
        requests.post(f"{url}/flush_cache", timeout=60)
        time.sleep(0.5)
        records, wall, poller = run_sessions(url, sessions, level, f"{name} c{level}")
        sweep.append({"concurrency": level, **summarize(records, wall, poller)})
    return {"sweep": sweep, "pool": pool_state(url)}


if __name__ == "__main__":
    sys.exit(main())
