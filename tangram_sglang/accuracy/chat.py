"""Token ids of a multi-turn chat, identical for the reference path and the server.

Both paths get token ids, never text, so that a difference between them is a difference
of computation. Turn 1 is the model's chat template with a generation prompt; a later turn
is what the template appends after an answer: the end of the assistant message (unless the
answer already ended with it), the user message and the next generation prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class ChatFormat:
    tokenizer: object

    @property
    def eos(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def first(self, user: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True
        )
        return list(ids if isinstance(ids, list) else ids["input_ids"])

    def follow(self, user: str, previous_answer: Sequence[int]) -> list[int]:
        """The ids after an answer: `<|im_end|>` (if the answer did not end with it), then
        the user turn and the assistant prompt, as the chat template writes them."""
        end = self.tokenizer.eos_token
        text = f"\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        closed = bool(previous_answer) and previous_answer[-1] == self.eos
        head = [] if closed else self.tokenizer(end, add_special_tokens=False)["input_ids"]
        return [*head, *ids]

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.eos]).strip()
