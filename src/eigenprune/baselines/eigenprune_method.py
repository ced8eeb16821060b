"""eigenprune itself as one method of a comparison.

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

from ..experiment import Harness, run_one
from .base import MethodResult, edit_applier, edit_changed_params, edit_saver
from .registry import Context, NoSettings, register


def run_eigenprune(harness: Harness, seed: int | None = None,
                   base: dict[str, torch.Tensor] | None = None) -> MethodResult:
    """The eigenprune experiment for the harness's split; `extra` also holds the `ScoreRun` ("score_run"),
    the chosen `Edit` ("edit") and run_one's report ("report") for the methods that build on them.
    `base`: the unmodified model's dev/test correctness when the caller has it (compare does)."""
    t0 = time.perf_counter()
    seed = harness.config.split_seed if seed is None else seed
    report, run, edit, chosen = run_one(harness, seed, base, sweep_test=False)  # test only for the chosen p
    wall = time.perf_counter() - t0 - report["timings"]["base_eval"]
    cfg = harness.config
    config = {"p": report["chosen_p"], "n_frozen": edit.n_frozen, "targets": cfg.targets, "layers": cfg.layers,
              "per_head": cfg.per_head, **{k: v for k, v in dataclasses.asdict(cfg.freeze).items() if k != "p"}}
    return MethodResult(
        method="eigenprune", config=config, dev=chosen["dev"], test=chosen["test"],
        dev_evaluations=1 + len(report["sweep"]),
        wall_s=wall, changed_params=edit_changed_params(edit),
        save=edit_saver(edit, run.edit_meta() | {"method": "eigenprune"}), applied=edit_applier(edit),
        extra={"score_run": run, "edit": edit, "report": report, "sweep": report["sweep"],
               "n_components": report["n_components"], "timings": report["timings"]},
        modules=edit.modules,
    )


@register("eigenprune", default=1, summary="score every component of the targets by attribution patching, "
                                           "freeze the lowest fraction p (chosen on dev; the run's settings)")
def eigenprune(harness: Harness, config: NoSettings, ctx: Context) -> MethodResult:
    return run_eigenprune(harness, base=ctx.base)
