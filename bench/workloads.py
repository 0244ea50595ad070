"""Multi-turn session workloads as JSONL any client can replay (one session per line).

Four shapes, lengths in tokens, drawn from a seed:
- `shared-context` (SCBench's multi-turn mode): one long document, then 3-8 follow-up
  questions about it; the sessions share nothing but their shape.
- `similar-documents`: the same shape, but every session's document is a copy of one
  template with about 1% of its tokens replaced (versions of one contract or form: same
  length, same positions), the case Fast Fusion is for.
- `chat`: a shared system prompt, then 4-10 turns whose user and answer lengths are drawn
  from log-normal distributions.
- `agent`: a shared system prompt with tool descriptions, then 5-20 steps, each appending
  a long tool output (1-8K tokens) and a short instruction.

Sessions arrive as a Poisson process (`--rate` sessions/s; 0: all at once) and wait a
think time (exponential, `--think` s mean) between turns. Token ids are random (no
tokenizer is needed; a server started with `--skip-tokenizer-init` serves them) in
[`--low`, `--vocab`), and a turn's prompt is the whole history: the previous prompt, the
server's real answer, then the turn's new tokens. `--scale` multiplies every length, so
the CPU runs the same shapes smaller.

    python bench/workloads.py shared-context --sessions 16 --scale 0.1 --out wl.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tangram_sglang.memory.budget import Workload

KINDS = ("shared-context", "similar-documents", "chat", "agent")
EDITED = 0.01  # share of a similar document's tokens that differ from the template


@dataclass
class Turn:
    """One turn: the new tokens appended after the history, and the answer length."""

    new_ids: list[int]
    max_tokens: int


@dataclass
class Session:
    """One session's turns; a follow-up turn is sent `think_s` after the previous answer
    and no sooner than `gap_s` after the previous send (a paced user, as LMCache's
    multi-round QA sends one per user every `users / qps` seconds)."""

    session_id: int
    kind: str
    arrival_s: float
    think_s: list[float]
    turns: list[Turn] = field(default_factory=list)
    gap_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> Session:
        data = json.loads(line)
        data["turns"] = [Turn(**t) for t in data["turns"]]
        return cls(**data)


class Generator:
    """Draws sessions of one kind; every length goes through `n()` (scaled, at least 1)."""

    def __init__(self, kind: str, seed: int, scale: float, vocab: int, low: int) -> None:
        if kind not in KINDS:
            raise ValueError(f"workload {kind!r} is not one of {', '.join(KINDS)}")
        self.kind, self.scale, self.vocab, self.low = kind, scale, vocab, low
        self.rng = random.Random(seed)
        # Shared by every session of the run: chat's and agent's system prompts, and the
        # template of the similar documents (drawn at its first use: the other kinds' draws
        # stay as they were).
        self.system = self.ids(self.n(512 if kind == "chat" else 2048))
        self.template: list[int] | None = None

    def n(self, tokens: float) -> int:
        return max(1, round(tokens * self.scale))

    def answer(self, tokens: float) -> int:
        """Answers keep at least 16 tokens at any scale (inter-token latency needs some)."""
        return max(16, self.n(tokens))

    def ids(self, count: int) -> list[int]:
        return [self.rng.randrange(self.low, self.vocab) for _ in range(count)]

    def lognormal(self, median: float, low: float, high: float) -> int:
        return self.n(min(high, max(low, self.rng.lognormvariate(0.0, 0.6) * median)))

    def document(self) -> list[int]:
        """A new document, or (similar-documents) the template with EDITED of it replaced."""
        r = self.rng
        if self.kind == "shared-context":
            return self.ids(self.n(r.uniform(2048, 65536)))
        if self.template is None:
            self.template = self.ids(self.n(r.uniform(2048, 65536)))
        document = list(self.template)
        for at in r.sample(range(len(document)), max(1, round(EDITED * len(document)))):
            document[at] = r.randrange(self.low, self.vocab)
        return document

    def turns(self) -> list[Turn]:
        r = self.rng
        if self.kind in ("shared-context", "similar-documents"):
            document = self.document()
            questions = r.randint(3, 8)
            first = Turn(document + self.ids(self.n(r.uniform(32, 96))), self.answer(64))
            follow = [
                Turn(self.ids(self.n(r.uniform(32, 96))), self.answer(64))
                for _ in range(questions - 1)
            ]
            return [first, *follow]
        if self.kind == "chat":
            count = r.randint(4, 10)
            return [
                Turn(
                    (self.system if t == 0 else []) + self.ids(self.lognormal(128, 16, 1024)),
                    max(16, self.lognormal(192, 16, 1024)),
                )
                for t in range(count)
            ]
        steps = r.randint(5, 20)
        task = self.ids(self.n(r.uniform(64, 256)))
        turns = [Turn(self.system + task, self.answer(96))]
        for _ in range(steps - 1):
            tool_output = self.ids(self.n(r.uniform(1024, 8192)))
            turns.append(Turn(tool_output + self.ids(self.n(32)), self.answer(96)))
        return turns

    def sessions(self, count: int, rate: float, think: float) -> list[Session]:
        clock, out = 0.0, []
        for i in range(count):
            if rate > 0 and i:
                clock += self.rng.expovariate(rate)
            turns = self.turns()
            pauses = [self.rng.expovariate(1 / think) if think > 0 else 0.0 for _ in turns[1:]]
            out.append(Session(i, self.kind, round(clock, 4), [round(p, 4) for p in pauses], turns))
        return out


def generate(
    kind: str,
    sessions: int,
    seed: int = 0,
    scale: float = 1.0,
    rate: float = 0.0,
    think: float = 0.0,
    vocab: int = 32000,
    low: int = 10,
) -> list[Session]:
    return Generator(kind, seed, scale, vocab, low).sessions(sessions, rate, think)


def pool_shape(sessions: list[Session]) -> str:
    """The sessions' mean shape as `--tangram-workload CONTEXT,TURNS,USER,ANSWER`: the
    head-group pools are split for one session shape (an uncompressed token costs a slot in
    every group, a compressed one its group's ratio), so a server split for another shape
    runs out of its tightest group early (bench/results/gpu-2026-12-06b-h100.md, section 4)."""
    if not sessions:
        raise ValueError("pool_shape: no sessions")
    follow = [len(t.new_ids) for s in sessions for t in s.turns[1:]]
    first = sum(len(s.turns[0].new_ids) for s in sessions) / len(sessions)
    user = sum(follow) / len(follow) if follow else 0.0
    answers = [t.max_tokens for s in sessions for t in s.turns]
    turns = sum(len(s.turns) for s in sessions) / len(sessions)
    return Workload(
        context=round(max(1.0, first - user)),
        turns=round(max(1.0, turns)),
        user_tokens=round(user),
        answer_tokens=round(sum(answers) / len(answers)),
    ).flag()


def save(sessions: list[Session], path: str | Path) -> None:
    Path(path).write_text("".join(s.to_json() + "\n" for s in sessions))


def load(path: str | Path) -> list[Session]:
    return [Session.from_json(line) for line in Path(path).read_text().splitlines() if line]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("--sessions", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every length")
    ap.add_argument("--rate", type=float, default=0.0, help="session arrivals per second")
    ap.add_argument("--think", type=float, default=0.0, help="mean think time between turns")
    ap.add_argument("--vocab", type=int, default=32000, help="token ids below this")
    ap.add_argument("--low", type=int, default=10, help="token ids from this (skip specials)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sessions = generate(
        args.kind, args.sessions, args.seed, args.scale, args.rate, args.think, args.vocab, args.low
    )
    save(sessions, args.out)
    tokens = sum(len(t.new_ids) for s in sessions for t in s.turns)
    print(f"{args.out}: {len(sessions)} {args.kind} sessions, {tokens} new prompt tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
