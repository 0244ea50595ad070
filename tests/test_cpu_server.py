"""The real SGLang 0.5.17 server on this CPU machine, over HTTP, with our plugin installed.

With `--kv-compression none` the plugin must leave SGLang exactly stock: same greedy tokens
(fp32 tiny Qwen3), radix-cache reuse across turns, chat via the local tokenizer. With
`--kv-compression uniform --tangram-ratio 1.0` (the tangram backend, ragged pools and
radix cache, keeping everything) it must give stock's greedy tokens too. With the shipped
profile at ratio 0.25 a conversation must reuse its compressed turns from the radix cache,
a second session sharing its first tokens must reuse them from inside a compressed turn
where the cut keeps enough (`--tangram-cut-reuse 0.5`), else recompute from the chunk's
start, as the server reports,
and `/flush_cache` must return every head-group pool to its capacity; a request that can
never fit its head groups gets an error while the server keeps serving, and no slot stays
reserved once the conversation is done (Budget Reservation). That server prefills in
chunks of 64 tokens, so the conversation's long prompts exercise chunked prefill: no
chunk may allocate beyond what admission reserved. Flag combinations we cannot serve must
stop the server at start-up with our message, before it loads a model.
Six server starts in all; the four that serve start side by side.
"""

from __future__ import annotations

import random
import re

import pytest
from server_sessions import (
    CHUNK,
    NEW_TOKENS,
    SYSTEM,
    assert_same_transcript,
    compressed_launches,
    run_conversation,
    transcript,
    workload,
)

from tangram_sglang.cpu.server import Launch, failed_start, running_servers

pytestmark = pytest.mark.server

CUT_REUSE = ("--tangram-cut-reuse", "0.5")  # the conversation's shared session is judged


@pytest.fixture(scope="module")
def transcripts(model_dir, tmp_path_factory):
    """The same fresh workload against stock SGLang, SGLang with our plugin (compression
    off, and uniform at ratio 1.0), and a conversation at ratio 0.25 with the shipped profile."""
    seed = random.randrange(2**32)
    work = workload(seed)
    launches = {
        "stock": Launch(plugins=False),
        # Naming the flag proves the plugin's hooks are live: stock SGLang rejects it.
        "plugin": Launch(["--kv-compression", "none"]),
        **compressed_launches(*CUT_REUSE),
    }
    with running_servers(model_dir, tmp_path_factory.mktemp("logs"), launches) as servers:
        stock, plugin, uniform = (
            transcript(servers[name], work) for name in ("stock", "plugin", "uniform-1.0")
        )
        conversation = run_conversation(servers["tangram-0.25"], seed)
        conversation["log"] = servers["tangram-0.25"].log()
    return seed, work, stock, plugin, uniform, conversation


def test_plugin_with_compression_none_gives_stock_greedy_tokens(transcripts):
    seed, _, stock, plugin, _, _ = transcripts
    assert_same_transcript(plugin, stock, "--kv-compression none", seed)


def test_uniform_compression_at_ratio_one_gives_stock_greedy_tokens(transcripts):
    seed, _, stock, _, uniform, _ = transcripts
    assert_same_transcript(uniform, stock, "--kv-compression uniform --tangram-ratio 1.0", seed)


def test_second_turn_reuses_first_turn_from_radix_cache(transcripts):
    seed, work, stock, plugin, uniform, _ = transcripts
    for name, result in (("stock", stock), ("plugin", plugin), ("uniform-1.0", uniform)):
        assert result["turn2_cached"] >= len(work["turn1"]), (
            f"{name}: turn 2 reused {result['turn2_cached']} cached tokens, expected at least "
            f"turn 1's {len(work['turn1'])} prompt tokens (workload seed {seed})"
        )


