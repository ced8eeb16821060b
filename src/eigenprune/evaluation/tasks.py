"""Task definitions: what a task's examples are and how they are prompted.

A `Task` is a name, a kind (generation or classification), a default evaluation mode and two lists
of `Example`s: `train` (scoring and dev come from here) and `test` (used once, for final numbers).

Built in:
- `int-sum` ("a + b =", a, b in 0..99) and `int-mult` ("a x b =", a, b in 0..19), split 80/20 with
  a fixed seed so every run sees the same test set;
- SuperGLUE `cb`, `copa`, `rte` from the packaged JSONL, with the prompts the paper's authors
  released: train = the train file, test = the validation file (SuperGLUE's test labels are not
  public).

Anything else is a JSONL file (or a folder holding train.jsonl and test.jsonl / val.jsonl) of
`{"prompt", "answer"}` lines (generation) or `{"prompt", "choices", "label"}` lines
(classification), optionally rendered through a template and renamed through a field map.
Dealing a task's examples into train / dev / test (a fixed split or cross-fitted folds) is `splits.py`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from eigenprune.core.batching import Example, read_jsonl
from eigenprune.core.errors import UsageError

GENERATION = "generation"
CLASSIFICATION = "classification"
KINDS = (GENERATION, CLASSIFICATION)
EVAL_MODES = ("next-token", "choice", "exact")
DEFAULT_MODE = {GENERATION: "exact", CLASSIFICATION: "choice"}
FIXED_SPLIT_SEED = 0  # the 80/20 train/test split of tasks that ship without one never changes
TEST_FRACTION = 0.2
CUSTOM_FIELDS = ("prompt", "answer", "choices", "label")


@dataclass
class Task:
    """A task's examples and how to evaluate them."""

    name: str = field(metadata={"help": "built-in task name, or the custom file's stem"})
    kind: str = field(metadata={"help": "'generation' (free-form answer) or 'classification' (choices)"})
    train: list[Example] = field(metadata={"help": "scoring and dev examples are drawn from these"})
    test: list[Example] = field(metadata={"help": "held out; evaluated once for the final numbers"})
    choices: tuple[str, ...] | None = field(
        default=None, metadata={"help": "answer strings in label order, when all examples share them"}
    )
    eval_mode: str | None = field(
        default=None, metadata={"help": "default eval mode; None picks choice/exact from the kind"}
    )
    test_name: str = field(
        default="test", metadata={"help": "what the source calls the test examples (SuperGLUE: validation)"}
    )
    template: str | None = field(
        default=None, metadata={"help": "the template the prompts were rendered from; None when the file gave "
                                        "ready-made prompts (calibrated scoring renders it with content-free fields)"}
    )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.eval_mode is None:
            self.eval_mode = DEFAULT_MODE[self.kind]
        if self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {self.eval_mode!r}")
        if self.kind == GENERATION and self.eval_mode == "choice":
            raise ValueError("eval_mode 'choice' needs a classification task (kind is 'generation')")
        if not self.train:
            raise ValueError(f"train of task {self.name!r} is empty")
        if not self.test:
            raise ValueError(f"test of task {self.name!r} is empty")
        if self.kind == CLASSIFICATION:
            for ex in (*self.train, *self.test):
                if ex.choices is None or ex.label is None:
                    raise ValueError(f"train/test of classification task {self.name!r}: an example "
                                     "has no choices/label")


# -- templates ---------------------------------------------------------------------------------------

def render(template: str, fields: Mapping[str, object], where: str) -> str:
    """Fill `{field}` placeholders; a missing field or a broken template is a UsageError at `where`."""
    try:
        return template.format_map(fields)
    except KeyError as err:
        raise UsageError(f"{where}: template field {{{err.args[0]}}} is missing; "
                         f"available fields: {', '.join(sorted(fields))}") from None
    except (ValueError, IndexError, AttributeError) as err:
        raise UsageError(f"{where}: bad template {template!r} ({err}); use named fields like "
                         "{premise} and write a literal brace as {{ or }}") from None


def _answer_words(answers: Sequence[str] | None, default: tuple[str, ...], task: str) -> tuple[str, ...]:
    if answers is None:
        return default
    answers = tuple(answers)
    if len(answers) != len(default):
        raise UsageError(f"task {task} needs {len(default)} answer words (for {', '.join(map(repr, default))}),"
                         f" got {len(answers)}")
    if len(set(answers)) != len(answers) or not all(answers):
        raise UsageError(f"answer words for task {task} must be distinct and non-empty, got {answers}")
    return answers


