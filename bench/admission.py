"""Admission parity: at equal KV bytes, does `--kv-compression tangram --tangram-ratio 1.0`
admit as many concurrent requests as stock SGLang when clients ask for far more tokens
than they get?

Chat clients routinely send `max_tokens` several times the real answer. Stock SGLang
counts `min(max_tokens, 4096)` for a request it admits and that times its `new_token_ratio`
for running ones, and retracts when it guessed wrong. Budget Reservation follows the same
policy for decoded tokens (the compressed prompt stays exact), so at ratio 1.0 it should
admit like stock; when it reserved the whole `max_tokens` in every group it admitted
several times fewer.

The reference model (SmolLM2-135M-Instruct) answers short questions; a probe on the stock
server measures each real answer length L, then every request is sent at once to each
server with `max_tokens = FACTOR * L` on the same small pool (`--max-total-tokens`). Per
server: peak and mean running requests (a log line per decode step), retracted requests,
wall time, and whether every answer matched the probe's length. Writes
`bench/results/admission-<date>.{json,md}`.

    .venv/bin/python bench/admission.py [--requests 24] [--factor 4] [--max-total-tokens 3072]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tangram_sglang.accuracy.paths import flush
from tangram_sglang.cpu.server import Launch, running_servers
from tangram_sglang.models import smollm2

ROOT = Path(__file__).resolve().parent.parent
TOPICS = (
    "rivers", "bread", "winter", "owls", "bridges", "tea", "maps", "bees", "clocks", "salt",
    "rain", "glass", "wolves", "paper", "copper", "tides", "moss", "kites", "chess", "wool",
    "ice", "lamps", "sand", "foxes", "honey", "ink", "ships", "wheat", "caves", "frost",
)  # fmt: skip


def ask(url: str, topic: str, max_tokens: int) -> int:
    """Answer tokens of one greedy chat completion."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": f"Say one short sentence about {topic}."}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=1800)
    reply.raise_for_status()
    return reply.json()["usage"]["completion_tokens"]


def load(server, topics: list[str], budgets: list[int]) -> dict:
    """Every request at once; what the server's log says about the run."""
    flush(server.url)
    mark = len(server.log())
    start = time.perf_counter()
    with ThreadPoolExecutor(len(topics)) as pool:
        lengths = list(pool.map(lambda tb: ask(server.url, *tb), zip(topics, budgets, strict=True)))
    wall = time.perf_counter() - start
    log = server.log()[mark:]
    running = [int(n) for n in re.findall(r"Decode batch, #running-req: (\d+)", log)]
    retractions = sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log))
    return {
        "peak_running": max(running, default=0),
        "mean_running": round(sum(running) / len(running), 2) if running else 0,
        "retracted_reqs": retractions,
        "wall_s": round(wall, 1),
        "lengths": lengths,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--factor", type=int, default=4, help="max_tokens / real answer length")
    parser.add_argument("--max-total-tokens", type=int, default=3072, help="both servers' pool")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"admission-{dt.date.today()}"
    )
    args = parser.parse_args()
    model = smollm2.build()
    topics = [TOPICS[i % len(TOPICS)] for i in range(args.requests)]
    pool = (
        "--max-total-tokens", str(args.max_total_tokens), "--max-running-requests", "64",
        "--decode-log-interval", "1",  # a log line per decode step: the running count
    )  # fmt: skip
    launches = {
        "stock": Launch(pool, plugins=False),
        "tangram-1.0": Launch(
            (
                *pool,
                "--kv-compression",
                "tangram",
                "--tangram-profile",
                str(ROOT / "profiles" / "smollm2-135m-instruct.headkv.yaml"),
                "--tangram-ratio",
                "1.0",
            ),
            attention=None,
        ),  # fmt: skip
    }
    with running_servers(model, Path(tempfile.mkdtemp(prefix="admission-")), launches) as servers:
        real = [ask(servers["stock"].url, t, 256) for t in topics]
        budgets = [args.factor * n for n in real]
        results = {name: load(server, topics, budgets) for name, server in servers.items()}
    for result in results.values():
        result["answers_as_probed"] = sum(
            a == b for a, b in zip(result["lengths"], real, strict=True)
        )
    ratio = results["tangram-1.0"]["peak_running"] / max(1, results["stock"]["peak_running"])
    summary = {
        "device": "CPU (2 cores)",
        "date": str(dt.date.today()),
        "model": "SmolLM2-135M-Instruct",
        "requests": args.requests,
        "factor": args.factor,
        "max_total_tokens": args.max_total_tokens,
        "real_answer_tokens": real,
        "peak_running_tangram_over_stock": round(ratio, 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"summary": summary, "servers": results}, indent=1) + "\n"
    )
    rows = "\n".join(
        f"| {name} | {r['peak_running']} | {r['mean_running']} | {r['retracted_reqs']} | "
        f"{r['wall_s']} | {r['answers_as_probed']}/{args.requests} |"
        for name, r in results.items()
    )
    table = (
        "| server | peak running | mean running (decode steps) | retracted requests | wall s "
        "| answers as probed |\n|---|---|---|---|---|---|\n" + rows
    )
    args.out.with_suffix(".md").write_text(
        f"# Admission parity, {summary['date']}\n\n{summary['device']}, {summary['model']}, "
        f"{args.requests} concurrent chat requests, max_tokens = {args.factor} x the real answer "
        f"({min(real)}-{max(real)} tokens), both servers on --max-total-tokens "
        f"{args.max_total_tokens} (equal KV bytes).\n\nCommand: `.venv/bin/python "
        f"bench/admission.py --requests {args.requests} --factor {args.factor} "
        f"--max-total-tokens {args.max_total_tokens}`\n\n{table}\n\n"
        f"Peak running, tangram / stock: {ratio:.2f}\n"
    )
    print(table)
    print(f"peak running tangram/stock: {ratio:.2f}")


if __name__ == "__main__":
    main()
