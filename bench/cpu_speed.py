"""The CPU torch path against stock SGLang's `torch_native`, one server at a time.

Two loads per server (the serving-parity issue's CPU targets): (a) a batch of concurrent
requests (`--requests` x `--input` random token ids, `--output` new tokens each; output
tokens/s, the better of two rounds, `/flush_cache` before each), and (b) one stream
decoding `--decode` tokens after a cached `--history`-token prompt (milliseconds per
output token: the stream's time less a one-token request's, over the extra tokens; the
median of `--repeats`), and (c) SGLang's own client, `python -m sglang.benchmark.serving
--dataset-name generated-shared-prefix` (`--requests` prompts in 2 groups sharing a
512-token system prompt, 64-token questions, `--output` new tokens; its output tokens/s
and mean TPOT). Servers: stock, `uniform` at 1.0 (the head-group machinery keeping
everything) and `tangram` at 0.25 with the model's shipped profile. Writes JSON and a
Markdown table with ratios to stock measured in the same run.

    .venv/bin/python bench/cpu_speed.py [--model tiny|smollm2] [--out bench/results/NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import requests

from tangram_sglang.cpu.server import SHIMS, running_servers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROFILES, config_launch, model_dir  # noqa: E402

SERVERS = ("stock", "uniform-1.0", "tangram-0.25")


def flush(url: str) -> None:
    requests.post(f"{url}/flush_cache", timeout=60).raise_for_status()
    time.sleep(0.5)


def timed(server, ids: list[int], new_tokens: int) -> float:
    start = time.perf_counter()
    reply = server.generate(ids, new_tokens)
    assert len(reply["output_ids"]) == new_tokens, reply["meta_info"]
    return time.perf_counter() - start


def batch_load(server, prompts: list[list[int]], new_tokens: int) -> float:
    """Output tokens/s of the prompts sent at once, the better of two rounds."""
    rates = []
    for _ in range(2):
        flush(server.url)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            list(pool.map(lambda p: timed(server, p, new_tokens), prompts))
        rates.append(len(prompts) * new_tokens / (time.perf_counter() - start))
    return max(rates)


def stream_load(server, history: list[int], new_tokens: int, repeats: int) -> float:
    """Milliseconds per output token of one stream after the cached `history`."""
    flush(server.url)
    timed(server, history, 1)  # caches the history
    per_token = []
    for _ in range(repeats):
        one = timed(server, history, 1)
        many = timed(server, history, new_tokens)
        per_token.append((many - one) / (new_tokens - 1) * 1e3)
    return statistics.median(per_token)


def sglang_bench_serving(
    url: str,
    model: Path,
    work: Path,
    prompts: int,
    output: int,
    *,
    groups: int = 2,
    system: int = 512,
    question: int = 64,
    extra: Sequence[str] = (),
) -> dict:
    """SGLang's `benchmark.serving` on its generated-shared-prefix dataset: `prompts` split
    evenly over `groups` system prompts of `system` tokens, each with its own `question`
    tokens, `output` new tokens; `extra` flags (e.g. `--max-concurrency`) as given. Returns
    its output tok/s, TTFT and TPOT (ms), the prompt tokens its client found cached
    (`--cache-report`), the mean requests it had in flight, and the command."""
    flush(url)
    result = work / f"bench-serving-{time.monotonic_ns()}.jsonl"
    flags = [
        "--backend", "sglang", "--seed", "0", "--dataset-name", "generated-shared-prefix",
        "--gsp-num-groups", str(groups), "--gsp-prompts-per-group", str(prompts // groups),
        "--gsp-system-prompt-len", str(system), "--gsp-question-len", str(question),
        "--gsp-output-len", str(output), "--num-prompts", str(prompts), "--cache-report",
        "--disable-tqdm", *extra,
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "sglang.benchmark.serving", *flags,
        "--base-url", url, "--tokenizer", str(model), "--output-file", str(result),
    ]  # fmt: skip
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(SHIMS), os.environ.get("PYTHONPATH", "")])
    )
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode or not result.exists():
        raise RuntimeError(f"sglang.benchmark.serving failed:\n{done.stderr[-2000:]}")
    data = json.loads(result.read_text().splitlines()[-1])
    keys = (
        "output_throughput", "request_throughput", "duration", "mean_ttft_ms", "median_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "median_itl_ms", "total_input_tokens",
        "total_output_tokens", "concurrency",
    )  # fmt: skip
    cache = data.get("cache_report") or {}
    return {
        **{k: round(data[k], 2) for k in keys if data.get(k) is not None},
        "cached_tokens": cache.get("total_cached_tokens"),
        "cache_hit_rate_pct": cache.get("cache_hit_rate_pct"),
        "command": "python -m sglang.benchmark.serving " + " ".join(flags),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=tuple(PROFILES), default="tiny")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input", type=int, default=300)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--history", type=int, default=1500)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cpu-speed-"))
    model = model_dir(args.model, work)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, min(vocab, 49152) - 10) for _ in range(n)]

    prompts = [ids(args.input) for _ in range(args.requests)]
    history = ids(args.history)
    rows = {}
    for name in args.servers.split(","):
        extra = ["--max-running-requests", str(max(32, args.requests))]
        launch = config_launch(name, PROFILES[args.model], extra if name != "stock" else [])
        with running_servers(model, work / "logs", {name: launch}) as servers:
            server = servers[name]
            rows[name] = {
                "batch_output_tok_s": round(batch_load(server, prompts, args.output), 1),
                "stream_ms_per_token": round(
                    stream_load(server, history, args.decode, args.repeats), 2
                ),
                "sglang_bench_serving": sglang_bench_serving(
                    server.url, model, work, args.requests, args.output
                ),
            }
        print(name, rows[name], flush=True)
    base = rows.get("stock")
    for row in rows.values():
        if base:
            row["batch_vs_stock"] = round(row["batch_output_tok_s"] / base["batch_output_tok_s"], 3)
            row["stream_speed_vs_stock"] = round(
                base["stream_ms_per_token"] / row["stream_ms_per_token"], 3
            )
            ours, theirs = row["sglang_bench_serving"], base["sglang_bench_serving"]
            row["bench_serving_vs_stock"] = round(
                ours["output_throughput"] / theirs["output_throughput"], 3
            )
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"CPU ({platform.processor() or platform.machine()}), 2 cores",
        "command": " ".join(["python bench/cpu_speed.py", *(argv or sys.argv[1:])]),
        "model": args.model,
        "load": {k: getattr(args, k) for k in ("requests", "input", "output", "history", "decode")},
        "servers": rows,
    }
    table = [
        f"| server | (a) {args.requests} x {args.input} in, {args.output} out: output tok/s "
        f"| vs stock | (b) ms/token after a cached {args.history}-token prompt | speed vs stock "
        "| (c) SGLang bench_serving, shared prefix: output tok/s | vs stock | TTFT / TPOT ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        serving = row["sglang_bench_serving"]
        table.append(
            f"| {name} | {row['batch_output_tok_s']} | {row.get('batch_vs_stock', '')} "
            f"| {row['stream_ms_per_token']} | {row.get('stream_speed_vs_stock', '')} "
            f"| {serving['output_throughput']} | {row.get('bench_serving_vs_stock', '')} "
            f"| {serving['mean_ttft_ms']} / {serving['mean_tpot_ms']} |"
        )
    print("\n".join(table))
    if args.out:
        Path(f"{args.out}.json").write_text(json.dumps(record, indent=1) + "\n")
        Path(f"{args.out}.md").write_text(
            f"{record['date']}, {record['device']}, model {args.model}\n\n"
            f"`{record['command']}`\n\n" + "\n".join(table) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