def test_compressed_turns_are_reused_from_the_radix_cache(transcripts):
    seed, _, _, _, _, conversation = transcripts
    turns = conversation["turns"]
    assert turns[0][1] == 0, f"seed {seed}: the first turn found {turns[0][1]} cached tokens"
    for t in (1, 2):
        # The previous turn's prompt and its answer but the last token (never attended).
        earlier = turns[t - 1][0] + NEW_TOKENS - 1
        assert turns[t][1] >= earlier, (
            f"seed {seed}: turn {t + 1} reused {turns[t][1]} cached tokens, expected the "
            f"{earlier} tokens of the earlier turns (turns: (prompt, cached) {turns})"
        )


def test_a_session_sharing_part_of_a_compressed_turn_reuses_that_part(transcripts):
    """Reused where the cut keeps enough of the chunk's kept slots (--tangram-cut-reuse),
    else recomputed from the chunk's start: what the server says it decided is what the
    request got."""
    seed, _, _, _, _, conversation = transcripts
    cached, produced = conversation["shared"]
    cut = conversation["shared_cut"]
    assert sum(cut.values()) == 1, f"seed {seed}: lossy-cut decisions {cut}, expected one"
    expected = SYSTEM if cut["reused"] else SYSTEM // CHUNK * CHUNK
    assert (cached, produced) == (expected, NEW_TOKENS), (
        f"seed {seed}: a session sharing the first {SYSTEM} tokens (inside a compressed "
        f"chunk of the first session's turn; the cut {cut}) reused {cached} and produced "
        f"{produced} tokens, expected {expected}"
    )


def test_compression_holds_fewer_slots_than_tokens_and_flush_returns_every_pool(transcripts):
    seed, _, _, _, _, conversation = transcripts
    start, held, flushed = conversation["start"], conversation["held"], conversation["flushed"]
    for state, name in ((start, "before the conversation"), (flushed, "after /flush_cache")):
        assert state["free_slots"] == state["slots"], (
            f"seed {seed}: {name} the group pools hold {state['free_slots']} free of "
            f"{state['slots']}"
        )
        assert state["logical_free"] == state["logical_slots"], f"seed {seed}: {name}: {state}"
    tokens = held["logical_slots"] - held["logical_free"]
    slots = [s - f for s, f in zip(held["slots"], held["free_slots"], strict=True)]
    assert tokens > 0 and min(slots) < tokens, (
        f"seed {seed}: the cached conversation holds {tokens} tokens in group slots {slots}: "
        "nothing was compressed"
    )


def test_chat_completion_uses_local_tokenizer(transcripts):
    _, _, _, plugin, _, _ = transcripts
    assert isinstance(plugin["chat"], str) and plugin["chat"], (
        f"/v1/chat/completions returned no text: {plugin['chat']!r}"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--speculative-algorithm", "EAGLE"],
            "--kv-compression tangram does not support: speculative decoding "
            "(--speculative-algorithm EAGLE)",
        ),
        (["--tangram-ratio", "1.5"], "--tangram-ratio 1.5 is outside (0, 1]"),
        (
            ["--tp-size", "3"],
            "tensor parallelism (--tp-size 3: 4 kv heads do not split evenly over --tp-size 3)",
        ),
    ],
    ids=["speculative-decoding", "ratio-1.5", "tensor-parallel-uneven"],
)
def test_bad_flag_combination_is_refused_at_startup(
    model_dir, profile_file, tmp_path, flags, message
):
    args = ["--kv-compression", "tangram", "--tangram-profile", str(profile_file), *flags]
    code, log = failed_start(model_dir, tmp_path / "refused.log", Launch(args, attention=None))
    assert code != 0, f"server exited with 0 for {flags}:\n{log[-2000:]}"
    assert message in log, f"refusal message {message!r} not in the log:\n{log[-2000:]}"
    assert "Load weight begin" not in log, f"server loaded the model before refusing {flags}"
    assert "Traceback" not in log, f"a traceback instead of one line:\n{log[-2000:]}"
    assert any(line.startswith("error: ") and message in line for line in log.splitlines())


