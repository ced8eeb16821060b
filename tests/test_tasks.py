"""Tests for tasks.py: built-in task sizes and prompts, answer tokens, custom JSONL tasks, splits."""

from __future__ import annotations

import json
from collections import Counter
from functools import cache

import pytest
from conftest import make_tokenizer

from eigenprune.core.batching import encode
from eigenprune.core.errors import UsageError
from eigenprune.evaluation.splits import split_task
from eigenprune.evaluation.tasks import BUILTIN_TASKS, CLASSIFICATION, GENERATION, Task, load_task


@cache
def task(name: str) -> Task:
    return load_task(name)


@pytest.mark.parametrize("name, kind, mode, n_train, n_test", [
    ("int-sum", GENERATION, "exact", 8000, 2000),
    ("int-mult", GENERATION, "exact", 320, 80),
    ("cb", CLASSIFICATION, "choice", 250, 56),
    ("copa", CLASSIFICATION, "choice", 400, 100),
    ("rte", CLASSIFICATION, "choice", 2490, 277),
])
def test_builtin_sizes_and_kinds(name, kind, mode, n_train, n_test):
    t = task(name)
    assert (t.kind, t.eval_mode, len(t.train), len(t.test)) == (kind, mode, n_train, n_test)


@pytest.mark.parametrize("name, symbol, top, op", [
    ("int-sum", "+", 99, lambda a, b: a + b),
    ("int-mult", "x", 19, lambda a, b: a * b),
])
def test_arithmetic_covers_every_pair_once_with_right_answers(name, symbol, top, op):
    t = task(name)
    seen = Counter()
    for ex in t.train + t.test:
        a, sym, b, eq = ex.prompt.split(" ")
        assert (sym, eq) == (symbol, "=")
        assert ex.answer == f" {op(int(a), int(b))}"
        seen[(int(a), int(b))] += 1
    assert set(seen) == {(a, b) for a in range(top + 1) for b in range(top + 1)}
    assert set(seen.values()) == {1}


def test_arithmetic_split_is_fixed():
    again = BUILTIN_TASKS["int-mult"](None, None)
    assert again.test == task("int-mult").test


SUPERGLUE_FIRST_TRAIN = {
    "cb": ("Premise: It was a complex language. Not written down but handed down. One might say it was "
           "peeled down.\n\nHypothesis: the language was peeled down\n\nDoes the premise entail, contradict "
           "or is neutral to the hypothesis?\nAnswer (entails, contradicts, is neutral): The premise",
           " entails", 0),
    "rte": ("Premise: No Weapons of Mass Destruction Found in Iraq Yet.\n\nHypothesis: Weapons of Mass "
            "Destruction Found in Iraq.\n\nDoes the premise entail or contradict to the hypothesis?\n"
            "Answer (entails or contradicts): The premise", " contradicts", 1),
    "copa": ("Premise: My body cast a shadow over the grass.\nWhat was the cause of this?\n\n"
             "Alternative 1: The sun was rising.\nAlternative 2: The grass was cut.\n\n"
             "What is the correct alternative?\nThe correct alternative is alternative", " 1", 0),
}


@pytest.mark.parametrize("name", sorted(SUPERGLUE_FIRST_TRAIN))
def test_superglue_prompt_rendered_exactly(name):
    prompt, answer, label = SUPERGLUE_FIRST_TRAIN[name]
    ex = task(name).train[0]
    assert (ex.prompt, ex.answer, ex.label) == (prompt, answer, label)
    assert ex.choices == task(name).choices and ex.choices[ex.label] == ex.answer


def test_copa_effect_question_and_second_alternative():
    ex = task("copa").test[0]  # val idx 0: question "effect", label 1
    assert ex.prompt == ("Premise: The man turned on the faucet.\nWhat happened as a result?\n\n"
                         "Alternative 1: The toilet filled with water.\nAlternative 2: Water flowed from "
                         "the spout.\n\nWhat is the correct alternative?\nThe correct alternative is alternative")
    assert (ex.answer, ex.label) == (" 2", 1)


@pytest.mark.parametrize("name, counts", [
    ("cb", {" contradicts": 119, " entails": 115, " is neutral": 16}),
    ("rte", {" entails": 1249, " contradicts": 1241}),
    ("copa", {" 1": 195, " 2": 205}),
])
def test_superglue_label_mapping_matches_source_counts(name, counts):
    assert Counter(ex.answer for ex in task(name).train) == counts


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["cb", "copa", "rte", "int-mult"])
def test_answer_tokens_never_hold_bos(style, name):
    tok = make_tokenizer(style)
    examples = task(name).test[:20]
    for ex, enc in zip(examples, encode(tok, examples), strict=True):
        assert tok.bos_token_id not in enc.answer_ids
        assert list(enc.answer_ids) == tok(ex.answer, add_special_tokens=False)["input_ids"]
        assert (enc.prompt_ids[0] == tok.bos_token_id) == (style == "llama")


def test_template_and_answer_words_override_defaults():
    t = load_task("rte", template="{hypothesis}? {premise} Answer:", answers=[" yes", " no"])
    assert t.choices == (" yes", " no")
    assert t.train[0].prompt == ("Weapons of Mass Destruction Found in Iraq.? No Weapons of Mass Destruction "
                                 "Found in Iraq Yet. Answer:")
    assert t.train[0].answer == " no"
    assert load_task("int-sum", template="{a} plus {b} is").train[0].prompt == "0 plus 0 is"


@pytest.mark.parametrize("kwargs, message", [
    ({"template": "{premise} {missing}"}, "missing"),
    ({"template": "{premise"}, "bad template"),
    ({"answers": [" yes"]}, "needs 2 answer words"),
    ({"answers": [" yes", " yes"]}, "distinct"),
    ({"field_map": {"prompt": "text"}}, "field map"),
])
def test_bad_builtin_options_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        load_task("rte", **kwargs)


