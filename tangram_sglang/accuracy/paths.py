"""The configurations the benchmark compares, and the two paths that run them.

A `Setting` is one KV configuration: full KV, or `uniform` / `tangram` at a memory share R
(`--tangram-ratio R`: both hold R of full KV per compressed token, so they compare at equal
bytes). It gives the reference path its per-head ratios and the server its flags.

`run_reference` prefills each sample once and branches every setting off the same KV;
`run_server` plays the same token ids through a running server's `/generate`, one session
at a time (a batch's other requests could move float near-ties), flushing the radix cache
before each sample (the server's warm-up request is cached too) so that every sample starts
from an empty pool, as on the reference path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from tangram_sglang.accuracy.chat import ChatFormat
from tangram_sglang.accuracy.hf_path import Conversation, HeadBudgets
from tangram_sglang.accuracy.tasks import Sample, correct
from tangram_sglang.memory.budget import BudgetRule
from tangram_sglang.offline.profile import Profile


@dataclass(frozen=True)
class Setting:
    """`mode` full, uniform or tangram at memory share `ratio`, scoring with `method`;
    tangram's profile is `profile`, else the run's main profile (`tag` names another one)."""

    mode: str
    ratio: float = 1.0
    method: str = "snapkv"
    profile: Path | None = None
    tag: str = ""

    @property
    def name(self) -> str:
        if self.mode == "full":
            return "full"
        tag = f"[{self.tag}]" if self.tag else ""
        return f"{self.mode}{tag}_{round(self.ratio * 100):g}"

    def budgets(self, main: Profile) -> HeadBudgets:
        m = main.model
        if self.mode == "full":
            return HeadBudgets(self.name, None, self.method)
        if self.mode == "uniform":
            ratios = np.full((m.num_layers, m.num_kv_heads), self.ratio)
        else:
            profile = Profile.load(self.profile) if self.profile else main
            ratios = np.asarray(profile.group_ratios(self.ratio))[np.asarray(profile.group_of())]
        return HeadBudgets(self.name, ratios, self.method)

    def server_args(self, main_profile: Path) -> list[str]:
        """Flags on top of the CPU server's; full KV is stock SGLang (no plugin).

        Overlap scheduling off: the reference path models SGLang's plain schedule, where a
        turn's last answer token never runs through the model. With overlap SGLang runs
        it one step ahead and caches its KV, so the next turn reuses it as a one-token
        segment instead of computing it in that turn's (compressed) extend.
        """
        common = ["--chunked-prefill-size", "8192", "--max-running-requests", "8"]
        common += ["--disable-overlap-schedule"]
        if self.mode == "full":
            return common
        args = ["--kv-compression", self.mode, "--tangram-ratio", str(self.ratio)]
        args += ["--tangram-method", self.method]
        if self.mode == "tangram":
            args += ["--tangram-profile", str(self.profile or main_profile)]
        return [*args, *common]


@dataclass
class TurnResult:
    output: list[int]
    text: str
    right: bool
    cached: int | None = None  # server: radix-cached prompt tokens
    held: int | None = None  # (layer, kv head) slots held after the turn (None: stock server)


@dataclass
class SampleResult:
    task: str
    index: int
    setting: str
    turns: list[TurnResult] = field(default_factory=list)
    prompt_tokens: int = 0  # turn 1
    kv_tokens: int = 0  # tokens with KV after the last turn (all but the last answer token)
    held_slots: int | None = None  # (layer, kv head) slots held then (server: None if stock)
    context_share: float | None = None  # share of full KV the turn-1 prompt holds


def run_reference(
    model,
    chat: ChatFormat,
    rule: BudgetRule,
    sample: Sample,
    settings: Sequence[Setting],
    profile: Profile,
    max_new_tokens: int,
) -> list[SampleResult]:
    """Every setting on one sample; turn 1 is prefilled once for all of them."""
    first = chat.first(sample.turns[0].user)
    root = Conversation(model, HeadBudgets("root", None), rule, eos=[chat.eos])
    branches = root.branch(first, [s.budgets(profile) for s in settings])
    slots_per_token = profile.model.num_layers * profile.model.num_kv_heads
    results = []
    for setting, conv in zip(settings, branches, strict=True):
        result = SampleResult(sample.task, sample.index, setting.name, prompt_tokens=len(first))
        result.context_share = conv.masks.held_slots() / (slots_per_token * len(first))
        output: list[int] = []
        for t, turn in enumerate(sample.turns):
            if t:
                conv.extend(chat.follow(turn.user, output))
            output = conv.answer(max_new_tokens)
            text = chat.text(output)
            held = conv.masks.held_slots()
            result.turns.append(TurnResult(output, text, correct(text, turn.answer), held=held))
        result.held_slots = conv.masks.held_slots()
        result.kv_tokens = conv.length
        results.append(result)
    return results


class ServerSession:
    """One conversation through `/generate` with token ids, greedy."""

    def __init__(self, url: str, chat: ChatFormat, max_new_tokens: int) -> None:
        self.url, self.chat, self.max_new_tokens = url, chat, max_new_tokens
        self.history: list[int] = []

    def turn(self, new_ids: Sequence[int]) -> tuple[list[int], int]:
        ids = [*self.history, *new_ids]
        params = {"temperature": 0.0, "max_new_tokens": self.max_new_tokens}
        reply = requests.post(
            f"{self.url}/generate", json={"input_ids": ids, "sampling_params": params}, timeout=600
        )
        reply.raise_for_status()
        body = reply.json()
        output = list(body["output_ids"])
        self.history = [*ids, *output]
        return output, int(body["meta_info"]["cached_tokens"])


def flush(url: str, attempts: int = 50) -> None:
    """`/flush_cache`, retried while SGLang still counts a just-finished request as pending
    (it answers 400 for a moment after a reply)."""
    for _ in range(attempts):
        if requests.post(f"{url}/flush_cache", timeout=30).ok:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{url}/flush_cache kept refusing (requests still pending?)")


def held_group_slots(url: str) -> int | None:
    """(layer, kv head) slots the server's groups hold (None on a stock server)."""
    info = requests.get(f"{url}/server_info", timeout=30).json()
    pool = info["internal_states"][0].get("tangram_pool")
    if pool is None:
        return None
    used = [s - f for s, f in zip(pool["slots"], pool["free_slots"], strict=True)]
    return int(sum(u * h for u, h in zip(used, pool["heads_per_group"], strict=True)))


def run_server(
    url: str,
    chat: ChatFormat,
    sample: Sample,
    setting: Setting,
    max_new_tokens: int,
    on_turn: Callable[[], None] | None = None,
) -> SampleResult:
    flush(url)  # an empty pool (the server's warm-up request stays in its radix cache)
    session = ServerSession(url, chat, max_new_tokens)
    result = SampleResult(sample.task, sample.index, setting.name)
    output: list[int] = []
    for t, turn in enumerate(sample.turns):
        new = chat.first(turn.user) if t == 0 else chat.follow(turn.user, output)
        if t == 0:
            result.prompt_tokens = len(new)
        output, cached = session.turn(new)
        text = chat.text(output)
        held = held_group_slots(url)
        result.turns.append(TurnResult(output, text, correct(text, turn.answer), cached, held))
        if on_turn is not None:
            on_turn()
    result.kv_tokens = len(session.history) - 1
    result.held_slots = result.turns[-1].held
    return result
