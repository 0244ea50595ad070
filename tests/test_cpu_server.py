"""The real SGLang 0.5.17 server on this CPU machine, over HTTP, with our plugin installed.

With `--kv-compression none` the plugin must leave SGLang exactly stock: same greedy tokens
(fp32 tiny Qwen3), radix-cache reuse across turns, chat via the local tokenizer. Flag
combinations we cannot serve must stop the server at start-up with our message, before it
loads a model. Four server starts in all; the two that serve start side by side.
"""

from __future__ import annotations

import random

import pytest
from server_harness import Launch, build_tiny_model_dir, failed_start, running_servers

from tangram_sglang.profile import ModelIdentity, uniform_profile
from tangram_sglang.tiny_tokenizer import SPECIAL_TOKENS, corpus

pytestmark = pytest.mark.server

VOCAB = 1024
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-qwen3") / "model")


@pytest.fixture(scope="module")
def profile_file(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny.uniform.yaml"
    uniform_profile(ModelIdentity.from_model_path(model_dir), 0.5).save(path)
    return path


def _workload(seed: int) -> dict:
    """Prompts (token ids, no special tokens), a two-turn session and a chat message."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(len(SPECIAL_TOKENS), VOCAB) for _ in range(n)]

    return {
        "prompts": [ids(rng.randint(8, 64)) for _ in range(3)],
        "turn1": ids(48),
        "user2": ids(16),
        "chat": rng.choice(corpus(lines=50, seed=seed)),
    }


def _transcript(server, work: dict) -> dict:
    prompts = [server.generate(p, NEW_TOKENS)["output_ids"] for p in work["prompts"]]
    turn1 = server.generate(work["turn1"], NEW_TOKENS)
    turn2 = server.generate(work["turn1"] + turn1["output_ids"] + work["user2"], NEW_TOKENS)
    chat = server.post(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": work["chat"]}],
            "max_tokens": NEW_TOKENS,
            "temperature": 0.0,
        },
    )
    return {
        "prompts": prompts,
        "turns": [turn1["output_ids"], turn2["output_ids"]],
        "turn2_cached": turn2["meta_info"]["cached_tokens"],
        "chat": chat["choices"][0]["message"]["content"],
    }


@pytest.fixture(scope="module")
def transcripts(model_dir, tmp_path_factory):
    """The same fresh workload against stock SGLang and against SGLang with our plugin."""
    seed = random.randrange(2**32)
    work = _workload(seed)
    launches = {
        "stock": Launch(plugins=False),
        # Naming the flag proves the plugin's hooks are live: stock SGLang rejects it.
        "plugin": Launch(["--kv-compression", "none"]),
    }
    with running_servers(model_dir, tmp_path_factory.mktemp("logs"), launches) as servers:
        stock, plugin = (_transcript(servers[name], work) for name in launches)
    return seed, work, stock, plugin


def test_plugin_with_compression_none_gives_stock_greedy_tokens(transcripts):
    seed, _, stock, plugin = transcripts
    for key in ("prompts", "turns", "chat"):
        assert plugin[key] == stock[key], (
            f"--kv-compression none changed the {key} output (workload seed {seed}):\n"
            f"stock  {stock[key]}\nplugin {plugin[key]}"
        )


def test_second_turn_reuses_first_turn_from_radix_cache(transcripts):
    seed, work, stock, plugin = transcripts
    for name, result in (("stock", stock), ("plugin", plugin)):
        assert result["turn2_cached"] >= len(work["turn1"]), (
            f"{name}: turn 2 reused {result['turn2_cached']} cached tokens, expected at least "
            f"turn 1's {len(work['turn1'])} prompt tokens (workload seed {seed})"
        )


def test_chat_completion_uses_local_tokenizer(transcripts):
    _, _, _, plugin = transcripts
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
    ],
    ids=["speculative-decoding", "ratio-1.5"],
)
def test_bad_flag_combination_is_refused_at_startup(
    model_dir, profile_file, tmp_path, flags, message
):
    args = ["--kv-compression", "tangram", "--tangram-profile", str(profile_file), *flags]
    code, log = failed_start(model_dir, tmp_path / "refused.log", Launch(args, attention=None))
    assert code != 0, f"server exited with 0 for {flags}:\n{log[-2000:]}"
    assert message in log, f"refusal message {message!r} not in the log:\n{log[-2000:]}"
    assert "Load weight begin" not in log, f"server loaded the model before refusing {flags}"
