"""KV compression scorers (one small class per method) and the shared selection path."""

from tangram_sglang.compress.ada_snapkv import AdaSnapKV
from tangram_sglang.compress.base import (
    PaddedSegments,
    Scorer,
    SegmentBatch,
    ada_allocation,
    check_budgets,
    forced_mask,
    group_mean,
    pool1d,
    select,
    select_batch,
    window_attention,
)
from tangram_sglang.compress.duo import DuoAttention, duo_split
from tangram_sglang.compress.expected_attention import ExpectedAttention
from tangram_sglang.compress.headkv import HeadKV, headkv_ratios
from tangram_sglang.compress.keydiff import KeyDiff
from tangram_sglang.compress.snapkv import SnapKV
from tangram_sglang.compress.streaming import StreamingLLM
from tangram_sglang.compress.tova import TOVA
from tangram_sglang.methods import SCORING

SCORERS: dict[str, type[Scorer]] = {
    "snapkv": SnapKV,
    "ada-snapkv": AdaSnapKV,
    "expected-attention": ExpectedAttention,
    "headkv": HeadKV,
    "keydiff": KeyDiff,
    "tova": TOVA,
    "streaming": StreamingLLM,
    "duo": DuoAttention,
}

if tuple(SCORERS) != SCORING:
    raise ImportError(f"scorer classes {tuple(SCORERS)} and method names {SCORING} disagree")

__all__ = [
    "SCORERS",
    "AdaSnapKV",
    "DuoAttention",
    "ExpectedAttention",
    "HeadKV",
    "KeyDiff",
    "PaddedSegments",
    "Scorer",
    "SegmentBatch",
    "SnapKV",
    "StreamingLLM",
    "TOVA",
    "ada_allocation",
    "check_budgets",
    "duo_split",
    "forced_mask",
    "group_mean",
    "headkv_ratios",
    "pool1d",
    "select",
    "select_batch",
    "window_attention",
]
