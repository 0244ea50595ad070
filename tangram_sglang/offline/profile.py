"""The Tangram profile: a model's calibrated per-head retention, stored as YAML.

Per-head retention is a property of the model, not of the prompt, so it is measured once
offline (`calibrate.py`) and everything at serving time (budgets, pool sizes, kernel
plans) is derived from this file. Loading validates every field and names the one that
is wrong, because a bad profile must fail at start-up, not inside a kernel.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tangram_sglang.methods import PROFILE

FORMAT = "tangram-profile/1"
METHODS = PROFILE
GROUPINGS = ("global", "per-layer")


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the offending field."""


def _fail(path: str, problem: str) -> ProfileError:
    return ProfileError(f"profile field '{path}': {problem}")


def _attr(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


@dataclass(frozen=True)
class ModelIdentity:
    """What a profile was calibrated for; a profile only loads for the same model shape."""

    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelIdentity:
        """Build from a Hugging Face config object or a parsed `config.json` dict."""
        text_config = _attr(config, "text_config")
        if text_config is not None and _attr(config, "num_hidden_layers") is None:
            config = text_config
        archs = _attr(config, "architectures") or ["unknown"]
        layers = int(_attr(config, "num_hidden_layers"))
        q_heads = int(_attr(config, "num_attention_heads"))
        kv_heads = int(_attr(config, "num_key_value_heads") or q_heads)
        hidden = int(_attr(config, "hidden_size"))
        head_dim = int(_attr(config, "head_dim") or hidden // q_heads)
        shape = {
            "architecture": archs[0],
            "num_layers": layers,
            "num_q_heads": q_heads,
            "num_kv_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_size": hidden,
            "intermediate_size": int(_attr(config, "intermediate_size") or 0),
            "vocab_size": int(_attr(config, "vocab_size") or 0),
        }
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]
        return cls(archs[0], layers, q_heads, kv_heads, head_dim, digest)

    @classmethod
    def from_model_path(cls, model_path: str | Path) -> ModelIdentity:
        config_file = Path(model_path) / "config.json"
        if not config_file.is_file():
            raise ProfileError(f"model path '{model_path}' has no config.json")
        return cls.from_hf_config(json.loads(config_file.read_text()))

    @property
    def gqa(self) -> int:
        return self.num_q_heads // self.num_kv_heads


@dataclass(frozen=True)
class Calibration:
    """How the retention statistics were obtained (enough to reproduce them)."""

    samples: int
    base_ratio: float
    seed: int
    alpha: float
    sink: int
    window: int
    dataset: str = "synthetic"


@dataclass(frozen=True)
class HeadStats:
    """Kept ratio of one (layer, kv_head) over the calibration samples: the share of the
    tokens past sink + window that the head kept (the ratio `budget.kept_tokens` applies)."""

    layer: int
    head: int
    mean: float
    std: float
    p90: float
    reserved: float
    rank: int


@dataclass(frozen=True)
class HeadGroup:
    """Heads that share one budget (`ratio`), one token pool and one page table."""

    gid: int
    ratio: float
    heads: tuple[tuple[int, int], ...]

    def heads_in_layer(self, layer: int) -> tuple[int, ...]:
        return tuple(h for (lay, h) in self.heads if lay == layer)


@dataclass(frozen=True)
class Profile:
    model: ModelIdentity
    method: str
    calibration: Calibration
    heads: tuple[HeadStats, ...]
    groups: tuple[HeadGroup, ...]
    grouping: str = "global"
    rank_stability: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def held_ratio(self) -> float:
        """The head-weighted mean of the group ratios as calibrated: the share of full KV a
        long compressed segment holds (more than the base ratio: a head reserves mean +
        alpha * std, and a group keeps its largest member's ratio)."""
        weights = [len(g.heads) for g in self.groups]
        return sum(w * g.ratio for w, g in zip(weights, self.groups, strict=True)) / sum(weights)

    def group_ratios(self, target_ratio: float | None = None) -> tuple[float, ...]:
        """Each group's kept ratio when serving at memory share `target_ratio` (default:
        as calibrated, holding `held_ratio`).

        The profile's shape is scaled so that the head-weighted mean ratio, what the groups
        hold per compressed token, is the target: `--tangram-ratio R` costs R of full KV's
        bytes in every mode, so tangram and uniform at one R compare at equal memory.
        Budget a group cannot use above 1 goes to the others in proportion to their ratios
        (`scale_ratios`), so the head ranking (the model property) is kept and a target of
        1.0 keeps every token.
        """
        if target_ratio is None:
            return tuple(g.ratio for g in self.groups)
        check_ratio(target_ratio, "tangram-ratio")
        weights = [len(g.heads) for g in self.groups]
        factor = target_ratio / self.held_ratio
        return scale_ratios([g.ratio for g in self.groups], weights, factor)

    def group_of(self) -> list[list[int]]:
        """`[layer][kv_head] -> gid`."""
        table = [[-1] * self.model.num_kv_heads for _ in range(self.model.num_layers)]
        for g in self.groups:
            for layer, head in g.heads:
                table[layer][head] = g.gid
        return table

    def heads_per_group_layer(self) -> list[list[int]]:
        """`[gid][layer] -> number of that layer's kv heads stored in group gid`."""
        counts = [[0] * self.model.num_layers for _ in self.groups]
        for g in self.groups:
            for layer, _ in g.heads:
                counts[g.gid][layer] += 1
        return counts

    def check_model(self, model: ModelIdentity) -> None:
        """Refuse a profile calibrated for a different model shape."""
        mine = self.model
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
            if getattr(mine, name) != getattr(model, name):
                raise _fail(
                    f"model.{name}",
                    f"profile has {getattr(mine, name)} but the model has "
                    f"{getattr(model, name)}: this profile was calibrated for another model "
                    f"({mine.architecture}, fingerprint {mine.fingerprint})",
                )
        if mine.fingerprint != model.fingerprint:
            raise _fail(
                "model.fingerprint",
                f"profile was calibrated for {mine.architecture} ({mine.fingerprint}) "
                f"but the model is {model.architecture} ({model.fingerprint})",
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": asdict(self.model),
            "method": self.method,
            "calibration": asdict(self.calibration),
            "grouping": self.grouping,
            "rank_stability": round(float(self.rank_stability), 6),
            "groups": [
                {"gid": g.gid, "ratio": g.ratio, "heads": [list(h) for h in g.heads]}
                for g in self.groups
            ],
            "heads": [asdict(h) for h in self.heads],
            **({"extra": self.extra} if self.extra else {}),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))

    @classmethod
    def from_dict(cls, data: Any) -> Profile:
        return _parse(data)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"profile file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ProfileError(f"profile file '{path}' is not valid YAML: {exc}") from exc
        try:
            return _parse(data)
        except ProfileError as exc:
            raise ProfileError(f"{path}: {exc}") from exc


