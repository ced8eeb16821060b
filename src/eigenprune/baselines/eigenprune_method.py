"""eigenprune itself as one method of a comparison, plus the helpers every edit-based method shares.

`run_eigenprune` calls `experiment.run_one`, the very code behind `eigenprune run`, so a comparison
measures exactly what the experiment measures (same scoring, same sweep, same choice on dev with
p = 0 a candidate). Two differences, both for fairness between methods: the sweep evaluates only dev
(the chosen p's test accuracy is computed once, after the choice), and the wall time leaves out the
base model's evaluation, which `compare` does once for every method.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..experiment import Harness, ci, run_one
from .base import MethodResult, edit_changed_params, edit_saver


class _RecordingHarness(Harness):
    """Evaluates through the caller's harness (so its counting and any override apply) under other
    settings, remembering each result so that `run_one`'s tensors can be recovered."""

    def __init__(self, parent: Harness, config) -> None:
        super().__init__(parent.model, parent.tokenizer, parent.splits, parent.mode, config, parent.quiet)
        self.parent, self.calls = parent, []

    def evaluate(self, split: str) -> torch.Tensor:
        correct = self.parent.evaluate(split)
        self.calls.append((split, correct))
        return correct


def run_eigenprune(harness: Harness, seed: int | None = None) -> MethodResult:
    """The eigenprune experiment for the harness's split; `extra` also holds the `ScoreRun` ("score_run"),
    the chosen `Edit` ("edit") and run_one's report ("report") for the methods that build on them."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(harness.config, sweep_test=False)  # test only for the chosen p
    recording = _RecordingHarness(harness, cfg)
    seed = harness.config.split_seed if seed is None else seed
    report, run, edit = run_one(recording, seed)
    wall = time.perf_counter() - t0 - report["timings"]["base_eval"]
    devs = [c for split, c in recording.calls if split == "dev"]  # base, then one per p in cfg.p order
    tests = [c for split, c in recording.calls if split == "test"]  # base, then the chosen p's (if any)
    chosen = report["chosen_p"]
    dev = devs[0] if chosen == 0 else devs[1 + cfg.p.index(chosen)]
    test = tests[0] if chosen == 0 else tests[-1]
    for split, correct in (("dev", dev), ("test", test)):  # the recovered tensors are run_one's numbers
        if ci(correct, 1)["acc"] != report["pruned"][split]["acc"]:
            raise RuntimeError(f"could not recover run_one's {split} correctness; experiment.run_one changed")
    config = {"p": chosen, "n_frozen": edit.n_frozen, "targets": cfg.targets, "layers": cfg.layers,
              "per_head": cfg.per_head, "scope": cfg.scope, "aggregate": cfg.aggregate, "bias": cfg.bias}
    return MethodResult(
        method="eigenprune", config=config, dev=dev, test=test, dev_evaluations=1 + len(cfg.p), wall_s=wall,
        changed_params=edit_changed_params(edit), save=edit_saver(edit, run.edit_meta() | {"method": "eigenprune"}),
        extra={"score_run": run, "edit": edit, "report": report, "sweep": report["sweep"],
               "n_components": report["n_components"], "timings": report["timings"]},
    )
