"""End-to-end checks against a running SGLang server (the client half of e2e.sh).

    e2e_check.py greedy   --url U --out F      prompts + a 3-turn session, token ids only
    e2e_check.py compare  A.json B.json        (1) identical greedy outputs, else exit 1
    e2e_check.py sessions --url U --out F      (2) N concurrent sessions x T turns, radix
                                               hits on every follow-up turn, a shared system
                                               prompt reused, pools back to their start
                                               after /flush_cache
    e2e_check.py frontend --url U --out F      (3) a multi-turn sgl.function program

Token-id workloads come from a seed, so two servers get the same prompts. Every command
writes its JSON result and exits non-zero when its check fails, printing why.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

FIRST_ID = 16  # below: special tokens of the tiny tokenizer (harmless for other vocabularies)


class Client:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()

    def generate(self, input_ids: list[int], max_new_tokens: int) -> dict[str, Any]:
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        response = self.http.post(
            f"{self.url}/generate",
            json={"input_ids": input_ids, "sampling_params": params},
            timeout=600,
        )
        if not response.ok:
            raise RuntimeError(f"/generate -> {response.status_code}: {response.text[:400]}")
        return response.json()

    def pool(self) -> dict[str, Any] | None:
        """The tangram pools' state (None on a stock server)."""
        response = self.http.get(f"{self.url}/server_info", timeout=60)
        response.raise_for_status()
        return response.json()["internal_states"][0].get("tangram_pool")

    def flush(self) -> None:
        for _ in range(30):  # refused (400) while requests are still running
            if self.http.post(f"{self.url}/flush_cache", timeout=60).ok:
                return
            time.sleep(1)
        raise RuntimeError("/flush_cache kept failing for 30 s")


def _ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def fusion_given_back(client: Client) -> int:
    """Group slots Fast Fusion gave back so far (0 without fusion or on stock)."""
    fusion = (client.pool() or {}).get("fusion") or {}
    return int(sum(fusion.get("slots_given_back", [])))


def greedy(args: argparse.Namespace) -> int:
    """Prompts one at a time (same batch shapes on both servers), then a 3-turn session."""
    client, rng = Client(args.url), random.Random(args.seed)
    result: dict[str, Any] = {"prompts": [], "session": [], "cached": []}
    for _ in range(args.prompts):
        prompt = _ids(rng, args.vocab, rng.randint(16, args.max_prompt))
        result["prompts"].append(client.generate(prompt, args.new_tokens)["output_ids"])
    if args.duplicates:  # one prompt 3 times in one batch, beside another (Fast Fusion)
        same, other = (_ids(rng, args.vocab, rng.randint(64, args.max_prompt)) for _ in "ab")
        before = fusion_given_back(client)
        replies = client.generate([same, same, other, same], args.new_tokens)
        result["prompts"] += [r["output_ids"] for r in replies]
        result["fusion_given_back"] = fusion_given_back(client) - before
        print(f"greedy: a batch with a prompt 3 times gave back {result['fusion_given_back']}")
    history = _ids(rng, args.vocab, args.max_prompt)
    for _ in range(3):
        reply = client.generate(history, args.new_tokens)
        result["session"].append(reply["output_ids"])
        result["cached"].append(reply["meta_info"]["cached_tokens"])
        history += reply["output_ids"] + _ids(rng, args.vocab, 64)
    Path(args.out).write_text(json.dumps(result))
    print(f"greedy: {args.prompts} prompts + 3 turns, cached per turn {result['cached']}")
    if args.expect_fusion and not result.get("fusion_given_back"):
        print("greedy: --expect-fusion, but no slot was given back")
        return 1
    return 0


