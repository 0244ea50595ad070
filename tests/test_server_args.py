"""The plugin's CLI touchpoint on the real `ServerArgs` argparse path.

Without our flags SGLang's arguments are exactly stock; with them the flags are stored on
the instance (and survive pickling into a spawned process, as the scheduler receives them)
and our backends are selected; every bad input is refused naming the flag or feature.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import multiprocessing
import random

import pytest
import torch

from tangram_sglang import plugin
from tangram_sglang.compress import SCORERS
from tangram_sglang.config import DEFAULT_FUSION, ConfigError, TangramConfig, model_conflicts
from tangram_sglang.memory.allocator import CUT_REUSE, build_tangram_pools
from tangram_sglang.memory.budget import serving_workload
from tangram_sglang.offline.profile import ModelIdentity, uniform_profile


@pytest.fixture(scope="module", autouse=True)
def hooks_applied():
    plugin.register()


@pytest.fixture(scope="module")
def foreign_profile_file(model_dir, tmp_path_factory):
    """A valid profile for a model with two more layers."""
    model = ModelIdentity.from_model_path(model_dir)
    other = dataclasses.replace(model, num_layers=model.num_layers + 2)
    path = tmp_path_factory.mktemp("profile") / "other.uniform.yaml"
    uniform_profile(other, 0.5).save(path)
    return path


def _server_args_class():
    from sglang.srt.server_args import ServerArgs

    return ServerArgs


def parse(argv: list[str]):
    """SGLang's own path: `prepare_server_args` minus logging set-up."""
    server_args = _server_args_class()
    parser = argparse.ArgumentParser()
    server_args.add_cli_args(parser)
    return server_args.from_cli_args(parser.parse_args(argv))


def parse_stock(argv: list[str]):
    """The same path through the original, unhooked SGLang functions."""
    server_args = _server_args_class()
    add_cli_args = inspect.unwrap(server_args.add_cli_args)
    from_cli_args = inspect.unwrap(server_args.from_cli_args.__func__)
    assert add_cli_args is not server_args.add_cli_args, "add_cli_args hook is not applied"
    assert from_cli_args is not server_args.from_cli_args.__func__, "from_cli_args not hooked"
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return from_cli_args(server_args, parser.parse_args(argv))


def _base(model_dir) -> list[str]:
    return ["--model-path", str(model_dir), "--device", "cpu", "--random-seed", "0"]


def _state(server_args) -> dict:
    """Every attribute, fields and SGLang's private resolution state (model_config aside)."""
    return {k: v for k, v in vars(server_args).items() if k != "model_config"}


@pytest.mark.parametrize(
    "extra",
    [[], ["--attention-backend", "torch_native", "--disable-radix-cache"], ["--page-size", "16"]],
    ids=["defaults", "torch-native-no-radix", "page-16"],
)
def test_without_our_flags_server_args_are_stock(model_dir, extra):
    argv = _base(model_dir) + extra
    ours, stock = parse(argv), parse_stock(argv)
    mine, theirs = _state(ours), _state(stock)
    changed = {k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)}
    assert not changed, f"the plugin changed ServerArgs without --kv-compression: {changed}"
    assert TangramConfig.from_server_args(ours) == TangramConfig(), "stock args read as enabled"


def test_tangram_flags_are_stored_and_select_our_backends(model_dir, profile_file):
    rng = random.Random()
    ratio, method = round(rng.uniform(0.05, 1.0), 4), rng.choice(sorted(SCORERS))
    flags = ["--kv-compression", "tangram", "--tangram-profile", str(profile_file)]
    flags += ["--tangram-ratio", str(ratio), "--tangram-method", method]
    server_args = parse(_base(model_dir) + flags)
    expected = TangramConfig("tangram", str(profile_file.resolve()), ratio, method)
    assert TangramConfig.from_server_args(server_args) == expected, f"flags {flags} not stored"
    assert server_args.get_attention_backends() == ("tangram", "tangram")
    assert server_args.radix_cache_backend == "tangram"


