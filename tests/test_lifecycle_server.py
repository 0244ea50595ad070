"""Budget Reservation's lifecycle on the real SGLang server (CPU, tiny Qwen3, the shipped
profile at 0.25, a small pool, prefill in chunks of 64): ordinary clients, pressure,
aborts and retractions, each ending with nothing reserved or overdrawn and every head-group
pool back at its capacity after `/flush_cache`.

- an OpenAI chat call without `max_tokens` is served on the small pool;
- clients abort mid-stream and in the middle of a chunked prefill;
- 64 concurrent three-turn sessions (32 at a time), a quarter aborted mid-stream, on a
  pool that holds a fraction of them (most histories are evicted before their next turn);
- SGLang's own retraction test switch (`SGLANG_TEST_RETRACT`: retract every few decode
  steps) on a second server: every retracted request comes back and finishes;
- `--enable-metrics`: Tangram's per-group gauges and counters on SGLang's `/metrics`, and
  the "token usage" SGLang logs is the share of KV memory in use (near 0 when idle).
Two server starts, side by side.
"""

from __future__ import annotations

import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from server_sessions import flush_when_idle, pool_state, stream_ids

from tangram_sglang.cpu.server import Launch, running_servers
from tangram_sglang.models.tiny_tokenizer import SPECIAL_TOKENS

pytestmark = pytest.mark.server

VOCAB = 1024
PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "tiny-qwen3.ada-snapkv.yaml"
TANGRAM = (
    "--kv-compression", "tangram", "--tangram-profile", str(PROFILE), "--tangram-ratio", "0.25",
    "--chunked-prefill-size", "64", "--max-running-requests", "16", "--max-total-tokens", "2048",
    "--enable-metrics",
    # The tiny random model never says EOS: a short context bounds a call without
    # max_tokens (SGLang clips it to the context, we to the scarcest group).
    "--context-length", "640",
)  # fmt: skip


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(n)]


def _generate(server, prompt: list[int], max_new: int) -> dict:
    """Greedy `/generate` with a long timeout: 64 sessions queue on 16 request rows."""
    params = {"temperature": 0.0, "max_new_tokens": max_new, "ignore_eos": True}
    return server.post("/generate", {"input_ids": prompt, "sampling_params": params}, timeout=1200)


def _session(server, seed: int, abort: bool) -> list[int]:
    """Three turns, each the history plus new tokens; an aborting session leaves its second
    turn mid-stream. Returns the cached tokens of each completed turn."""
    rng = random.Random(seed)
    history, cached = _ids(rng, rng.randint(60, 160)), []
    for turn in range(3):
        if abort and turn == 1:
            stream_ids(server, history, 32, stop_after=rng.randint(1, 4))
            return cached
        reply = _generate(server, history, rng.randint(8, 24))
        cached.append(reply["meta_info"]["cached_tokens"])
        history = history + reply["output_ids"] + _ids(rng, 20)
    return cached


def _clean(server, name: str, seed: int) -> dict:
    flush_when_idle(server)
    state = pool_state(server)
    groups = len(state["slots"])
    assert state["reserved"] == [0] * groups and state["reserved_requests"] == 0, (
        f"seed {seed}: after {name}, {state['reserved_requests']} request(s) still reserve "
        f"{state['reserved']} group slots"
    )
    assert state["overdrawn"] == [0] * groups, (
        f"seed {seed}: during {name}, extends allocated {state['overdrawn']} group slots "
        "beyond their reservations"
    )
    assert state["free_slots"] == state["slots"], (
        f"seed {seed}: after {name} and a flush, {state['free_slots']} of {state['slots']} "
        "group slots are free"
    )
    return state


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    launches = {
        "pressure": Launch(TANGRAM, attention=None),
        "retract": Launch(
            TANGRAM, attention=None, env=(("SGLANG_TEST_RETRACT", "1"),)
        ),  # SGLang retracts the decode batch every 3 forward steps
    }
    with running_servers(model_dir, tmp_path_factory.mktemp("logs"), launches) as running:
        yield running


