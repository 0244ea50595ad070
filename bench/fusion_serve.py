"""Fast Fusion served: KV held and accuracy on near-duplicate documents, SmolLM2 server.

Each sample is one needle task (`--task`, about `--words` words of essay around a hidden
fact and a question). Its first-turn prompt is sent `--batch` times in one `/generate`
call: the first copy as it is, the others with `--edits` document tokens each replaced by
another token of the same document (same length, same positions: documents that differ
in a few words, the case the offline report found fusion is for; the hidden fact and the
question are never edited). Every configuration serves the same batches from an empty
cache (`/flush_cache` between samples):

- `uniform-1.0`: every token kept, no fusion: the radix cache alone (it shares the copies'
  common prefix once the first finishes);
- `fastfusion-T`: every token kept, blocks fused at threshold T;
- `tangram-R` and `tangram-R+fusion-T`: the shipped HeadKV profile at memory share R,
  without and with fusion.

Reported per configuration: accuracy (the expected value in the answer), answers equal
to `uniform-1.0`'s token for token, and the KV the batch holds while it runs and once it
is cached, as shares of full KV ((layer, kv head) slots / (tokens x layers x kv heads)),
with the group slots fusion gave back.

`--one-by-one` sends a sample's copies one after the other instead (each its own batch,
the earlier ones cached by then: fusion across batches, and a later copy's match ending
inside the first one's compressed turn at its first edit); "KV once cached" is then what
the copies hold together. `--server-args` adds flags to every server (e.g.
`--tangram-cut-reuse 0`: reuse every such cut).

    python bench/fusion_serve.py --samples 6 --out bench/results/fusion-serve-<date>
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from serve import config_args, pool_state  # noqa: E402

from tangram_sglang.accuracy.chat import ChatFormat  # noqa: E402
from tangram_sglang.accuracy.paths import flush, held_group_slots  # noqa: E402
from tangram_sglang.accuracy.tasks import Haystack, correct, make_sample  # noqa: E402
from tangram_sglang.cpu.server import Launch, running_servers  # noqa: E402
from tangram_sglang.memory.budget import BudgetRule, kept_tokens  # noqa: E402
from tangram_sglang.offline.profile import ModelIdentity  # noqa: E402

PROFILE = ROOT / "profiles" / "smollm2-135m-instruct.headkv.yaml"
COMMON = ("--chunked-prefill-size", "8192", "--max-running-requests", "8")
COMMON += ("--schedule-policy", "fcfs")
BASELINE = "uniform-1.0"


def config_flags(name: str) -> list[str]:
    """A configuration of `bench/serve.py` (`uniform-R`, `fastfusion-T`, `tangram-R` and
    `+fusion-T`) as server flags, batches admitted whole and in arrival order."""
    flags, _ = config_args(name, PROFILE)
    return [*flags, *COMMON]


def protected_span(ids: list[int], tokenizer, statements, question_tokens: int) -> set[int]:
    """Positions never edited: the hidden statements' tokens, the template's head and the
    question at the end."""
    keep = set(range(min(24, len(ids)))) | set(range(len(ids) - question_tokens, len(ids)))
    for statement in statements:
        for text in (" " + statement, statement):
            sub = tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(len(ids) - len(sub) + 1):
                if ids[start : start + len(sub)] == sub:
                    keep |= set(range(start - 1, start + len(sub) + 1))
    return keep


def copies(ids: list[int], keep: set[int], batch: int, edits: int, rng: random.Random):
    """`batch` copies of `ids`, all but the first with `edits` tokens replaced."""
    free = [i for i in range(len(ids)) if i not in keep]
    out = [list(ids)]
    for _ in range(batch - 1):
        copy = list(ids)
        for at in rng.sample(free, min(edits, len(free))):
            copy[at] = ids[rng.choice(free)]
        out.append(copy)
    return out


def build_batches(args, tokenizer) -> list[dict]:
    chat, hay, rng = ChatFormat(tokenizer), Haystack(), random.Random(args.seed)
    batches = []
    for index in range(args.samples):
        sample = make_sample(args.task, index, args.words, seed=args.seed, hay=hay)
        turn = sample.turns[0]
        ids = chat.first(turn.user)
        question = chat.first(turn.user.rsplit("Question:", 1)[1])
        keep = protected_span(ids, tokenizer, sample.facts, len(question))
        prompts = copies(ids, keep, args.batch, args.edits, rng)
        batches.append({"prompts": prompts, "expected": turn.answer})
    return batches


def fusion_state(url: str) -> list[int]:
    pool = pool_state(url) or {}
    return list(pool["fusion"]["slots_given_back"]) if pool.get("fusion") else [0]


def running_share(pool: dict, prompts, replies, given: list[int], cells: int) -> float:
    """KV held while the batch decodes, as a share of full KV: each group's kept slots of
    every prompt (`kept_tokens` at its ratio) and decoded token, less what fusion gave back
    (the radix cache shares nothing yet: none of the copies is cached until it finishes)."""
    rule = BudgetRule(sink=pool["sink"], window=pool["window"])
    held = 0
    for g, (ratio, heads) in enumerate(zip(pool["ratios"], pool["heads_per_group"], strict=True)):
        kept = sum(
            kept_tokens(len(p), ratio, rule) + len(r["output_ids"]) - 1
            for p, r in zip(prompts, replies, strict=True)
        )
        held += heads * (kept - (given[g] if g < len(given) else 0))
    tokens = sum(len(p) + len(r["output_ids"]) - 1 for p, r in zip(prompts, replies, strict=True))
    return held / (tokens * cells)


def serve(server, batches, args, cells: int, chat: ChatFormat) -> list[dict]:
    params = {"temperature": 0.0, "max_new_tokens": args.max_new_tokens}
    out = []
    for batch in batches:
        flush(server.url)
        before = fusion_state(server.url)
        if args.one_by_one:  # each copy its own batch, after the previous one finished
            replies = [
                server.post("/generate", {"input_ids": p, "sampling_params": params}, timeout=600)
                for p in batch["prompts"]
            ]
        else:
            replies = server.post(
                "/generate", {"input_ids": batch["prompts"], "sampling_params": params}, timeout=600
            )
        time.sleep(0.2)  # the last request's slots reach the tree
        held = held_group_slots(server.url)
        pairs = zip(batch["prompts"], replies, strict=True)
        tokens = sum(len(p) + len(r["output_ids"]) - 1 for p, r in pairs)
        given = [a - b for a, b in zip(fusion_state(server.url), before, strict=True)]
        running = (
            None  # one by one, the earlier copies are cached while a copy runs: "once cached"
            if args.one_by_one
            else running_share(pool_state(server.url), batch["prompts"], replies, given, cells)
        )
        out.append(
            {
                "running_share": running,
                "answers": [r["output_ids"] for r in replies],
                "correct": [
                    correct(chat.text(r["output_ids"]), batch["expected"]) for r in replies
                ],
                "held_share": held / (tokens * cells),
                "given_back": given,
                "tokens": tokens,
            }
        )
    return out


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    base = results.get(BASELINE)
    table = {}
    for name, rows in results.items():
        answers = [a for r in rows for a in r["answers"]]
        same = None
        if base is not None:
            ref = [a for r in base for a in r["answers"]]
            same = sum(a == b for a, b in zip(answers, ref, strict=True)) / len(ref)
        table[name] = {
            "accuracy": sum(c for r in rows for c in r["correct"]) / len(answers),
            "same_answers_as_baseline": same,
            "running_share": None
            if rows[0]["running_share"] is None
            else sum(r["running_share"] * r["tokens"] for r in rows)
            / sum(r["tokens"] for r in rows),
            "held_share": sum(r["held_share"] * r["tokens"] for r in rows)
            / sum(r["tokens"] for r in rows),
            "slots_given_back": [
                sum(x) for x in zip(*(r["given_back"] for r in rows), strict=True)
            ],
            "answers": len(answers),
        }
    return table


def report_head(title: str, device: str) -> list[str]:
    """A CPU server report's first lines: the title and date, the command, the device."""
    return [
        f"# {title}, {time.strftime('%Y-%m-%d')}",
        "",
        f"- Command: `python bench/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}`",
        f"- Device: CPU, fp32, {device}",
    ]


