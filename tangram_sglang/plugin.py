"""SGLang plugin entry point (`sglang.srt.plugins` group: `tangram_sglang.plugin:register`).

SGLang calls `register()` in the launcher (or `Engine`) and in every scheduler process,
before it parses arguments or builds the model. Importing this module stays light (no
torch, no sglang); `register()` checks the SGLang version the hooks were written against
and applies `tangram_sglang.patches`. SGLang logs and swallows an exception raised here,
so a failed register leaves SGLang stock: `--kv-compression` is then an unknown flag (or,
when only some hooks took, refused by its own parser), never a silently uncompressed server.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

SGLANG_VERSION = "0.5.17"


class IncompatibleSGLang(RuntimeError):
    """The installed SGLang is not the release our touchpoints were written against."""


def check_sglang_version(installed: str | None = None) -> None:
    """Refuse any SGLang but the pinned one: the hooked internals change every release."""
    if installed is None:
        try:
            installed = version("sglang")
        except PackageNotFoundError:
            installed = "none"
    if installed != SGLANG_VERSION:
        raise IncompatibleSGLang(
            f"tangram-sglang {_own_version()} supports sglang=={SGLANG_VERSION} only, but "
            f"sglang {installed} is installed; install sglang=={SGLANG_VERSION}"
        )


def register() -> None:
    """Apply and verify every touchpoint's hooks; safe to call more than once."""
    check_sglang_version()
    from tangram_sglang import patches

    patches.apply_all()
    _refusals_in_one_line()


def _refusals_in_one_line() -> None:
    """A refused flag stops the launcher with its one message, not a traceback (the
    exception still reaches any caller that catches it, as `Engine` users and tests do)."""
    from tangram_sglang.config import ConfigError

    previous = sys.excepthook
    if getattr(previous, "tangram", False):
        return

    def hook(kind, value, traceback) -> None:
        if isinstance(value, ConfigError):
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    hook.tangram = True
    sys.excepthook = hook


def _own_version() -> str:
    try:
        return version("tangram-sglang")
    except PackageNotFoundError:
        return "(not installed)"