def test_the_pools_are_split_for_the_given_session_shape(model_dir):
    shape = [random.randint(64, 8192), random.randint(1, 8), random.randint(1, 512)]
    shape.append(random.randint(1, 512))
    workload = ",".join(map(str, shape))
    flags = ["--kv-compression", "uniform", "--tangram-ratio", "0.5"]
    config = TangramConfig.from_server_args(
        parse(_base(model_dir) + flags + ["--tangram-workload", workload])
    )
    assert config.workload == workload, f"--tangram-workload {workload} not stored"
    got = config.serving_workload(8192)
    assert (got.context, got.turns, got.user_tokens, got.answer_tokens) == tuple(shape), got
    default = TangramConfig.from_server_args(parse(_base(model_dir) + flags))
    assert default.serving_workload(8192) == serving_workload(8192), "default shape changed"


def test_cut_reuse_is_stored_and_reaches_the_allocator(model_dir):
    share = round(random.uniform(0.0, 1.0), 3)
    flags = ["--kv-compression", "uniform", "--tangram-ratio", "0.5"]
    config = TangramConfig.from_server_args(
        parse(_base(model_dir) + flags + ["--tangram-cut-reuse", str(share)])
    )
    assert config.cut_reuse == share, f"--tangram-cut-reuse {share} not stored: {config}"
    profile = config.validate(model_dir)
    for given, used in ((share, share), (None, CUT_REUSE)):
        _, allocator = build_tangram_pools(
            profile, 0.5, "snapkv", 256, torch.float32, "cpu", 4, 128, cut_reuse=given
        )
        assert allocator.cut_reuse == used, f"cut_reuse {given}: the allocator has {used}"


def test_fusion_is_stored_and_fastfusion_keeps_every_token(model_dir):
    tau = round(random.uniform(0.5, 1.0), 4)
    flags = ["--kv-compression", "uniform", "--tangram-ratio", "0.5", "--tangram-fusion", str(tau)]
    config = TangramConfig.from_server_args(parse(_base(model_dir) + flags))
    assert config.fusion_threshold == tau, f"--tangram-fusion {tau} not stored: {config}"
    fast = TangramConfig.from_server_args(
        parse(_base(model_dir) + ["--kv-compression", "fastfusion"])
    )
    assert fast.fusion_threshold == DEFAULT_FUSION and fast.validate(model_dir).group_ratios() == (
        1.0,
    )
    plain = TangramConfig.from_server_args(
        parse(_base(model_dir) + ["--kv-compression", "uniform", "--tangram-ratio", "0.5"])
    )
    assert plain.fusion_threshold is None


def test_uniform_mode_needs_no_profile(model_dir):
    ratio = round(random.uniform(0.05, 1.0), 4)
    server_args = parse(
        _base(model_dir) + ["--kv-compression", "uniform", "--tangram-ratio", str(ratio)]
    )
    assert TangramConfig.from_server_args(server_args) == TangramConfig("uniform", None, ratio)
    assert server_args.get_attention_backends() == ("tangram", "tangram")


def test_flags_reach_a_spawned_process_with_the_pickled_server_args(model_dir, profile_file):
    """SGLang starts schedulers with multiprocessing spawn and pickles ServerArgs to them."""
    flags = ["--kv-compression", "tangram", "--tangram-profile", str(profile_file)]
    server_args = parse(_base(model_dir) + flags + ["--tangram-ratio", "0.25"])
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        in_child = pool.apply(TangramConfig.from_server_args, (server_args,))
    assert in_child == TangramConfig.from_server_args(server_args), (
        f"spawned process read {in_child}"
    )


