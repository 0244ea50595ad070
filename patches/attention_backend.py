"""Touchpoint: SGLang's attention-backend registry and its CLI choices. `--kv-compression`
selects the attention backend `tangram` (`tangram_sglang.attention.backend`)."""

from __future__ import annotations

from sglang.srt.layers.attention.attention_registry import (
    ATTENTION_BACKENDS,
    register_attention_backend,
)
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

from tangram_sglang.attention.backend import BACKEND, create_tangram_backend

from . import Registration


def _register() -> None:
    if BACKEND not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND])
    register_attention_backend(BACKEND)(create_tangram_backend)


HOOKS = ()
REGISTRATIONS = (
    Registration(
        "attention backend 'tangram'",
        _register,
        lambda: ATTENTION_BACKENDS.get(BACKEND) is create_tangram_backend,
    ),
)
