"""Fast Fusion on the real SGLang server (CPU, fp32 tiny Qwen3): `--kv-compression
fastfusion`.

At threshold 1.0 only bit-identical blocks fuse: one prompt sent several times in one
batch (SGLang's radix cache cannot share it, none of them is cached yet) is stored once,
and every answer is stock's, token for token, on this turn and the next (which must hit
the radix cache through the shared slots). At 0.95, edited copies of one document (a few
tokens swapped, same positions) share blocks too, and such a batch aborted while it
decodes gives its shared slots back; sent one by one (each its own batch), later copies
read the blocks the first one left in the radix cache. Either way the pools return to
their start after `/flush_cache`, no slot stays reserved, and the strict idle check
(every slot's owners against its count, `TANGRAM_STRICT_POOL_CHECK`) finds nothing.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import requests
from server_sessions import VOCAB, flush_when_idle, pool_state

from tangram_sglang.cpu.server import Launch, running_servers
from tangram_sglang.models.tiny_tokenizer import SPECIAL_TOKENS

pytestmark = pytest.mark.server

NEW_TOKENS = 8
FUSION = ("--schedule-policy", "fcfs", "--max-running-requests", "16")


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(n)]


def generate_batch(server, prompts: list[list[int]]) -> list[dict]:
    """One /generate call with a list of prompts: they reach the scheduler together."""
    params = {"temperature": 0.0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    return server.post("/generate", {"input_ids": prompts, "sampling_params": params})


def session(server, prompts: list[list[int]], follow: list[int], plugin: bool = True) -> dict:
    flush_when_idle(server)  # the server's warm-up request stays cached otherwise
    start = pool_state(server) if plugin else None
    first = generate_batch(server, prompts)
    fused = pool_state(server)["fusion"] if plugin else None
    second = server.generate(prompts[0] + first[0]["output_ids"] + follow, NEW_TOKENS)
    held = pool_state(server) if plugin else None
    flush_when_idle(server)
    return {
        "answers": [r["output_ids"] for r in first],
        "second": second["output_ids"],
        "second_cached": second["meta_info"]["cached_tokens"],
        "fusion": fused,
        "start": start,
        "held": held,
        "flushed": pool_state(server) if plugin else None,
        "log": server.log(),
    }


def one_by_one(server, prompts: list[list[int]]) -> dict:
    """Each prompt alone, after the previous one finished (so in its own batch, with a
    radix hit up to its first edited token): what each one gave back to the pools."""
    flush_when_idle(server)
    given_back = []
    for prompt in prompts:
        before = pool_state(server)["fusion"]["slots_given_back"][0]
        server.generate(prompt, NEW_TOKENS)
        given_back.append(pool_state(server)["fusion"]["slots_given_back"][0] - before)
    flush_when_idle(server)
    return {"given_back": given_back, "flushed": pool_state(server), "log": server.log()}


def aborted(server, prompts: list[list[int]]) -> dict:
    """The batch decoding long answers, aborted once fusion shared its blocks: the
    requests' shared slots go back with their last owner."""
    params = {"temperature": 0.0, "max_new_tokens": 400, "ignore_eos": True}
    payload = {"input_ids": prompts, "sampling_params": params}
    before = sum(pool_state(server)["fusion"]["slots_given_back"])
    worker = threading.Thread(
        target=lambda: requests.post(f"{server.url}/generate", json=payload, timeout=300)
    )
    worker.start()
    deadline = time.monotonic() + 120
    while sum(pool_state(server)["fusion"]["slots_given_back"]) == before:
        assert time.monotonic() < deadline, "the batch never fused"
        time.sleep(0.2)
    shared = pool_state(server)["fusion"]["shared_owners"]
    requests.post(f"{server.url}/abort_request", json={"abort_all": True}, timeout=30)
    worker.join(timeout=120)
    flush_when_idle(server)
    return {"shared_while_running": shared, "flushed": pool_state(server)}


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    doc = ids(rng, 96)  # six 16-token blocks
    other = ids(rng, 70)
    duplicates = [doc, doc, other, doc]
    edited = [list(doc) for _ in range(3)]
    for copy in edited[1:]:
        for at in rng.sample(range(4, 16), 2):  # swap two tokens of the first block
            copy[at] = rng.randrange(len(SPECIAL_TOKENS), VOCAB)
    follow = ids(rng, 12)
    launches = {
        "stock": Launch(["--schedule-policy", "fcfs"], plugins=False),
        "exact": Launch(
            ["--kv-compression", "fastfusion", "--tangram-fusion", "1.0", *FUSION], attention=None
        ),
        "near": Launch(["--kv-compression", "fastfusion", *FUSION], attention=None),
    }
    with running_servers(model_dir, tmp_path_factory.mktemp("logs"), launches) as servers:
        results = {
            "stock": session(servers["stock"], duplicates, follow, plugin=False),
            "exact": session(servers["exact"], duplicates, follow),
            "near": session(servers["near"], edited, follow),
        }
        # Edited copies: exact ones stop sharing once the radix cache adopts the twins' slots.
        results["aborted"] = aborted(servers["near"], edited)
        results["aborted"]["log"] = servers["near"].log()
        results["one_by_one"] = one_by_one(servers["near"], edited)
    return seed, results