BAD_INPUTS = [
    ("ratio-0", ["--tangram-ratio", "0"], "--tangram-ratio 0.0 is outside (0, 1]"),
    ("ratio-1.5", ["--tangram-ratio", "1.5"], "--tangram-ratio 1.5 is outside (0, 1]"),
    ("ratio-nan", ["--tangram-ratio", "nan"], "--tangram-ratio nan is outside (0, 1]"),
    ("unknown-method", ["--tangram-method", "magic"], "--tangram-method 'magic' is unknown"),
    (
        "workload-3-fields",
        ["--tangram-workload", "4096,4,256"],
        "--tangram-workload '4096,4,256' must be CONTEXT,TURNS,USER,ANSWER",
    ),
    (
        "workload-zero-turns",
        ["--tangram-workload", "4096,0,256,64"],
        "--tangram-workload '4096,0,256,64' must be CONTEXT,TURNS,USER,ANSWER",
    ),
    (
        "flashinfer-fp8",
        ["--tangram-kernels", "flashinfer", "--kv-cache-dtype", "fp8_e4m3"],
        "does not support: FP8 KV with --tangram-kernels flashinfer",
    ),
    (
        "flashinfer-fp32",
        ["--tangram-kernels", "flashinfer", "--dtype", "float32"],
        "does not support: --dtype float32 with --tangram-kernels flashinfer",
    ),
    (
        "speculative",
        ["--speculative-algorithm", "EAGLE"],
        "does not support: speculative decoding (--speculative-algorithm EAGLE)",
    ),
    (
        "hierarchical-cache",
        ["--enable-hierarchical-cache"],
        "does not support: hierarchical cache (--enable-hierarchical-cache)",
    ),
    ("pipeline", ["--pp-size", "2"], "does not support: pipeline parallelism (--pp-size 2)"),
    (
        "tensor-parallel-uneven",
        ["--tp-size", "3"],
        "does not support: tensor parallelism (--tp-size 3: 4 kv heads do not split evenly "
        "over --tp-size 3)",
    ),
    (
        "fp4-kv",
        ["--kv-cache-dtype", "nvfp4"],
        "does not support: block-scaled KV (--kv-cache-dtype nvfp4; the head-group pools "
        "store bf16, bfloat16, fp8_e4m3, fp8_e5m2)",
    ),
    (
        "dp-attention",
        ["--enable-dp-attention"],
        "does not support: data-parallel attention (--enable-dp-attention)",
    ),
    (
        "disaggregation",
        ["--disaggregation-mode", "prefill"],
        "does not support: prefill/decode disaggregation (--disaggregation-mode prefill)",
    ),
    ("lmcache", ["--enable-lmcache"], "does not support: LMCache (--enable-lmcache)"),
    ("flexkv", ["--enable-flexkv"], "does not support: FlexKV (--enable-flexkv)"),
    (
        "attention-backend",
        ["--attention-backend", "triton"],
        "another attention backend (--attention-backend triton)",
    ),
    (
        "decode-backend",
        ["--decode-attention-backend", "flashinfer"],
        "another attention backend (--decode-attention-backend flashinfer)",
    ),
    (
        "radix-backend",
        ["--radix-cache-backend", "flexkv"],
        "another radix cache backend (--radix-cache-backend flexkv)",
    ),
]


