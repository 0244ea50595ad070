"""Tensor and data parallelism on the real SGLang server (CPU). Under `--tp-size 2` each
rank stores its own kv heads of every head group, and admission, which runs on every rank
from the same inputs, must come out the same everywhere.

SGLang's CPU path runs TP=2 on one NUMA node once `SGLANG_CPU_OMP_THREADS_BIND` gives each
rank its cores (without it SGLang asserts that ranks <= NUMA nodes). The shipped tiny
profile splits its 4 kv heads 2 per rank so that one rank holds no head of group 0:
- at ratio 1.0 the sharded pools give stock TP=2's greedy tokens;
- at 0.25 a conversation reuses its compressed turns, a client abort and a chunked
  prefill abort release exactly, every rank's free slots and reservations agree after
  each step (`tangram_pool_ranks`), and `/flush_cache` returns every rank's pools.
Three TP=2 servers, started side by side. Then data parallelism (`--dp-size 2`): each
replica keeps its own pools, and a session pinned to one replica reuses its turns there.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import pytest
import requests
from server_sessions import (
    NEW_TOKENS,
    SHIPPED_PROFILE,
    assert_same_transcript,
    compressed_launches,
    flush_when_idle,
    internal_states,
    run_conversation,
    stream_ids,
    transcript,
    workload,
)

from tangram_sglang.cpu.server import Launch, running_servers
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.offline.profile import Profile

pytestmark = pytest.mark.server

TP = ("--tp-size", "2")
BIND = (("SGLANG_CPU_OMP_THREADS_BIND", "0|1"),)  # one core per rank
# What every rank must agree on (bytes differ: each rank stores its own heads).
AGREED = ("slots", "free_slots", "logical_slots", "logical_free", "reserved", "overdrawn")


def rank_states(server) -> list[dict]:
    return internal_states(server)[0]["tangram_pool_ranks"]


def disagreement(states: list[dict]) -> dict:
    """The agreed fields that differ between ranks (empty when they all agree)."""
    return {k: [s[k] for s in states] for k in AGREED if any(s[k] != states[0][k] for s in states)}


def tp_launch(launch: Launch) -> Launch:
    return replace(launch, args=[*launch.args, *TP], env=(*launch.env, *BIND))


@pytest.fixture(scope="module")
def tp_runs(model_dir, tmp_path_factory):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    work = workload(seed)
    tangram = compressed_launches()["tangram-0.25"]
    launches = {
        "stock": tp_launch(Launch(plugins=False)),
        "tangram-1.0": tp_launch(
            replace(tangram, args=[*tangram.args, "--tangram-ratio", "1.0"])
        ),  # the last --tangram-ratio wins
        "tangram-0.25": tp_launch(tangram),
    }
    # Six scheduler processes start on two cores: allow twice the usual start-up time.
    with running_servers(model_dir, tmp_path_factory.mktemp("logs"), launches, 480) as servers:
        stock, ours = (transcript(servers[n], work) for n in ("stock", "tangram-1.0"))
        server = servers["tangram-0.25"]
        steps = {}
        conversation = run_conversation(server, seed)
        steps["after the conversation"] = rank_states(server)
        history = [rng.randrange(10, 1000) for _ in range(150)]
        reply = server.generate(history, NEW_TOKENS)
        steps["holding one turn"] = rank_states(server)
        stream_ids(server, history + reply["output_ids"], 64, stop_after=3)
        rid = f"tp-abort-{seed}"
        worker = threading.Thread(
            target=stream_ids, args=(server, [rng.randrange(10, 1000) for _ in range(400)], 32),
            kwargs={"stop_after": None, "rid": rid},
        )  # fmt: skip
        worker.start()
        time.sleep(0.2 + rng.random() * 0.5)
        requests.post(f"{server.url}/abort_request", json={"rid": rid}, timeout=30)
        worker.join(300)
        flush_when_idle(server)
        steps["after aborts and a flush"] = rank_states(server)
    return seed, stock, ours, conversation, steps, worker.is_alive()


def test_sharded_pools_at_ratio_one_give_stock_tp2_greedy_tokens(tp_runs):
    seed, stock, ours, *_ = tp_runs
    assert_same_transcript(ours, stock, "tangram 1.0 TP=2 against stock TP=2", seed)


def test_tp2_conversation_reuses_compressed_turns_and_ranks_agree(tp_runs):
    seed, _, _, conversation, steps, stuck = tp_runs
    assert not stuck, f"seed {seed}: the aborted chunked request never ended"
    turns = conversation["turns"]
    for t in (1, 2):
        earlier = turns[t - 1][0] + NEW_TOKENS - 1
        assert turns[t][1] >= earlier, f"seed {seed}: turn {t + 1} reused {turns[t]}"
    assert conversation["shared"][1] == NEW_TOKENS, f"seed {seed}: {conversation['shared']}"
    held = conversation["held"]
    slots = [s - f for s, f in zip(held["slots"], held["free_slots"], strict=True)]
    assert min(slots) < held["logical_slots"] - held["logical_free"], f"seed {seed}: {held}"
    for step, states in steps.items():
        assert len(states) == 2, f"{step}: {len(states)} rank states"
        differ = disagreement(states)
        assert not differ, f"seed {seed}: {step}, the ranks' pools differ: {differ}"
    holding = steps["holding one turn"][0]
    assert holding["free_slots"] != holding["slots"], f"seed {seed}: nothing held: {holding}"
    for rank, state in enumerate(steps["after aborts and a flush"]):
        groups = len(state["slots"])
        assert state["free_slots"] == state["slots"], f"seed {seed}: rank {rank}: {state}"
        assert state["logical_free"] == state["logical_slots"], f"seed {seed}: rank {rank}"
        assert state["reserved"] == [0] * groups, f"seed {seed}: rank {rank} reserves {state}"


def test_each_rank_stores_its_own_heads_of_the_shipped_profile(tp_runs):
    """Rank 1 holds no head of group 0 (the case the sharding must survive), so its group
    storage differs from rank 0's while the slot counts agree."""
    seed, *_, steps, _ = tp_runs
    states = steps["after the conversation"]
    layout = PoolLayout.from_profile(Profile.load(SHIPPED_PROFILE), 0.25)
    for rank, state in enumerate(states):
        shard = layout.shard(rank, 2)
        heads = [sum(len(h) for h in shard.heads[g]) for g in range(shard.num_groups)]
        assert state["heads_per_group"] == heads, f"rank {rank}: {state['heads_per_group']}"
    assert 0 in states[1]["heads_per_group"], "the shipped profile no longer leaves a group empty"
    assert states[0]["bytes_per_group"] != states[1]["bytes_per_group"]


