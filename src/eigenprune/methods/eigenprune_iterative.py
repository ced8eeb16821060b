"""Iterative eigenpruning as a method of `compare`: reach p in S rounds, re-scoring the edited model between
rounds (`eigenprune.iterative`), with p and S chosen on dev like every other method.

Each candidate (p, S) costs S scoring passes (round 1 depends on p, so nothing is shared across p) and one
dev evaluation; the unedited model competes and wins ties, then the smaller p, then the fewer rounds. The
chosen edit is saved merged into one ordinary edit (`IterativeEdit.merged`), which reloads with
`artifact.apply_saved_edit` like eigenprune's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from eigenprune.edits.artifact import fingerprint
from eigenprune.edits.iterative import iterative_edits
from eigenprune.methods.base import MethodResult, edit_applier, edit_changed_params, edit_saver
from eigenprune.methods.registry import Context, register
from eigenprune.protocol.harness import Harness, accuracy, base_correct, chosen_on_dev


@dataclass
class IterativeSettings:
    """Which totals and how many rounds to try."""

    steps: tuple[int, ...] = field(default=(3,), metadata={"help": "numbers of rounds to try (each costs that many "
                                                                   "scoring passes per p)"})
    p: tuple[float, ...] | None = field(default=None, metadata={"help": "total fractions to try; None: the run's --p"})

    def __post_init__(self) -> None:
        if not self.steps or min(self.steps) < 1:
            raise ValueError(f"steps must be positive round counts, got {list(self.steps)}")
        if self.p is not None and (not self.p or not all(0 < v < 1 for v in self.p)):
            raise ValueError(f"p values must be in (0, 1), got {list(self.p)}")


@register("eigenprune-iterative", IterativeSettings,
          summary="eigenprune in S rounds, re-scoring the edited model between rounds (p and S chosen on dev)")
def eigenprune_iterative(harness: Harness, config: IterativeSettings, ctx: Context) -> MethodResult:
    t0 = time.perf_counter()
    cfg, model = harness.config, harness.model
    ps = sorted(set(config.p if config.p is not None else cfg.grid))
    candidates = [(p, s) for p in ps for s in sorted(set(config.steps))]  # mildest first: ties keep the smaller
    base_dev = base_correct(harness, ctx.base, "dev")
    edits, devs, sweep = [], [], []
    for p, steps in candidates:
        with harness.step(f"p={p:g} S={steps}"):
            edit = iterative_edits(model, harness.tokenizer, harness.splits.train, cfg.targets, cfg.layers,
                                   cfg.per_head, cfg.score, cfg.freeze_at(p), steps=steps, progress=harness.progress())
            with edit.applied(model):
                devs.append(harness.evaluate("dev"))  # (n_dev,)
        edits.append(edit)
        sweep.append({"p": p, "steps": steps, "rounds": len(edit.rounds), "n_frozen": edit.n_frozen,
                      "dev_acc": accuracy(devs[-1])})
    best = chosen_on_dev(base_dev, devs, cfg.select)  # accuracy, or the one-SE rule (mildest first)
    if best < 0:
        dev, test = base_dev, base_correct(harness, ctx.base, "test")
        chosen, save, changed, modules, applied = {"p": 0.0, "steps": 0, "n_frozen": 0}, None, 0, [], None
    else:
        dev = devs[best]
        with edits[best].applied(model):
            test = harness.evaluate("test")
        merged = edits[best].merged()
        modules = merged.modules
        meta = {"method": "eigenprune-iterative", "base_model": cfg.model, "data": cfg.task,
                "targets_spec": cfg.targets, "layers": cfg.layers, "per_head": cfg.per_head,
                "base_fingerprint": fingerprint(model, sorted({t.module_name for t in merged.targets})),
                "steps": candidates[best][1]}
        chosen = {k: v for k, v in sweep[best].items() if k != "dev_acc"}
        save, changed = edit_saver(merged, meta), edit_changed_params(merged)
        applied = edit_applier(merged)
    return MethodResult(
        method="eigenprune-iterative", config=chosen, dev=dev, test=test, dev_evaluations=1 + len(sweep),
        wall_s=time.perf_counter() - t0, changed_params=changed, save=save, runs=sweep, modules=modules,
        applied=applied,
        extra={"candidates": [list(c) for c in candidates]},
        notes=["eigenprune-iterative: each (p, S) candidate re-scores the model S times, the rounds after the first "
               "on the model with the earlier rounds' edit applied."],
    )
