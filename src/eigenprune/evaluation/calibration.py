"""Contextual calibration of choice scores (Zhao et al. 2021, "Calibrate Before Use", arXiv 2102.09690).

A model's choice scores carry a prior over the label words that owes nothing to the example: SmolLM2 answers
" entails" to nearly every CB prompt. Contextual calibration estimates that prior by asking the same model the
task's prompt with every content field replaced by a content-free string — "N/A", "" and "[MASK]", the paper's
three, whose probabilities it averages — and divides it out. With p_cf the content-free probabilities of the
choices (the mean over the content-free prompts, normalised over the choices),

    score_c(x) = log p(c | x) − log p_cf(c)        (the paper's W = diag(p_cf)^-1, b = 0, in log space)

and the example's answer is the choice with the highest score. A choice's log p is the summed log-probability
of its whole string, in the example and in the content-free prompt alike (`evaluate.choice_nll` computes both),
so a label word of several tokens is calibrated as the unit that is scored.

It fits tasks whose examples share one set of label words: CB, RTE, COPA as packaged (its choices " 1"/" 2"
name the alternatives, so the prior removed is the position bias) and custom classification files with shared
choices rendered through a template. A task whose choices differ per example has no one set of answers to ask
the content-free prompt about, and a file of ready-made prompts has no fields to empty: `calibration_for`
refuses both in one line.

The prior belongs to the model: `evaluate` computes it afresh for every model state it judges (the base, each
edit), so base and edits are calibrated by the same rule, each with its own content-free distribution.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from eigenprune.core.batching import Example
from eigenprune.core.errors import UsageError
from eigenprune.evaluation.tasks import Task, render

CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al.'s content-free strings; their probabilities are averaged


@dataclass(frozen=True)
class Calibration:
    """The content-free prompts of one task and the choices they are asked about."""

    task: str
    prompts: tuple[str, ...]  # the task's template with every field content-free, one per filler
    choices: tuple[str, ...]  # the label words every example shares, in label order

    def examples(self) -> list[Example]:
        """The content-free prompts as examples offering the task's choices (their label is never used)."""
        return [Example(prompt, self.choices[0], self.choices, 0) for prompt in self.prompts]


def template_fields(template: str) -> list[str]:
    """The names of a template's `{field}` placeholders (`{a.b}` and `{a[0]}` name `a`), in order, once each."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            root = name.split(".", 1)[0].split("[", 1)[0]
            if root not in names:
                names.append(root)
    return names


def calibration_for(task: Task, mode: str, fillers: Sequence[str] = CONTENT_FREE) -> Calibration:
    """The content-free prompts of `task`: its template with every field set to each filler; a task or mode
    that calibration does not fit is a one-line UsageError that says why."""
    if mode != "choice":
        raise UsageError(f"--calibrate calibrates choice scores; eval mode {mode!r} scores no choices "
                         "(use --eval-mode choice or drop --calibrate)")
    if task.choices is None:
        raise UsageError(f"--calibrate needs one set of label words shared by every example; the choices of task "
                         f"{task.name!r} differ per example, so no content-free prompt can estimate their prior")
    if task.template is None:
        raise UsageError(f"--calibrate needs the task's prompt template to build a content-free prompt; task "
                         f"{task.name!r} gives ready-made prompts (give --template with the file's fields)")
    fields = template_fields(task.template)
    prompts = []
    for filler in fillers:
        prompt = render(task.template, {name: filler for name in fields}, f"task {task.name} (content-free)")
        if prompt.strip() and prompt not in prompts:  # a template of one bare field has nothing left for ""
            prompts.append(prompt)
    if not prompts:
        raise UsageError(f"--calibrate: the template of task {task.name!r} renders to nothing content-free")
    return Calibration(task.name, tuple(prompts), task.choices)


def content_free_logprobs(content_free_nll: Sequence[torch.Tensor]) -> torch.Tensor:
    """log p_cf: the summed choice NLLs of each content-free prompt, (n_choices,) each, as the log of their mean
    probability over the prompts, normalised over the choices: (n_choices,), logsumexp 0."""
    logp = -torch.stack([v.double() for v in content_free_nll])  # (prompts, choices)
    mean = logp.logsumexp(0) - math.log(logp.shape[0])  # (choices,) log of the mean probability
    return mean - mean.logsumexp(0)  # (choices,)


def calibrated_nll(nll: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Calibrated NLL of an example's choices, (n_choices,): −(log p(c | x) − log p_cf(c)); its argmin is the
    calibrated answer."""
    return nll.double() + log_prior  # (n_choices,)


def prior_by_choice(choices: Sequence[str], log_prior: torch.Tensor) -> dict[str, float]:
    """p_cf as {label word (stripped): probability}, for reports."""
    return {c.strip(): float(p) for c, p in zip(choices, log_prior.exp(), strict=True)}


def calibration_record(calibration: Calibration, base: dict[str, float] | None,
                       edits: dict[str, list[dict[str, float] | None]]) -> dict:
    """The `calibration` block of report.json / comparison.json: how choices were scored, the content-free
    prompts, the base model's content-free distribution (one: the base and the prompts are the same in every
    split) and each edit's, per split (a fixed split: one; K folds: one per fold, each fold's chosen edit)."""
    return {"scoring": "contextual calibration (Zhao et al. 2021): log p(choice | example) - log p_cf(choice)",
            "fillers": list(CONTENT_FREE), "content_free_prompts": list(calibration.prompts),
            "choices": [c.strip() for c in calibration.choices], "base_content_free": base, "content_free": edits}
