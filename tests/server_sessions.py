"""Sessions against a running CPU server, shared by the server tests: a fresh workload of
token-id prompts, its greedy transcript, and a compressed conversation with the pool
states around it (radix reuse, a shared prefix, a request that never fits, bad token ids,
an SGLang frontend program)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import requests

from tangram_sglang.cpu.server import Launch
from tangram_sglang.models.tiny_tokenizer import SPECIAL_TOKENS, corpus

VOCAB = 1024
NEW_TOKENS = 12
SHIPPED_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "tiny-qwen3.ada-snapkv.yaml"
# The ragged pools keep one request table per head group ([groups, rows, largest group]):
# few request rows keep it small.
COMPRESSED = ("--max-running-requests", "16")
CHUNK = 64  # --chunked-prefill-size of the compressed conversation's server
SYSTEM = 100  # a second session shares this many first tokens (inside the second chunk)


def compressed_launches(*extra: str) -> dict[str, Launch]:
    """`uniform` at 1.0 and the shipped profile at 0.25 (prefilled in chunks of CHUNK),
    both with `extra` flags."""
    return {
        "uniform-1.0": Launch(
            ["--kv-compression", "uniform", "--tangram-ratio", "1.0", *extra, *COMPRESSED],
            attention=None,
        ),
        "tangram-0.25": Launch(
            [
                "--kv-compression",
                "tangram",
                "--tangram-profile",
                str(SHIPPED_PROFILE),
                "--tangram-ratio",
                "0.25",
                "--chunked-prefill-size",
                str(CHUNK),
                *extra,
                *COMPRESSED,
            ],
            attention=None,
        ),  # fmt: skip
    }


def workload(seed: int) -> dict:
    """Prompts (token ids, no special tokens), a two-turn session and a chat message."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(n)]

    return {
        "prompts": [ids(rng.randint(8, 64)) for _ in range(3)],
        "turn1": ids(48),
        "user2": ids(16),
        "chat": rng.choice(corpus(lines=50, seed=seed)),
    }


def transcript(server, work: dict) -> dict:
    prompts = [server.generate(p, NEW_TOKENS)["output_ids"] for p in work["prompts"]]
    turn1 = server.generate(work["turn1"], NEW_TOKENS)
    turn2 = server.generate(work["turn1"] + turn1["output_ids"] + work["user2"], NEW_TOKENS)
    chat = server.post(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": work["chat"]}],
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
        },
    )
    return {
        "prompts": prompts,
        "turns": [turn1["output_ids"], turn2["output_ids"]],
        "turn2_cached": turn2["meta_info"]["cached_tokens"],
        "chat": chat["choices"][0]["message"]["content"],
    }


def internal_states(server) -> list[dict]:
    """`/server_info`'s scheduler states, one per data-parallel replica."""
    response = requests.get(f"{server.url}/server_info", timeout=30)
    assert response.ok, f"/server_info -> {response.status_code}: {response.text[:300]}"
    return response.json()["internal_states"]


def pool_state(server) -> dict:
    return internal_states(server)[0]["tangram_pool"]


def flush(server) -> None:
    response = requests.post(f"{server.url}/flush_cache", timeout=30)
    assert response.ok, f"/flush_cache -> {response.status_code}: {response.text[:300]}"


def flush_when_idle(server, wait: float = 60) -> None:
    """`/flush_cache` once the scheduler is idle (it answers 400 while requests are pending,
    e.g. an abort still draining)."""
    deadline = time.monotonic() + wait
    while True:
        response = requests.post(f"{server.url}/flush_cache", timeout=30)
        if response.ok:
            return
        assert time.monotonic() < deadline, f"/flush_cache kept failing: {response.text[:300]}"
        time.sleep(0.5)