# -- arithmetic -----------------------------------------------------------------------------------------

def _split_fixed(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """The fixed 80/20 train/test split of a task that ships without one."""
    if len(examples) < 2:
        raise UsageError(f"a task needs at least 2 examples to split into train and test, got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(FIXED_SPLIT_SEED).shuffle(order)
    n_test = min(max(round(TEST_FRACTION * len(examples)), 1), len(examples) - 1)
    test, train = sorted(order[:n_test]), sorted(order[n_test:])
    return [examples[i] for i in train], [examples[i] for i in test]


def _arithmetic(name: str, symbol: str, top: int, op: Callable[[int, int], int],
                template: str | None, answers: Sequence[str] | None) -> Task:
    if answers is not None:
        raise UsageError(f"task {name} is a generation task; answer words apply to classification tasks")
    template = template or f"{{a}} {symbol} {{b}} ="
    examples = [
        Example(render(template, {"a": a, "b": b}, f"task {name}"), f" {op(a, b)}")
        for a in range(top + 1)
        for b in range(top + 1)
    ]
    train, test = _split_fixed(examples)
    return Task(name, GENERATION, train, test, template=template)


# -- SuperGLUE ------------------------------------------------------------------------------------------

_NLI_HEAD = "Premise: {premise}\n\nHypothesis: {hypothesis}\n\n"
SUPERGLUE_TEMPLATES = {
    "cb": _NLI_HEAD + "Does the premise entail, contradict or is neutral to the hypothesis?\n"
                      "Answer (entails, contradicts, is neutral): The premise",
    "rte": _NLI_HEAD + "Does the premise entail or contradict to the hypothesis?\n"
                       "Answer (entails or contradicts): The premise",
    "copa": "Premise: {premise}\n{question_text}\n\nAlternative 1: {choice1}\nAlternative 2: {choice2}\n\n"
            "What is the correct alternative?\nThe correct alternative is alternative",
}
SUPERGLUE_LABELS = {  # label values in the files, in choice order
    "cb": ("entailment", "contradiction", "neutral"),
    "rte": ("entailment", "not_entailment"),
    "copa": (0, 1),
}
SUPERGLUE_ANSWERS = {
    "cb": (" entails", " contradicts", " is neutral"),
    "rte": (" entails", " contradicts"),
    "copa": (" 1", " 2"),
}
COPA_QUESTIONS = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}


def _superglue_file(task: str, split: str):
    return resources.files("eigenprune").joinpath("data", "superglue", task, f"{split}.jsonl")


def _superglue(name: str, template: str | None, answers: Sequence[str] | None) -> Task:
    template = template or SUPERGLUE_TEMPLATES[name]
    choices = _answer_words(answers, SUPERGLUE_ANSWERS[name], name)
    labels = SUPERGLUE_LABELS[name]
    splits = []
    for split in ("train", "val"):
        with resources.as_file(_superglue_file(name, split)) as path:
            rows = read_jsonl(path)
        examples = []
        for n, row in rows:
            fields = dict(row)
            if name == "copa":
                fields["question_text"] = COPA_QUESTIONS[row["question"]]
            label = labels.index(row["label"])
            prompt = render(template, fields, f"task {name} ({split}.jsonl:{n})")
            examples.append(Example(prompt, choices[label], choices, label))
        splits.append(examples)
    return Task(name, CLASSIFICATION, splits[0], splits[1], choices=choices, test_name="validation",
                template=template)


BUILTIN_TASKS: dict[str, Callable[[str | None, Sequence[str] | None], Task]] = {
    "int-sum": lambda t, a: _arithmetic("int-sum", "+", 99, lambda x, y: x + y, t, a),
    "int-mult": lambda t, a: _arithmetic("int-mult", "x", 19, lambda x, y: x * y, t, a),
    "cb": lambda t, a: _superglue("cb", t, a),
    "copa": lambda t, a: _superglue("copa", t, a),
    "rte": lambda t, a: _superglue("rte", t, a),
}


# -- custom JSONL ---------------------------------------------------------------------------------------

def _field_names(field_map: Mapping[str, str] | None) -> dict[str, str]:
    names = {f: f for f in CUSTOM_FIELDS}
    for key, value in (field_map or {}).items():
        if key not in CUSTOM_FIELDS:
            raise UsageError(f"field map key {key!r} is not one of {', '.join(CUSTOM_FIELDS)}")
        if not isinstance(value, str) or not value:
            raise UsageError(f"field map value for {key!r} must be a field name, got {value!r}")
        names[key] = value
    return names


def _custom_example(row: dict, where: str, kind: str, names: dict[str, str], template: str | None,
                    answers: tuple[str, ...] | None) -> Example:
    def need(key: str, types: type | tuple[type, ...], what: str):
        value = row.get(names[key])
        if value is None or not isinstance(value, types) or isinstance(value, bool):
            raise UsageError(f"{where}: needs field {names[key]!r} ({what})")
        return value

    prompt = render(template, row, where) if template else need("prompt", str, "a string")
    if kind == GENERATION:
        return Example(prompt, need("answer", str, "a string"))
    choices = answers or need("choices", list, "a list of answer strings")
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices) or len(set(choices)) < len(choices):
        raise UsageError(f"{where}: field {names['choices']!r} must list at least 2 distinct non-empty strings")
    label = need("label", (int, str), "an index into the choices, or one of them")
    if isinstance(label, str):
        if label not in choices:
            raise UsageError(f"{where}: label {label!r} is not one of the choices {choices}")
        label = choices.index(label)
    if not 0 <= label < len(choices):
        raise UsageError(f"{where}: label {label} is out of range for {len(choices)} choices")
    return Example(prompt, choices[label], tuple(choices), label)