def test_a_prompt_sent_three_times_in_one_batch_is_stored_once_and_answers_as_stock(runs):
    seed, results = runs
    exact, stock = results["exact"], results["stock"]
    assert exact["answers"] == stock["answers"], (
        f"seed {seed}: fastfusion at 1.0 answered {exact['answers']}, stock {stock['answers']}"
    )
    # 96 tokens = 6 whole blocks; the two later copies of the prompt each give them back.
    assert exact["fusion"]["slots_given_back"] == [2 * 96], f"seed {seed}: {exact['fusion']}"
    assert exact["second"] == stock["second"], f"seed {seed}: the next turn differs"
    assert exact["second_cached"] >= 96, (
        f"seed {seed}: the next turn reused {exact['second_cached']} cached tokens"
    )


def test_edited_copies_of_a_document_share_their_unedited_blocks(runs):
    seed, results = runs
    near = results["near"]
    given_back = near["fusion"]["slots_given_back"][0]
    assert given_back >= 16, (
        f"seed {seed}: at threshold 0.95 two edited copies of a 96-token document gave back "
        f"{given_back} slots (their last five blocks are the same tokens at the same positions)"
    )
    assert len(near["answers"]) == 3 and all(len(a) == NEW_TOKENS for a in near["answers"])


def test_edited_copies_sent_one_by_one_share_the_blocks_earlier_batches_left(runs):
    """Fusion across batches: the first copy stays in the radix cache, each later copy
    (its own batch, starting at its first edited token) reads its unedited blocks."""
    seed, results = runs
    given_back = results["one_by_one"]["given_back"]
    assert given_back[0] == 0 and all(n >= 16 for n in given_back[1:]), (
        f"seed {seed}: copies sent one by one gave back {given_back} slots (their last five "
        "blocks are the same tokens at the same positions as the first copy's)"
    )


@pytest.mark.parametrize("name", ["exact", "near", "aborted", "one_by_one"])
def test_pools_return_to_their_start_and_the_idle_checks_stay_clean(runs, name):
    """After the sessions, and after a fused batch aborted while it decodes."""
    seed, results = runs
    run = results[name]
    if name == "aborted":
        assert sum(run["shared_while_running"]) > 0, f"seed {seed}: {run}"
    states = [(run["flushed"], "after /flush_cache")]
    if "start" in run:
        states.append((run["start"], "before"))
    for state, when in states:
        assert state["free_slots"] == state["slots"], f"seed {seed}: {name} {when}: {state}"
        assert state["logical_free"] == state["logical_slots"], f"seed {seed}: {name} {when}"
    assert run["flushed"]["fusion"]["shared_owners"] == [0], f"seed {seed}: {run['flushed']}"
    assert "[tangram]" not in run["log"] and "memory leak detected" not in run["log"], (
        f"seed {seed}: {name}: the idle check reported a problem"
    )
