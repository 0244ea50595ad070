"""The accuracy benchmark's CI slice on the reference model: a few multi-turn samples through
the real SGLang server on CPU and through the reference path must give the same answers,
token for token, at full KV, uniform and tangram (equal memory share), with the same KV
held; and a flat profile (every group at one ratio) must serve exactly what uniform does.
Accuracy levels are the benchmark's (`bench/accuracy.py`), not asserted here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tangram_sglang.accuracy.chat import ChatFormat
from tangram_sglang.accuracy.hf_path import load_model
from tangram_sglang.accuracy.paths import Setting, run_reference, run_server
from tangram_sglang.accuracy.tasks import Haystack, make_sample
from tangram_sglang.cpu.server import Launch, running_servers
from tangram_sglang.memory.budget import BudgetRule
from tangram_sglang.offline.profile import Profile

pytestmark = pytest.mark.server

PROFILE = Path(__file__).parents[1] / "profiles" / "smollm2-135m-instruct.headkv.yaml"
SAMPLES, WORDS, MAX_NEW = 2, 450, 24
SETTINGS = (Setting("full"), Setting("uniform", 0.25), Setting("tangram", 0.25))


def flat_profile(profile: Profile, ratio: float) -> Profile:
    """The profile's head groups with one ratio everywhere: uniform's budgets, several pools."""
    heads = tuple(dataclasses.replace(h, reserved=ratio) for h in profile.heads)
    groups = tuple(dataclasses.replace(g, ratio=ratio) for g in profile.groups)
    return dataclasses.replace(profile, heads=heads, groups=groups)


@pytest.fixture(scope="module")
def runs(smollm2_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    chat = ChatFormat(AutoTokenizer.from_pretrained(smollm2_dir))
    profile = Profile.load(PROFILE)
    flat = tmp_path_factory.mktemp("profile") / "flat.yaml"
    flat_profile(profile, 0.25).save(flat)
    hay = Haystack()
    samples = [make_sample("multi_turn", i, WORDS, seed=7, hay=hay) for i in range(SAMPLES)]
    model = load_model(smollm2_dir)
    rule = BudgetRule(sink=profile.calibration.sink, window=profile.calibration.window)
    reference = [
        r
        for sample in samples
        for r in run_reference(model, chat, rule, sample, SETTINGS, profile, MAX_NEW)
    ]
    del model
    launches = {
        s.name: Launch(
            s.server_args(PROFILE),
            plugins=s.mode != "full",
            attention="torch_native" if s.mode == "full" else None,
        )
        for s in SETTINGS
    }
    flat_setting = Setting("tangram", 0.25)
    launches["flat"] = Launch(flat_setting.server_args(flat), attention=None)
    server = {}
    with running_servers(smollm2_dir, tmp_path_factory.mktemp("logs"), launches) as servers:
        for name, setting in [*((s.name, s) for s in SETTINGS), ("flat", flat_setting)]:
            server[name] = [
                run_server(servers[name].url, chat, sample, setting, MAX_NEW) for sample in samples
            ]
    return reference, server


def test_server_answers_equal_the_reference_path_token_for_token(runs):
    reference, server = runs
    ref = {(r.setting, r.index): r for r in reference}
    for setting in SETTINGS:
        for s in server[setting.name]:
            r = ref[(setting.name, s.index)]
            for t, (a, b) in enumerate(zip(s.turns, r.turns, strict=True), 1):
                assert a.output == b.output, (
                    f"{setting.name} sample {s.index} turn {t}: server {a.text!r} vs "
                    f"reference {b.text!r}"
                )


def test_server_and_reference_hold_the_same_kv(runs):
    """Same segments, same budgets: the server's groups hold exactly the (layer, head) slots
    the reference path's masks keep, and every follow-up turn hits the radix cache."""
    reference, server = runs
    ref = {(r.setting, r.index): r for r in reference}
    model = Profile.load(PROFILE).model
    per_token = model.num_layers * model.num_kv_heads
    for setting in SETTINGS[1:]:
        for s in server[setting.name]:
            r = ref[(setting.name, s.index)]
            assert s.kv_tokens == r.kv_tokens
            assert s.held_slots == r.held_slots, (setting.name, s.index)
            assert r.held_slots < 0.5 * r.kv_tokens * per_token, "nothing was compressed"
            cached = [t.cached for t in s.turns]
            assert cached[0] == 0 and all(c > s.prompt_tokens for c in cached[1:]), cached


def test_a_flat_profile_serves_exactly_what_uniform_serves(runs):
    _, server = runs
    for flat, uniform in zip(server["flat"], server["uniform_25"], strict=True):
        assert [t.output for t in flat.turns] == [t.output for t in uniform.turns]
        assert flat.held_slots == uniform.held_slots