def markdown(args, table: dict, seconds: float) -> str:
    lines = [
        *report_head(
            "Fast Fusion served on SmolLM2-135M-Instruct",
            f"SGLang 0.5.17 server per configuration; {seconds:.0f} s",
        ),
        f"- Workload: {args.samples} samples of `{args.task}` at ~{args.words} words; each sent "
        + (
            f"as {args.batch} copies one by one (each its own batch, after the previous one "
            "finished: fusion across batches)"
            if args.one_by_one
            else f"as one batch of {args.batch} copies"
        )
        + f", all but the first with {args.edits} document "
        "tokens replaced (same length and positions); greedy, "
        f"{args.max_new_tokens} new tokens",
        "- KV while running: (layer, kv head) slots the batch holds while it decodes (every "
        "group's kept slots, less what fusion gave back) / (tokens x layers x kv heads): what "
        "admission has left for other requests; none of the copies is cached yet",
        "- KV once cached: the same once the batch finished and the radix cache holds it (it "
        "shares the copies' common prefix; a copy whose compressed segment straddles that "
        "prefix's end is not cached, by the radix rule for compressed segments)",
        "",
        "| configuration | KV while running | KV once cached | accuracy % | same answers as "
        "uniform-1.0 % | slots given back by fusion, per group |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        same, running = row["same_answers_as_baseline"], row["running_share"]
        lines.append(
            f"| {name} | {'-' if running is None else f'{running:.3f}'} | "
            f"{row['held_share']:.3f} | "
            f"{100 * row['accuracy']:.1f} | "
            f"{'-' if same is None else f'{100 * same:.1f}'} | {row['slots_given_back']} |"
        )
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """Accuracy and answers equal to full KV's against the KV held while running."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = "running_share" if next(iter(table.values()))["running_share"] is not None else None
    share = share or "held_share"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, marker, label in (
        ("accuracy", "o", "accuracy"),
        ("same_answers_as_baseline", "s", f"answers = {BASELINE}'s"),
    ):
        xs = [row[share] for row in table.values()]
        ys = [100 * (row[key] or 0) for row in table.values()]
        ax.scatter(xs, ys, marker=marker, label=label)
    for i, (name, row) in enumerate(table.items()):  # labels alternate above and below
        ax.annotate(name, (row[share], 100 * row["accuracy"]), fontsize=7,
                    xytext=(4, 6 if i % 2 else -12), textcoords="offset points")  # fmt: skip
    ax.set_xlabel(
        "KV held while the batch runs (share of full KV)"
        if share == "running_share"
        else "KV held once the copies are cached (share of full KV)"
    )
    ax.set_ylabel("%")
    ax.set_title("Fast Fusion on near-copies of one document (SmolLM2, CPU server)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--configs",
        default="uniform-1.0,fastfusion-1.0,fastfusion-0.99,fastfusion-0.95,fastfusion-0.9,"
        "tangram-0.25,tangram-0.25+fusion-0.95",
    )
    ap.add_argument("--task", default="niah_single")
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--server-args", default="", help="extra flags for every server")
    ap.add_argument(
        "--one-by-one",
        action="store_true",
        help="send a sample's copies one after the other (fusion across batches)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parallel", type=int, default=2, help="servers started side by side")
    ap.add_argument("--out", type=Path, default=Path("fusion-serve"))
    ap.add_argument("--plot-only", type=Path, help="redraw the plot of a recorded JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text())["table"], args.plot_only.with_suffix(".png"))
        return 0

    from transformers import AutoTokenizer

    from tangram_sglang.models import smollm2

    started = time.monotonic()
    model_dir = smollm2.build()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = ModelIdentity.from_model_path(model_dir)
    cells = model.num_layers * model.num_kv_heads
    batches = build_batches(args, tokenizer)
    chat = ChatFormat(tokenizer)
    names = args.configs.split(",")
    extra = args.server_args.split()
    launches = {n: Launch([*config_flags(n), *extra], attention=None) for n in names}
    results: dict[str, list[dict]] = {}
    logs = Path(tempfile.mkdtemp(prefix="fusion-serve-logs-"))  # the servers' logs
    for i in tqdm(range(0, len(names), args.parallel), desc="servers"):
        group = {n: launches[n] for n in names[i : i + args.parallel]}
        with running_servers(model_dir, logs, group) as servers:
            for name, server in servers.items():
                results[name] = serve(server, batches, args, cells, chat)
    table = summarize(results)
    seconds = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "table": table,
        "seconds": seconds,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    text = markdown(args, table, seconds)
    args.out.with_suffix(".md").write_text(text)
    plot(table, args.out.with_suffix(".png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
