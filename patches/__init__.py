"""SGLang touchpoints, one module per place we reach into SGLang (installed as
`tangram_sglang.patches`).

Each touchpoint module lists its hooks in `HOOKS` and, where SGLang has a registry for
the thing (attention backends, radix caches), its entries in `REGISTRATIONS`. `apply_all()`
registers them once per process, applies the hooks and verifies each hook and entry: the
hook registry only logs a hook that fails to apply (bad target, or a target that was
already patched before the hook was registered), so a broken hook would otherwise leave a
server that looks compressed and is not.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TOUCHPOINTS = (
    "server_args",
    "request_validation",
    "cpu_paths",
    "memory_pool",
    "allocation",
    "release",
    "admission",
    "radix_cache",
    "attention_backend",
    "invariants",
    "metrics",
    "server_info",
)


@dataclass(frozen=True)
class Hook:
    """One `HookRegistry.register(target, fn, kind)` call."""

    target: str
    fn: Callable[..., Any]
    kind: HookType


@dataclass(frozen=True)
class Registration:
    """One entry in one of SGLang's registries: `apply()` adds it, `live()` checks it."""

    name: str
    apply: Callable[[], None]
    live: Callable[[], bool]


class HookNotApplied(RuntimeError):
    """A registered hook is not live on its target; the message names the target."""


_registered: list[Hook] = []
_registrations: list[Registration] = []


def apply_all() -> tuple[Hook, ...]:
    """Register every touchpoint's hooks and registry entries (first call only), apply and
    verify them."""
    if not _registered:
        for name in TOUCHPOINTS:
            module = importlib.import_module(f"{__name__}.{name}")
            for entry in getattr(module, "REGISTRATIONS", ()):
                entry.apply()
                _registrations.append(entry)
            for hook in module.HOOKS:
                HookRegistry.register(hook.target, hook.fn, hook.kind)
                _registered.append(hook)
    # Idempotent: targets already patched are skipped; SGLang calls it again after plugins.
    HookRegistry.apply_hooks()
    verify()
    return tuple(_registered)


def verify(hooks: Sequence[Hook] | None = None) -> None:
    """Raise HookNotApplied naming every hook not live on its target (and, by default,
    every registry entry of ours that is missing)."""
    missing = [h.target for h in (_registered if hooks is None else hooks) if not _is_live(h)]
    if hooks is None:
        missing += [r.name for r in _registrations if not r.live()]
    if missing:
        raise HookNotApplied(
            "tangram-sglang: SGLang did not apply the hook(s) on "
            + ", ".join(missing)
            + " (see 'Failed to apply hooks' above, or a hook registered after its target "
            "was patched); refusing KV compression"
        )


def _is_live(hook: Hook) -> bool:
    owner_path, attr = hook.target.rsplit(".", 1)
    try:
        owner = pkgutil.resolve_name(owner_path)
    except (ImportError, AttributeError, ValueError):
        return False
    live = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
    if isinstance(hook.fn, type):
        return live is hook.fn
    fn = getattr(live, "__func__", live)  # unwrap classmethod / staticmethod
    while fn is not None:
        if _wrapped_hook(fn) is hook.fn:
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def _wrapped_hook(fn: Any) -> Any:
    """The hook inside one of HookRegistry's wrappers (its closure variable `hook`)."""
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return None
    cells = dict(zip(code.co_freevars, fn.__closure__, strict=True))
    return cells["hook"].cell_contents if "hook" in cells else None
