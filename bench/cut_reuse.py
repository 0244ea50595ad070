"""What `--tangram-cut-reuse` does to a shared system prompt, SmolLM2 server (CPU, fp32).

Sessions open with the same `--system` tokens followed by a long first user turn of their
own (`--user` tokens), then a second turn (the whole history plus `--follow` tokens). The
first session's first turn is compressed as one segment, so every later session's match
ends inside it, at the system prompt's end: a cut. Per `--shares` value, one server: the
cached tokens of each session's two turns and the server's count of judged cuts.

    python bench/cut_reuse.py --out bench/results/cut-reuse-<date>
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from fusion_serve import report_head  # noqa: E402
from serve import config_args, pool_state  # noqa: E402

from tangram_sglang.accuracy import corpus  # noqa: E402
from tangram_sglang.cpu.server import Launch, running_servers  # noqa: E402

PROFILE = ROOT / "profiles" / "smollm2-135m-instruct.headkv.yaml"


def sessions(server, text: list[int], args) -> list[dict]:
    """Each session's two turns: prompt lengths and cached tokens."""
    system, rows = text[: args.system], []
    for i in range(args.sessions):
        start = args.system + i * args.user
        first = system + text[start : start + args.user]
        reply = server.generate(first, args.new_tokens)
        second = first + reply["output_ids"] + text[-args.follow :]
        again = server.generate(second, args.new_tokens)
        rows.append(
            {
                "first": [len(first), reply["meta_info"]["cached_tokens"]],
                "second": [len(second), again["meta_info"]["cached_tokens"]],
            }
        )
    return rows


def markdown(args, results: dict, seconds: float) -> str:
    lines = [
        *report_head(
            "`--tangram-cut-reuse` and a shared system prompt",
            f"SmolLM2-135M-Instruct, `{args.config}` with the shipped HeadKV profile, one "
            f"server per share; {seconds:.0f} s",
        ),
        f"- {args.sessions} sessions: the same {args.system} system tokens, then {args.user} "
        f"tokens of their own (the shipped essays), {args.new_tokens} answer tokens; a second turn "
        f"adds {args.follow} tokens. Sessions run one after the other.",
        "",
        "| --tangram-cut-reuse | first turns: cached tokens per session | second turns: "
        "cached / prompt tokens per session | cuts reused / recomputed |",
        "|---|---|---|---|",
    ]
    for share, run in results.items():
        firsts = ", ".join(str(r["first"][1]) for r in run["sessions"])
        seconds_ = ", ".join(f"{r['second'][1]}/{r['second'][0]}" for r in run["sessions"])
        cuts = run["cuts"]
        lines.append(
            f"| {share} | {firsts} | {seconds_} | {cuts['reused']} / {cuts['recomputed']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tangram-0.25")
    ap.add_argument("--shares", default="0,0.5")
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--system", type=int, default=256)
    ap.add_argument("--user", type=int, default=1024)
    ap.add_argument("--follow", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("cut-reuse"))
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from tangram_sglang.models import smollm2

    started = time.monotonic()
    model_dir = smollm2.build()
    essays = "\n\n".join(corpus.essays("tasks"))  # the accuracy tasks' shipped haystack
    text = AutoTokenizer.from_pretrained(model_dir)(essays)["input_ids"]
    need = args.system + args.sessions * args.user + args.follow
    if len(text) < need:
        ap.error(f"the essays have {len(text)} tokens, the sessions need {need}")
    flags, _ = config_args(args.config, PROFILE)
    launches = {
        share: Launch([*flags, "--tangram-cut-reuse", share], attention=None)
        for share in args.shares.split(",")
    }
    results = {}
    logs = Path(tempfile.mkdtemp(prefix="cut-reuse-logs-"))
    with running_servers(model_dir, logs, launches) as servers:
        for share, server in servers.items():
            rows = sessions(server, text, args)
            cuts = pool_state(server.url)["lossy_cuts"]
            results[share] = {"sessions": rows, "cuts": cuts}
    seconds = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    text_md = markdown(args, results, seconds)
    args.out.with_suffix(".md").write_text(text_md)
    print(text_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
