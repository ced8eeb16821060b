"""eigenprune itself, as a method: score once, sweep or search p on dev, test the chosen p once.

`run_one` is the whole experiment on one split (what `eigenprune run` reports); `run_eigenprune` wraps
it as the registered method `eigenprune`, so a comparison measures exactly what the experiment
measures (same scoring, same sweep, same choice on dev with p = 0 a candidate). Two differences, both
for fairness between methods: the sweep evaluates only dev (the chosen p's test accuracy is computed
once, after the choice), and the wall time leaves out the base model's evaluation, which `compare` does
once for every method.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from eigenprune.edits.freeze import applied
from eigenprune.evaluation.calibration import calibration_record
from eigenprune.evaluation.evaluate import content_free_prior, predicted_choices
from eigenprune.evaluation.stats import label_distribution
from eigenprune.methods.base import MethodResult, edit_applier, edit_changed_params, edit_saver
from eigenprune.methods.registry import Context, register
from eigenprune.protocol.harness import Harness, base_correct, ci, diff_ci


def sweep_p(harness: Harness, run, base_dev: torch.Tensor, base_nll: torch.Tensor,
            sweep_test: bool) -> tuple[list[dict], dict, float]:
    """Every p tried, in the order tried (the given grid, or `--p auto`'s search), each one dev evaluation of
    an edit made from the same scores; returns (sweep rows, p -> (edit, dev, test or None), the chosen p).
    Every row carries both dev numbers, accuracy and the summed NLL of the correct answers."""
    from eigenprune.protocol.search import Candidate, Step, search_p
    from eigenprune.protocol.search import choose as choose_step

    cfg, results, sweep = harness.config, {}, []

    def evaluate_p(p: float) -> Candidate:
        edit = run.edit(cfg.freeze_at(p))
        with applied(harness.model, edit), harness.step(f"p={p:g}"):
            dev, nll = harness.evaluate_with_nll("dev")  # one pass in exact mode
            test = harness.evaluate("test") if sweep_test else None
        results[p] = (edit, dev, test)
        row = {"p": p, "n_frozen": edit.n_frozen, **{f"dev_{k}": v for k, v in ci(dev, cfg.n_boot).items()},
               "dev_nll": float(nll.double().sum())}
        if test is not None:
            row |= {f"test_{k}": v for k, v in ci(test, cfg.n_boot).items()}
        sweep.append(row)
        return Candidate.from_examples(dev, nll)

    base = Candidate.from_examples(base_dev, base_nll)
    if cfg.p == "auto":
        n_components = sum(t.n_components for t in run.targets)
        chosen = search_p(evaluate_p, base, grid=cfg.grid, budget=cfg.p_budget, select=cfg.select,
                          min_p=1 / n_components).chosen.value
    else:
        steps = [Step(0.0, base, "base")] + [Step(p, evaluate_p(p), "grid") for p in cfg.p]
        chosen = choose_step(steps, cfg.select).value
    for row in sweep:
        row["chosen"] = row["p"] == chosen
    return sweep, results, chosen


def _kind(target_name: str) -> str:
    part = target_name.split(":")
    return part[1] if len(part) > 1 and part[1] in "qkv" else part[0].rsplit(".", 1)[-1]


def run_one(harness: Harness, seed: int, base: dict[str, torch.Tensor] | None = None,
            sweep_test: bool | None = None, base_nll: torch.Tensor | None = None,
            ) -> tuple[dict, object, object, dict[str, torch.Tensor]]:
    """One split seed: returns (report dict, ScoreRun, chosen Edit, the chosen model's (n,) correctness per
    split). `base`: the unmodified model's correctness on dev and test, when the caller has it (else
    evaluated here); `sweep_test`: overrides the config's (evaluate every p on test, or only the chosen);
    `base_nll`: the unmodified model's (n_dev,) dev NLL when the caller has it (`pipeline` in exact mode)."""
    from eigenprune.edits.engine import score_run

    cfg, timings = harness.config, {}
    sweep_test = cfg.sweep_test if sweep_test is None else sweep_test
    t0 = time.perf_counter()
    base = {split: base_correct(harness, base, split) for split in ("dev", "test")}
    timings["base_eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = score_run(harness.model, harness.tokenizer, harness.splits.train, cfg.targets, cfg.layers, cfg.per_head,
                    cfg.score, progress=harness.progress(), meta={"model": cfg.model, "dtype": cfg.dtype,
                                                                 "data": cfg.task, "split_seed": seed})
    timings["scoring"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_nll = harness.nll("dev") if base_nll is None else base_nll
    sweep, results, chosen_p = sweep_p(harness, run, base["dev"], base_nll, sweep_test)
    timings["sweep"] = time.perf_counter() - t0
    base_ci = {k: ci(v, cfg.n_boot) for k, v in base.items()}
    t0 = time.perf_counter()
    if chosen_p == 0:
        edit, pruned = run.edit(cfg.freeze_at(0.0)), dict(base)
    else:
        edit, dev, test = results[chosen_p]
        if test is None:
            with applied(harness.model, edit), harness.step(f"chosen p={chosen_p:g}"):
                test = harness.evaluate("test")
        pruned = {"dev": dev, "test": test}
    timings["test_eval"] = time.perf_counter() - t0
    splits = harness.splits
    report = {
        "model": cfg.model, "task": cfg.task, "targets": cfg.targets, "layers": cfg.layers, "per_head": cfg.per_head,
        "eval_mode": harness.mode, "split_seed": seed, "score_seed": cfg.score.seed,
        "scope": cfg.freeze.scope, "aggregate": cfg.freeze.aggregate, "bias": cfg.freeze.bias,
        "split_sizes": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        "base": base_ci,
        "pruned": {k: ci(v, cfg.n_boot) for k, v in pruned.items()},
        "chosen_p": chosen_p, "n_frozen": edit.n_frozen, "n_components": sum(t.n_components for t in run.targets),
        "sweep": sweep,
        "diff_ci": diff_ci(base["test"], pruned["test"], cfg.n_boot),
        "dev_diff_ci": diff_ci(base["dev"], pruned["dev"], cfg.n_boot),
        "frozen_by_target": [{"target": t.name, "layer": t.layer, "kind": _kind(t.name),
                              "n_frozen": len(edit.removed[t.name]), "n_components": t.n_components}
                             for t in run.targets],
        "n_pairs": run.scores.n_pairs, "timings": timings,
        "p_search": {"mode": "auto" if cfg.p == "auto" else "grid", "select": cfg.select, "budget": cfg.p_budget,
                     "tried": [row["p"] for row in sweep], "base_dev_nll": float(base_nll.double().sum())},
    }
    picked = {key: predicted_choices(correct["test"]) for key, correct in (("base", base), ("pruned", pruned))}
    if all(v is not None for v in picked.values()):  # choice mode: which labels each model answered on test
        report["predicted_labels"] = {key: label_distribution(v) for key, v in picked.items()}
    if harness.calibration is not None:  # each model's own content-free distribution, as its test evaluation used
        report["calibration"] = calibration_record(harness.calibration, content_free_prior(base["test"]),
                                                   {"pruned": [content_free_prior(pruned["test"])]})
    labels = [ex.label for ex in splits.test if ex.label is not None]
    if labels:
        from eigenprune.evaluation.stats import majority_rate

        report["majority_rate"] = {"dev": majority_rate([ex.label for ex in splits.dev]),
                                   "test": majority_rate(labels)}
    return report, run, edit, pruned


@dataclass
class EigenpruneSettings:
    """eigenprune's own setting; everything else (targets, scoring, freezing, p) is the run's."""

    sweep_test: bool = field(default=False, metadata={
        "help": "also evaluate every p on test (shown in `run`'s report, never used to choose)"})


@dataclass
class EigenpruneResult(MethodResult):
    """eigenprune's result: the row every method has, and the whole experiment on this split (`run`'s report)."""

    report: dict = field(default_factory=dict)  # run_one's report of this split: sweep, chosen p, CIs, timings


def run_eigenprune(harness: Harness, seed: int | None = None, base: dict[str, torch.Tensor] | None = None,
                   sweep_test: bool = False, base_nll: torch.Tensor | None = None) -> EigenpruneResult:
    """The eigenprune experiment for the harness's split, as a method result. `score_run` and `edit` carry the
    scores and the chosen edit to the methods that build on them. `base`: the unmodified model's dev/test
    correctness when the caller has it (the pipeline does); `sweep_test`: evaluate every p on test too."""
    t0 = time.perf_counter()
    seed = harness.config.split_seed if seed is None else seed
    report, run, edit, chosen = run_one(harness, seed, base, sweep_test=sweep_test, base_nll=base_nll)
    wall = time.perf_counter() - t0 - report["timings"]["base_eval"]
    cfg = harness.config
    config = {"p": report["chosen_p"], "n_frozen": edit.n_frozen, "targets": cfg.targets, "layers": cfg.layers,
              "per_head": cfg.per_head, **{k: v for k, v in dataclasses.asdict(cfg.freeze).items() if k != "p"}}
    return EigenpruneResult(
        method="eigenprune", config=config, dev=chosen["dev"], test=chosen["test"],
        dev_evaluations=1 + len(report["sweep"]),
        wall_s=wall, changed_params=edit_changed_params(edit),
        save=edit_saver(edit, run.edit_meta() | {"method": "eigenprune"}), applied=edit_applier(edit),
        extra={"sweep": report["sweep"], "n_components": report["n_components"], "timings": report["timings"]},
        modules=edit.modules, score_run=run, edit=edit, report=report,
    )


@register("eigenprune", EigenpruneSettings, default=1,
          summary="score every component of the targets by attribution patching, freeze the lowest fraction p "
                  "(chosen on dev; the run's settings)")
def eigenprune(harness: Harness, config: EigenpruneSettings, ctx: Context) -> EigenpruneResult:
    return run_eigenprune(harness, base=ctx.base, sweep_test=config.sweep_test, base_nll=ctx.base_nll)
