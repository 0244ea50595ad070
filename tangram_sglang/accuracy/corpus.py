"""The haystack and calibration text: essays the reference model wrote itself.

    python -m tangram_sglang.accuracy.corpus essays       # writes data/essays.jsonl (once)
    python -m tangram_sglang.accuracy.corpus calibration --out calib.jsonl

No text corpus can be downloaded here, so the model writes its own: one essay per topic
and prompt style below, sampled with transformers (temperature 0.7, top-p 0.9, repetition
penalty 1.1, a seed per batch), as SmolLM2-135M-Instruct (Apache-2.0) writes it; the text
is ours to ship. Degenerate samples (short, or looping) are dropped. Essays are split by
index: `CALIBRATION` for profiles, the rest for the accuracy tasks, so a profile never
sees a task's haystack.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data" / "essays.jsonl"
SOURCE = (
    "essays written by SmolLM2-135M-Instruct (Apache-2.0) itself, sampled with "
    "transformers (tangram_sglang.accuracy.corpus)"
)
STYLES = (
    "Write a detailed, factual article about {topic}. Use several paragraphs.",
    "Explain {topic} to a curious reader in a few paragraphs, with examples.",
)
TOPICS = (
    "the history of the bicycle", "how bees make honey", "the water cycle",
    "the invention of the printing press", "volcanoes", "the life of octopuses",
    "how bridges are built", "the Silk Road", "coral reefs", "the history of tea",
    "how airplanes fly", "the Roman aqueducts", "photosynthesis", "the Great Wall of China",
    "how vaccines work", "the history of chess", "deserts", "the moon landing",
    "how compasses work", "the Amazon rainforest", "the history of paper money",
    "lighthouses", "the human heart", "glaciers", "the history of the violin",
    "how bread is made", "migratory birds", "the invention of the telephone",
    "the Sahara desert", "how solar panels work", "ancient Egyptian pyramids",
    "the history of coffee", "earthquakes", "the life of elephants", "how rainbows form",
    "the history of the Olympic Games", "recycling", "the Industrial Revolution",
    "how trains changed travel", "the deep ocean", "the history of medicine",
    "wolves", "how clocks keep time", "the Renaissance", "mushrooms and fungi",
    "the history of maps", "how cheese is made", "the northern lights",
    "the history of writing", "penguins", "how windmills work", "the Vikings",
    "rivers and deltas", "the history of the piano", "how the internet works",
    "tornadoes", "the history of gardens", "dolphins", "how glass is made",
    "the history of the theater", "the rainforest canopy", "how ships navigate",
    "the history of astronomy", "salt and its uses", "the life of ants",
    "how dams produce electricity", "ancient Greek philosophy", "tides",
    "the history of cooking", "owls", "how paper is made", "the history of trade",
    "mountain climbing", "the history of railways", "butterflies", "how snow forms",
    "the history of castles", "forests in winter", "how musical instruments make sound",
    "the history of the postal service", "camels", "the history of sculpture",
    "how soil is formed", "the history of sailing", "caves", "the history of libraries",
    "how the eye sees", "the history of farming", "whales", "the history of bridges",
    "how batteries work", "the history of painting", "lakes", "the history of clocks",
    "how fire was tamed", "islands", "the history of ballet", "how honey bees dance",
    "the history of the kite", "frogs", "how weather is forecast", "the history of glass",
    "the Arctic", "the history of perfume", "how wool becomes cloth", "the history of soap",
    "sharks", "how mountains form", "the history of the calendar", "spiders",
    "the history of shoes", "how a city is planned", "the history of pottery", "horses",
    "how rivers shape valleys", "the history of umbrellas", "bats", "the history of keys",
)  # fmt: skip
CALIBRATION = 60  # essays [0, 60) calibrate profiles; the rest hold the tasks' haystacks


def prompts() -> list[tuple[str, str]]:
    """(topic, prompt) pairs in corpus order: every topic in style 0, then in style 1."""
    return [(topic, style.format(topic=topic)) for style in STYLES for topic in TOPICS]


def looping(tokens: Sequence[int], n: int = 4) -> bool:
    """A sample that repeats itself: under half of its word n-grams are distinct."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return not grams or len(set(grams)) < 0.5 * len(grams)


def load(path: Path = DATA) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def essays(split: str, path: Path = DATA) -> list[str]:
    """The texts of one split: "calibration" or "tasks"."""
    rows = load(path)
    if split == "calibration":
        return [r["text"] for r in rows[:CALIBRATION]]
    if split == "tasks":
        return [r["text"] for r in rows[CALIBRATION:]]
    raise ValueError(f"split {split!r} is not 'calibration' or 'tasks'")