@pytest.mark.parametrize(
    ("extra", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_tangram_input_is_refused_naming_it(model_dir, profile_file, extra, message):
    flags = ["--kv-compression", "tangram", "--tangram-profile", str(profile_file), *extra]
    with pytest.raises(ConfigError) as refused:
        parse(_base(model_dir) + flags)
    assert message in str(refused.value), f"{extra}: message was {refused.value}"


def test_all_unsupported_features_are_named_in_one_message(model_dir, profile_file):
    while True:  # three features whose flags differ (two may set --kv-cache-dtype)
        chosen = random.sample([c for c in BAD_INPUTS if "does not support" in c[2]], 3)
        names = [a for c in chosen for a in c[1] if a.startswith("--")]
        if len(names) == len(set(names)):
            break
    flags = ["--kv-compression", "tangram", "--tangram-profile", str(profile_file)]
    with pytest.raises(ConfigError) as refused:
        parse(_base(model_dir) + flags + [a for c in chosen for a in c[1]])
    for name, _, message in chosen:
        feature = message.removeprefix("does not support: ")
        assert feature in str(refused.value), f"{name} not named in: {refused.value}"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-compression", "tangram"], "--kv-compression tangram needs --tangram-profile"),
        (["--kv-compression", "uniform"], "--kv-compression uniform needs --tangram-ratio"),
        (
            ["--kv-compression", "uniform", "--tangram-ratio", "0.5", "--tangram-profile", "p"],
            "--tangram-profile is not used by --kv-compression uniform",
        ),
        (["--tangram-ratio", "0.5"], "--tangram-ratio given without --kv-compression"),
        (["--tangram-profile", "p.yaml"], "--tangram-profile given without --kv-compression"),
        (["--tangram-workload", "9,9,9,9"], "--tangram-workload given without --kv-compression"),
        (["--tangram-fusion", "0.9"], "--tangram-fusion given without --kv-compression"),
        (
            ["--kv-compression", "fastfusion", "--tangram-ratio", "0.5"],
            "--kv-compression fastfusion keeps every token",
        ),
        (
            ["--kv-compression", "uniform", "--tangram-ratio", "0.5", "--tangram-fusion", "1.5"],
            "--tangram-fusion 1.5 is outside (0, 1]",
        ),
        (
            ["--kv-compression", "fastfusion", "--tp-size", "2"],
            "Fast Fusion with tensor parallelism (--tp-size 2",
        ),
        (["--tangram-cut-reuse", "0.5"], "--tangram-cut-reuse given without --kv-compression"),
        (
            ["--kv-compression", "uniform", "--tangram-ratio", "0.5", "--tangram-cut-reuse", "0.5"]
            + ["--tp-size", "2"],
            "--tangram-cut-reuse 0.5 with tensor parallelism (--tp-size 2",
        ),
        (
            ["--kv-compression", "uniform", "--tangram-ratio", "0.5", "--tangram-cut-reuse", "-1"],
            "--tangram-cut-reuse -1.0 is outside [0, 1]",
        ),
    ],
    ids=[
        "tangram-no-profile",
        "uniform-no-ratio",
        "uniform-with-profile",
        "stray-ratio",
        "stray-profile",
        "stray-workload",
        "stray-fusion",
        "fastfusion-with-ratio",
        "fusion-out-of-range",
        "fusion-with-tp",
        "stray-cut-reuse",
        "cut-reuse-with-tp",
        "cut-reuse-out-of-range",
    ],
)
def test_missing_or_stray_flag_is_refused(model_dir, flags, message):
    with pytest.raises(ConfigError) as refused:
        parse(_base(model_dir) + flags)
    assert message in str(refused.value), f"{flags}: message was {refused.value}"


def test_missing_profile_file_is_refused(model_dir, tmp_path):
    absent = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as refused:
        parse(_base(model_dir) + ["--kv-compression", "tangram", "--tangram-profile", str(absent)])
    assert f"--tangram-profile {absent}" in str(refused.value)
    assert "does not exist" in str(refused.value), str(refused.value)


def test_profile_for_another_model_is_refused(model_dir, foreign_profile_file):
    flags = ["--kv-compression", "tangram", "--tangram-profile", str(foreign_profile_file)]
    with pytest.raises(ConfigError) as refused:
        parse(_base(model_dir) + flags)
    assert "does not match --model-path" in str(refused.value), str(refused.value)
    assert "model.num_layers" in str(refused.value), str(refused.value)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"architectures": ["DeepseekV3ForCausalLM"], "kv_lora_rank": 512}, "MLA"),
        ({"architectures": ["MiniCPM3ForCausalLM"], "kv_lora_rank": 256}, "MLA"),
        (
            {
                "architectures": ["Gemma3ForCausalLM"],
                "layer_types": ["sliding_attention", "full_attention"],
            },
            "hybrid models with sliding_attention layers",
        ),
    ],
    ids=["deepseek-v3", "minicpm3", "hybrid-sliding"],
)
def test_unsupported_model_is_refused_before_sglang_loads_it(tmp_path, profile_file, config, named):
    (tmp_path / "config.json").write_text(json.dumps(config))
    argv = ["--model-path", str(tmp_path), "--kv-compression", "uniform", "--tangram-ratio", "0.5"]
    with pytest.raises(ConfigError) as refused:
        parse(argv)
    assert named in str(refused.value), f"{config}: message was {refused.value}"


def test_multimodal_text_config_is_checked():
    nested = {"architectures": ["KimiVL"], "text_config": {"kv_lora_rank": 512}}
    assert model_conflicts(nested), "MLA inside text_config was not detected"
    assert model_conflicts({"architectures": ["Qwen3ForCausalLM"]}) == []


def _compressed(model_dir, profile_file, device: str, extra=()) -> list[str]:
    argv = ["--model-path", str(model_dir), "--device", device, "--random-seed", "0"]
    return argv + ["--kv-compression", "tangram", "--tangram-profile", str(profile_file), *extra]


