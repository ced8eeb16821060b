"""What every method of an experiment shares: one model, one task split, one eval mode, one chooser, CIs.

`Harness` evaluates the current model on a split; `best_on_dev` is the one rule by which every method
chooses among its candidates (the unedited model competes and wins ties; then the mildest change), and
`chosen_on_dev` the same with the run's `select`: `"1se"` takes the mildest candidate whose dev accuracy is
within one paired standard error of the best (`significance.one_se_choice`); `ci` is the bootstrap
interval of one accuracy and `diff_ci` the paired difference every report shows (`evaluation.paired`:
Newcombe's interval, the exact McNemar p, n and the detectable effect). Every method gets a `Harness`;
this module builds on evaluation alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from eigenprune.core.progress import SEP
from eigenprune.evaluation.paired import paired_difference
from eigenprune.evaluation.significance import one_se_choice
from eigenprune.evaluation.stats import Accuracy, Difference, accuracy, accuracy_ci, paired_diff_ci  # noqa: F401


def ci(correct: torch.Tensor, n_boot: int, seed: int = 0) -> dict:
    """Accuracy with its 95% bootstrap CI: {"acc", "lo", "hi", "n"} (`stats.Accuracy`)."""
    return Accuracy(*accuracy_ci(correct.numpy(), n_boot=n_boot, seed=seed), int(correct.numel())).to_dict()


def diff_ci(before: torch.Tensor, after: torch.Tensor, n_boot: int) -> dict:
    """Paired difference (after - before) on the same examples: {"diff", "lo", "hi", "p", "n", "discordant",
    "mde", "interval"} (`paired.PairedDifference`; `n_boot` serves only seed-averaged values' bootstrap)."""
    return paired_difference(before.double().numpy(), after.double().numpy(), n_boot=n_boot).to_dict()


def best_on_dev(base_acc: float | None, candidates: Sequence[float]) -> int:
    """Index of the best dev accuracy, -1 for the base model. The base (when given) wins ties, then the
    earliest candidate: callers list candidates from the mildest change to the strongest."""
    best, best_acc = -1, base_acc if base_acc is not None else float("-inf")
    for i, acc in enumerate(candidates):
        if acc > best_acc:
            best, best_acc = i, acc
    return best


def chosen_on_dev(base_dev: torch.Tensor, devs: Sequence[torch.Tensor], select: str) -> int:
    """Index of the chosen candidate, -1 for the base model: `best_on_dev` on the accuracies, or with `select`
    "1se" the one-standard-error rule on the per-example (n_dev,) correctness (`devs` mildest first, as for
    `best_on_dev`). Any other `select` needs a dev loss the caller does not have: the accuracy rule."""
    if select != "1se":
        return best_on_dev(accuracy(base_dev), [accuracy(d) for d in devs])
    return one_se_choice([base_dev.float().numpy(), *(d.float().numpy() for d in devs)]) - 1


class Harness:
    """One model, one task split, one eval mode: what every method in a comparison shares."""

    def __init__(self, model, tokenizer, splits, mode: str, config, quiet: bool, where: Sequence[str] = (),
                 calibration=None) -> None:
        self.model, self.tokenizer, self.splits, self.mode = model, tokenizer, splits, mode
        self.calibration = calibration  # `evaluation.calibration.Calibration`: every evaluation is calibrated alike
        self.config, self.quiet = config, quiet
        self.where = [w for w in where if w]  # the steps the work in progress belongs to: fold, method, candidate
        self.dev_evaluations = 0
        self._want_nll, self._free_nll = False, None  # `evaluate_with_free_nll` asks `evaluate` for the NLL

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Name a step (a method, a candidate such as "p=0.05"): every progress bar inside says it."""
        self.where.append(name)
        try:
            yield
        finally:
            self.where.pop()

    def progress(self, what: str = "") -> bool | str:
        """What to pass as a long function's `progress` (`core.progress`): False under --quiet, else the steps."""
        if self.quiet:
            return False
        return SEP.join([*self.where, what] if what else self.where) or True

    def evaluate(self, split: str) -> torch.Tensor:
        """(n,) bool correctness of the model as it is now on `split`. Every evaluation of every method comes through
        here (`evaluate_with_nll` too), so a test that wraps it sees them all."""
        from eigenprune.evaluation.evaluate import evaluate

        self.dev_evaluations += split == "dev"
        result = evaluate(self.model, self.tokenizer, getattr(self.splits, split), self.mode,
                          self.config.eval_batch_size, progress=self.progress(split), calibration=self.calibration,
                          with_nll=self._want_nll)
        self._free_nll = result.nll
        return result.correct

    def evaluate_with_free_nll(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`evaluate(split)`, the (n,) answer NLL when that evaluation's own pass computed it, else None): in
        `exact` mode the teacher-forced pass gives the numbers `nll` would, bit for bit."""
        self._want_nll, self._free_nll = True, None
        try:
            correct = self.evaluate(split)
        finally:
            self._want_nll = False
        nll, self._free_nll = self._free_nll, None
        return correct, nll

    def evaluate_with_nll(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(`evaluate(split)`, `nll(split)`) of the model as it is now: one pass in `exact` mode, two otherwise."""
        correct, nll = self.evaluate_with_free_nll(split)
        return correct, nll if nll is not None else self.nll(split)

    def nll(self, split: str) -> torch.Tensor:
        """(n,) summed NLL of each example's correct answer under the model as it is now (teacher forced)."""
        from eigenprune.protocol.search import dev_nll

        return dev_nll(self.model, self.tokenizer, getattr(self.splits, split), self.config.eval_batch_size)


def base_correct(harness: Harness, base: dict[str, torch.Tensor] | None, split: str) -> torch.Tensor:
    """The unmodified model's (n,) correctness on `split`: the caller's (compare evaluates it once for every
    method) when given, else evaluated now."""
    return base[split] if base and split in base else harness.evaluate(split)
