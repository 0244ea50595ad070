"""CPU demo: a multi-turn session against stock SGLang and SGLang with Tangram, side by side.

Builds the tiny fp32 Qwen3 (random weights, local tokenizer) that the shipped profile was
calibrated on, starts the real SGLang 0.5.17 server twice on this CPU machine (stock full
KV, and `--kv-compression tangram` at the shipped profile's ratio), sends the same
conversation to both (each turn = the whole history + its answer + new user tokens) and
prints, per turn, the radix cache hits and the KV bytes each server holds: per head group
for Tangram against full KV. Then a second session that shares the first `--shared` tokens
of the first turn (a system prompt) shows that part reused from inside a compressed turn.
Uses the CPU stand-ins of tests/cpu_shims (a torchvision stand-in, SGLang's rotary CPU
flag), which only a CPU machine needs.

    .venv/bin/python bench/cpu_demo.py [--turns 4] [--context 600] [--ratio 0.25]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from server_harness import Launch, build_tiny_model_dir, running_servers  # noqa: E402

PROFILE = ROOT / "profiles" / "tiny-qwen3.ada-snapkv.yaml"
FIRST_ID = 16  # ids below are the tiny tokenizer's special and chat tokens


def pool_state(url: str) -> dict:
    response = requests.get(f"{url}/server_info", timeout=30)
    response.raise_for_status()
    return response.json()["internal_states"][0]["tangram_pool"]


def held_bytes(state: dict) -> list[int]:
    """KV bytes per group held by cached and running sequences."""
    held = []
    for slots, free, nbytes in zip(
        state["slots"], state["free_slots"], state["bytes_per_group"], strict=True
    ):
        per_slot = nbytes // (slots + state["page_size"])
        held.append((slots - free) * per_slot)
    return held


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--context", type=int, default=600, help="first turn's prompt tokens")
    parser.add_argument("--user-tokens", type=int, default=48)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--shared", type=int, default=400, help="tokens a 2nd session shares")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="tangram-demo-"))
    model = build_tiny_model_dir(work / "tiny-qwen3")
    config = json.loads((model / "config.json").read_text())
    token_bytes = (
        config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 2 * 4
    )
    launches = {
        "stock": Launch(plugins=False),
        "tangram": Launch(
            ["--kv-compression", "tangram", "--tangram-profile", str(PROFILE),
             "--tangram-ratio", str(args.ratio), "--max-running-requests", "16"],
            attention=None,
        ),
    }  # fmt: skip
    print(f"starting stock SGLang and SGLang + tangram (ratio {args.ratio}) on CPU ...")
    rng = random.Random(args.seed)
    vocab = config["vocab_size"]

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]

    with running_servers(model, work / "logs", launches) as servers:
        tangram = servers["tangram"]
        start = pool_state(tangram.url)
        print(
            f"tangram pools: {start['groups']} head groups, ratios {start['ratios']}, slots "
            f"{start['slots']}; full KV costs {token_bytes} B per token\n"
        )
        header = (
            f"{'turn':>4} {'prompt':>7} {'cached stock':>13} {'cached tangram':>15} "
            f"{'full KV B':>10} {'tangram B':>10} {'share':>6}  tangram B per group"
        )
        print(header)
        first = ids(args.context)
        history = {name: list(first) for name in servers}
        for turn in range(1, args.turns + 1):
            replies = {
                name: server.generate(history[name], args.answer_tokens)
                for name, server in servers.items()
            }
            full = (len(history["stock"]) + args.answer_tokens) * token_bytes
            groups = held_bytes(pool_state(tangram.url))
            print(
                f"{turn:>4} {len(history['tangram']):>7} "
                f"{replies['stock']['meta_info']['cached_tokens']:>13} "
                f"{replies['tangram']['meta_info']['cached_tokens']:>15} {full:>10} "
                f"{sum(groups):>10} {sum(groups) / full:>6.1%}  {groups}"
            )
            user = ids(args.user_tokens)
            for name, reply in replies.items():
                history[name] += reply["output_ids"] + user
        own = [t for t in ids(args.user_tokens) if t != first[args.shared]]
        shared = first[: args.shared] + own
        cached = {
            name: server.generate(shared, args.answer_tokens)["meta_info"]["cached_tokens"]
            for name, server in servers.items()
        }
        print(
            f"\na second session sharing the first {args.shared} tokens: cached stock "
            f"{cached['stock']}, tangram {cached['tangram']} (from inside the compressed turn 1)"
        )
        requests.post(f"{tangram.url}/flush_cache", timeout=30).raise_for_status()
        flushed = pool_state(tangram.url)
        back = flushed["free_slots"] == flushed["slots"] and not any(flushed["reserved"])
        print(
            f"\nafter /flush_cache every group's pool is empty again: {back} "
            f"(free {flushed['free_slots']} of {flushed['slots']}, reserved {flushed['reserved']})"
        )
    return 0 if back else 1


if __name__ == "__main__":
    sys.exit(main())
