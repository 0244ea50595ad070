"""The accuracy benchmark's driver (`bench/accuracy.py`) without running it: the GPU
servers are SGLang's own in fp32 (no CPU defaults or stand-ins, the fp32 shim and IEEE
Triton dots), the CPU ones unchanged, and a context the model cannot hold is refused
before anything runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import accuracy  # noqa: E402

from tangram_sglang.accuracy.chat import ChatFormat  # noqa: E402
from tangram_sglang.accuracy.paths import Setting  # noqa: E402
from tangram_sglang.accuracy.tasks import Haystack, make_sample  # noqa: E402
from tangram_sglang.cpu import server  # noqa: E402


def started(monkeypatch, launch: server.Launch, tmp_path: Path) -> tuple[list[str], dict]:
    """The command line and environment `server.start` gives SGLang for `launch`."""
    seen, real = {}, subprocess.Popen

    def popen(cmd, env, **_):
        seen.update(cmd=cmd, env=env)
        return real(["true"])

    monkeypatch.setattr(server.subprocess, "Popen", popen)
    server.start(tmp_path / "model", tmp_path / "server.log", launch)
    return seen["cmd"], seen["env"]


@pytest.mark.parametrize("mode", ["full", "tangram"])
def test_gpu_servers_are_sglangs_own_in_fp32(monkeypatch, tmp_path, mode):
    monkeypatch.setenv("PYTHONPATH", "/site")  # as e2e.sh's install, without the CPU stand-ins
    args = accuracy.parse_args(["--device", "cuda", "--device-name", "H100"])
    launch = accuracy.launch_for(args, Setting(mode, 0.25))
    cmd, env = started(monkeypatch, launch, tmp_path)
    flags = " ".join(cmd)
    assert "--device cpu" not in flags and "--dtype float32" in flags
    assert ("--attention-backend triton" in flags) == (mode == "full")
    assert ("--kv-compression tangram" in flags) == (mode == "tangram")
    assert env["TRITON_F32_DEFAULT"] == "ieee"
    path = env["PYTHONPATH"].split(":")
    assert path == [str(accuracy.FP32_SHIM), "/site"]
    assert (env.get("SGLANG_PLUGINS") == server.NO_PLUGINS) == (mode == "full")


def test_cpu_servers_keep_the_cpu_defaults(monkeypatch, tmp_path):
    args = accuracy.parse_args([])
    cmd, env = started(monkeypatch, accuracy.launch_for(args, Setting("full")), tmp_path)
    assert "--device cpu" in " ".join(cmd) and "--attention-backend torch_native" in " ".join(cmd)
    assert env["PYTHONPATH"].split(":")[0] == str(server.SHIMS)
    assert args.device_name.startswith("CPU")


def test_options_are_checked_before_anything_runs():
    args = accuracy.parse_args(["--other-samples", "0", "--server-ratios", "0.25"])
    assert args.tasks == [accuracy.MULTI] and args.server_ratios == [0.25]
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--ratios", "0.5", "--server-ratios", "0.25"])
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--samples", "4", "--server-samples", "8"])


def test_contexts_beyond_the_models_positions_are_refused(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    chat = ChatFormat(AutoTokenizer.from_pretrained(smollm2_dir))
    limit = AutoConfig.from_pretrained(smollm2_dir).max_position_embeddings
    assert limit == 8192  # 4-8K-token contexts fit the model
    hay = Haystack()
    fits = make_sample(accuracy.MULTI, 0, 4000, hay=hay)
    assert 4000 < accuracy.check_context(chat, [fits], 24, limit) <= limit
    with pytest.raises(SystemExit, match="max_position_embeddings 8192"):
        accuracy.check_context(chat, [make_sample(accuracy.MULTI, 0, 7000, hay=hay)], 24, limit)
