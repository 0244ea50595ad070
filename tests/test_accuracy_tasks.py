"""The accuracy tasks and the chat ids both paths receive: deterministic samples whose facts
are each hidden once in a haystack of task essays, and chat ids equal to the model's own
chat template."""

from __future__ import annotations

import pytest

from tangram_sglang.accuracy import corpus
from tangram_sglang.accuracy.chat import ChatFormat
from tangram_sglang.accuracy.tasks import TASKS, Haystack, correct, make_sample, sentences


@pytest.fixture(scope="module")
def hay():
    return Haystack()


@pytest.fixture(scope="module")
def chat(smollm2_dir):
    from transformers import AutoTokenizer

    return ChatFormat(AutoTokenizer.from_pretrained(smollm2_dir))


def test_corpus_splits_are_disjoint_and_the_tasks_draw_only_task_essays(hay):
    calibration = {s for e in corpus.essays("calibration") for s in sentences(e)}
    tasks = {s for e in corpus.essays("tasks") for s in sentences(e)}
    assert len(corpus.essays("calibration")) == corpus.CALIBRATION
    assert len(corpus.essays("tasks")) >= 100, "the task split is too small to vary haystacks"
    drawn = set(hay.draw(__import__("random").Random(0), 5000))
    assert drawn <= tasks
    shared = drawn & calibration
    # Short generic sentences ("Here are some examples:") recur across essays; no more.
    assert all(len(s.split()) <= 8 for s in shared), sorted(shared, key=len)[-3:]


@pytest.mark.parametrize("task", list(TASKS))
def test_samples_are_deterministic_and_hide_each_fact_once(task, hay):
    a = make_sample(task, 3, 600, hay=hay)
    assert a == make_sample(task, 3, 600, hay=hay), "the same (seed, index) gave another sample"
    assert a != make_sample(task, 4, 600, hay=hay)
    assert a != make_sample(task, 3, 600, seed=1, hay=hay)
    context = a.turns[0].user
    for statement in a.facts:
        assert context.count(statement) == 1, f"{statement!r} is not in the context once"
    for turn in a.turns:
        assert any(correct(f, turn.answer) for f in a.facts), f"{turn.answer!r} in no fact"
        assert not correct(turn.user.rsplit("Question:", 1)[-1], turn.answer), turn.user[-80:]
    words = len(context.split())
    assert 600 <= words <= 800, f"context of {words} words for 600 asked"
    if task == "multi_turn":
        assert len(a.turns) == 5 and len({t.answer for t in a.turns}) == 5


def test_a_right_answer_holds_the_expected_value_as_a_whole_word():
    assert correct("The meeting will take place in oslo.", "Oslo")
    assert correct("It leaves from platform 17.", "17")
    assert not correct("The magic number is 321.", "3201")
    assert not correct("It leaves from platform 171.", "17")


def test_chat_ids_are_the_chat_template_of_the_whole_conversation(chat):
    tok = chat.tokenizer
    answer = tok("The answer is Vobi.", add_special_tokens=False)["input_ids"] + [chat.eos]
    ids = chat.first("Hello there") + answer + chat.follow("And then?", answer)
    messages = [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "The answer is Vobi."},
        {"role": "user", "content": "And then?"},
    ]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert ids == list(expected)
    unfinished = answer[:-1]  # cut by max_new_tokens: the follow-up closes the message
    ids = chat.first("Hello there") + unfinished + chat.follow("And then?", unfinished)
    assert ids == list(expected)
