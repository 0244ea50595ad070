"""Tangram's serving settings: the eight CLI flags as one value, checked once at start-up.

The flags reach every SGLang process as attributes of its `ServerArgs` (see
`tangram_sglang.patches.server_args`); `TangramConfig.from_server_args` reads them back in
any process, and reads a stock `ServerArgs` (no attributes) as compression off. Every check
names the flag it refuses, because a bad setting must stop the server before it loads a
model, not surface inside a kernel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tangram_sglang.compress import SCORERS
from tangram_sglang.memory.budget import Workload, serving_workload
from tangram_sglang.memory.layout import rank_heads
from tangram_sglang.offline.profile import ModelIdentity, Profile, ProfileError, uniform_profile

MODES = ("none", "tangram", "uniform", "fastfusion")
DEFAULT_FUSION = 0.95  # --kv-compression fastfusion without --tangram-fusion (see fusion/serving)
# Attention kernels of the tangram backend: Triton (decode, extend, K/V writes), FlashInfer
# decode with ahead-of-time splits (extend and writes on Triton), or the torch path (CPU).
KERNEL_CHOICES = ("triton", "flashinfer", "torch")
DEFAULT_METHOD = "snapkv"  # scorer for profiles whose method is not one (uniform profiles)

# Flag of each TangramConfig field, and the attribute that carries it on ServerArgs.
FLAGS = {
    "mode": "--kv-compression",
    "profile": "--tangram-profile",
    "ratio": "--tangram-ratio",
    "method": "--tangram-method",
    "workload": "--tangram-workload",
    "kernels": "--tangram-kernels",
    "fusion": "--tangram-fusion",
    "cut_reuse": "--tangram-cut-reuse",
}
ATTRIBUTES = {
    "mode": "kv_compression",
    "profile": "tangram_profile",
    "ratio": "tangram_ratio",
    "method": "tangram_method",
    "workload": "tangram_workload",
    "kernels": "tangram_kernels",
    "fusion": "tangram_fusion",
    "cut_reuse": "tangram_cut_reuse",
}
WORKLOAD_FIELDS = ("context", "turns", "user_tokens", "answer_tokens")


class ConfigError(ValueError):
    """A flag or flag combination Tangram refuses; the message names the flag."""


def _in_unit_interval(value: Any, zero: bool = False) -> bool:
    """A number (not a bool, not NaN) in (0, 1], or [0, 1] with `zero`: a memory share, a
    fusion threshold, a cut-reuse share."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not math.isnan(value)
        and (value >= 0.0 if zero else value > 0.0)
        and value <= 1.0
    )


