"""Touchpoint: SGLang's command line. Adds the Tangram flags, refuses what we cannot serve,
stores the flags on `ServerArgs` and selects the `tangram` attention and radix backends.

SGLang derives its flags from the `ServerArgs` dataclass and `from_cli_args` keeps only
dataclass fields, so a plugin has no API for a flag: an AFTER hook on `add_cli_args` adds
ours and an AROUND hook on `from_cli_args` checks them. The flags are stored with
`ServerArgs.override`, SGLang's one sanctioned mutation point once `__post_init__` has made
the instance read-only. Scheduler and detokenizer processes receive the instance pickled
(multiprocessing spawn), extra attributes included, so they need no environment variable.
Without `--kv-compression` (or with `none`) SGLang's own objects pass through unchanged.
With it, the radix overrides' self-test (`tangram_sglang.memory.radix.self_test`) runs first.

Forced with `--kv-compression` (each logged): prefill CUDA graphs off (see `FORCED`); decode
CUDA graphs off only where the backend cannot be captured (`cuda_graph_blocker`: not
CUDA, the torch path, or `TANGRAM_CUDA_GRAPH=0`).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from sglang.srt.plugins.hook_registry import HookType
from sglang.srt.utils.common import get_device

from tangram_sglang.attention.backend import cuda_graph_blocker
from tangram_sglang.compress import SCORERS
from tangram_sglang.config import (
    KERNEL_CHOICES,
    MODES,
    ConfigError,
    TangramConfig,
    model_conflicts,
    read_hf_config,
    tp_conflicts,
)
from tangram_sglang.memory.radix import self_test as radix_self_test

from . import Hook, verify

logger = logging.getLogger(__name__)

BACKEND = "tangram"  # attention backend and radix cache backend name
SOURCE = "tangram-sglang"  # provenance recorded by ServerArgs.override
# --kv-cache-dtype values the pools store (per-tensor scales, SGLang's convention); the
# block-scaled ones (mxfp8, nvfp4, fp4_mx_block16) keep scale tensors we do not lay out.
KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16", "fp8_e4m3", "fp8_e5m2")
FORCED = {
    # SGLang 0.5.17 captures prefill ("breakable" by default on CUDA) with dummy extend
    # batches that no allocation hook precedes, and our extend builds its segment tables
    # (scoring parts, selection widths) per forward: it stays eager (prefill is
    # compute-bound; graphs buy little).
    "disable_prefill_cuda_graph": "the tangram extend builds its segment tables per forward",
}


def _mode(value: str) -> str:
    """`--kv-compression` parser: compression is refused if any of our hooks did not apply."""
    if value != "none":
        verify()
    return value


def add_flags(_result: None, parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Tangram KV-cache compression (tangram-sglang plugin)")
    group.add_argument(
        "--kv-compression",
        type=_mode,
        choices=MODES,
        default="none",
        help="none: stock SGLang. tangram: per-head budgets from --tangram-profile. "
        "uniform: one ratio (--tangram-ratio) for every head, same machinery (baseline). "
        "fastfusion: every token kept; near-identical 16-token blocks of different requests "
        "at the same positions stored once (Fast Fusion at --tangram-fusion, default 0.95).",
    )
    group.add_argument(
        "--tangram-profile", help="Profile YAML calibrated for this model (tangram mode)."
    )
    group.add_argument(
        "--tangram-ratio",
        type=float,
        help="Share of full KV memory a compressed token holds, in (0, 1], the same in every "
        "mode. tangram: the profile's group ratios are scaled so that their head-weighted mean "
        "is this share, keeping the head ranking (default: the profile as calibrated); 1.0 "
        "keeps every token; uniform: required.",
    )
    group.add_argument(
        "--tangram-method",
        help=f"Token scoring method ({', '.join(SCORERS)}); default: the profile's.",
    )
    group.add_argument(
        "--tangram-workload",
        metavar="CONTEXT,TURNS,USER,ANSWER",
        help="Session shape the head-group pools are split for: context tokens (the first "
        "prompt is the context plus one turn's user tokens), turns, user and answer tokens "
        "per turn (default: a 4-turn chat whose context is half the context length, at most "
        "8192 tokens, 256 user + 256 answer tokens per turn). The server logs the shape its "
        "traffic has when the groups fill unevenly.",
    )
    group.add_argument(
        "--tangram-kernels",
        choices=KERNEL_CHOICES,
        help="Attention kernels: triton (default on CUDA), flashinfer (FlashInfer decode with "
        "ahead-of-time splits; extend on Triton), torch (default elsewhere). "
        "TANGRAM_BACKEND_KERNELS sets the same.",
    )
    group.add_argument(
        "--tangram-fusion",
        type=float,
        metavar="TAU",
        help="Fast Fusion: after each prefill batch, a 16-token block of new KV whose K and V "
        "keep cosine >= TAU (and a norm ratio within [TAU, 1/TAU]) to an earlier request's "
        "block at the same position (in the batch, or still held from an earlier one) in "
        "every layer of its head group reads that block and frees its own slots. "
        "1.0 shares only bit-identical blocks (lossless). With --kv-compression tangram or "
        "uniform; fastfusion's default is 0.95.",
    )
    group.add_argument(
        "--tangram-cut-reuse",
        type=float,
        metavar="SHARE",
        help="A cached prefix that ends inside another request's compressed turn keeps, per "
        "head group, only the slots all its heads filled before the cut; it is reused only "
        "if every group keeps at least SHARE of what compressing that part afresh keeps, "
        "else the request recomputes it from the turn's start, and its own turn is then "
        "not cached. Default 0 (always reuse); 0.5 for near-duplicate documents without a "
        "shared head, where a lossy cut cost accuracy; not with a shared system prompt, "
        "whose later sessions would lose their radix hits.",
    )


def unsupported(args: Any) -> list[str]:
    """SGLang features compression cannot run with, one readable entry each.

    Reads flag values by ServerArgs field name, so it checks both the parsed namespace
    (before SGLang resolves anything) and the resolved ServerArgs (after, where a model's
    defaults may have switched a feature on).
    """
    found = []
    if args.speculative_algorithm:
        found.append(f"speculative decoding (--speculative-algorithm {args.speculative_algorithm})")
    if args.enable_hierarchical_cache:
        found.append("hierarchical cache (--enable-hierarchical-cache)")
    if str(args.kv_cache_dtype) not in KV_CACHE_DTYPES:
        found.append(
            f"block-scaled KV (--kv-cache-dtype {args.kv_cache_dtype}; the head-group pools "
            f"store {', '.join(KV_CACHE_DTYPES[1:])})"
        )
    if getattr(args, "tangram_kernels", None) == "flashinfer":
        if "fp8" in str(args.kv_cache_dtype):
            found.append("FP8 KV with --tangram-kernels flashinfer (the Triton kernels read FP8)")
        if args.dtype in ("float32", "float"):
            found.append("--dtype float32 with --tangram-kernels flashinfer (no fp32 FlashInfer)")
    fusion = getattr(args, "tangram_fusion", None) is not None
    if (fusion or getattr(args, "kv_compression", None) == "fastfusion") and args.tp_size > 1:
        found.append(
            f"Fast Fusion with tensor parallelism (--tp-size {args.tp_size}: each rank would "
            "fuse its own heads differently, and the ranks' pools must agree)"
        )
    cut_reuse = getattr(args, "tangram_cut_reuse", None)
    if cut_reuse is not None and cut_reuse > 0 and args.tp_size > 1:
        found.append(
            f"--tangram-cut-reuse {cut_reuse} with tensor parallelism (--tp-size "
            f"{args.tp_size}: each rank holds other heads, so each would judge a cut by its "
            "own, and the ranks must agree on every match; leave it at 0)"
        )
    if args.pp_size > 1:
        found.append(f"pipeline parallelism (--pp-size {args.pp_size})")
    if args.enable_dp_attention:
        found.append("data-parallel attention (--enable-dp-attention)")
    if args.disaggregation_mode not in (None, "null"):
        found.append(
            f"prefill/decode disaggregation (--disaggregation-mode {args.disaggregation_mode})"
        )
    if args.enable_lmcache:
        found.append("LMCache (--enable-lmcache)")
    if args.enable_flexkv:
        found.append("FlexKV (--enable-flexkv)")
    for flag in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        if getattr(args, flag) not in (None, BACKEND):
            found.append(
                f"another attention backend (--{flag.replace('_', '-')} {getattr(args, flag)})"
            )
    if args.radix_cache_backend not in (None, BACKEND):
        found.append(
            f"another radix cache backend (--radix-cache-backend {args.radix_cache_backend})"
        )
    if args.page_size not in (None, 1):
        found.append(f"paged KV (--page-size {args.page_size}; page size 1 only for now)")
    if args.enable_mixed_chunk:
        found.append("mixed prefill/decode batches (--enable-mixed-chunk)")
    return found


def graph_conflicts(server_args: Any, decode_blocker: str | None) -> list[str]:
    """CUDA graphs still on after SGLang resolved its graph flags (an explicit
    `--cuda-graph-backend-*` or `--cuda-graph-config` wins over the switches we set)."""
    config = server_args.cuda_graph_config
    found = []
    if config.prefill.backend != "disabled":
        found.append(
            f"prefill CUDA graphs (backend {config.prefill.backend!r} from "
            "--cuda-graph-backend-prefill or --cuda-graph-config; the tangram extend runs eagerly)"
        )
    if decode_blocker and config.decode.backend != "disabled":
        found.append(
            f"decode CUDA graphs (backend {config.decode.backend!r} from "
            f"--cuda-graph-backend-decode or --cuda-graph-config) with {decode_blocker}"
        )
    return found


def from_cli_args(original: Any, cls: type, args: argparse.Namespace) -> Any:
    config = TangramConfig.from_server_args(args)
    if not config.enabled:
        config.validate(args.model_path)  # refuses stray --tangram-* flags, reads nothing
        return original(cls, args)
    model_dir = _model_dir(args.model_path, getattr(args, "revision", None))
    hf_config = read_hf_config(model_dir)
    _refuse(
        config,
        unsupported(args) + model_conflicts(hf_config) + tp_conflicts(hf_config, args.tp_size),
    )
    broken = radix_self_test()
    if broken:
        raise ConfigError(
            f"--kv-compression {config.mode}: the tangram radix cache does not fit this SGLang: "
            + "; ".join(broken)
        )
    profile = config.validate(model_dir)
    if config.profile:  # every process must find it, whatever its working directory
        config = replace(config, profile=str(Path(config.profile).resolve()))
    args = argparse.Namespace(**vars(args))
    args.attention_backend = args.radix_cache_backend = BACKEND
    blocker = cuda_graph_blocker(args.device or get_device(), config.kernels)
    forced = dict(FORCED)
    if blocker:
        forced["disable_cuda_graph"] = f"no decode graphs with {blocker}"
    else:
        logger.info(
            "tangram: --kv-compression %s decodes in CUDA graphs (TANGRAM_CUDA_GRAPH=0 turns "
            "them off)",
            config.mode,
        )
    for flag, why in forced.items():
        if not getattr(args, flag, False):
            logger.info("tangram: --kv-compression %s sets %s (%s)", config.mode, flag, why)
        setattr(args, flag, True)
    server_args = original(cls, args)
    _refuse(config, unsupported(server_args) + graph_conflicts(server_args, blocker))
    server_args.override(SOURCE, **config.server_args_fields())
    logger.info(
        "tangram: --kv-compression %s, %d head group(s) at ratios %s holding %.3f of full KV "
        "per compressed token (the profile as calibrated at base ratio %s holds %.3f), method "
        "%s, Fast Fusion %s",
        config.mode,
        profile.num_groups,
        [round(r, 4) for r in profile.group_ratios(config.ratio)],
        config.ratio if config.ratio is not None else profile.held_ratio,
        profile.calibration.base_ratio,
        profile.held_ratio,
        config.scorer_method(profile),
        "off" if config.fusion_threshold is None else f"at {config.fusion_threshold}",
    )
    return server_args


def _refuse(config: TangramConfig, conflicts: list[str]) -> None:
    if conflicts:
        raise ConfigError(
            f"--kv-compression {config.mode} does not support: " + "; ".join(conflicts)
        )


def _model_dir(model_path: str, revision: str | None) -> str:
    """A local directory holding the model's config.json (a Hub id fetches only that file)."""
    if Path(model_path).is_dir():
        return model_path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_path, revision=revision, allow_patterns=["config.json"])
    except Exception as exc:
        raise ConfigError(
            f"--model-path {model_path}: cannot read its config.json for the Tangram checks: {exc}"
        ) from exc


HOOKS = (
    Hook("sglang.srt.server_args.ServerArgs.add_cli_args", add_flags, HookType.AFTER),
    Hook("sglang.srt.server_args.ServerArgs.from_cli_args", from_cli_args, HookType.AROUND),
)
