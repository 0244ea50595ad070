"""A byte-level BPE tokenizer built locally for the tiny test models.

SGLang's text mode (`/generate` with text, `/v1/completions`, `/v1/chat/completions`)
needs a Hugging Face tokenizer beside the weights; nothing may be downloaded in CI, so
this one is trained here on a generated corpus in well under a second and saved as
`tokenizer.json` + `tokenizer_config.json` (with a chat template) into the model dir.
Byte-level means every string round-trips, whatever the corpus covered.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>")  # ids 0, 1, 2, ...

# Turns end with EOS, so greedy generation stops at the end of the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_COMMON = (
    "the a an of to in and is was for on with as by at from it this that you we they "
    "user assistant system question answer turn session cache token head group ratio "
    "budget profile model server request prompt history context memory page slot layer "
    "hello what which when where how why please tell me about remember earlier said "
    "one two three four five six seven eight nine ten number name city color key value"
)
_WORDS = tuple(_COMMON.split())


def corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    """English-like lines: common words mixed with pronounceable made-up words and numbers."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"

    def made_up() -> str:
        return "".join(
            rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 3))
        )

    def word() -> str:
        roll = rng.random()
        if roll < 0.6:
            return rng.choice(_WORDS)
        return made_up() if roll < 0.95 else str(rng.randint(0, 9999))

    return [
        " ".join(word() for _ in range(rng.randint(4, 16))).capitalize() + rng.choice(".?!,:")
        for _ in range(lines)
    ]


def build_tokenizer(vocab_size: int = 1024, seed: int = 0) -> Tokenizer:
    """Train the tokenizer; the special tokens take ids 0..5 (pad, bos, eos first)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(seed=seed), trainer=trainer)
    return tokenizer


def save_tokenizer(model_dir: str | Path, vocab_size: int = 1024, seed: int = 0) -> Tokenizer:
    """Write tokenizer.json and tokenizer_config.json into `model_dir`."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, seed)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": PAD,
        "bos_token": BOS,
        "eos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 16,
        "clean_up_tokenization_spaces": False,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer
