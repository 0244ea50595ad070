"""FP8 KV composed with compression on the real SGLang server (CPU, `torch_native` for stock):
`--kv-cache-dtype fp8_e4m3` with `--kv-compression`.

SGLang's CPU path serves FP8 KV (it stores the cast values and reads them back), so the
reference is stock SGLang with the same flag: at ratio 1.0 the head-group pools must give
its greedy tokens. At 0.25 with the shipped profile a conversation must reuse its
compressed turns from the radix cache and `/flush_cache` must return every pool, whose
storage is one byte per element. Three servers, started side by side.
"""

from __future__ import annotations

import random

import pytest
from server_sessions import (
    NEW_TOKENS,
    SYSTEM,
    assert_same_transcript,
    compressed_launches,
    run_conversation,
    transcript,
    workload,
)

from tangram_sglang.cpu.server import Launch, running_servers

pytestmark = pytest.mark.server

FP8 = ("--kv-cache-dtype", "fp8_e4m3")


@pytest.fixture(scope="module")
def fp8_runs(model_dir, tmp_path_factory):
    seed = random.randrange(2**32)
    work = workload(seed)
    launches = {
        "stock-fp8": Launch([*FP8], plugins=False),
        **{f"{name}-fp8": launch for name, launch in compressed_launches(*FP8).items()},
    }
    with running_servers(model_dir, tmp_path_factory.mktemp("logs"), launches) as servers:
        stock, uniform = (transcript(servers[n], work) for n in ("stock-fp8", "uniform-1.0-fp8"))
        conversation = run_conversation(servers["tangram-0.25-fp8"], seed)
    return seed, stock, uniform, conversation


def test_fp8_pools_at_ratio_one_give_stock_fp8_greedy_tokens(fp8_runs):
    seed, stock, uniform, _ = fp8_runs
    assert_same_transcript(uniform, stock, "uniform 1.0 + FP8 against stock + FP8", seed)


def test_fp8_compressed_conversation_reuses_its_turns_and_flush_returns_every_pool(fp8_runs):
    seed, _, _, conversation = fp8_runs
    start, held, flushed = conversation["start"], conversation["held"], conversation["flushed"]
    assert start["dtype"] == "float8_e4m3fn", f"the pools store {start['dtype']}"
    turns = conversation["turns"]
    for t in (1, 2):
        earlier = turns[t - 1][0] + NEW_TOKENS - 1
        assert turns[t][1] >= earlier, f"seed {seed}: turn {t + 1} reused {turns[t]}"
    # At the default --tangram-cut-reuse 0 the shared head is reused, the cut never judged.
    assert conversation["shared"] == (SYSTEM, NEW_TOKENS), f"seed {seed}: {conversation}"
    assert conversation["shared_cut"] == {"reused": 0, "recomputed": 0}, f"seed {seed}"
    slots = [s - f for s, f in zip(held["slots"], held["free_slots"], strict=True)]
    assert min(slots) < held["logical_slots"] - held["logical_free"], f"seed {seed}: {held}"
    assert flushed["free_slots"] == flushed["slots"], f"seed {seed}: after flush {flushed}"
    assert flushed["logical_free"] == flushed["logical_slots"], f"seed {seed}: {flushed}"