@dataclass(frozen=True)
class TangramConfig:
    """`mode` none (SGLang untouched), tangram (calibrated per-head profile), uniform
    (one ratio for every head on the same machinery: the fair baseline) or fastfusion
    (every token kept, near-identical blocks of a batch's requests stored once); `fusion`
    adds Fast Fusion at that threshold to tangram or uniform."""

    mode: str = "none"
    profile: str | None = None
    ratio: float | None = None
    method: str | None = None
    workload: str | None = None
    kernels: str | None = None
    fusion: float | None = None
    cut_reuse: float | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def fusion_threshold(self) -> float | None:
        """The Fast Fusion threshold served with (None: no fusion)."""
        if self.fusion is not None:
            return float(self.fusion)
        return DEFAULT_FUSION if self.mode == "fastfusion" else None

    @classmethod
    def from_server_args(cls, args: Any) -> TangramConfig:
        """From an argparse namespace or a `ServerArgs`; absent attributes mean stock."""
        values = {field: getattr(args, attr, None) for field, attr in ATTRIBUTES.items()}
        values["mode"] = values["mode"] or "none"
        return cls(**values)

    def scorer_method(self, profile: Profile) -> str:
        """The scorer to serve with: --tangram-method, else the profile's method, else
        snapkv (a uniform profile's method, "uniform", names no scorer)."""
        if self.method:
            return self.method
        return profile.method if profile.method in SCORERS else DEFAULT_METHOD

    def serving_workload(self, max_context: int) -> Workload:
        """The session shape the head-group pools are split for: --tangram-workload
        CONTEXT,TURNS,USER,ANSWER, else `budget.serving_workload(max_context)`. The split
        only fits sessions of about this shape: decoded and forced tokens cost every group
        a slot, compressed prompt tokens only their group's ratio."""
        if self.workload is None:
            return serving_workload(max_context)
        return self._workload()

    def _workload(self) -> Workload:
        """--tangram-workload as a `Workload`, or ConfigError naming the flag."""
        parts = str(self.workload).split(",")
        try:
            values = [int(x) for x in parts]
        except ValueError:
            values = []
        if len(values) != len(WORKLOAD_FIELDS) or min(values) < 1:
            raise ConfigError(
                f"--tangram-workload {self.workload!r} must be CONTEXT,TURNS,USER,ANSWER: four "
                "positive token/turn counts (context, turns, user and answer tokens per "
                "turn), e.g. 4096,4,256,256"
            )
        return Workload(**dict(zip(WORKLOAD_FIELDS, values, strict=True)))

    def server_args_fields(self) -> dict[str, Any]:
        """The attributes `from_server_args` reads back, keyed by attribute name."""
        return {attr: getattr(self, field) for field, attr in ATTRIBUTES.items()}

    def validate(self, model_path: str | Path) -> Profile | None:
        """Check the flags and their fit with the model; return the profile to serve with.

        Mode none returns None without reading the model. Uniform mode serves a one-group
        profile built for the model at `ratio`.
        """
        self._check_flags()
        if not self.enabled:
            return None
        model = ModelIdentity.from_model_path(model_path)
        if self.mode == "uniform":
            return uniform_profile(model, self.ratio)
        if self.mode == "fastfusion":
            return uniform_profile(model, 1.0)
        try:
            profile = Profile.load(self.profile)
        except ProfileError as exc:
            raise ConfigError(f"--tangram-profile {self.profile}: {exc}") from exc
        try:
            profile.check_model(model)
        except ProfileError as exc:
            raise ConfigError(
                f"--tangram-profile {self.profile} does not match --model-path {model_path}: {exc}"
            ) from exc
        return profile

    def _check_flags(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--kv-compression {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.enabled:
            stray = [FLAGS[f] for f in FLAGS if f != "mode" and getattr(self, f) is not None]
            if stray:
                raise ConfigError(
                    f"{', '.join(stray)} given without --kv-compression: add "
                    "--kv-compression tangram or uniform, or remove them"
                )
            return
        if self.ratio is not None and not _in_unit_interval(self.ratio):
            raise ConfigError(f"--tangram-ratio {self.ratio!r} is outside (0, 1]")
        if self.method is not None and self.method not in SCORERS:
            raise ConfigError(
                f"--tangram-method {self.method!r} is unknown; known: {', '.join(SCORERS)}"
            )
        if self.workload is not None:
            self._workload()
        if self.kernels is not None and self.kernels not in KERNEL_CHOICES:
            raise ConfigError(
                f"--tangram-kernels {self.kernels!r} is not one of {', '.join(KERNEL_CHOICES)}"
            )
        if self.fusion is not None and not _in_unit_interval(self.fusion):
            raise ConfigError(
                f"--tangram-fusion {self.fusion!r} is outside (0, 1]: the cosine a fused block "
                "keeps to the block it reads (1.0: only bit-identical blocks)"
            )
        if self.cut_reuse is not None and not _in_unit_interval(self.cut_reuse, zero=True):
            raise ConfigError(
                f"--tangram-cut-reuse {self.cut_reuse!r} is outside [0, 1]: the share of a "
                "fresh compression's kept tokens a cached prefix ending inside a compressed "
                "turn must keep to be reused (0: always reuse, 1: only lossless cuts)"
            )
        if self.mode == "fastfusion" and (self.profile or self.ratio is not None):
            raise ConfigError(
                "--kv-compression fastfusion keeps every token: remove --tangram-profile and "
                "--tangram-ratio, or use --kv-compression tangram --tangram-fusion TAU"
            )
        if self.mode == "tangram" and not self.profile:
            raise ConfigError("--kv-compression tangram needs --tangram-profile FILE")
        if self.mode == "uniform":
            if self.ratio is None:
                raise ConfigError("--kv-compression uniform needs --tangram-ratio R")
            if self.profile:
                raise ConfigError(
                    "--tangram-profile is not used by --kv-compression uniform (one ratio for "
                    "every head): remove it, or use --kv-compression tangram"
                )


def read_hf_config(model_path: str | Path) -> dict[str, Any]:
    """The model's `config.json` as a dict (what the model checks here need)."""
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"--model-path {model_path} has no config.json")
    return json.loads(config_file.read_text())


def model_conflicts(hf_config: Mapping[str, Any]) -> list[str]:
    """Model features the head-group pools cannot serve, one readable entry each.

    MLA stores one shared latent per token instead of per-head K/V, so there are no heads
    to compress separately; hybrid models keep sliding-window or linear-attention layers
    in pools of their own.
    """
    configs = [hf_config]
    if isinstance(hf_config.get("text_config"), Mapping):
        configs.append(hf_config["text_config"])
    archs = [a for c in configs for a in (c.get("architectures") or [])]
    conflicts = []
    mla_archs = [a for a in archs if a.startswith("Deepseek")]
    if any(c.get("kv_lora_rank") is not None for c in configs) or mla_archs:
        conflicts.append(f"MLA / compressed-latent attention models ({', '.join(archs)})")
    other_layers = sorted(
        {t for c in configs for t in (c.get("layer_types") or []) if t != "full_attention"}
    )
    if other_layers:
        conflicts.append(f"hybrid models with {', '.join(other_layers)} layers")
    return conflicts


def tp_conflicts(hf_config: Mapping[str, Any], tp_size: int) -> list[str]:
    """Tensor parallelism splits whole kv heads over the ranks (each rank stores its own
    share of every head group); a split SGLang would replicate unevenly is refused."""
    if tp_size <= 1:
        return []
    text = hf_config.get("text_config")
    config = text if isinstance(text, Mapping) else hf_config
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    try:
        rank_heads(0, int(heads), tp_size)
    except (TypeError, ValueError) as e:
        return [f"tensor parallelism (--tp-size {tp_size}: {e})"]
    return []
