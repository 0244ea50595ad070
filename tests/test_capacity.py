"""Capacity planning agrees with the budget rule and the pool split it is built from."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tangram_sglang.__main__ import main
from tangram_sglang.memory.budget import BudgetRule, Workload, session_slots
from tangram_sglang.memory.layout import PoolLayout
from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.capacity import capacity_plan, serving_sessions
from tangram_sglang.offline.profile import ModelIdentity, Profile, uniform_profile

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "num_hidden_layers": 6,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "hidden_size": 512,
    "head_dim": 64,
}
MODEL = ModelIdentity.from_hf_config(CONFIG)


@pytest.mark.parametrize("page_size", [1, 16])
def test_tangram_sessions_fit_their_group_pools(page_size):
    rng = np.random.default_rng()
    profile = synthetic_profile(MODEL, float(rng.uniform(0.1, 0.5)), seed=int(rng.integers(1e6)))
    workload = Workload(int(rng.integers(500, 5000)), int(rng.integers(1, 5)), 100, 50)
    kv_bytes = int(rng.integers(2**28, 2**31))
    plan = capacity_plan(profile, kv_bytes, workload, 2, page_size)
    tangram = plan.rows[-1]
    layout = PoolLayout.from_profile(profile)
    total = sum(g.bytes for g in plan.groups)
    assert total <= kv_bytes, f"groups use {total} bytes of a {kv_bytes} budget"
    for g in plan.groups:
        assert g.slots % page_size == 0
        assert g.bytes == g.slots * layout.slot_bytes(g.gid, 2)
        assert tangram.sessions * g.slots_per_session <= g.slots
    # groups run out together: one more session would not fit in at least one group,
    # and no group has room for two more.
    assert any((tangram.sessions + 1) * g.slots_per_session > g.slots for g in plan.groups)
    assert all((tangram.sessions + 2) * g.slots_per_session > g.slots for g in plan.groups)


def test_full_ratio_profile_plans_like_full_kv():
    profile = uniform_profile(MODEL, 1.0)
    workload = Workload(4096, 3, 128, 64)
    plan = capacity_plan(profile, 2**30, workload)
    full, uniform, padded, tangram = plan.rows
    assert full.bytes_per_session == tangram.bytes_per_session == padded.bytes_per_session
    assert abs(full.sessions - tangram.sessions) <= 1
    rule = BudgetRule(sink=4, window=32)
    assert plan.groups[0].slots_per_session == session_slots(workload.turn_shapes(), [1.0], rule)[0]


def test_plan_command_prints_the_table(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    profile = synthetic_profile(MODEL, 0.25)
    profile.save(path)
    assert main(["plan", "--profile", str(path), "--kv-gib", "2"]) == 0
    out = capsys.readouterr().out
    uniform = f"uniform {profile.held_ratio:.0%}"  # at the profile's memory share
    for needle in ("full KV", uniform, "tangram head groups", "slots/session"):
        assert needle in out


def test_plan_under_tensor_parallelism_counts_each_ranks_heads(tmp_path, capsys):
    """Per GPU, a rank holds 1/tp of the heads: full KV fits tp times the sessions, and the
    group slots are the ones every rank can hold (the heaviest rank fills its budget)."""
    seed = int(np.random.default_rng().integers(1e6))
    profile = synthetic_profile(MODEL, 0.25, seed=seed)
    workload = Workload(2000, 2, 64, 32)
    kv_bytes = 64 * 2**20
    one, two = (capacity_plan(profile, kv_bytes, workload, tp_size=n) for n in (1, 2))
    assert two.rows[0].sessions in (2 * one.rows[0].sessions, 2 * one.rows[0].sessions + 1)
    assert max(two.rank_use) > 0.99 and min(two.rank_use) <= max(two.rank_use)
    assert one.rows[-1].sessions <= two.rows[-1].sessions <= 2 * one.rows[-1].sessions + 1, seed
    path = tmp_path / "p.yaml"
    profile.save(path)
    assert main(["plan", "--profile", str(path), "--tp-size", "2"]) == 0
    assert "tensor parallel 2: " in capsys.readouterr().out
    assert main(["plan", "--profile", str(path), "--tp-size", "3"]) == 2
    assert "4 kv heads do not split evenly over --tp-size 3" in capsys.readouterr().err


def test_plan_command_reports_a_bad_profile_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: tangram-profile/1\nmethod: ada-snapkv\n")
    proc = subprocess.run(
        [sys.executable, "-m", "tangram_sglang", "plan", "--profile", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "profile field 'model': is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_reports_the_slots_a_ragged_pool_allocates():
    import torch

    from tangram_sglang.memory.pool import RaggedPool

    profile = synthetic_profile(MODEL, 0.3, seed=int(np.random.default_rng().integers(1e6)))
    workload = Workload(2000, 2, 64, 32)
    kv_bytes = 24 * 2**20
    plan = capacity_plan(profile, kv_bytes, workload, 2, 16)
    demand = [g.slots_per_session for g in plan.groups]
    pool = RaggedPool.from_budget(profile, kv_bytes, torch.float16, "cpu", 4, 64, 16, demand=demand)
    assert tuple(pool.slots) == tuple(g.slots for g in plan.groups)
    assert pool.sessions_that_fit(demand) == plan.rows[-1].sessions


def test_synthetic_command_writes_a_profile_for_the_model(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(CONFIG))
    out = tmp_path / "synthetic.yaml"
    args = ["synthetic", "--model-path", str(model_dir), "--ratio", "0.3", "--out", str(out)]
    assert main([*args, "--groups", "3"]) == 0
    profile = Profile.load(out)
    profile.check_model(MODEL)
    assert 1 <= profile.num_groups <= 3, f"{profile.num_groups} groups, asked for at most 3"
    assert f"{profile.num_groups} groups" in capsys.readouterr().out
    kept = np.mean([h.mean for h in profile.heads])
    assert kept == pytest.approx(0.3, rel=0.1), f"mean kept ratio {kept}, asked for 0.3"
    assert (
        main(["synthetic", "--model-path", str(tmp_path), "--ratio", "0.3", "--out", str(out)]) == 2
    )
    assert "no config.json" in capsys.readouterr().err


def test_serving_sessions_compare_the_same_bytes():
    rule = BudgetRule(sink=4, window=32)
    workload = Workload(context=2048, turns=3, user_tokens=128, answer_tokens=64)
    full_tokens = 100_000
    full_layout = PoolLayout.from_profile(uniform_profile(MODEL, 1.0))
    demand = session_slots(workload.turn_shapes(), full_layout.ratios, rule)
    slots = full_layout.pool_slots(full_tokens * full_layout.full_token_bytes(2), demand, 2, 1)
    full, same = serving_sessions(slots, full_layout.ratios, rule, full_tokens, workload)
    assert full == same == full_tokens // workload.raw_tokens
    profile = synthetic_profile(MODEL, 0.25)
    layout = PoolLayout.from_profile(profile)
    demand = session_slots(workload.turn_shapes(), layout.ratios, rule)
    slots = layout.pool_slots(full_tokens * layout.full_token_bytes(2), demand, 2, 1)
    full, tangram = serving_sessions(slots, layout.ratios, rule, full_tokens, workload)
    assert tangram > full, f"at 0.25 the pools fit {tangram} sessions, full KV {full}"
    assert all(s >= tangram * d for s, d in zip(slots, demand, strict=True))
