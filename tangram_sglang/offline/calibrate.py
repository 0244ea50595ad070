"""Offline calibration: measure each head's kept ratio under a method's own allocation.

    python -m tangram_sglang calibrate --model-path DIR --method ada-snapkv \
        --samples 50 --ratio 0.25 --out profiles/model.ada-snapkv.yaml

Per-head retention is a property of the model, so we run the (Hugging Face) model on N
samples, let the method split each layer's budget across heads as it would dynamically
(Ada-KV joint top-k for ada-snapkv and expected-attention, full/streaming heads for duo,
an even split for snapkv), and record per (layer, kv head) the kept share of the tokens
that are not forced (sink + window): exactly the ratio `budget.kept_tokens` applies at
serving time, so a reserved ratio reserves what the method kept. The profile stores
mean, std and p90 of that ratio, the reserved ratio min(1, mean + alpha * std) serving
budgets are built from, the head ranking and its stability, and the head groups.

Queries and keys are captured post-RoPE, before `repeat_kv`, by an attention function
registered with transformers' `AttentionInterface` that records them and then runs SDPA;
each layer's q/k/v is reduced to per-head counts at once, so memory stays one sample's.
Finished samples are appended to a partial JSONL file, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tangram_sglang.compress import (
    AdaSnapKV,
    DuoAttention,
    ExpectedAttention,
    HeadKV,
    Scorer,
    SnapKV,
    ada_allocation,
    duo_split,
    headkv_ratios,
)
from tangram_sglang.memory.budget import BudgetRule, kept_tokens
from tangram_sglang.methods import CALIBRATED
from tangram_sglang.offline.grouping import build_groups
from tangram_sglang.offline.profile import (
    Calibration,
    HeadStats,
    ModelIdentity,
    Profile,
    ProfileError,
)

METHODS = CALIBRATED
CAPTURE = "tangram_capture"
_PARTIAL_VERSION = 1
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

LayerHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
_ACTIVE_HOOK: ContextVar[LayerHook | None] = ContextVar("tangram_capture_hook", default=None)


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything one calibration run depends on (the CLI arguments)."""

    model_path: str
    method: str
    samples: int
    ratio: float
    out: str
    data: str | None = None
    seq_len: int = 1024
    alpha: float = 2.0
    max_groups: int = 4
    grouping: str = "global"
    sink: int = 4
    window: int = 32
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"
    partial: str | None = None
    progress: bool = True
    held_out: int = 0
    data_name: str | None = None
    headkv_share: float = 0.5

    @property
    def rule(self) -> BudgetRule:
        return BudgetRule(sink=self.sink, window=self.window)

    @property
    def partial_path(self) -> Path:
        return Path(self.partial) if self.partial else Path(self.out + ".partial.jsonl")

    def check(self) -> None:
        """Refuse bad arguments up front, naming the argument."""
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is unknown; known: {', '.join(METHODS)}")
        if isinstance(self.ratio, bool) or not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"--ratio {self.ratio} is outside (0, 1]")
        if self.samples < 2:
            raise ValueError(f"--samples {self.samples}: need at least 2 to estimate a std")
        if not 0.0 <= self.headkv_share <= 1.0:
            raise ValueError(f"--headkv-share {self.headkv_share} is outside [0, 1]")
        if self.method == "headkv" and self.data is None:
            raise ValueError(
                '--method headkv needs --data whose samples name their "spans" (the '
                "statements the question asks about)"
            )
        if self.held_out < 0:
            raise ValueError(f"--held-out {self.held_out} must be >= 0")
        if self.seq_len < 1:
            raise ValueError(f"--seq-len {self.seq_len} must be positive")
        if self.data is None and self.seq_len < 64:
            raise ValueError(f"--seq-len {self.seq_len}: synthetic samples need at least 64")
        if self.alpha < 0:
            raise ValueError(f"--alpha {self.alpha} must be >= 0")
        if self.max_groups < 1:
            raise ValueError(f"--max-groups {self.max_groups} must be >= 1")
        if self.grouping not in ("global", "per-layer"):
            raise ValueError(f"--grouping {self.grouping!r} is not 'global' or 'per-layer'")
        if self.sink < 0 or self.window < 0:
            raise ValueError("--sink and --window must be >= 0")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        model_dir = Path(self.model_path)
        if not model_dir.is_dir():
            raise ValueError(f"--model-path {self.model_path!r} is not a directory")
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"--model-path {self.model_path!r} has no config.json")
        if self.data is not None and not Path(self.data).is_file():
            raise ValueError(f"--data {self.data!r} does not exist")