def test_an_openai_chat_call_without_max_tokens_is_served_on_a_small_pool(servers):
    seed = random.randrange(2**32)
    server = servers["pressure"]
    words = " ".join(
        random.Random(seed).choice(["river", "stone", "light", "field"]) for _ in range(40)
    )
    reply = server.post(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": words}], "temperature": 0.0},
        timeout=600,
    )
    choice = reply["choices"][0]
    assert (
        choice["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] > 0
    ), f"seed {seed}: a chat call without max_tokens got {reply}"
    _clean(server, "a chat call without max_tokens", seed)


def test_client_aborts_mid_stream_and_mid_chunked_prefill_release_exactly(servers):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    server = servers["pressure"]
    flush_when_idle(server)
    for _ in range(3):
        assert stream_ids(server, _ids(rng, rng.randint(20, 100)), 200, stop_after=3) == 3
    long = _ids(rng, 560)  # 9 chunks of 64
    rid = f"chunked-{seed}"
    worker = threading.Thread(target=stream_ids, args=(server, long, 50, None, rid))
    worker.start()
    time.sleep(0.2 + rng.random() * 0.5)
    requests.post(f"{server.url}/abort_request", json={"rid": rid}, timeout=30)
    worker.join(300)
    assert not worker.is_alive(), f"seed {seed}: the aborted chunked request never ended"
    _clean(server, "aborts mid-stream and mid-prefill", seed)


def test_64_concurrent_sessions_with_random_aborts_on_a_small_pool(servers):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    server = servers["pressure"]
    flush_when_idle(server)
    aborting = {i for i in range(64) if rng.random() < 0.25}
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: _session(server, seed + i, i in aborting), range(64)))
    completed = [c for i, c in enumerate(results) if i not in aborting]
    assert all(len(c) == 3 for c in completed), f"seed {seed}: a session lost a turn: {results}"
    # The pool holds a fraction of 32 live histories: radix hits are not the point here
    # (eviction is), a clean ledger after the storm is.
    _clean(server, "64 concurrent sessions with aborts", seed)


def test_forced_retractions_come_back_and_finish(servers):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    server = servers["retract"]
    flush_when_idle(server)
    lengths = [rng.randint(30, 60) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda n: _generate(server, _ids(random.Random(n), 40 + n), n), lengths)
        )
    assert [len(r["output_ids"]) for r in replies] == lengths, (
        f"seed {seed}: retracted requests did not finish with every token"
    )
    assert "retract" in server.log().lower(), f"seed {seed}: SGLang never retracted"
    _clean(server, "forced retractions", seed)
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    count = re.search(r"^tangram:retraction_total\{[^}]*\} ([0-9.]+)", metrics, re.M)
    assert count and float(count.group(1)) > 0, (
        f"seed {seed}: no tangram:retraction_total on /metrics:\n{metrics[-2000:]}"
    )


def test_metrics_show_every_group_and_token_usage_is_the_kv_share(servers):
    seed = random.randrange(2**32)
    server = servers["pressure"]
    flush_when_idle(server)
    server.generate(_ids(random.Random(seed), 30), 4)
    groups = len(pool_state(server)["slots"])
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    for name in ("free", "reserved", "evictable", "overdrawn"):
        found = set(
            re.findall(rf'^tangram:group_{name}_slots\{{[^}}]*group="(\d+)"', metrics, re.M)
        )
        assert found == {str(g) for g in range(groups)}, (
            f"/metrics has tangram:group_{name}_slots for groups {sorted(found)} of {groups}"
        )
    assert re.search(r"^tangram:never_fit_total", metrics, re.M), "no never-fit counter"
    # The split gauge follows finished turns: the next request's stats publish the first's.
    server.generate(_ids(random.Random(seed + 1), 30), 4)
    metrics = requests.get(f"{server.url}/metrics", timeout=30).text
    split = r'^tangram:group_split_fill\{[^}]*group="\d+"[^}]*\} ([0-9.e+-]+)'
    fill = re.findall(split, metrics, re.M)
    assert len(fill) == groups and abs(sum(map(float, fill)) / groups - 1) < 1e-6, (
        f"seed {seed}: tangram:group_split_fill {fill} (one per group, mean 1)"
    )
    usage = [float(u) for u in re.findall(r"token usage: ([0-9.]+)", server.log())]
    assert usage and usage[-1] < 0.2, (
        f"seed {seed}: SGLang logged token usage {usage[-3:]} for one 30-token request on a "
        "flushed server: not the KV share in use"
    )
