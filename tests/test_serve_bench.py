"""The serving benchmark's workloads (`bench/workloads.py`), a smoke run of its driver
(`bench/serve.py`) and of the peer clients (`bench/multiround.py`, LMCache's multi-round
QA shape; `bench/peers.py`, SGLang's own `benchmark.serving` beside it) against the real
CPU server: results, the summary keys and the plots are produced. No speed is asserted
(speed lives in bench/results/)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import multiround  # noqa: E402
import peers  # noqa: E402
import serve  # noqa: E402
import workloads  # noqa: E402

from tangram_sglang.cpu.server import running_servers  # noqa: E402

SUMMARY_KEYS = {
    "throughput_ratio_tangram_vs_stock_25pct",
    "throughput_ratio_tangram_vs_uniform_25pct",
    "throughput_ratio_tangram_vs_stock_fp8kv_25pct",
    "ttft_p50_ratio_tangram_vs_stock",
    "sessions_ratio_tangram_vs_stock_25pct",
    "sessions_held",
    "device",
    "date",
    "model",
    "workload",
}


@pytest.mark.parametrize(
    ("kind", "turns", "first_tokens"),
    [("shared-context", (3, 8), (2048 + 32, 65536 + 96)), ("chat", (4, 10), (512 + 16, 512 + 1024)),
     ("agent", (5, 20), (2048 + 64, 2048 + 256)),
     ("similar-documents", (3, 8), (2048 + 32, 65536 + 96))],
)  # fmt: skip
def test_workloads_have_their_shapes_and_replay_from_jsonl(kind, turns, first_tokens, tmp_path):
    seed = random.randrange(2**31)
    sessions = workloads.generate(kind, 12, seed=seed, rate=2.0, think=0.5, vocab=1000)
    assert sessions == workloads.generate(kind, 12, seed=seed, rate=2.0, think=0.5, vocab=1000)
    for s in sessions:
        assert turns[0] <= len(s.turns) <= turns[1], f"seed {seed}: {len(s.turns)} turns"
        assert first_tokens[0] <= len(s.turns[0].new_ids) <= first_tokens[1], f"seed {seed}"
        assert len(s.think_s) == len(s.turns) - 1
        assert all(10 <= t < 1000 for turn in s.turns for t in turn.new_ids)
    arrivals = [s.arrival_s for s in sessions]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0 and arrivals[-1] > 0
    path = tmp_path / "w.jsonl"
    workloads.save(sessions, path)
    assert workloads.load(path) == sessions
    small = workloads.generate(kind, 12, seed=seed, scale=0.01)
    assert sum(len(t.new_ids) for s in small for t in s.turns) < sum(
        len(t.new_ids) for s in sessions for t in s.turns
    )
    assert min(t.max_tokens for s in small for t in s.turns) >= 16


def test_similar_documents_are_edited_copies_of_one_template():
    seed = random.randrange(2**31)
    sessions = workloads.generate("similar-documents", 6, seed=seed, vocab=1000)
    first = [s.turns[0].new_ids for s in sessions]
    # The document is the first prompt less its question (32-96 tokens): compare a prefix.
    n = min(len(f) for f in first) - 96
    template = first[0][:n]
    for doc in first[1:]:
        differ = sum(a != b for a, b in zip(doc[:n], template, strict=True))
        assert 0 < differ <= 3 * workloads.EDITED * n, f"seed {seed}: {differ} of {n} differ"


def test_fusion_configurations_add_the_threshold():
    assert serve.config_args("fastfusion-0.95", Path("p.yaml")) == (
        ["--kv-compression", "fastfusion", "--tangram-fusion", "0.95"],
        True,
    )
    flags, plugins = serve.config_args("tangram-0.25+fusion-0.9", Path("p.yaml"))
    assert plugins and flags[:2] == ["--kv-compression", "tangram"]
    assert flags[-2:] == ["--tangram-fusion", "0.9"]
    with pytest.raises(ValueError, match="needs uniform-R or tangram-R"):
        serve.config_args("stock+fusion-0.9", Path("p.yaml"))


def test_unknown_configuration_is_named():
    with pytest.raises(ValueError, match="'tangram' is not"):
        serve.config_args("tangram", Path("p.yaml"))
    assert serve.config_args("tangram-0.25-fp8", Path("p.yaml"))[0][-2:] == [
        "--kv-cache-dtype",
        "fp8_e4m3",
    ]


def test_tangram_pools_are_split_for_the_workloads_own_session_shape():
    """The mean shape of the sessions reaches tangram servers as --tangram-workload (and
    passes the server's own check of that flag); stock and uniform get none."""
    from tangram_sglang.config import TangramConfig

    seed = random.randrange(10_000)
    sessions = workloads.generate("shared-context", 8, seed=seed, scale=0.05)
    shape = workloads.pool_shape(sessions)
    context, turns, user, answer = (int(x) for x in shape.split(","))
    firsts = [len(s.turns[0].new_ids) for s in sessions]
    assert min(firsts) <= context + user <= max(firsts) + 1, (seed, shape)
    assert min(len(s.turns) for s in sessions) <= turns <= max(len(s.turns) for s in sessions)
    assert answer == 16 and 1 <= user < context, (seed, shape)
    flags = serve.config_args("tangram-0.25", Path("p.yaml"), shape)[0]
    assert flags[flags.index("--tangram-workload") + 1] == shape
    parsed = TangramConfig(mode="tangram", workload=shape).serving_workload(8192)
    assert (parsed.context, parsed.turns) == (context, turns)
    for name in ("stock", "uniform-0.25"):
        assert "--tangram-workload" not in serve.config_args(name, Path("p.yaml"), shape)[0]


def test_fp8_configurations_get_stocks_pool_bytes():
    """`--max-total-tokens` counts tokens: an FP8 pool gets the tokens of the same bytes."""
    ap = argparse.ArgumentParser()
    serve.add_server_options(ap)
    args = ap.parse_args(["--max-total-tokens", "6000"])
    flags = {
        name: serve.server_flags(args, name, 8)
        for name in ("stock", "stock-fp8", "tangram-0.25", "tangram-0.25-fp8")
    }
    tokens = {name: int(f[f.index("--max-total-tokens") + 1]) for name, f in flags.items()}
    assert tokens == {
        "stock": 6000,
        "stock-fp8": 6000 * serve.CPU_KV_BYTES,
        "tangram-0.25": 6000,
        "tangram-0.25-fp8": 6000 * serve.CPU_KV_BYTES,
    }


@pytest.mark.server
def test_driver_records_results_summary_and_plots(tmp_path):
    out = tmp_path / "serve-0.25"  # a dot in the name is no suffix
    serve.main(
        ["--workload", "shared-context", "--sessions", "3", "--scale", "0.01",
         "--configs", "stock,tangram-0.25", "--concurrency", "1,3", "--out", str(out)]
    )  # fmt: skip
    record = json.loads(Path(f"{out}.json").read_text())
    assert set(record["summary"]) == SUMMARY_KEYS
    assert record["summary"]["throughput_ratio_tangram_vs_stock_25pct"] > 0
    for name in ("stock", "tangram-0.25"):
        sweep = record["runs"][name]["sweep"]
        assert [r["concurrency"] for r in sweep] == [1, 3]
        for r in sweep:
            assert r["requests"] == record["workload"]["turns"], f"{name}: {r}"
            assert r["ttft_ms"]["p50"] > 0 and r["itl_ms"]["p50"] > 0, f"{name}: {r}"
            assert r["cached_share_per_turn"][1] > 0.5, f"{name}: follow-ups missed the cache"
    assert record["runs"]["tangram-0.25"]["pool"]["free_slots"] is not None
    assert Path(f"{out}.png").stat().st_size > 10_000
    assert "| tangram-0.25 | 3 |" in Path(f"{out}.md").read_text()


def test_multiround_sessions_have_lmcaches_shape():
    shape = multiround.PUBLISHED.scaled(0.1)
    lengths = (shape.shared_system_prompt, shape.user_history_prompt, shape.answer_len)
    assert lengths == (100, 200, 10), "lengths are LMCache's times --scale"
    assert (shape.num_users, shape.num_rounds, shape.qps) == (10, 5, 0.5), "counts stay"
    sessions = shape.sessions(seed=random.randrange(2**31), vocab=1000)
    system = sessions[0].turns[0].new_ids[:100]
    for user, s in enumerate(sessions):
        first = s.turns[0].new_ids
        assert len(first) == 100 + 200 + shape.question_len and first[:100] == system
        assert first[100:300] != sessions[(user + 1) % 10].turns[0].new_ids[100:300]
        assert [len(t.new_ids) for t in s.turns[1:]] == [shape.question_len] * 4
        assert {t.max_tokens for t in s.turns} == {10}
        assert s.arrival_s == user / 0.5 and s.gap_s == 10 / 0.5 and s.think_s == [0.0] * 4


@pytest.fixture(scope="module")
def tangram_server(model_dir, tmp_path_factory):
    """One tiny-model server at `tangram-0.25` for the peer clients (bench/serve.py's flags)."""
    launch = serve.config_launch(
        "tangram-0.25", serve.PROFILES["tiny"], ["--max-running-requests", "16"]
    )
    logs = tmp_path_factory.mktemp("logs")
    with running_servers(model_dir, logs, {"tangram-0.25": launch}) as servers:
        yield servers["tangram-0.25"]


@pytest.mark.server
def test_multiround_client_records_every_parameter_and_its_runs(
    tangram_server, model_dir, tmp_path
):
    out = tmp_path / "multiround"
    workload = ["--scale", "0.1", "--num-users", "3", "--num-rounds", "3", "--qps", "30"]
    multiround.main(
        [*workload, "--url", tangram_server.url, "--name", "tangram-0.25",
         "--model", str(model_dir), "--out", str(out)]
    )  # fmt: skip
    record = json.loads(Path(f"{out}.json").read_text())
    assert set(dataclasses.asdict(multiround.PUBLISHED)) <= set(record["workload"])
    assert "LMCache" in record["workload"]["source"] and record["workload"]["scale"] == 0.1
    (run,) = record["runs"]["tangram-0.25"]["sweep"]
    assert run["requests"] == 9 == record["workload"]["turns"], run
    assert run["ttft_ms"]["p50"] > 0 and run["itl_ms"]["p50"] > 0, run
    assert run["cached_share_per_turn"][1] > 0.5, "follow-up rounds missed the cache"
    markdown = Path(f"{out}.md").read_text()
    assert "| tangram-0.25 | 3 |" in markdown and "multi-round-qa" in markdown


@pytest.mark.server
def test_peer_clients_record_sglangs_client_and_the_multiround_one(
    tangram_server, model_dir, tmp_path
):
    out = tmp_path / "peers"
    peers.main(
        ["--gsp-groups", "2", "--gsp-prompts-per-group", "2", "--gsp-system", "64",
         "--gsp-question", "8", "--gsp-output", "8", "--gsp-max-concurrency", "2",
         "--scale", "0.05", "--num-users", "2", "--num-rounds", "2", "--qps", "30",
         "--url", tangram_server.url, "--name", "tangram-0.25", "--model", str(model_dir),
         "--out", str(out)]
    )  # fmt: skip
    record = json.loads(Path(f"{out}.json").read_text())
    gsp = record["sglang_gsp"]["runs"]["tangram-0.25"]
    assert gsp["output_throughput"] > 0 and gsp["total_output_tokens"] == 4 * 8, gsp
    assert 0 < gsp["cached_tokens"] < gsp["total_input_tokens"], "no shared prefix was reused"
    assert "--dataset-name generated-shared-prefix" in record["sglang_gsp"]["command"]
    (run,) = record["multiround"]["runs"]["tangram-0.25"]["sweep"]
    assert run["requests"] == 4, run
    markdown = Path(f"{out}.md").read_text()
    assert "## (1) SGLang" in markdown and "| tangram-0.25 | 2 |" in markdown