def test_cuda_decode_runs_in_graphs_with_overlap_on_while_prefill_graphs_stay_off(
    model_dir, profile_file, monkeypatch, caplog
):
    monkeypatch.delenv("TANGRAM_CUDA_GRAPH", raising=False)
    monkeypatch.delenv("TANGRAM_BACKEND_KERNELS", raising=False)
    with caplog.at_level(logging.INFO):
        server_args = parse(_compressed(model_dir, profile_file, "cuda"))
    graphs = server_args.cuda_graph_config
    assert not server_args.disable_cuda_graph, "decode graphs forced off on CUDA"
    assert graphs.decode.backend == "full", f"decode graph backend {graphs.decode.backend}"
    assert graphs.prefill.backend == "disabled", f"prefill graphs {graphs.prefill.backend}"
    assert not server_args.disable_overlap_schedule, "overlap scheduling forced off"
    assert "decodes in CUDA graphs" in caplog.text, caplog.text
    assert "sets disable_prefill_cuda_graph" in caplog.text, caplog.text


@pytest.mark.parametrize(
    ("device", "env", "reason"),
    [
        ("cpu", {}, "device cpu"),
        ("cuda", {"TANGRAM_CUDA_GRAPH": "0"}, "TANGRAM_CUDA_GRAPH=0"),
        ("cuda", {"TANGRAM_BACKEND_KERNELS": "torch"}, "the torch path"),
    ],
    ids=["cpu", "escape-hatch", "torch-path"],
)
def test_graphs_are_forced_off_where_decode_cannot_be_captured(
    model_dir, profile_file, monkeypatch, caplog, device, env, reason
):
    for name in ("TANGRAM_CUDA_GRAPH", "TANGRAM_BACKEND_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.INFO):
        server_args = parse(_compressed(model_dir, profile_file, device))
    graphs = server_args.cuda_graph_config
    assert server_args.disable_cuda_graph, f"{reason}: decode graphs left on"
    assert (graphs.decode.backend, graphs.prefill.backend) == ("disabled", "disabled"), (
        f"{reason}: graph backends {graphs.decode.backend}, {graphs.prefill.backend}"
    )
    assert f"sets disable_cuda_graph (no decode graphs with {reason}" in caplog.text, caplog.text


@pytest.mark.parametrize(
    ("extra", "env", "named"),
    [
        (["--cuda-graph-backend-prefill", "breakable"], {}, "prefill CUDA graphs"),
        (["--cuda-graph-config", '{"prefill": {"backend": "full"}}'], {}, "prefill CUDA graphs"),
        (
            ["--cuda-graph-backend-decode", "full"],
            {"TANGRAM_CUDA_GRAPH": "0"},
            "decode CUDA graphs (backend 'full'",
        ),
    ],
    ids=["prefill-flag", "prefill-json", "decode-with-escape-hatch"],
)
def test_explicit_graph_flags_we_cannot_serve_are_refused(
    model_dir, profile_file, monkeypatch, extra, env, named
):
    for name in ("TANGRAM_CUDA_GRAPH", "TANGRAM_BACKEND_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as refused:
        parse(_compressed(model_dir, profile_file, "cuda", extra))
    assert named in str(refused.value), f"{extra}: message was {refused.value}"


def test_a_bad_graph_switch_is_refused_naming_it(model_dir, profile_file, monkeypatch):
    monkeypatch.setenv("TANGRAM_CUDA_GRAPH", random.choice(["yes", "off", "2"]))
    with pytest.raises(ValueError, match="TANGRAM_CUDA_GRAPH="):
        parse(_compressed(model_dir, profile_file, "cuda"))


def test_a_radix_cache_that_fails_its_self_test_refuses_compression(model_dir, monkeypatch):
    from tangram_sglang.patches import server_args as touchpoint

    problem = "SGLang's RadixCache._split_node takes (self, key, child), tangram-sglang's ..."
    monkeypatch.setattr(touchpoint, "radix_self_test", lambda: [problem])
    with pytest.raises(ConfigError) as refused:
        parse(_base(model_dir) + ["--kv-compression", "uniform", "--tangram-ratio", "0.5"])
    assert "the tangram radix cache does not fit this SGLang" in str(refused.value)
    assert problem in str(refused.value)
    assert parse(_base(model_dir)).attention_backend != "tangram", "flag off must stay stock"