_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# ---------------------------------------------------------------- capturing q/k/v


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function that shows the active hook post-RoPE q/k/v, then runs SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    hook = _ACTIVE_HOOK.get()
    if hook is not None:
        if query.shape[0] != 1:
            raise ValueError("calibration captures one sample at a time (batch size 1)")
        hook(
            module.layer_idx,
            query[0].transpose(0, 1),
            key[0].transpose(0, 1),
            value[0].transpose(0, 1),
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_capture() -> str:
    """Register the capturing attention (and SDPA's mask for it) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_attention)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    return CAPTURE


@contextlib.contextmanager
def capturing(hook: LayerHook) -> Iterator[None]:
    token = _ACTIVE_HOOK.set(hook)
    try:
        yield
    finally:
        _ACTIVE_HOOK.reset(token)


def load_model(model_path: str, device: str = "cpu", dtype: str = "auto") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch_dtype = _DTYPES[dtype] or (torch.float32 if device == "cpu" else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype, attn_implementation=register_capture()
    )
    return model.to(device).eval()


# ---------------------------------------------------------------- per-sample kept tokens


@dataclass
class KeptMeter:
    """Runs one sample and returns the method's kept tokens per (layer, kv head)."""

    model: torch.nn.Module
    method: str
    ratio: float
    rule: BudgetRule
    headkv_share: float = 0.5

    def __post_init__(self) -> None:
        observation = max(1, self.rule.window)
        self.scorer: Scorer = {
            "snapkv": SnapKV(window_size=observation),
            "ada-snapkv": AdaSnapKV(window_size=observation),
            "expected-attention": ExpectedAttention(n_sink=self.rule.sink),
            "duo": DuoAttention(observation=observation),
            "headkv": HeadKV(window_size=observation),
        }[self.method]

    def _layer(self, q, k, v, spans) -> np.ndarray:
        t, heads = k.shape[0], k.shape[1]
        per_head = kept_tokens(t, self.ratio, self.rule)
        if self.method == "snapkv":
            return np.full(heads, per_head, dtype=np.float64)
        if self.method == "duo":
            return self.scorer.head_mass(q, k, self.rule).double().cpu().numpy()
        if self.method == "headkv":
            return self.scorer.needle_mass(q, k, spans).double().cpu().numpy()
        scores = self.scorer.score(q, k, v)
        return np.asarray(ada_allocation(scores, heads * per_head, self.rule), dtype=np.float64)

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, spans: Sequence[tuple[int, int]] | None = None
    ) -> np.ndarray:
        """`[L, Hkv]` int kept tokens for one sample of T = len(input_ids) tokens (`spans`:
        the token ranges its question is about, which headkv needs)."""
        if self.method == "headkv" and not spans:
            raise ValueError('--method headkv: a sample has no "spans"')
        records: dict[int, np.ndarray] = {}

        def hook(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
            records[layer] = self._layer(q, k, v, spans)

        device = next(self.model.parameters()).device
        with capturing(hook):
            self.model(input_ids.view(1, -1).to(device), use_cache=False, logits_to_keep=1)
        table = np.stack([records[layer] for layer in sorted(records)])
        t = int(input_ids.numel())
        if self.method == "duo":
            full = duo_split(table, t, self.ratio, self.rule)
            return np.where(full, t, min(t, self.rule.sink + self.rule.window)).astype(np.int64)
        if self.method == "headkv":
            ratios = headkv_ratios(table, self.ratio, self.headkv_share)
            return np.vectorize(lambda r: kept_tokens(t, max(float(r), 1e-9), self.rule))(
                ratios
            ).astype(np.int64)
        return table.astype(np.int64)


# ---------------------------------------------------------------- samples


def synthetic_sample(index: int, seed: int, seq_len: int, vocab: int) -> torch.Tensor:
    """A deterministic long-context retrieval sample (random filler, key/value needles).

    Needles (a 4-token key followed by a 4-token value) appear one to three times each in
    random filler; the sample ends with a question made of some needles' keys, so the
    last queries have earlier tokens worth retrieving.
    """
    rng = np.random.default_rng([seed, index])
    tokens = rng.integers(0, vocab, seq_len)
    question_len = min(24, seq_len // 4)
    body = seq_len - question_len
    slots = body // 16
    needles = rng.integers(0, vocab, (max(1, slots // 4), 8))
    copies = rng.integers(1, 4, len(needles))
    owners = np.repeat(np.arange(len(needles)), copies)[:slots]
    for slot, needle in zip(rng.choice(slots, len(owners), replace=False), owners, strict=True):
        start = int(slot) * 16 + int(rng.integers(0, 9))
        tokens[start : start + 8] = needles[needle]
    asked = rng.choice(len(needles), min(len(needles), question_len // 6), replace=False)
    question = np.concatenate([needles[n, :4] for n in asked] + [tokens[body:]])[:question_len]
    tokens[body:] = question
    return torch.from_numpy(tokens.astype(np.int64))


class SampleSource:
    """Sample i as token ids: from a JSONL file ({"text"} or {"input_ids"}) or synthetic."""

    def __init__(self, config: CalibrationConfig, vocab: int) -> None:
        self.config, self.vocab = config, vocab
        self.lines: list[str] = []
        self._tokenizer: Any = None
        if config.data is not None:
            with open(config.data) as f:
                self.lines = [line for line in f if line.strip()]

    @property
    def name(self) -> str:
        """What the profile records as its data: `--data-name`, else the file's name."""
        if self.config.data is None:
            return "synthetic"
        return self.config.data_name or Path(self.config.data).name

    def __len__(self) -> int:
        return len(self.lines) if self.config.data is not None else sys.maxsize

    def _tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = Path(self.config.model_path)
            if not any((path / name).is_file() for name in _TOKENIZER_FILES):
                raise ValueError(
                    f"--data has 'text' samples but --model-path {str(path)!r} has no "
                    f"tokenizer ({', '.join(_TOKENIZER_FILES)}); give 'input_ids' instead"
                )
            self._tokenizer = AutoTokenizer.from_pretrained(path)
        return self._tokenizer(text)["input_ids"]

    def spans(self, index: int) -> list[tuple[int, int]] | None:
        """The sample's "spans" (token ranges its question is about), if it names any."""
        if self.config.data is None:
            return None
        record = json.loads(self.lines[index])
        spans = record.get("spans") if isinstance(record, dict) else None
        return [(int(a), int(b)) for a, b in spans] if spans else None

    def __getitem__(self, index: int) -> torch.Tensor:
        c = self.config
        if c.data is None:
            return synthetic_sample(index, c.seed, c.seq_len, self.vocab)
        where = f"--data {c.data} line {index + 1}"
        try:
            record = json.loads(self.lines[index])
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not JSON: {exc}") from exc
        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
            ids = record["input_ids"]
        elif isinstance(record, dict) and isinstance(record.get("text"), str):
            ids = self._tokenize(record["text"])
        else:
            raise ValueError(f"{where} needs a 'text' string or an 'input_ids' list")
        ids = ids[: c.seq_len]
        if not ids or not all(isinstance(i, int) and 0 <= i < self.vocab for i in ids):
            raise ValueError(f"{where}: token ids must be a non-empty list of ints < {self.vocab}")
        return torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------- statistics


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts - 1) / 2.0, counts)
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks). Two constant vectors agree (1.0);
    one constant vector against a varying one carries no ranking (0.0)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"spearman needs two equal, non-empty lengths, got {a.size} and {b.size}")
    ra, rb = _average_ranks(a) - (a.size - 1) / 2.0, _average_ranks(b) - (b.size - 1) / 2.0
    na, nb = math.sqrt(float(ra @ ra)), math.sqrt(float(rb @ rb))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(ra @ rb) / (na * nb)


@dataclass(frozen=True)
class HeadStatistics:
    """Per-(layer, kv head) arrays `[L, H]` of the kept-ratio statistics."""

    mean: np.ndarray
    std: np.ndarray
    p90: np.ndarray
    reserved: np.ndarray
    rank: np.ndarray
    rank_stability: float

    @classmethod
    def from_moments(
        cls,
        mean: np.ndarray,
        std: np.ndarray,
        p90: np.ndarray,
        alpha: float,
        minimum: float | np.ndarray = 0.0,
        rank_stability: float = 1.0,
    ) -> HeadStatistics:
        """reserved = min(1, mean + alpha * std), rounded up to 6 decimals and never below
        `minimum`; rank 0 is the largest mean (ties: lower layer, then head)."""
        reserved = np.minimum(1.0, _ceil6(mean + alpha * std))
        reserved = np.minimum(1.0, np.maximum(reserved, _ceil6(np.asarray(minimum, np.float64))))
        order = np.argsort(-mean.ravel(), kind="stable")
        rank = np.empty(mean.size, dtype=np.int64)
        rank[order] = np.arange(mean.size)
        return cls(mean, std, p90, reserved, rank.reshape(mean.shape), rank_stability)

    def to_heads(self) -> tuple[HeadStats, ...]:
        layers, heads = self.mean.shape
        return tuple(
            HeadStats(
                layer,
                head,
                round(float(self.mean[layer, head]), 6),
                round(float(self.std[layer, head]), 6),
                round(float(self.p90[layer, head]), 6),
                float(self.reserved[layer, head]),
                int(self.rank[layer, head]),
            )
            for layer in range(layers)
            for head in range(heads)
        )


def _ceil6(x: np.ndarray) -> np.ndarray:
    return np.ceil(np.round(x * 1e6, 3)) / 1e6


def head_statistics(
    kept_ratios: np.ndarray, alpha: float = 2.0, minimum: float | np.ndarray = 0.0
) -> HeadStatistics:
    """Statistics of kept ratios `[samples, L, H]`.

    reserved = min(1, mean + alpha * std) (sample std), rounded up to 6 decimals and never
    below `minimum` (the forced sink + window share); rank 0 is the largest mean (ties:
    lower layer, then head); rank stability is the mean Spearman correlation between each
    sample's ratios and the mean ratios.
    """
    r = np.asarray(kept_ratios, dtype=np.float64)
    if r.ndim != 3 or r.shape[0] < 2:
        raise ValueError(f"kept_ratios must be [samples >= 2, L, H], got {r.shape}")
    mean, std = r.mean(0), r.std(0, ddof=1)
    p90 = np.percentile(r, 90, axis=0)
    stability = float(np.mean([spearman(sample, mean) for sample in r]))
    return HeadStatistics.from_moments(mean, std, p90, alpha, minimum, stability)


def profile_from_statistics(
    identity: ModelIdentity,
    method: str,
    calibration: Calibration,
    stats: HeadStatistics,
    max_groups: int,
    grouping: str,
    extra: dict[str, float] | None = None,
) -> Profile:
    """Head groups (with their waste report in `extra`) and the profile, from statistics."""
    heads = stats.to_heads()
    groups, report = build_groups(
        heads, identity.num_layers, identity.num_kv_heads, max_groups, grouping
    )
    report = {key: round(float(value), 4) + 0.0 for key, value in report.items()}
    return Profile(
        identity,
        method,
        calibration,
        heads,
        groups,
        grouping,
        round(stats.rank_stability, 6),
        {**report, **(extra or {})},
    )


def coverage(reserved: np.ndarray, held_out_kept: np.ndarray) -> float:
    """Fraction of (sample, layer, head) whose kept ratio fits the reserved ratio."""
    held = np.asarray(held_out_kept, dtype=np.float64)
    return float(np.mean(held <= np.asarray(reserved, dtype=np.float64)[None] + 1e-9))


# ---------------------------------------------------------------- the run


def _args_key(config: CalibrationConfig, model: ModelIdentity) -> str:
    """Hash of what a sample's kept counts depend on (not alpha, grouping or output)."""
    data_hash = None
    if config.data is not None:
        data_hash = hashlib.sha256(Path(config.data).read_bytes()).hexdigest()
    keyed = {
        "version": _PARTIAL_VERSION,
        "model_path": str(Path(config.model_path).resolve()),
        "model": asdict(model),
        "method": config.method,
        "ratio": config.ratio,
        "seq_len": config.seq_len,
        "sink": config.sink,
        "window": config.window,
        "seed": config.seed,
        "data": data_hash,
        "dtype": config.dtype,
        **({"headkv_share": config.headkv_share} if config.method == "headkv" else {}),
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def _read_partial(path: Path, key: str, samples: int) -> dict[int, tuple[int, np.ndarray]]:
    """Finished samples of an earlier run with the same key; other lines are dropped."""
    done: dict[int, tuple[int, np.ndarray]] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            if rec["key"] == key and 0 <= rec["sample"] < samples:
                done[int(rec["sample"])] = (int(rec["tokens"]), np.asarray(rec["kept"], np.int64))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    with path.open("w") as f:
        for i, (tokens, kept) in sorted(done.items()):
            f.write(_partial_line(key, i, tokens, kept))
    return done


def _partial_line(key: str, sample: int, tokens: int, kept: np.ndarray) -> str:
    rec = {"key": key, "sample": sample, "tokens": tokens, "kept": kept.tolist()}
    return json.dumps(rec) + "\n"


def measure(
    config: CalibrationConfig,
    indices: Sequence[int],
    model: torch.nn.Module | None = None,
) -> np.ndarray:
    """Kept ratios `[len(indices), L, H]` of the given samples (no files written)."""
    config.check()
    model = (
        model if model is not None else load_model(config.model_path, config.device, config.dtype)
    )
    meter = KeptMeter(model, config.method, config.ratio, config.rule, config.headkv_share)
    source = SampleSource(config, int(model.config.vocab_size))
    out = []
    for i in indices:
        ids = source[i]
        out.append(kept_fraction(meter(ids, source.spans(i)), ids.numel(), config.rule))
    return np.stack(out)


def kept_fraction(kept: np.ndarray, tokens: int, rule: BudgetRule) -> np.ndarray:
    """Kept share of the non-forced tokens: the inverse of `budget.kept_tokens`."""
    forced = min(tokens, rule.sink + rule.window)
    if tokens == forced:
        return np.ones(np.shape(kept))
    return (np.asarray(kept, dtype=np.float64) - forced) / (tokens - forced)


def calibrate(
    config: CalibrationConfig,
    sample_limit: int | None = None,
    model: torch.nn.Module | None = None,
) -> Profile | None:
    """Run (or resume) a calibration and write the profile; None if `sample_limit` new
    samples were done before the end (the partial file keeps them for the next run)."""
    from tqdm import tqdm

    config.check()
    identity = ModelIdentity.from_model_path(config.model_path)
    model = (
        model if model is not None else load_model(config.model_path, config.device, config.dtype)
    )
    source = SampleSource(config, int(model.config.vocab_size))
    if len(source) < config.samples + config.held_out:
        raise ValueError(
            f"--data has {len(source)} samples, fewer than --samples {config.samples} + "
            f"--held-out {config.held_out}"
        )
    key = _args_key(config, identity)
    partial = config.partial_path
    partial.parent.mkdir(parents=True, exist_ok=True)
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    done = _read_partial(partial, key, config.samples)
    meter = KeptMeter(model, config.method, config.ratio, config.rule, config.headkv_share)
    new = 0
    bar = tqdm(
        total=config.samples,
        initial=len(done),
        desc=f"calibrate {config.method}",
        unit="sample",
        disable=not config.progress,
    )
    with bar, partial.open("a") as f:
        for i in range(config.samples):
            if i in done:
                continue
            if sample_limit is not None and new >= sample_limit:
                return None
            ids = source[i]
            done[i] = (int(ids.numel()), meter(ids, source.spans(i)))
            f.write(_partial_line(key, i, *done[i]))
            f.flush()
            new += 1
            bar.update(1)
    profile = build_profile(config, identity, done, source.name)
    if config.held_out:
        profile.extra.update(held_out_report(profile, meter, source, config))
    profile.save(config.out)
    partial.unlink()
    return profile


def held_out_report(
    profile: Profile, meter: KeptMeter, source: SampleSource, config: CalibrationConfig
) -> dict[str, float]:
    """How the profile holds on `held_out` samples it was not calibrated on: the share of
    (sample, layer, head) whose kept ratio fits its reserved ratio, and the mean Spearman
    correlation of each sample's head ranking with the calibrated mean ranking."""
    from tqdm import tqdm

    rows = range(config.samples, config.samples + config.held_out)
    kept = []
    for i in tqdm(rows, desc="held out", unit="sample", disable=not config.progress):
        ids = source[i]
        kept.append(kept_fraction(meter(ids, source.spans(i)), ids.numel(), config.rule))
    held = np.stack(kept)
    layers, heads = profile.model.num_layers, profile.model.num_kv_heads
    reserved = np.array([h.reserved for h in profile.heads]).reshape(layers, heads)
    mean = np.array([h.mean for h in profile.heads]).reshape(layers, heads)
    return {
        "held_out_samples": config.held_out,
        "held_out_coverage": round(coverage(reserved, held), 4),
        "held_out_rank_stability": round(float(np.mean([spearman(x, mean) for x in held])), 4),
    }


def build_profile(
    config: CalibrationConfig,
    identity: ModelIdentity,
    done: dict[int, tuple[int, np.ndarray]],
    dataset: str,
) -> Profile:
    """Statistics, groups and waste report from every sample's kept counts."""
    tokens = np.array([done[i][0] for i in sorted(done)], dtype=np.float64)
    ratios = np.stack([kept_fraction(done[i][1], done[i][0], config.rule) for i in sorted(done)])
    stats = head_statistics(ratios, config.alpha, minimum=1e-6)
    calib = Calibration(
        len(done), config.ratio, config.seed, config.alpha, config.sink, config.window, dataset
    )
    extra = {
        "in_sample_coverage": round(coverage(stats.reserved, ratios), 4),
        "mean_tokens": round(float(tokens.mean()), 1),
        "mean_kept_ratio": round(float(ratios.mean()), 6),
    }
    return profile_from_statistics(
        identity, config.method, calib, stats, config.max_groups, config.grouping, extra
    )


# ---------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> CalibrationConfig:
    p = argparse.ArgumentParser(
        prog="python -m tangram_sglang calibrate",
        description="Measure per-head kept ratios of a KV compression method and write a "
        "Tangram profile.",
    )
    p.add_argument("--model-path", required=True, help="local Hugging Face model directory")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--ratio", type=float, required=True, help="target kept ratio in (0, 1]")
    p.add_argument("--out", required=True, help="profile YAML to write")
    p.add_argument(
        "--data",
        default=None,
        help='JSONL of {"text": ...} or {"input_ids": [...]}; default synthetic',
    )
    p.add_argument(
        "--data-name",
        default=None,
        help="what --data is, with its source and license (stored in the profile; default: "
        "the file name)",
    )
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--alpha", type=float, default=2.0)
    p.add_argument("--max-groups", type=int, default=4)
    p.add_argument("--grouping", default="global", choices=("global", "per-layer"))
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=tuple(_DTYPES))
    p.add_argument(
        "--headkv-share",
        type=float,
        default=0.5,
        help="headkv: share of the budget split by importance (the rest evenly)",
    )
    p.add_argument("--partial", default=None, help="resume file (default: OUT.partial.jsonl)")
    p.add_argument(
        "--held-out",
        type=int,
        default=0,
        help="further samples (after --samples) to report coverage and rank stability on",
    )
    p.add_argument("--no-progress", action="store_true")
    args = vars(p.parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    return CalibrationConfig(**args)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        profile = calibrate(config)
    except (ValueError, ProfileError) as exc:
        print(f"calibrate: error: {exc}", file=sys.stderr)
        return 2
    assert profile is not None
    extra = profile.extra
    print(
        f"wrote {config.out}: {profile.num_groups} groups, ratios "
        f"{[round(r, 4) for r in profile.group_ratios()]}, waste {extra['waste_pct']}% "
        f"(adjacent {extra['adjacent_waste_pct']}%, one group {extra['no_grouping_waste_pct']}%), "
        f"rank stability {profile.rank_stability:.3f}"
    )
    if "held_out_coverage" in extra:
        print(
            f"held out ({extra['held_out_samples']} samples): reserved-ratio coverage "
            f"{extra['held_out_coverage']:.4f}, "
            f"rank stability {extra['held_out_rank_stability']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
