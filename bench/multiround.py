"""Multi-round QA client of LMCache's shape, a peer cross-check of bench/serve.py.

LMCache's `benchmarks/multi-round-qa/multi-round-qa.py` (also vLLM production-stack's
benchmark) simulates `--num-users` users at once, each opening with one system prompt
shared by all users plus its own history, then asking `--num-rounds` short questions, each
answered in `--answer-len` tokens; users send at `--qps` overall, one user every
`num_users / qps` seconds, never before its previous answer came back. Its published
command (README): 10 users, 5 rounds, qps 0.5, shared system prompt 1,000 tokens, user
history 2,000, answer 100 (question: its one ~20-token sentence).

Here every token length is that default times `--scale` (the CPU runs the same shape
smaller; users, rounds and qps stay), token ids are random (no tokenizer), and the users
are a fixed cohort: user i starts at i / qps and runs all its rounds, so every
configuration gets the same requests. (LMCache instead starts in a simulated steady state
and lets new users join for `--time` seconds.) Requests go to SGLang's `/generate` through
bench/serve.py's streaming client, which records the same metrics as our benchmark.

    .venv/bin/python bench/multiround.py --model smollm2 --max-total-tokens 6000 \\
        --configs stock,uniform-0.25,tangram-0.25 --out /tmp/multiround
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402
import workloads  # noqa: E402

SOURCE = (
    "LMCache benchmarks/multi-round-qa/multi-round-qa.py, README command: --num-users 10 "
    "--num-rounds 5 --qps 0.5 --shared-system-prompt 1000 --user-history-prompt 2000 "
    "--answer-len 100"
)

KIND = "lmcache-multi-round-qa"


@dataclass(frozen=True)
class MultiRoundQA:
    """The workload's parameters, LMCache's published ones by default (lengths in tokens)."""

    num_users: int = 10
    num_rounds: int = 5
    qps: float = 0.5
    shared_system_prompt: int = 1000
    user_history_prompt: int = 2000
    answer_len: int = 100
    question_len: int = 20

    def scaled(self, scale: float) -> MultiRoundQA:
        """Every length times `scale` (at least one token; answers at least two, so each
        has an inter-token latency)."""

        def n(tokens: int, least: int = 1) -> int:
            return max(least, round(tokens * scale))

        return MultiRoundQA(
            self.num_users, self.num_rounds, self.qps, n(self.shared_system_prompt),
            n(self.user_history_prompt), n(self.answer_len, 2), n(self.question_len),
        )  # fmt: skip

    def sessions(self, seed: int, vocab: int, low: int = 10) -> list[workloads.Session]:
        """One session per user: round 1 is the shared system prompt, the user's history
        and a question; each later round a new question after the whole history."""
        rng = random.Random(seed)

        def ids(count: int) -> list[int]:
            return [rng.randrange(low, vocab) for _ in range(count)]

        system, gap = ids(self.shared_system_prompt), self.num_users / self.qps
        out = []
        for user in range(self.num_users):
            first = system + ids(self.user_history_prompt) + ids(self.question_len)
            turns = [workloads.Turn(first, self.answer_len)] + [
                workloads.Turn(ids(self.question_len), self.answer_len)
                for _ in range(self.num_rounds - 1)
            ]
            pauses = [0.0] * (self.num_rounds - 1)
            out.append(workloads.Session(user, KIND, user / self.qps, pauses, turns, gap))
        return out


PUBLISHED = MultiRoundQA()


def describe(
    shape: MultiRoundQA, sessions: list[workloads.Session], scale: float, seed: int
) -> dict:
    """Every parameter of a run, its source and the tokens it sends, for the results."""
    return {
        "kind": KIND,
        "source": SOURCE,
        "scale": scale,
        **asdict(shape),
        "per_user_gap_s": shape.num_users / shape.qps,
        "arrival": "user i starts at i / qps (a fixed cohort)",
        "seed": seed,
        "turns": sum(len(s.turns) for s in sessions),
        "new_prompt_tokens": sum(len(t.new_ids) for s in sessions for t in s.turns),
    }


def add_workload_options(ap: argparse.ArgumentParser) -> None:
    """One flag per parameter (default: LMCache's, lengths times `--scale`), and the seed."""
    for field, value in asdict(PUBLISHED).items():
        flag = "--" + field.replace("_", "-")
        times = "" if field in ("num_users", "num_rounds", "qps") else " x --scale"
        ap.add_argument(flag, type=type(value), help=f"default: LMCache's {value}{times}")
    ap.add_argument("--scale", type=float, default=0.3, help="multiplies every length")
    ap.add_argument("--seed", type=int, default=0)


def workload_from(args: argparse.Namespace) -> MultiRoundQA:
    """LMCache's parameters at `--scale`; a parameter's flag, if given, is taken as is."""
    given = {k: getattr(args, k) for k in asdict(PUBLISHED) if getattr(args, k) is not None}
    return replace(PUBLISHED.scaled(args.scale), **given)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_options(ap)
    serve.add_server_options(ap)
    ap.set_defaults(workload=KIND)
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("--out is required")
    model, vocab = serve.model_and_vocab(args, Path(tempfile.mkdtemp(prefix="multiround-")))
    shape = workload_from(args)
    sessions = shape.sessions(args.seed, vocab)
    record = {
        "command": serve.command_line("bench/multiround.py", argv),
        "workload": {
            **describe(shape, sessions, args.scale, args.seed),
            "max_total_tokens": None if args.url else args.max_total_tokens,
        },
        # every user may have a request in flight: no client-side cap
        "runs": serve.run_configs(args, model, sessions, [shape.num_users]),
    }
    return serve.write(record, Path(args.out), args)


if __name__ == "__main__":
    sys.exit(main())