def _custom_files(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        test = next((path / f for f in ("test.jsonl", "val.jsonl") if (path / f).is_file()), None)
        if not (path / "train.jsonl").is_file() or test is None:
            raise UsageError(f"task folder {path} needs train.jsonl and test.jsonl (or val.jsonl)")
        return path / "train.jsonl", test
    return path, None


def load_custom_task(path: str | Path, template: str | None = None, answers: Sequence[str] | None = None,
                     field_map: Mapping[str, str] | None = None) -> Task:
    """A task from a JSONL file (split 80/20 with a fixed seed) or a folder with train/test files.

    A first line with a choices field (or any file, when `answers` is given) makes a classification task;
    otherwise each line needs an answer. `template` renders the prompt from the line's fields.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"task file not found: {path} (built-in tasks: {', '.join(BUILTIN_TASKS)})")
    names = _field_names(field_map)
    train_file, test_file = _custom_files(path)
    parts = [read_jsonl(train_file)] + ([read_jsonl(test_file)] if test_file else [])
    kind = CLASSIFICATION if answers is not None or names["choices"] in parts[0][0][1] else GENERATION
    if answers is not None:
        answers = tuple(answers)
        if len(answers) < 2 or len(set(answers)) != len(answers) or not all(answers):
            raise UsageError(f"answer words must be at least 2 distinct non-empty strings, got {answers}")
    files = [train_file, test_file]
    examples = [[_custom_example(row, f"{file}:{n}", kind, names, template, answers) for n, row in rows]
                for file, rows in zip(files, parts, strict=False)]
    train, test = (examples[0], examples[1]) if test_file else _split_fixed(examples[0])
    shared = {ex.choices for ex in (*train, *test)}
    choices = shared.pop() if kind == CLASSIFICATION and len(shared) == 1 else None
    name = path.name if path.is_dir() else path.stem
    return Task(name, kind, train, test, choices=choices, template=template)


def load_task(name_or_path: str, template: str | None = None, answers: Sequence[str] | None = None,
              field_map: Mapping[str, str] | None = None) -> Task:
    """A built-in task by name, else a custom JSONL task by path; built-in names win over paths.

    Template fields: `{a}`, `{b}` for int-sum/int-mult; the JSONL fields for SuperGLUE (`{premise}`,
    `{hypothesis}`; COPA also `{choice1}`, `{choice2}` and `{question_text}`, the question sentence)
    and for custom files. `answers` replaces a classification task's answer words in label order.
    """
    if name_or_path in BUILTIN_TASKS:
        if field_map:
            raise UsageError(f"a field map applies to custom JSONL tasks, not to built-in task {name_or_path}")
        return BUILTIN_TASKS[name_or_path](template, answers)
    path = Path(name_or_path).expanduser()
    if not path.exists() and not name_or_path.endswith(".jsonl") and "/" not in name_or_path:
        raise UsageError(f"unknown task {name_or_path!r}; built-in tasks: {', '.join(BUILTIN_TASKS)} "
                         "(or give a path to a JSONL file)")
    return load_custom_task(path, template, answers, field_map)
