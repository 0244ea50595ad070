"""Peer clients as cross-checks of bench/serve.py: the same configurations under the same
memory-bound pool, driven by clients we did not design.

Per configuration one server (bench/serve.py's `config_launch`, `--max-total-tokens` for
stock's pool) serves, after a `/flush_cache` each:
(1) SGLang's own `python -m sglang.benchmark.serving --dataset-name
    generated-shared-prefix` (bench/cpu_speed.py's helper): `--gsp-groups` system prompts
    of `--gsp-system` tokens, `--gsp-prompts-per-group` questions each, shuffled, at most
    `--gsp-max-concurrency` in flight; SGLang's client reports the cached prompt tokens,
    and `/v1/loads` (polled) how many requests the server ran at once;
(2) LMCache's multi-round QA shape (bench/multiround.py) at `--scale`.
Writes OUT.json and OUT.md with both tables and ratios to stock from the same run.

    .venv/bin/python bench/peers.py --model smollm2 --max-total-tokens 6000 \\
        --out bench/results/serve-2026-12-05-cpu-peers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multiround  # noqa: E402
import serve  # noqa: E402
from cpu_speed import sglang_bench_serving  # noqa: E402


@dataclass(frozen=True)
class SharedPrefix:
    """SGLang's generated-shared-prefix load: sizes in tokens."""

    groups: int
    prompts_per_group: int
    system: int
    question: int
    output: int
    max_concurrency: int

    def run(self, url: str, model: Path, work: Path) -> dict:
        """SGLang's client against the server at `url`, with the server's own count of
        running and queued requests beside it."""
        with serve.LoadPoller(url) as poller:
            result = sglang_bench_serving(
                url, model, work, self.groups * self.prompts_per_group, self.output,
                groups=self.groups, system=self.system, question=self.question,
                extra=["--max-concurrency", str(self.max_concurrency)],
            )  # fmt: skip
        result["prefilled_tokens"] = result["total_input_tokens"] - result["cached_tokens"]
        result["max_running_requests"] = poller.max_running
        result["max_running_while_queued"] = poller.max_running_queued
        return result

    @property
    def least_prefill(self) -> int:
        """Prompt tokens computed with a cache that never evicts: each system prompt once,
        every question."""
        return self.groups * (self.system + self.prompts_per_group * self.question)


def vs(runs: dict[str, dict], name: str, key) -> str:
    """`name`'s figure over stock's, or nothing without stock."""
    if "stock" not in runs or not key(runs["stock"]):
        return ""
    return f"{key(runs[name]) / key(runs['stock']):.2f}x"


def markdown(record: dict) -> str:
    gsp, mr = record["sglang_gsp"], record["multiround"]
    lines = [
        f"# Peer clients, {record['date']}",
        "",
        f"Device: {record['device']}; model {record['model']}; every server's pool "
        f"`--max-total-tokens {record['max_total_tokens']}`. Command: `{record['command']}`",
        "",
        "## (1) SGLang `benchmark.serving`, generated shared prefix",
        "",
        f"Parameters: {json.dumps(gsp['parameters'])}; the least prefill any cache allows "
        f"(each system prompt once, every question): about {gsp['least_prefill']:,} tokens.",
        f"`{gsp['command']}`",
        "",
        "| config | output tok/s | vs stock | req/s | TTFT mean / p50 / p99 ms | TPOT mean ms "
        "| cached / prompt tokens | prefilled | mean in flight (client) "
        "| most running (queued), server |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in gsp["runs"].items():
        lines.append(
            f"| {name} | {r['output_throughput']} "
            f"| {vs(gsp['runs'], name, lambda x: x['output_throughput'])} "
            f"| {r['request_throughput']} "
            f"| {r['mean_ttft_ms']} / {r['median_ttft_ms']} / {r['p99_ttft_ms']} "
            f"| {r['mean_tpot_ms']} | {r['cached_tokens']:,} / {r['total_input_tokens']:,} "
            f"| {r['prefilled_tokens']:,} | {r['concurrency']} "
            f"| {r['max_running_requests']} ({r['max_running_while_queued']}) |"
        )
    top = {name: run["sweep"][-1] for name, run in mr["runs"].items()}
    lines += [
        "",
        "## (2) LMCache multi-round QA shape (`bench/multiround.py`)",
        "",
        f"Parameters: {json.dumps(mr['workload'])}",
        "",
        *serve.sweep_table(mr["runs"]),
        "",
        "Against stock: output tok/s "
        + ", ".join(f"{n} {vs(top, n, lambda x: x['output_tok_s'])}" for n in top)
        + "; TTFT p50 "
        + ", ".join(f"{n} {vs(top, n, lambda x: x['ttft_ms']['p50'])}" for n in top)
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gsp-groups", type=int, default=8)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=4)
    ap.add_argument("--gsp-system", type=int, default=1000)
    ap.add_argument("--gsp-question", type=int, default=32)
    ap.add_argument("--gsp-output", type=int, default=32)
    ap.add_argument("--gsp-max-concurrency", type=int, default=4)
    multiround.add_workload_options(ap)
    serve.add_server_options(ap)
    ap.add_argument("--resume", action="store_true", help="keep OUT.json's configurations")
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out is required")
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    model, vocab = serve.model_and_vocab(args, work)
    gsp = SharedPrefix(
        args.gsp_groups, args.gsp_prompts_per_group, args.gsp_system, args.gsp_question,
        args.gsp_output, args.gsp_max_concurrency,
    )  # fmt: skip
    shape = multiround.workload_from(args)
    sessions = shape.sessions(args.seed, vocab)
    gsp_runs: dict[str, dict] = {}
    mr_runs: dict[str, dict] = {}
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": args.device,
        "model": args.model,
        "max_total_tokens": None if args.url else args.max_total_tokens,
        "command": serve.command_line("bench/peers.py", argv),
        "sglang_gsp": {
            "parameters": asdict(gsp),
            "least_prefill": gsp.least_prefill,
            "runs": gsp_runs,
        },  # fmt: skip
        "multiround": {
            "workload": multiround.describe(shape, sessions, args.scale, args.seed),
            "runs": mr_runs,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and Path(f"{out}.json").is_file():
        earlier = json.loads(Path(f"{out}.json").read_text())
        for part in ("sglang_gsp", "multiround"):
            key = "parameters" if part == "sglang_gsp" else "workload"
            if earlier[part][key] != record[part][key]:
                ap.error(f"{out}.json ran other {part} parameters: {earlier[part][key]}")
            record[part]["runs"].update(earlier[part]["runs"])
        record["command"] = f"{earlier['command']} ; {record['command']}"

    def save() -> None:
        """After every client of every configuration: a long run that fails keeps these."""
        Path(f"{out}.json").write_text(json.dumps(record, indent=1) + "\n")
        Path(f"{out}.md").write_text(markdown(record))

    running = max(shape.num_users, gsp.max_concurrency) + 8
    split = serve.split_shape(args, sessions)  # tangram's pools split for the multi-round shape
    for name in serve.config_names(args):
        with serve.serving(args, name, model, running, work / "logs", split) as url:
            gsp_runs[name] = gsp.run(url, model, work)
            record["sglang_gsp"]["command"] = gsp_runs[name]["command"]
            save()
            mr_runs[name] = serve.drive(url, sessions, [shape.num_users], name)
            save()
        print(f"{name}: gsp {gsp_runs[name]['output_throughput']} tok/s, multi-round "
              f"{mr_runs[name]['sweep'][-1]['output_tok_s']} tok/s", flush=True)  # fmt: skip
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