def stream_ids(server, prompt: list[int], max_new: int, stop_after: int | None, rid=None) -> int:
    """A streamed greedy `/generate`; closes the connection after `stop_after` chunks (a
    client abort). Returns the number of chunks read."""
    payload = {
        "input_ids": prompt,
        "stream": True,
        "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True},
    }
    if rid is not None:
        payload["rid"] = rid
    read = 0
    with requests.post(f"{server.url}/generate", json=payload, stream=True, timeout=300) as r:
        assert r.ok, f"/generate -> {r.status_code}: {r.text[:300]}"
        for line in r.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                read += 1
                if stop_after is not None and read >= stop_after:
                    break
    return read


def post_ids(server, prompt: list[int], **params) -> tuple[int, str]:
    """Status and body of a greedy `/generate` of `prompt` (4 new tokens unless `params`)."""
    params = {"temperature": 0.0, "max_new_tokens": 4, **params}
    response = requests.post(
        f"{server.url}/generate",
        json={"input_ids": prompt, "sampling_params": params},
        timeout=120,
    )
    return response.status_code, response.text


def never_fits(server, ids, slots: list[int]) -> tuple[int, str]:
    """A prompt that no head group can hold even empty (twice the largest group's slots;
    a chunk of 64 keeps at least its 36 sink + window tokens in every group), yet within
    the model's context. (A decode budget beyond the pools is clipped, as stock clips it.)"""
    return post_ids(server, ids(2 * max(slots)))


def frontend_program(server) -> list[tuple[str, int]]:
    """An SGLang frontend program (`sgl.function` with system/user/assistant turns) run
    against the server: each turn's answer and its cached prompt tokens."""
    import sglang as sgl

    @sgl.function
    def multi_turn(s, questions):
        s += sgl.system("Answer briefly. " * 20)
        for i, question in enumerate(questions):
            s += sgl.user(question)
            s += sgl.assistant(sgl.gen(f"a{i}", max_tokens=NEW_TOKENS, temperature=0))

    questions = ["which river is the longest " * 5, "and why is that " * 3, "one more " * 3]
    state = multi_turn.run(questions=questions, backend=sgl.RuntimeEndpoint(server.url))
    return [
        (state[f"a{i}"], state.get_meta_info(f"a{i}")["cached_tokens"])
        for i in range(len(questions))
    ]


def run_conversation(server, seed: int) -> dict:
    """Three turns, each the whole history plus new user tokens; a second session sharing
    the first `SYSTEM` tokens; then a request that can never fit and one that can; pool
    states around it."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(n)]

    flush(server)
    start = pool_state(server)
    history, turns = ids(200), []
    for _ in range(3):
        reply = server.generate(history, NEW_TOKENS)
        turns.append((len(history), reply["meta_info"]["cached_tokens"]))
        history = history + reply["output_ids"] + ids(40)
    own = [t for t in ids(30) if t != history[SYSTEM]]
    cuts = pool_state(server)["lossy_cuts"]
    shared = server.generate(history[:SYSTEM] + own, NEW_TOKENS)
    cut = {k: v - cuts[k] for k, v in pool_state(server)["lossy_cuts"].items() if k != "share"}
    frontend = frontend_program(server)
    refused = never_fits(server, ids, start["slots"])
    bad_ids = [
        post_ids(server, [*ids(5), token, *ids(3)]) for token in (10**6 + rng.randrange(99), -1)
    ]
    served = server.generate(ids(8), NEW_TOKENS)["output_ids"]
    held = pool_state(server)
    flush(server)
    return {
        "start": start,
        "turns": turns,
        "shared": (shared["meta_info"]["cached_tokens"], len(shared["output_ids"])),
        "shared_cut": cut,
        "frontend": frontend,
        "refused": refused,
        "bad_ids": bad_ids,
        "served": served,
        "held": held,
        "flushed": pool_state(server),
    }


def assert_same_transcript(ours: dict, stock: dict, what: str, seed: int) -> None:
    """Greedy outputs, turn by turn and by chat, and the cached prefix of turn 2 equal."""
    for key in ("prompts", "turns", "chat"):
        assert ours[key] == stock[key], (
            f"{what} changed the {key} output (seed {seed}):\nstock {stock[key]}\nours  {ours[key]}"
        )
    assert ours["turn2_cached"] == stock["turn2_cached"], f"{what}, seed {seed}"
