"""Profiles round-trip through YAML and refuse bad content with the field's name."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tangram_sglang.models.synthetic import synthetic_profile
from tangram_sglang.offline.profile import (
    ModelIdentity,
    Profile,
    ProfileError,
    scale_ratios,
    uniform_profile,
)

CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "hidden_size": 128,
    "head_dim": 32,
    "intermediate_size": 256,
    "vocab_size": 1024,
}


@pytest.fixture
def model():
    return ModelIdentity.from_hf_config(CONFIG)


@pytest.fixture
def profile(model):
    return synthetic_profile(model, 0.25, seed=7, max_groups=3)


def test_yaml_round_trip_is_lossless(profile, tmp_path):
    path = tmp_path / "p.yaml"
    profile.save(path)
    assert Profile.load(path) == profile


def test_identity_reads_head_dim_and_gqa(model):
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.gqa) == (3, 4, 32, 2)
    no_head_dim = {k: v for k, v in CONFIG.items() if k != "head_dim"}
    assert ModelIdentity.from_hf_config(no_head_dim).head_dim == 16


def test_group_tables_cover_every_head_once(profile, model):
    table = profile.group_of()
    assert all(g >= 0 for row in table for g in row)
    counts = profile.heads_per_group_layer()
    assert sum(map(sum, counts)) == model.num_layers * model.num_kv_heads


def test_tangram_ratio_is_the_memory_share_the_groups_hold(profile):
    """--tangram-ratio R: the head-weighted mean group ratio is R (equal memory with uniform
    at R), the ranking is kept, and 1.0 keeps every token."""
    base = profile.group_ratios()
    weights = [len(g.heads) for g in profile.groups]

    def mean(ratios):
        return sum(w * r for w, r in zip(weights, ratios, strict=True)) / sum(weights)

    assert profile.held_ratio == pytest.approx(mean(base))
    for target in (0.05, 0.1, 0.25, 0.5, 0.9):
        scaled = profile.group_ratios(target)
        assert mean(scaled) == pytest.approx(target), (target, scaled)
        order = sorted(range(len(base)), key=lambda g: base[g])
        assert [scaled[g] for g in order] == sorted(scaled), f"ranking changed: {base} -> {scaled}"
        assert all(0.0 < r <= 1.0 for r in scaled)
    assert profile.group_ratios(profile.held_ratio) == pytest.approx(base)
    assert profile.group_ratios(1.0) == (1.0,) * len(base), "ratio 1.0 must keep every token"
    with pytest.raises(ProfileError, match="tangram-ratio"):
        profile.group_ratios(1.5)


@settings(max_examples=200, deadline=None)
@given(
    ratios=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6),
    data=st.data(),
    factor=st.floats(0.05, 20.0),
)
def test_scale_ratios_water_fills_up_to_one(ratios, data, factor):
    weights = data.draw(st.lists(st.integers(1, 50), min_size=len(ratios), max_size=len(ratios)))
    scaled = scale_ratios(ratios, weights, factor)
    total = sum(weights)
    want = min(1.0, factor * sum(w * r for w, r in zip(weights, ratios, strict=True)) / total)
    got = sum(w * r for w, r in zip(weights, scaled, strict=True)) / total
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (ratios, weights, factor, scaled)
    assert all(0.0 < r <= 1.0 for r in scaled)
    free = [b / a for a, b in zip(ratios, scaled, strict=True) if b < 1.0]
    if free:  # one common scale s: min(1, s * r) for every ratio
        scale = free[0]
        assert free == pytest.approx([scale] * len(free))
        assert all(scale * a >= 1.0 - 1e-9 for a, b in zip(ratios, scaled, strict=True) if b == 1.0)
    if factor <= 1.0:
        assert scaled == pytest.approx([factor * r for r in ratios])


def test_profile_for_another_model_is_refused(profile):
    other = ModelIdentity.from_hf_config({**CONFIG, "num_hidden_layers": 4})
    with pytest.raises(ProfileError, match="num_layers"):
        profile.check_model(other)
    same_shape = ModelIdentity.from_hf_config({**CONFIG, "vocab_size": 2048})
    with pytest.raises(ProfileError, match="fingerprint"):
        profile.check_model(same_shape)


def _mutated(profile, edit):
    data = copy.deepcopy(profile.to_dict())
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.pop("method"), "method"),
        (lambda d: d.update(method="magic"), "method"),
        (lambda d: d.update(format="v0"), "format"),
        (lambda d: d["model"].pop("head_dim"), "model.head_dim"),
        (lambda d: d["calibration"].update(base_ratio=0.0), "calibration.base_ratio"),
        (lambda d: d["heads"][2].update(reserved=1.2), "heads[2].reserved"),
        (lambda d: d["heads"][1].update(mean=-0.1), "heads[1].mean"),
        (lambda d: d["heads"][1].update(p90=1.01), "heads[1].p90"),
        (lambda d: d["heads"].pop(), "heads"),
        (lambda d: d["groups"][0]["heads"].append(d["groups"][-1]["heads"][0]), "groups["),
        (lambda d: d["groups"][-1]["heads"].pop(), "groups"),
        (lambda d: d["groups"][0].update(ratio=1e-6), "groups[0].ratio"),
        (lambda d: d["groups"][0].update(heads="all"), "groups[0].heads"),
        (lambda d: d["model"].update(num_kv_heads=3), "model.num_q_heads"),
    ],
)
def test_bad_profile_names_the_field(profile, edit, field):
    with pytest.raises(ProfileError) as err:
        Profile.from_dict(_mutated(profile, edit))
    assert f"'{field}" in str(err.value), f"error does not name {field}: {err.value}"


def test_missing_or_invalid_file_is_a_clear_error(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        Profile.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: [unclosed")
    with pytest.raises(ProfileError, match="not valid YAML"):
        Profile.load(bad)


def test_uniform_profile_has_one_group_at_the_ratio(model):
    p = uniform_profile(model, 0.3)
    assert p.num_groups == 1 and p.group_ratios() == (0.3,)
    assert len(p.groups[0].heads) == model.num_layers * model.num_kv_heads