def check_ratio(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 < value <= 1.0:
        raise _fail(name, f"{value!r} is outside (0, 1]")
    return float(value)


def scale_ratios(
    ratios: Sequence[float], weights: Sequence[int], factor: float
) -> tuple[float, ...]:
    """Ratios scaled by one common s with `min(1, s * r)`, s chosen so that the weighted
    mean is `factor` times today's (at most 1): water-filling, so that the budget a ratio
    clipped at 1 cannot use is not lost. `factor <= 1` is plain proportional scaling."""
    total = sum(weights)
    target = min(1.0, factor * sum(w * r for w, r in zip(weights, ratios, strict=True)) / total)
    if target >= 1.0 - 1e-12:
        return tuple(1.0 for _ in ratios)
    order = sorted(range(len(ratios)), key=lambda i: -ratios[i])
    clipped_weight = 0.0
    for k in range(len(order) + 1):
        rest = order[k:]
        mass = sum(weights[i] * ratios[i] for i in rest)
        scale = (target * total - clipped_weight) / mass
        if all(scale * ratios[i] <= 1.0 for i in rest):
            return tuple(min(1.0, scale * r) for r in ratios)
        clipped_weight += weights[order[k]]
    raise AssertionError("unreachable: a mean below 1 leaves a ratio unclipped")


def uniform_profile(model: ModelIdentity, ratio: float, sink: int = 4, window: int = 32) -> Profile:
    """One group holding every head at one ratio: the fair baseline on the same machinery."""
    check_ratio(ratio, "uniform ratio")
    heads = tuple(
        HeadStats(layer, head, ratio, 0.0, ratio, ratio, layer * model.num_kv_heads + head)
        for layer in range(model.num_layers)
        for head in range(model.num_kv_heads)
    )
    group = HeadGroup(0, ratio, tuple((h.layer, h.head) for h in heads))
    calib = Calibration(0, ratio, 0, 0.0, sink, window, "none")
    return Profile(model, "uniform", calib, heads, (group,), "global", 1.0)


def validate(profile: Profile) -> None:
    """Check the invariants every consumer relies on; raise ProfileError naming the field."""
    m = profile.model
    for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
        value = getattr(m, name)
        if not isinstance(value, int) or value <= 0:
            raise _fail(f"model.{name}", f"{value!r} must be a positive integer")
    if m.num_q_heads % m.num_kv_heads:
        raise _fail("model.num_q_heads", "must be a multiple of model.num_kv_heads")
    if profile.method not in METHODS:
        raise _fail("method", f"unknown method {profile.method!r}; known: {', '.join(METHODS)}")
    if profile.grouping not in GROUPINGS:
        raise _fail("grouping", f"{profile.grouping!r} is not one of {', '.join(GROUPINGS)}")
    c = profile.calibration
    check_ratio(c.base_ratio, "calibration.base_ratio")
    if c.sink < 0 or c.window < 0:
        raise _fail("calibration.sink", "sink and window must be >= 0")
    expected = {(layer, h) for layer in range(m.num_layers) for h in range(m.num_kv_heads)}
    seen: set[tuple[int, int]] = set()
    for i, h in enumerate(profile.heads):
        key = (h.layer, h.head)
        if key not in expected:
            raise _fail(f"heads[{i}]", f"(layer {h.layer}, head {h.head}) is not in the model")
        if key in seen:
            raise _fail(f"heads[{i}]", f"(layer {h.layer}, head {h.head}) appears twice")
        seen.add(key)
        check_ratio(h.reserved, f"heads[{i}].reserved")
        for name in ("mean", "p90"):
            value = getattr(h, name)
            if math.isnan(value) or not 0.0 <= value <= 1.0:
                raise _fail(f"heads[{i}].{name}", f"{value!r} is outside [0, 1]")
        if h.std < 0:
            raise _fail(f"heads[{i}].std", f"{h.std} is negative")
    if seen != expected:
        missing = sorted(expected - seen)[:4]
        raise _fail("heads", f"missing entries for (layer, head) {missing}")
    if not profile.groups:
        raise _fail("groups", "a profile needs at least one group")
    owner: dict[tuple[int, int], int] = {}
    for i, g in enumerate(profile.groups):
        if g.gid != i:
            last = len(profile.groups) - 1
            raise _fail(f"groups[{i}].gid", f"is {g.gid}; gids must be 0..{last}")
        check_ratio(g.ratio, f"groups[{i}].ratio")
        if not g.heads:
            raise _fail(f"groups[{i}].heads", "a group needs at least one head")
        for head in g.heads:
            if head not in expected:
                raise _fail(
                    f"groups[{i}].heads", f"{list(head)} is not a (layer, head) of the model"
                )
            if head in owner:
                raise _fail(
                    f"groups[{i}].heads",
                    f"{list(head)} is already in group {owner[head]}; each head must be in "
                    "exactly one group",
                )
            owner[head] = i
    if len(owner) != len(expected):
        missing = sorted(expected - set(owner))[:4]
        raise _fail("groups", f"heads {[list(h) for h in missing]} are in no group")
    by_key = {(h.layer, h.head): h for h in profile.heads}
    for i, g in enumerate(profile.groups):
        low = max(by_key[h].reserved for h in g.heads)
        if g.ratio + 1e-9 < low:
            raise _fail(
                f"groups[{i}].ratio",
                f"{g.ratio} is below its heads' largest reserved ratio {low}",
            )


def _require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise _fail(where or "<root>", "must be a mapping")
    if key not in data:
        raise _fail(f"{where}.{key}" if where else key, "is missing")
    return data[key]


def _typed(value: Any, kind: type, path: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise _fail(path, f"{value!r} should be of type {kind.__name__}")
    return value


def _record(cls: type, data: Any, where: str, fields: Sequence[tuple[str, type]]) -> Any:
    values = {}
    for name, kind in fields:
        raw = _require(data, name, where)
        values[name] = _typed(raw, kind, f"{where}.{name}")
    return cls(**values)


def _parse(data: Any) -> Profile:
    if not isinstance(data, Mapping):
        raise ProfileError("profile: the document must be a YAML mapping")
    fmt = _require(data, "format", "")
    if fmt != FORMAT:
        raise _fail("format", f"{fmt!r} is not {FORMAT!r}")
    model = _record(
        ModelIdentity,
        _require(data, "model", ""),
        "model",
        [
            ("architecture", str),
            ("num_layers", int),
            ("num_q_heads", int),
            ("num_kv_heads", int),
            ("head_dim", int),
            ("fingerprint", str),
        ],
    )
    calib_data = _require(data, "calibration", "")
    calib = _record(
        Calibration,
        calib_data,
        "calibration",
        [
            ("samples", int),
            ("base_ratio", float),
            ("seed", int),
            ("alpha", float),
            ("sink", int),
            ("window", int),
            ("dataset", str),
        ],
    )
    heads_data = _require(data, "heads", "")
    if not isinstance(heads_data, list):
        raise _fail("heads", "must be a list")
    heads = tuple(
        _record(
            HeadStats,
            item,
            f"heads[{i}]",
            [
                ("layer", int),
                ("head", int),
                ("mean", float),
                ("std", float),
                ("p90", float),
                ("reserved", float),
                ("rank", int),
            ],
        )
        for i, item in enumerate(heads_data)
    )
    groups_data = _require(data, "groups", "")
    if not isinstance(groups_data, list):
        raise _fail("groups", "must be a list")
    groups = []
    for i, item in enumerate(groups_data):
        where = f"groups[{i}]"
        members = _require(item, "heads", where)
        if not isinstance(members, list) or not all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, int) for x in h)
            for h in members
        ):
            raise _fail(f"{where}.heads", "must be a list of [layer, head] pairs")
        groups.append(
            HeadGroup(
                _typed(_require(item, "gid", where), int, f"{where}.gid"),
                _typed(_require(item, "ratio", where), float, f"{where}.ratio"),
                tuple((int(a), int(b)) for a, b in members),
            )
        )
    return Profile(
        model=model,
        method=_typed(_require(data, "method", ""), str, "method"),
        calibration=calib,
        heads=heads,
        groups=tuple(groups),
        grouping=_typed(data.get("grouping", "global"), str, "grouping"),
        rank_stability=_typed(data.get("rank_stability", 1.0), float, "rank_stability"),
        extra=dict(data.get("extra") or {}),
    )