@pytest.fixture(scope="module")
def dp_run(model_dir, tmp_path_factory):
    """`--dp-size 2`: two replicas, each its own pools; a session pinned to replica 1
    (`routed_dp_rank`, what a router's session affinity sets) reuses its compressed turns
    there and leaves replica 0 untouched."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    launch = compressed_launches()["tangram-0.25"]
    launch = replace(launch, args=[*launch.args, "--dp-size", "2"])
    with running_servers(model_dir, tmp_path_factory.mktemp("logs"), {"dp": launch}, 480) as s:
        server = s["dp"]
        flush_when_idle(server)
        history, turns = [rng.randrange(10, 1000) for _ in range(200)], []
        for _ in range(3):
            reply = server.post(
                "/generate",
                {
                    "input_ids": history,
                    "sampling_params": {"temperature": 0.0, "max_new_tokens": NEW_TOKENS},
                    "routed_dp_rank": 1,
                },
            )
            turns.append((len(history), reply["meta_info"]["cached_tokens"]))
            history = history + reply["output_ids"] + [rng.randrange(10, 1000) for _ in range(40)]
        held = replica_states(server)
        flush_when_idle(server)
        flushed = replica_states(server)
    return seed, turns, held, flushed


def replica_states(server) -> list[dict]:
    return [state["tangram_pool"] for state in internal_states(server)]


def test_dp2_replicas_keep_their_own_pools_and_a_pinned_session_reuses_its_turns(dp_run):
    seed, turns, held, flushed = dp_run
    assert len(held) == 2, f"{len(held)} replica states"
    for t in (1, 2):
        earlier = turns[t - 1][0] + NEW_TOKENS - 1
        assert turns[t][1] >= earlier, f"seed {seed}: turn {t + 1} reused {turns[t]}"
    assert held[0]["free_slots"] == held[0]["slots"], f"seed {seed}: replica 0 holds {held[0]}"
    assert held[1]["free_slots"] != held[1]["slots"], f"seed {seed}: replica 1 holds nothing"
    for replica, state in enumerate(flushed):
        assert state["free_slots"] == state["slots"], f"seed {seed}: replica {replica}: {state}"
        assert state["reserved"] == [0] * len(state["slots"]), f"seed {seed}: {state}"
