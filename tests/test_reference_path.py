"""The accuracy benchmark's reference path (transformers + our compression) on the real
model: full KV is transformers' own greedy decoding, a compressed segment keeps exactly
each head's budget, masking a token out equals not storing it, and branching one prefill
into several settings equals running each alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tangram_sglang.accuracy.chat import ChatFormat
from tangram_sglang.accuracy.hf_path import Conversation, HeadBudgets, load_model
from tangram_sglang.accuracy.paths import Setting
from tangram_sglang.memory.budget import BudgetRule, kept_tokens
from tangram_sglang.offline.profile import ModelIdentity, Profile

RULE = BudgetRule(sink=4, window=32)
TEXT = (
    "Read the text below and answer the question.\n\nThe lighthouse stood on a rock. "
    + "Ships passed it every night and the keeper watched them. " * 12
    + "The keeper's cat was called Mirabel. "
    + "Storms came in winter and the sea rose high. " * 10
    + "\n\nQuestion: What was the keeper's cat called?"
)


@pytest.fixture(scope="module")
def model(smollm2_dir):
    return load_model(smollm2_dir)


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    from transformers import AutoTokenizer

    return ChatFormat(AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.fixture(scope="module")
def shape(smollm2_dir):
    m = ModelIdentity.from_model_path(smollm2_dir)
    return m.num_layers, m.num_kv_heads


def hf_greedy(smollm2_dir, ids, max_new_tokens, eos):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    out = hf.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos
    )
    return out[0, len(ids) :].tolist()


def test_full_kv_is_transformers_greedy_over_turns(model, chat, smollm2_dir):
    conv = Conversation(model, HeadBudgets("full", None), RULE, eos=[chat.eos])
    first = chat.first(TEXT)
    a1 = conv.turn(first, 16)
    assert a1 == hf_greedy(smollm2_dir, first, 16, chat.eos)
    follow = chat.follow("And what stood on the rock?", a1)
    a2 = conv.turn(follow, 12)
    assert a2 == hf_greedy(smollm2_dir, first + a1 + follow, 12, chat.eos)
    assert conv.length == len(first) + len(a1) + len(follow) + len(a2) - 1


def test_a_compressed_segment_keeps_each_heads_budget(model, chat, shape):
    layers, heads = shape
    ratios = np.random.default_rng(0).uniform(0.05, 0.6, size=(layers, heads))
    conv = Conversation(model, HeadBudgets("mixed", ratios), RULE, eos=[chat.eos])
    first = chat.first(TEXT)
    answer = conv.turn(first, 8)
    n = len(first)
    for layer, mask in enumerate(conv.masks.layers):
        assert mask.shape == (heads, conv.length)
        for h in range(heads):
            kept = int(mask[h, :n].sum())
            assert kept == kept_tokens(n, float(ratios[layer, h]), RULE), (layer, h)
            assert mask[h, : RULE.sink].all() and mask[h, n - RULE.window : n].all()
        assert mask[:, n:].all(), "decoded tokens are kept by every head"
    assert conv.length == n + len(answer) - 1


def test_masking_out_a_token_equals_not_storing_it(model, chat, shape):
    """StreamingLLM keeps the same tokens in every head, so a transformers cache physically
    holding only those (RoPE already applied) must give the same next-token logits."""
    from transformers import AutoModelForCausalLM, DynamicCache

    layers, heads = shape
    budgets = HeadBudgets("streaming", np.full((layers, heads), 0.2), "streaming")
    conv = Conversation(model, budgets, RULE, eos=[chat.eos])
    first = chat.first(TEXT)
    conv.extend(first)
    keep = conv.masks.layers[0][0]
    assert all(torch.equal(m[h], keep) for m in conv.masks.layers for h in range(heads))
    assert 0 < int(keep.sum()) < len(first)
    follow = chat.follow("Who watched the ships?", [chat.eos])
    conv.extend(follow)
    hf = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32).eval()
    dropped = DynamicCache()
    with torch.inference_mode():
        full = DynamicCache()
        hf(torch.tensor([first]), past_key_values=full, use_cache=True)
        for layer, entry in enumerate(full.layers):
            dropped.update(entry.keys[:, :, keep], entry.values[:, :, keep], layer)
        positions = torch.arange(len(first), len(first) + len(follow))[None]
        logits = hf(torch.tensor([follow]), position_ids=positions, past_key_values=dropped).logits[
            0, -1
        ]
    torch.testing.assert_close(conv.logits, logits, rtol=1e-4, atol=1e-4)


def test_branching_one_prefill_equals_running_each_setting_alone(model, chat, shape):
    layers, heads = shape
    settings = [
        HeadBudgets("full", None),
        HeadBudgets("uniform", np.full((layers, heads), 0.25)),
        HeadBudgets("mixed", np.random.default_rng(1).uniform(0.05, 0.5, (layers, heads))),
    ]
    first = chat.first(TEXT)
    root = Conversation(model, HeadBudgets("root", None), RULE, eos=[chat.eos])
    follow = chat.follow("And the sea?", [chat.eos])
    for budgets, branch in zip(settings, root.branch(first, settings), strict=True):
        alone = Conversation(model, budgets, RULE, eos=[chat.eos])
        alone.extend(first)
        assert branch.answer(10) == alone.answer(10), budgets.name
        assert branch.turn(follow, 10) == alone.turn(follow, 10), budgets.name
        for a, b in zip(branch.masks.layers, alone.masks.layers, strict=True):
            assert torch.equal(a, b), budgets.name


def test_tangram_and_uniform_settings_hold_the_same_memory_share(shape):
    """`--tangram-ratio R` means R of full KV for both modes (the head-weighted mean)."""
    from pathlib import Path

    profile = Profile.load(
        Path(__file__).parents[1] / "profiles" / "smollm2-135m-instruct.ada-snapkv.yaml"
    )
    for r in (0.5, 0.25, 0.1):
        tangram = Setting("tangram", r).budgets(profile)
        uniform = Setting("uniform", r).budgets(profile)
        assert tangram.held == pytest.approx(r) and uniform.held == pytest.approx(r)
        assert tangram.ratios.std() > 0, "a calibrated profile gives heads different budgets"
