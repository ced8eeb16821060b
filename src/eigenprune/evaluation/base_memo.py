"""The unedited model's evaluations, remembered for the process, so that a study's cells of one model and task
(other targets, other methods) evaluate the base once per fold, not once per cell.

An entry is one split's (n,) correctness and, when the judging pass gave it, the (n,) answer NLL
(`evaluate(..., with_nll=True)`). Its key is a sha256 over everything those numbers depend on, so a hit
returns what a fresh evaluation would: the weights (the caller's digest of every parameter, e.g. the
`sha256` of `edits.fingerprint`, which covers dtype and shape), the model's class and config, the device,
the tokenizer (its serialised vocabulary and merges, pad token and padding side), the examples (prompt,
answer, choices, label: another task file or limit is another key), the eval mode, batch size and choice
calibration, and torch's version and thread count (float sums differ across these). The caller vouches that the model is
unedited: `experiments.pipeline` asks before any method ran and checks the weights after each one.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_ENTRIES = 256  # a split's correctness is a few bytes per example


@dataclass(frozen=True)
class BaseEvaluation:
    """One split's evaluation of the unedited model."""

    correct: torch.Tensor  # (n,) as `evaluate` returned it (its `predicted_choices` stay attached)
    nll: torch.Tensor | None  # (n,) each answer's summed NLL, when the evaluation's pass gave it


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(json.dumps([type(tokenizer).__qualname__, text, tokenizer.pad_token_id,
                                      getattr(tokenizer, "padding_side", None)]).encode()).hexdigest()


def key(weights: str, model: torch.nn.Module, tokenizer, examples: Sequence, mode: str, batch_size: int,
        calibration=None) -> str:
    """The entry name of the unedited `model` (whose parameters' digest is `weights`) judging `examples`, with the
    choice scores calibrated by `calibration`'s content-free prompts (`evaluation.calibration`) or not."""
    config = getattr(model, "config", None)
    setup = {"weights": weights, "class": type(model).__qualname__,
             "config": config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else "",
             "device": str(next(model.parameters()).device), "tokenizer": _tokenizer_identity(tokenizer),
             "mode": mode, "batch_size": batch_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "examples": [[e.prompt, e.answer, list(e.choices) if e.choices else None, e.label] for e in examples],
             "calibration": None if calibration is None else [list(calibration.prompts), list(calibration.choices)]}
    return hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest()


class BaseEvaluations:
    """Entries by `key`, least recently used dropped beyond `max_entries`; `counts` of made and reused ones."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[str, BaseEvaluation] = OrderedDict()
        self.counts: Counter = Counter()

    def get(self, name: str) -> BaseEvaluation | None:
        found = self.entries.get(name)
        if found is not None:
            self.entries.move_to_end(name)
            self.counts["reused"] += 1
        return found

    def put(self, name: str, value: BaseEvaluation) -> None:
        self.counts["made"] += 1
        self.entries[name] = value
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
        self.counts.clear()


SHARED = BaseEvaluations()
