#!/usr/bin/env python3
"""Stdlib-only client for a running `sglang.launch_server --skip-tokenizer-init`.

Waits for /health_generate, then measures with token ids (no tokenizer needed):
  - first request latency (small; on a fresh machine it may include JIT work),
  - one stream: 1 request x input_len in x output_len out,
  - a concurrent batch: N requests x input_len in x output_len out (random, distinct
    prompts, ignore_eos), run `--rounds` times with /flush_cache in between,
  - multi-turn: turn 2 = turn 1 prompt + its output ids + new ids; reports cached_tokens.
Prints a one-line summary and writes a JSON record (--json-out, appended per backend).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def http(url: str, payload: dict | None = None, timeout: float = 600.0) -> tuple[int, bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def alive(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def wait_ready(base: str, deadline: float, pid: int | None) -> float:
    """Poll /health_generate until 200; returns the time it answered. Raises on failure."""
    last = ""
    while time.time() < deadline:
        if not alive(pid):
            raise RuntimeError(f"server process {pid} exited before it was ready")
        try:
            code, body = http(
                base + "/health_generate", timeout=min(30.0, max(1.0, deadline - time.time()))
            )
            if code == 200:
                return time.time()
            last = f"HTTP {code} {body[:200]!r}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            last = repr(e)
        time.sleep(1.0)
    raise TimeoutError(f"server not ready before deadline (last: {last})")


def generate(base: str, ids: list[int], max_new: int, timeout: float) -> dict:
    payload = {
        "input_ids": ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True},
    }
    t = time.time()
    code, body = http(base + "/generate", payload, timeout=timeout)
    dt = time.time() - t
    if code != 200:
        raise RuntimeError(f"/generate HTTP {code}: {body[:500]!r}")
    out = json.loads(body)
    if isinstance(out, list):
        out = out[0]
    meta = out.get("meta_info", {})
    return {
        "latency_s": dt,
        "output_ids": out.get("output_ids") or [],
        "prompt_tokens": meta.get("prompt_tokens"),
        "completion_tokens": meta.get("completion_tokens"),
        "cached_tokens": meta.get("cached_tokens"),
        "e2e_latency": meta.get("e2e_latency"),
    }


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Stay clear of special tokens at the top of the Qwen vocabulary.
    hi = max(2, min(vocab, 151643)) - 1
    return [rng.randint(1, hi) for _ in range(n)]


def batch(base: str, prompts: list[list[int]], max_new: int, timeout: float) -> dict:
    t = time.time()
    with ThreadPoolExecutor(max_workers=len(prompts)) as ex:
        res = list(ex.map(lambda p: generate(base, p, max_new, timeout), prompts))
    wall = time.time() - t
    out_tok = sum(r["completion_tokens"] or len(r["output_ids"]) for r in res)
    in_tok = sum(r["prompt_tokens"] or 0 for r in res)
    lat = sorted(r["latency_s"] for r in res)
    return {
        "requests": len(prompts),
        "wall_s": round(wall, 3),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "output_tok_s": round(out_tok / wall, 1),
        "total_tok_s": round((in_tok + out_tok) / wall, 1),
        "latency_p50_s": round(lat[len(lat) // 2], 3),
        "latency_max_s": round(lat[-1], 3),
        "all_complete": all(
            (r["completion_tokens"] or len(r["output_ids"])) == max_new for r in res
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--backend", default="?", help="label recorded in the JSON")
    ap.add_argument("--pid", type=int, default=None, help="server pid: stop waiting if it dies")
    ap.add_argument(
        "--t-launch", type=float, default=None, help="epoch seconds of the launch (startup time)"
    )
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for readiness")
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="epoch seconds by which everything must be done (skips later phases)",
    )
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--turn2-new", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="per-request timeout")
    ap.add_argument("--json-out", default=None, help="append one JSON line here")
    a = ap.parse_args(argv)

    base = f"http://{a.host}:{a.port}"
    rng = random.Random(a.seed)
    t_launch = a.t_launch or time.time()
    deadline = a.deadline or float("inf")
    rec: dict = {
        "backend": a.backend,
        "ok": False,
        "config": {
            "num_requests": a.num_requests,
            "input_len": a.input_len,
            "output_len": a.output_len,
            "rounds": a.rounds,
        },
    }

    def left() -> float:
        return deadline - time.time()

    def tmo() -> float:  # a request never runs past the deadline
        return max(5.0, min(a.timeout, left()))

    def emit() -> None:
        if a.json_out:
            with open(a.json_out, "a") as f:
                f.write(json.dumps(rec) + "\n")

    try:
        ready = wait_ready(base, min(time.time() + a.wait, deadline), a.pid)
        rec["startup_s"] = round(ready - t_launch, 1)
        print(f"[{a.backend}] ready after {rec['startup_s']} s", flush=True)

        r = generate(base, rand_ids(rng, 16, a.vocab), 8, tmo())
        rec["first_request_s"] = round(r["latency_s"], 3)

        r = generate(base, rand_ids(rng, a.input_len, a.vocab), a.output_len, tmo())
        rec["single"] = {
            "latency_s": round(r["latency_s"], 3),
            "completion_tokens": r["completion_tokens"],
            "output_tok_s": round((r["completion_tokens"] or 0) / r["latency_s"], 1),
        }
        print(f"[{a.backend}] single stream: {rec['single']}", flush=True)

        rec["batch"] = []
        for i in range(a.rounds):
            if i and left() < 60:
                print(f"[{a.backend}] skipping batch round {i + 1}: deadline", flush=True)
                break
            http(base + "/flush_cache", {}, timeout=60)
            prompts = [rand_ids(rng, a.input_len, a.vocab) for _ in range(a.num_requests)]
            b = batch(base, prompts, a.output_len, tmo())
            rec["batch"].append(b)
            print(f"[{a.backend}] batch round {i + 1}: {b}", flush=True)

        p1 = rand_ids(rng, a.input_len, a.vocab)
        t1 = generate(base, p1, a.output_len, tmo())
        p2 = p1 + list(t1["output_ids"]) + rand_ids(rng, a.turn2_new, a.vocab)
        t2 = generate(base, p2, a.output_len, tmo())
        rec["multi_turn"] = {
            "turn1_prompt": len(p1),
            "turn1_cached": t1["cached_tokens"],
            "turn1_outputs": len(t1["output_ids"]),
            "turn2_prompt": len(p2),
            "turn2_cached": t2["cached_tokens"],
            "turn2_latency_s": round(t2["latency_s"], 3),
        }
        print(f"[{a.backend}] multi-turn: {rec['multi_turn']}", flush=True)
        rec["ok"] = bool(rec["batch"]) and all(b["all_complete"] for b in rec["batch"])
    except Exception as e:  # noqa: BLE001 - record whatever failed, keep the JSON
        rec["error"] = f"{type(e).__name__}: {e}"
        print(f"[{a.backend}] FAILED: {rec['error']}", file=sys.stderr, flush=True)
    emit()
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