def test_unknown_task_lists_builtins():
    with pytest.raises(UsageError, match="int-sum, int-mult, cb, copa, rte"):
        load_task("boolq")


def write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def test_custom_generation_file(tmp_path):
    rows = [{"prompt": f"{i} plus one is", "answer": f" {i + 1}"} for i in range(10)]
    t = load_task(str(write_jsonl(tmp_path / "succ.jsonl", rows)))
    assert (t.name, t.kind, t.eval_mode, len(t.train), len(t.test), t.choices) == (
        "succ", GENERATION, "exact", 8, 2, None)
    assert {ex.prompt for ex in t.train + t.test} == {r["prompt"] for r in rows}


def test_custom_classification_with_template_and_field_map(tmp_path):
    rows = [{"question": f"is {i} even?", "options": [" no", " yes"], "target": " yes" if i % 2 == 0 else 0}
            for i in range(6)]
    path = write_jsonl(tmp_path / "even.jsonl", rows)
    t = load_task(str(path), template="Q: {question}\nA:", field_map={"choices": "options", "label": "target"})
    assert (t.kind, t.eval_mode, t.choices) == (CLASSIFICATION, "choice", (" no", " yes"))
    by_prompt = {ex.prompt: ex for ex in t.train + t.test}
    assert by_prompt["Q: is 2 even?\nA:"].label == 1 and by_prompt["Q: is 3 even?\nA:"].answer == " no"


def test_custom_folder_with_answer_words(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    write_jsonl(tmp_path / "val.jsonl", [{"text": "c", "label": 1}])
    t = load_task(str(tmp_path), template="{text} ->", answers=[" A", " B"])
    assert (len(t.train), len(t.test), t.choices) == (2, 1, (" A", " B"))
    assert t.test[0].prompt == "c ->" and t.test[0].answer == " B"


@pytest.mark.parametrize("lines, kwargs, message", [
    ([{"prompt": "p", "answer": "a"}, "{not json\n"], {}, r"bad\.jsonl:2: not valid JSON"),
    ([{"prompt": "p", "answer": "a"}, "\n", {"prompt": "q"}], {}, r"bad\.jsonl:3: needs field 'answer'"),
    ([{"prompt": "p", "answer": "a"}, {"prompt": "q", "target": "b"}], {}, r"bad\.jsonl:2: needs field 'answer'"),
    ([{"q": "p", "target": "a"}, {"q": "r", "answer": "b"}],
     {"field_map": {"answer": "target"}, "template": "{q}"}, r"bad\.jsonl:2: needs field 'target'"),
    ([{"prompt": "p", "choices": [" a", " b"], "label": 2}], {}, r"bad\.jsonl:1: label 2 is out of range"),
    ([{"prompt": "p", "choices": [" a", " b"], "label": " c"}], {}, r"bad\.jsonl:1: label ' c' is not one"),
    ([{"x": "p", "answer": "a"}], {"template": "{y}"}, r"bad\.jsonl:1: template field \{y\} is missing"),
    ([{"prompt": "p", "answer": "a"}], {"field_map": {"question": "q"}}, "field map key 'question'"),
])
def test_custom_file_errors_name_file_and_line(tmp_path, lines, kwargs, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UsageError, match=message):
        load_task(str(path), **kwargs)


def test_missing_custom_file(tmp_path):
    with pytest.raises(UsageError, match="task file not found"):
        load_task(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("name, n_train, n_dev, n_test", [
    ("int-sum", 6400, 1600, 2000),
    ("int-mult", 256, 64, 80),
    ("cb", 200, 50, 56),
    ("copa", 320, 80, 100),
    ("rte", 1992, 498, 277),
])
def test_split_sizes_and_disjointness(name, n_train, n_dev, n_test):
    splits = split_task(task(name), dev_fraction=0.2, seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (n_train, n_dev, n_test)
    ids = lambda xs: {id(x) for x in xs}
    assert ids(splits.train) | ids(splits.dev) == ids(task(name).train)
    assert not ids(splits.train) & ids(splits.dev)
    assert splits.test == task(name).test


def test_splits_are_seeded():
    t = task("cb")
    a, b, c = split_task(t, seed=0), split_task(t, seed=0), split_task(t, seed=1)
    assert a == b
    assert a.dev != c.dev and a.test == c.test
    limited = [split_task(t, seed=s, limit=10) for s in (3, 3, 4)]
    assert [len(x) for x in (limited[0].train, limited[0].dev, limited[0].test)] == [10, 10, 10]
    assert limited[0] == limited[1] and limited[0].train != limited[2].train
    assert limited[0].test == limited[2].test  # one test set across seeds


@pytest.mark.parametrize("kwargs, message", [
    ({"dev_fraction": 0.0}, "dev fraction"),
    ({"dev_fraction": 1.0}, "dev fraction"),
    ({"limit": 0}, "limit must be at least 1"),
    ({"seed": -1}, "seed"),
])
def test_bad_split_options(kwargs, message):
    with pytest.raises(UsageError, match=message):
        split_task(task("cb"), **kwargs)


def test_task_validates_fields():
    with pytest.raises(ValueError, match="kind"):
        Task("t", "regression", task("cb").train, task("cb").test)
    with pytest.raises(ValueError, match="eval_mode"):
        Task("t", GENERATION, task("int-mult").train, task("int-mult").test, eval_mode="choice")
    with pytest.raises(ValueError, match="choices"):
        Task("t", CLASSIFICATION, task("int-mult").train, task("int-mult").test)