def compare(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    outputs = [
        ("prompt", i, x, y) for i, (x, y) in enumerate(zip(a["prompts"], b["prompts"], strict=True))
    ]
    outputs += [
        ("turn", i, x, y) for i, (x, y) in enumerate(zip(a["session"], b["session"], strict=True))
    ]
    bad = []
    for kind, i, x, y in outputs:
        if x != y:
            first = next((j for j, (u, w) in enumerate(zip(x, y, strict=False)) if u != w), len(x))
            bad.append(f"{kind} {i}: first difference at output token {first} of {len(x)}")
    total = sum(len(x) for *_, x, _ in outputs)
    print(
        f"compare {args.a} vs {args.b}: {len(outputs) - len(bad)}/{len(outputs)} outputs "
        f"identical ({total} tokens)"
    )
    for line in bad:
        print("  DIFFERENT", line)
    Path(args.out).write_text(
        json.dumps({"outputs": len(outputs), "tokens": total, "different": bad})
    )
    return 1 if bad or not outputs else 0


def _groups_held(state: dict[str, Any]) -> list[int]:
    return [s - f for s, f in zip(state["slots"], state["free_slots"], strict=True)]


def sessions(args: argparse.Namespace) -> int:
    """`--rounds` rounds of `session_round` on the same server, each from an empty cache:
    every round is checked; the summary is the round of median throughput, with every
    round's throughput beside it (one server start, several measurements of one load)."""
    rounds = [session_round(args) for _ in range(args.rounds)]
    problems = [p for r in rounds for p in r["problems"]]
    speeds = [r["output_tok_s"] for r in rounds]
    summary = dict(sorted(rounds, key=lambda r: r["output_tok_s"])[(len(rounds) - 1) // 2])
    summary.update(rounds=len(rounds), round_output_tok_s=speeds, problems=problems)
    Path(args.out).write_text(json.dumps(summary))
    if len(rounds) > 1:
        print(f"rounds: output tok/s {speeds}, median round {summary['output_tok_s']}")
    return 1 if problems else 0


def session_round(args: argparse.Namespace) -> dict[str, Any]:
    """`--sessions` conversations at once; each turn sends the whole history (previous
    prompt + answer + new user tokens), so turn t+1 must find turn t in the radix cache.
    Every session starts with the same `--system-tokens` tokens, and the other sessions
    start once the first session's first turn is done, so each of their first turns reuses
    them from inside that compressed turn. Returns the round's summary and problems."""
    client = Client(args.url)
    client.flush()
    start = client.pool()
    system = _ids(random.Random(-1 - args.seed), args.vocab, args.system_tokens)
    first_cached = threading.Event()

    def conversation(seed: int) -> list[dict[str, Any]]:
        rng, own = random.Random(seed), Client(args.url)
        history, turns = system + _ids(rng, args.vocab, args.first_tokens), []
        if seed != args.seed:
            first_cached.wait()
        try:
            for _ in range(args.turns):
                t0 = time.perf_counter()
                reply = own.generate(history, args.answer_tokens)
                turns.append({
                    "prompt": len(history),
                    "cached": reply["meta_info"]["cached_tokens"],
                    "output": len(reply["output_ids"]),
                    "s": round(time.perf_counter() - t0, 3),
                })  # fmt: skip
                history = history + reply["output_ids"] + _ids(rng, args.vocab, args.user_tokens)
                first_cached.set()
        finally:
            first_cached.set()  # never leave the other sessions waiting
        return turns

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.sessions) as pool:
        results = list(pool.map(conversation, range(args.seed, args.seed + args.sessions)))
    elapsed = time.perf_counter() - t0
    held = client.pool()
    client.flush()
    flushed = client.pool()

    problems = []
    follow_ups = [
        (s, t, turn) for s, turns in enumerate(results) for t, turn in enumerate(turns) if t
    ]
    misses = [(s, t) for s, t, turn in follow_ups if turn["cached"] <= 0]
    if misses and not args.allow_misses:
        problems.append(f"{len(misses)} follow-up turns found nothing cached, e.g. {misses[:5]}")
    # Whole reuse: the previous prompt and its answer but the last token (never attended).
    full = sum(
        turn["cached"] >= results[s][t - 1]["prompt"] + results[s][t - 1]["output"] - 1
        for s, t, turn in follow_ups
    )
    # First turns that reused the shared system prompt (from the first session's first turn).
    system_hits = sum(turns[0]["cached"] >= args.system_tokens > 0 for turns in results[1:])
    if args.system_tokens and system_hits < args.sessions - 1 and not args.allow_misses:
        problems.append(
            f"{system_hits} of {args.sessions - 1} later first turns reused the "
            f"{args.system_tokens} shared system tokens"
        )
    short = [r for turns in results for r in turns if r["output"] != args.answer_tokens]
    if short:
        problems.append(f"{len(short)} answers are not {args.answer_tokens} tokens long")
    if start is not None:
        for name, state in (("after /flush_cache", flushed),):
            if state["free_slots"] != start["free_slots"] or state["free_slots"] != state["slots"]:
                problems.append(
                    f"{name}: free group slots {state['free_slots']}, "
                    f"at start {start['free_slots']} of {state['slots']}"
                )
            if state["logical_free"] != start["logical_free"] or any(state["reserved"]):
                problems.append(
                    f"{name}: logical free {state['logical_free']} (start "
                    f"{start['logical_free']}), reserved {state['reserved']}"
                )
    prompt_tokens = sum(r["prompt"] for turns in results for r in turns)
    cached_tokens = sum(r["cached"] for turns in results for r in turns)
    output_tokens = sum(r["output"] for turns in results for r in turns)
    summary = {
        "sessions": args.sessions,
        "turns": args.turns,
        "requests": args.sessions * args.turns,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(output_tokens / elapsed, 1),
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        "follow_up_turns": len(follow_ups),
        "follow_ups_with_hits": len(follow_ups) - len(misses),
        "follow_ups_full_reuse": full,
        "system_tokens": args.system_tokens,
        "first_turns_reusing_system": system_hits,
        "pool_start": start,
        "pool_held": held,
        "pool_flushed": flushed,
        "problems": problems,
        "turns_detail": results,
    }
    print(
        f"sessions: {args.sessions} x {args.turns} turns in {elapsed:.1f} s "
        f"({summary['output_tok_s']} output tok/s); follow-up turns with radix hits "
        f"{summary['follow_ups_with_hits']}/{len(follow_ups)}, whole history reused {full}; "
        f"cached {cached_tokens} of {prompt_tokens} prompt tokens; first turns reusing the "
        f"{args.system_tokens} shared system tokens {system_hits}/{args.sessions - 1}"
    )
    if held is not None:
        print(
            f"  held before flush: group slots {_groups_held(held)} of {held['slots']} for "
            f"{held['logical_slots'] - held['logical_free']} cached tokens; after flush: "
            f"free {flushed['free_slots']}, reserved {flushed['reserved']}"
        )
    for p in problems:
        print("  PROBLEM", p)
    return summary


def frontend(args: argparse.Namespace) -> int:
    """A multi-turn `sgl.function` program (system prompt, user/assistant turns): every
    follow-up turn must reuse the earlier ones from the radix cache."""
    import sglang as sgl

    @sgl.function
    def multi_turn(s, questions):
        s += sgl.system("You answer questions about rivers, briefly. " * 30)
        for i, question in enumerate(questions):
            s += sgl.user(question)
            s += sgl.assistant(sgl.gen(f"a{i}", max_tokens=args.answer_tokens, temperature=0))

    questions = ["Which river is the longest? " * 8, "And why is that? " * 6, "One more. " * 4]
    backend = sgl.RuntimeEndpoint(args.url)
    states = multi_turn.run_batch([{"questions": questions}] * args.programs, backend=backend)
    turns = [
        [state.get_meta_info(f"a{i}")["cached_tokens"] for i in range(len(questions))]
        for state in states
    ]
    answers = [[state[f"a{i}"] for i in range(len(questions))] for state in states]
    problems = [
        f"program {p}: cached tokens per turn {c}"
        for p, c in enumerate(turns)
        if not all(c[i] > c[i - 1] for i in range(1, len(c)))
    ]
    Path(args.out).write_text(
        json.dumps({"cached": turns, "answers": answers, "problems": problems})
    )
    print(
        f"frontend: {args.programs} sgl.function programs x {len(questions)} turns; cached "
        f"tokens per turn {turns[0]} (first program); first answer {answers[0][0]!r:.60}"
    )
    for p in problems:
        print("  PROBLEM follow-up turns did not grow the cached prefix:", p)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("greedy", "sessions", "frontend"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--vocab", type=int, default=151936)
        p.add_argument("--answer-tokens", type=int, default=32)
    g = sub.choices["greedy"]
    g.add_argument("--prompts", type=int, default=8)
    g.add_argument("--max-prompt", type=int, default=512)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--duplicates", action="store_true", help="add a batch with a repeated prompt")
    g.add_argument("--expect-fusion", action="store_true", help="fail if fusion gave nothing back")
    s = sub.choices["sessions"]
    s.add_argument("--sessions", type=int, default=200)
    s.add_argument("--turns", type=int, default=4)
    s.add_argument("--first-tokens", type=int, default=1024)
    s.add_argument("--user-tokens", type=int, default=128)
    s.add_argument("--system-tokens", type=int, default=256)
    s.add_argument("--rounds", type=int, default=1, help="repeat the load (median reported)")
    s.add_argument(
        "--allow-misses",
        action="store_true",
        help="a load beyond the KV pool (evictions expected): report radix misses, not fail",
    )
    sub.choices["frontend"].add_argument("--programs", type=int, default=4)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return {"greedy": greedy, "compare": compare, "sessions": sessions, "frontend": frontend}[
        args.command
    ](args)


if __name__ == "__main__":
    sys.exit(main())
