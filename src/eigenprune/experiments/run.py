"""`eigenprune run`: the whole experiment, honest by construction: the pipeline with the one method eigenprune.

base dev/test accuracy -> score once on train -> for each p, dev accuracy (test shown, never used)
-> choose p on dev (p = 0, the base model, is always a candidate; ties go to the smaller p) -> the
chosen edit's test accuracy -> report.json, report.md, plots, the edit, the scores and the
configuration that repeats the run bit for bit. The output directory appears only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from eigenprune.core.errors import UsageError
from eigenprune.evaluation.splits import fold_splits, split_task
from eigenprune.experiments import pipeline, tracking
from eigenprune.experiments.crossfit import folds_report
from eigenprune.methods import registry
from eigenprune.protocol.config import RunConfig, to_json


def run(cfg: RunConfig, out: str | Path | None = None, quiet: bool = False, report_to: tuple[str, ...] = ()) -> dict:
    """The whole experiment (`eigenprune run`) from Python: writes `out` (default runs/TASK-TIMESTAMP) and
    returns the report (report.json's content); `report_to` names trackers to log it to (`experiments.tracking`)."""
    return execute(cfg, out, quiet, report_to=report_to)


def execute(cfg: RunConfig, out: str | Path | None = None, quiet: bool = False, expected: dict | None = None,
            allow_changed: bool = False, report_to: tuple[str, ...] = ()) -> dict:
    """Run the experiment and write its directory, then log it to the `report_to` trackers; returns the report.
    `out` is claimed first, so a clash or an unwritable destination fails before any work, and a failure leaves
    nothing there."""
    from eigenprune.core.outdir import released_on_error
    from eigenprune.edits.artifact import check_new_dir

    tracking.check_installed(report_to)
    out = check_new_dir(out or f"runs/{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    with released_on_error(out):
        report = _execute(cfg, out, quiet, expected, allow_changed)
    tracking.log_folder(out, report_to)
    return report


def _check_recorded(expected: dict | None, recorded: dict, allow_changed: bool) -> list[str]:
    """A rerun from config.json: refuse changed data or weights (unless allowed); say which versions changed."""
    from eigenprune.experiments.provenance import compare

    if not expected:
        return []
    inputs, versions = compare(expected, recorded)
    if inputs and not allow_changed:
        raise UsageError(f"{'; '.join(inputs)}: this rerun would answer another question "
                         "(--allow-changed runs it anyway)")
    notes = [f"rerun with changed inputs (--allow-changed): {'; '.join(inputs)}"] if inputs else []
    if versions:
        notes.append(f"rerun with other versions than the recorded run: {', '.join(versions)}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return notes


def _chosen(cfg: RunConfig, report: dict, edit) -> dict:
    """config.json's `chosen` block: the p of the saved edit (edit/: the fixed split's, else fold 1's or the first
    seed's) and, with folds or seeds, every fold's or seed's; `--config` reruns choose again and ignore it."""
    chosen = {"edit": "edit", "p": edit.config.p, "n_frozen": edit.n_frozen, "select": cfg.select}
    if cfg.folds > 1:
        chosen["p_per_fold"] = [row["chosen_p"] for row in report["folds"]["per_fold"]]
    if cfg.seeds > 1:
        chosen["p_per_seed"] = report["repeats"]["chosen_p"]
    return chosen


def _execute(cfg: RunConfig, out: Path, quiet: bool, expected: dict | None, allow_changed: bool) -> dict:
    from eigenprune.core.models import load_model
    from eigenprune.edits.artifact import atomic_dir, save_edit, save_scores
    from eigenprune.evaluation.calibration import calibration_for
    from eigenprune.evaluation.evaluate import next_token_warnings
    from eigenprune.evaluation.stats import mean_sd
    from eigenprune.evaluation.tasks import load_task
    from eigenprune.reports.run_report import verdict, write_report

    task = load_task(cfg.task, cfg.template, cfg.answers)
    mode = cfg.eval_mode or task.eval_mode
    calibration = calibration_for(task, mode) if cfg.calibrate else None  # a task it does not fit: one line, now
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device, device_map=cfg.device_map, progress=not quiet)
    load_s = time.perf_counter() - t0
    from eigenprune.experiments.provenance import record

    recorded = record(task, model, cfg.device)
    warnings = _check_recorded(expected, recorded, allow_changed)
    spec = registry.resolve("eigenprune")  # `run` is the pipeline with this one method
    costs, side_s = None, 0.0

    def measure(i: int, one: pipeline.SplitRun) -> None:
        """Side effects of every fold's edit (with split seeds, the first seed's), while it lives."""
        nonlocal costs, side_s
        if (cfg.side_effects or cfg.also) and (cfg.folds > 1 or i == 0):
            from eigenprune.experiments.fold_side_effects import FoldSideEffects

            t0 = time.perf_counter()
            costs = costs or FoldSideEffects(model, tok, task, cfg, cfg.folds, quiet, name=_edit_name)
            costs.measure(i, one)
            side_s += time.perf_counter() - t0

    configs = {spec.name: registry.configure(spec, {spec.name: {"sweep_test": cfg.sweep_test}})}
    if cfg.folds > 1:
        folds = fold_splits(task, cfg.folds, cfg.split_seed, cfg.dev_fraction, cfg.limit)
        if mode == "next-token":
            warnings += next_token_warnings(tok, task.train + task.test)
        runs = pipeline.run_splits([(fold, cfg) for fold in folds], model, tok, mode, quiet, [spec], configs,
                                   after=measure, label=lambda i: f"fold {i + 1}/{cfg.folds}",
                                   calibration=calibration)
        reports = [folds_report(folds, runs, pipeline.pool(folds, runs, [spec], cfg.n_boot, dict)[1][spec.name])]
    else:
        seeds = range(cfg.split_seed, cfg.split_seed + cfg.seeds)
        splits = [(split_task(task, cfg.dev_fraction, seed, cfg.limit), dataclasses.replace(cfg, split_seed=seed))
                  for seed in seeds]
        if mode == "next-token":
            for split, _ in splits:
                warnings += [w for w in next_token_warnings(tok, split.train + split.test) if w not in warnings]

        def say(i: int, one: pipeline.SplitRun) -> None:
            r = one.results[spec.name].report
            if not quiet and cfg.seeds > 1:
                print(f"seed {r['split_seed']}: base test {r['base']['test']['acc']:.3f}, "
                      f"pruned {r['pruned']['test']['acc']:.3f} (p={r['chosen_p']})", file=sys.stderr)

        def say_and_measure(i: int, one: pipeline.SplitRun) -> None:
            say(i, one)
            measure(i, one)

        runs = pipeline.run_splits(splits, model, tok, mode, quiet, [spec], configs, after=say_and_measure,
                                   label=lambda i: f"seed {cfg.split_seed + i}" if cfg.seeds > 1 else "",
                                   calibration=calibration)
        reports = [one.results[spec.name].report for one in runs]
    fold_edits = [(i, one.results[spec.name].score_run, one.results[spec.name].edit) for i, one in enumerate(runs)]
    _, run, edit = fold_edits[0]  # the first fold's (or seed's) scores and edit are the ones saved at the top
    fold_edits = fold_edits if cfg.folds > 1 else []
    report = reports[0]
    report["timings"] = {"load": load_s, **report["timings"]}
    if costs is not None:
        report["side_effects"] = costs.section()
        report["timings"]["side_effects"] = side_s
    report["warnings"] = warnings
    report["versions"] = recorded["versions"]
    report["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    if cfg.seeds > 1:
        rows = [{"seed": r["split_seed"], "base_test": r["base"]["test"]["acc"],
                 "pruned_test": r["pruned"]["test"]["acc"], "diff": r["diff_ci"]["diff"], "chosen_p": r["chosen_p"],
                 "sweep": r.get("sweep", [])}
                for r in reports]
        summary = {k: dict(zip(("mean", "sd"), mean_sd(row[k] for row in rows), strict=True))
                   for k in ("base_test", "pruned_test", "diff")}
        report["repeats"] = {"seeds": [r["seed"] for r in rows], "base_test": summary["base_test"],
                             "pruned_test": summary["pruned_test"], "diff": summary["diff"],
                             "chosen_p": [r["chosen_p"] for r in rows], "runs": rows}
    report["verdict"] = verdict(report)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(to_json(cfg) | {"chosen": _chosen(cfg, report, edit),
                                                                    "recorded": recorded}, indent=2,
                                                    sort_keys=True) + "\n")
        save_scores(tmp / "scores", run.scores, run.targets, run.components, run.meta)
        save_edit(tmp / "edit", edit, run.edit_meta())
        for fold, fold_run, fold_edit in fold_edits:
            save_edit(tmp / "folds" / f"fold-{fold + 1}" / "edit", fold_edit, fold_run.edit_meta() | {"fold": fold + 1})
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        write_report(tmp, report, run.scores.ranking(cfg.freeze.aggregate), edit.removed)
    report["out"] = str(out)
    return report


def _edit_name(method: str, fold: int, tag: str | None, n_folds: int, result) -> str:
    """`run`'s row names for its edits: "edit (p = 0.3)" on a fixed split, "fold 2 (p = 0.3)" over folds."""
    return f"fold {fold + 1} (p = {result.edit.config.p:g})" if n_folds > 1 else f"edit (p = {result.edit.config.p:g})"
