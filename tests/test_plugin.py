"""The plugin entry point: discoverable by SGLang, idempotent, version-pinned, and loud
about any hook SGLang did not apply (its registry only logs those)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from tangram_sglang import plugin


@pytest.fixture(scope="module")
def patches():
    plugin.register()
    from tangram_sglang import patches

    return patches


@pytest.fixture
def registry():
    """SGLang's HookRegistry; hooks a test adds are removed again afterwards."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    before = {target: list(hooks) for target, hooks in HookRegistry._hooks.items()}
    yield HookRegistry
    for target in list(HookRegistry._hooks):
        if target in before:
            HookRegistry._hooks[target] = before[target]
        else:
            del HookRegistry._hooks[target]


def _after(result, *args, **kwargs):
    return result


def test_entry_point_is_in_the_installed_metadata():
    found = {ep.name: ep for ep in entry_points(group="sglang.srt.plugins")}
    assert "tangram" in found, f"no 'tangram' plugin in sglang.srt.plugins: {sorted(found)}"
    assert found["tangram"].value == "tangram_sglang.plugin:register"
    assert found["tangram"].load() is plugin.register


def test_stock_server_whitelist_leaves_our_plugin_out(monkeypatch):
    """The e2e stock server relies on SGLang's SGLANG_PLUGINS whitelist skipping us."""
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    from tangram_sglang.cpu.server import NO_PLUGINS

    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    assert "tangram" in load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    monkeypatch.setenv("SGLANG_PLUGINS", NO_PLUGINS)
    assert "tangram" not in load_plugins_by_group(GENERAL_PLUGINS_GROUP)


def test_importing_the_plugin_is_light():
    code = (
        "import sys, tangram_sglang.plugin\n"
        "print(sorted(m for m in ('torch', 'sglang', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing the plugin pulled in {out.stdout.strip()}"


def test_register_is_idempotent(patches, registry):
    plugin.register()
    plugin.register()
    for hook in patches.apply_all():
        count = sum(fn is hook.fn for _, fn, _ in registry._hooks[hook.target])
        assert count == 1, f"{hook.target}: our hook registered {count} times"
    parser = argparse.ArgumentParser()
    from sglang.srt.server_args import ServerArgs

    ServerArgs.add_cli_args(parser)  # a doubled hook would add --kv-compression twice
    assert (
        parser.parse_args(["--model-path", "m", "--kv-compression", "uniform"]).kv_compression
        == "uniform"
    )


def test_every_hook_of_ours_is_live(patches):
    hooks = patches.apply_all()
    assert {h.target for h in hooks} >= {
        "sglang.srt.server_args.ServerArgs.add_cli_args",
        "sglang.srt.server_args.ServerArgs.from_cli_args",
    }
    patches.verify()


def test_verify_names_a_hook_on_a_missing_target(patches, registry):
    from sglang.srt.plugins.hook_registry import HookType

    bogus = patches.Hook("sglang.srt.server_args.ServerArgs.no_such_method", _after, HookType.AFTER)
    registry.register(bogus.target, bogus.fn, bogus.kind)
    registry.apply_hooks()  # SGLang logs the failure and carries on
    with pytest.raises(patches.HookNotApplied, match="ServerArgs.no_such_method"):
        patches.verify([bogus])


def test_verify_names_a_hook_registered_after_its_target_was_patched(patches, registry):
    from sglang.srt.plugins.hook_registry import HookType

    late = patches.Hook("sglang.srt.server_args.ServerArgs.add_cli_args", _after, HookType.AFTER)
    registry.register(late.target, late.fn, late.kind)
    registry.apply_hooks()  # target already patched: SGLang skips it without a word
    with pytest.raises(patches.HookNotApplied, match=r"ServerArgs\.add_cli_args"):
        patches.verify([late])


def test_compression_is_refused_when_a_hook_did_not_apply(patches, monkeypatch):
    from sglang.srt.plugins.hook_registry import HookType
    from sglang.srt.server_args import ServerArgs

    missing = patches.Hook("sglang.srt.server_args.ServerArgs.gone", _after, HookType.AFTER)
    monkeypatch.setattr(patches, "_registered", [*patches._registered, missing])
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert (
        parser.parse_args(["--model-path", "m", "--kv-compression", "none"]).kv_compression
        == "none"
    )
    with pytest.raises(patches.HookNotApplied, match=r"ServerArgs\.gone"):
        parser.parse_args(["--model-path", "m", "--kv-compression", "tangram"])


def test_version_check_names_both_versions():
    plugin.check_sglang_version()  # the installed one is the pinned one
    with pytest.raises(plugin.IncompatibleSGLang) as refused:
        plugin.check_sglang_version("0.5.23")
    assert "0.5.23" in str(refused.value) and "sglang==0.5.17" in str(refused.value), str(
        refused.value
    )


def test_register_refuses_another_sglang_before_touching_it(registry, monkeypatch):
    monkeypatch.setattr(plugin, "version", lambda dist: "0.5.18" if dist == "sglang" else "0")
    before = {target: len(hooks) for target, hooks in registry._hooks.items()}
    with pytest.raises(plugin.IncompatibleSGLang, match="sglang 0.5.18 is installed"):
        plugin.register()
    after = {target: len(hooks) for target, hooks in registry._hooks.items()}
    assert after == before, "register() registered hooks on an unsupported SGLang"