def generate(model_path: Path, max_new_tokens: int, batch: int) -> list[dict]:
    """Every prompt's essay (None where degenerate), sampled in batches with transformers:
    on CPU its batched decode is several times faster than a server's per-request one."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pairs = prompts()
    rows: list[dict] = []
    for start in tqdm(range(0, len(pairs), batch), desc="essays", unit="batch"):
        chunk = pairs[start : start + batch]
        chats = [[{"role": "user", "content": p}] for _, p in chunk]
        inputs = tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
        torch.manual_seed(start)
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                do_sample=True,
                temperature=0.7,
                top_p=0.9,
                repetition_penalty=1.1,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        for (topic, prompt), ids in zip(chunk, out[:, inputs["input_ids"].shape[1] :], strict=True):
            tokens = [int(t) for t in ids if int(t) not in (tokenizer.pad_token_id,)]
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            rows.append({"topic": topic, "prompt": prompt, "tokens": len(tokens), "text": text})
    return rows


CALIBRATION_QUESTIONS = (
    "What is the main topic of the text?",
    "Summarize the text in one sentence.",
    "Name one fact the text mentions.",
    "What does the text say first?",
    "Which idea does the text end with?",
)
# Statements a retrieval calibration (headkv) hides and asks about: other templates than the
# accuracy tasks', so that a profile is not fitted to the benchmark's questions.
CALIBRATION_NEEDLES = (
    ("The secret code of the {key} project is {value}.", "What is the code of the {key} project?"),
    ("The {key} river is {value} kilometers long.", "How long is the {key} river?"),
    ("Captain {key} was born in the year {value}.", "In which year was Captain {key} born?"),
    ("The {key} library holds {value} old books.", "How many books does the {key} library hold?"),
)


@dataclass(frozen=True)
class CalibrationPrompt:
    input_ids: list[int]
    spans: list[tuple[int, int]]  # token ranges of the statement the question is about


def calibration_samples(
    tokenizer, samples: int, words: int, seed: int = 0, needles: int = 0
) -> list[CalibrationPrompt]:
    """Chat prompts over the calibration essays, shaped like a document question: the
    instruction the tasks use, about `words` words of consecutive calibration essays (never
    a task's) and a question. With `needles`, that many statements (`CALIBRATION_NEEDLES`)
    are hidden in the text and the question asks for one of them, whose tokens are the
    prompt's span; else the question is generic and there is no span."""
    from tangram_sglang.accuracy.tasks import Names, hide, sentences

    texts = [sentences(e) for e in essays("calibration")]
    rng = random.Random(seed)
    out = []
    for _ in range(samples):
        chosen, count, start = [], 0, rng.randrange(len(texts))
        while count < words:
            for sentence in texts[start % len(texts)]:
                chosen.append(sentence)
                count += len(sentence.split())
                if count >= words:
                    break
            start += 1
        names, asked = Names(rng), None
        if needles:
            kinds = rng.sample(CALIBRATION_NEEDLES, needles)
            keys = [names.word() for _ in kinds]
            facts = [
                (s.format(key=k, value=names.number(3)), q.format(key=k))
                for (s, q), k in zip(kinds, keys, strict=True)
            ]
            document = hide(rng, chosen, [f for f, _ in facts])
            asked, question = rng.choice(facts)
        else:
            document, question = " ".join(chosen), rng.choice(CALIBRATION_QUESTIONS)
        user = f"Read the text below and answer the question.\n\n{document}\n\nQuestion: {question}"
        out.append(_tokenized(tokenizer, user, asked))
    return out


def _tokenized(tokenizer, user: str, statement: str | None) -> CalibrationPrompt:
    """The chat prompt's ids, and the tokens covering `statement` (by character offsets)."""
    messages = [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    if ids != list(expected):
        raise ValueError("the chat template's text does not tokenize to its ids")
    spans = []
    if statement is not None:
        begin = text.index(statement)
        end = begin + len(statement)
        inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > begin]
        spans.append((inside[0], inside[-1] + 1))
    return CalibrationPrompt(ids, spans)


def main(argv: Sequence[str] | None = None) -> int:
    from tangram_sglang.models import smollm2

    parser = argparse.ArgumentParser(
        prog="python -m tangram_sglang.accuracy.corpus",
        description="Write the accuracy corpus (essays the reference model writes) or "
        "calibration prompts over its calibration split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("essays", help="have the model write the essays")
    write.add_argument("--out", type=Path, default=DATA)
    write.add_argument("--max-new-tokens", type=int, default=600)
    write.add_argument("--min-tokens", type=int, default=200)
    write.add_argument("--batch", type=int, default=24)
    calib = sub.add_parser("calibration", help="calibration prompts (JSONL of input_ids)")
    calib.add_argument("--out", type=Path, required=True)
    calib.add_argument("--samples", type=int, default=60)
    calib.add_argument("--words", type=int, default=800)
    calib.add_argument("--seed", type=int, default=0)
    calib.add_argument(
        "--needles", type=int, default=0, help="statements hidden per prompt (headkv needs >= 1)"
    )
    args = parser.parse_args(argv)
    model = smollm2.build()
    if args.command == "calibration":
        from transformers import AutoTokenizer

        rows = calibration_samples(
            AutoTokenizer.from_pretrained(model), args.samples, args.words, args.seed, args.needles
        )
        args.out.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
        print(
            f"wrote {args.out}: {len(rows)} prompts, "
            f"mean {np.mean([len(r.input_ids) for r in rows]):.0f} tokens"
        )
        return 0
    rows = generate(model, args.max_new_tokens, args.batch)
    kept = [r for r in rows if r["tokens"] >= args.min_tokens and not looping(r["text"].split())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tokens = sum(r["tokens"] for r in kept)
    print(f"wrote {args.out}: {len(kept)} of {len(rows)} essays, {tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