def test_a_request_that_can_never_fit_is_refused_and_the_server_keeps_serving(transcripts):
    seed, _, _, _, _, conversation = transcripts
    status, body = conversation["refused"]
    assert status == 400 and "can never fit the KV pools: head group" in body, (
        f"seed {seed}: a request needing more than every group holds got {status}: {body[:500]}"
    )
    assert len(conversation["served"]) == NEW_TOKENS, (
        f"seed {seed}: after the refusal the server answered {conversation['served']}"
    )


def test_a_token_id_outside_the_vocabulary_gets_a_400_and_the_server_keeps_serving(transcripts):
    seed, _, _, _, _, conversation = transcripts
    for status, body in conversation["bad_ids"]:
        assert status == 400 and "outside the vocabulary [0, " in body, (
            f"seed {seed}: a request with an out-of-vocabulary id got {status}: {body[:500]}"
        )
    assert len(conversation["served"]) == NEW_TOKENS, (
        f"seed {seed}: after the refusals the server answered {conversation['served']}"
    )


def test_reservations_return_to_zero_when_the_conversation_is_done(transcripts):
    seed, _, _, _, _, conversation = transcripts
    groups = len(conversation["start"]["slots"])
    for name in ("start", "held", "flushed"):
        state = conversation[name]
        assert state["reserved"] == [0] * groups and state["reserved_requests"] == 0, (
            f"seed {seed}: {name}: {state['reserved_requests']} request(s) still reserve "
            f"{state['reserved']} group slots with nothing running"
        )


def test_finished_turns_are_counted_against_the_shape_the_pools_are_split_for(transcripts):
    """`/server_info` reports the split's planned session shape and the traffic's, from
    every finished turn (`memory/split_check.py`; aborted requests are not turns)."""
    seed, _, _, _, _, conversation = transcripts
    start, held = conversation["start"]["split"], conversation["held"]["split"]
    assert start["planned"] == held["planned"] and start["planned"].count(",") == 3, seed
    counted = held["turns"] - start["turns"]
    assert counted >= len(conversation["turns"]) + 1, f"seed {seed}: {counted} turns counted"
    assert held["observed"] is not None and held["observed"].count(",") == 3, seed


def test_chunked_prefill_never_allocates_beyond_the_reservation(transcripts):
    seed, _, _, _, _, conversation = transcripts
    first_prompt = conversation["turns"][0][0]
    assert first_prompt > CHUNK, f"seed {seed}: the first turn ({first_prompt}) was not chunked"
    held = conversation["held"]
    assert held["overdrawn"] == [0] * len(held["slots"]), (
        f"seed {seed}: the conversation (chunks of {CHUNK}) allocated {held['overdrawn']} "
        "group slots beyond what admission reserved"
    )
    log = conversation["log"]
    assert "not the planned" not in log, (
        f"seed {seed}: a chunk left admission's plan:\n{log[-3000:]}"
    )
    assert "Memory leak" not in log and "memory leak" not in log, (
        f"seed {seed}: the idle leak check fired:\n{log[-3000:]}"
    )
    assert "request tables (req_to_slot [" in log, "the start-up log does not state the table bytes"
    fit = re.search(r"sessions that fit at once .*: (\d+) at full KV, (\d+) in the head-group", log)
    assert fit, "the start-up log does not state the sessions that fit"
    full, tangram = map(int, fit.groups())
    assert tangram > full, f"at 0.25 the pools fit {tangram} sessions, full KV {full}"


def test_sglang_frontend_multi_turn_program_reuses_compressed_turns(transcripts):
    seed, _, _, _, _, conversation = transcripts
    turns = conversation["frontend"]
    assert all(answer for answer, _ in turns), f"seed {seed}: an empty answer in {turns}"
    cached = [c for _, c in turns]
    assert cached[1] > 0 and cached[2] > cached[1], (
        f"seed {seed}: the frontend program's follow-up turns did not reuse the earlier "
        f"turns from the radix cache (cached tokens per turn {cached})"
    )
