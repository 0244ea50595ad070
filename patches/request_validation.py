"""Touchpoint: request validation in the tokenizer manager
(`TokenizerManager._validate_one_request`). A token id outside the vocabulary indexes past
the embedding in the scheduler and ends every process, and with them every session's
compressed history; with `--kv-compression` on, such a request gets a 400 naming the id.
Stock SGLang (flag off) is left as it is.
"""

from __future__ import annotations

from typing import Any

from sglang.srt.plugins.hook_registry import HookType

from tangram_sglang.config import TangramConfig

from . import Hook


def out_of_vocabulary(input_ids: list[int], vocab_size: int) -> str | None:
    """The refusal for the first id outside [0, vocab_size), or None."""
    for position, token in enumerate(input_ids):
        if not 0 <= token < vocab_size:
            return (
                f"input_ids[{position}] is token id {token}, outside the vocabulary "
                f"[0, {vocab_size})"
            )
    return None


def validate_one_request(original: Any, manager: Any, obj: Any, input_ids: Any, *args: Any) -> Any:
    result = original(manager, obj, input_ids, *args)
    enabled = getattr(manager, "_tangram_enabled", None)
    if enabled is None:
        enabled = TangramConfig.from_server_args(manager.server_args).enabled
        manager._tangram_enabled = enabled
    if enabled and input_ids:
        refusal = out_of_vocabulary(input_ids, manager.model_config.vocab_size)
        if refusal:
            raise ValueError(refusal)
    return result


HOOKS = (
    Hook(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        validate_one_request,
        HookType.AROUND,
    ),
)
