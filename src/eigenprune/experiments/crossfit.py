"""`run --folds K`: every example tested once, by a run that chose p on the other folds.

The pipeline runs the whole experiment (`methods.eigenprune.run_one`: base, score on the fold's train,
choose p on its dev, test once) once per fold of `splits.fold_splits`; `folds_report` pools what each
fold's test split says: the base model's and the chosen edit's per-example correctness on all N pooled
examples, with accuracy CIs that resample within folds (`stats.fold_accuracy_ci`) and the paired difference
stratified by fold (`paired.paired_difference`: Newcombe's interval, the exact McNemar p). Nothing a
fold learns on its test split reaches its own choices; each fold's p may differ, and the report says
which. The top-level sweep, the plots and the saved scores are fold 1's (every fold's dev sweep is in its
per_fold row, and every fold's chosen edit is saved too).
`reports.run_report` puts it in words.
"""

from __future__ import annotations

import math

from eigenprune.evaluation.evaluate import content_free_prior, predicted_choices
from eigenprune.evaluation.stats import label_distribution
from eigenprune.experiments.pipeline import SplitRun
from eigenprune.methods.registry import Pooled


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def folds_report(folds, runs: list[SplitRun], pooled: Pooled) -> dict:
    """`run --folds`'s report from the pipeline's runs of eigenprune on each fold and its pooled row: fold 1's
    sweep and components (for the plots), every example's pooled base and edited correctness, CIs resampling
    within folds, and a per-fold table of what each fold chose."""
    reports = [one.results[pooled.result.method].report for one in runs]
    fold_of = pooled.fold_of
    base_test, edit_test = pooled.base.double(), pooled.result.test.double()  # (N,), (N,)
    mean_dev = lambda rows: {"acc": _mean(r["acc"] for r in rows), "lo": math.nan, "hi": math.nan,
                             "n": sum(r["n"] for r in rows)}
    per_fold = [{"fold": fold.fold + 1, "n_train": len(fold.train), "n_dev": len(fold.dev), "n_test": len(fold.test),
                 "chosen_p": r["chosen_p"], "n_frozen": r["n_frozen"], "base_dev": r["base"]["dev"]["acc"],
                 "pruned_dev": r["pruned"]["dev"]["acc"], "base_test": r["base"]["test"]["acc"],
                 "pruned_test": r["pruned"]["test"]["acc"], "sweep": r.get("sweep", [])}
                for fold, r in zip(folds, reports, strict=True)]
    report = dict(reports[0])  # fold 1's sweep, components and score counts, for the plots
    report["timings"] = {k: sum(r["timings"].get(k, 0.0) for r in reports) for k in reports[0]["timings"]}
    report["base"] = {"dev": mean_dev([r["base"]["dev"] for r in reports]), "test": pooled.ci(base_test)}
    report["pruned"] = {"dev": mean_dev([r["pruned"]["dev"] for r in reports]), "test": pooled.ci(edit_test)}
    report["diff_ci"] = pooled.diff(base_test, edit_test)
    report["dev_diff_ci"] = {"diff": _mean(r["pruned_dev"] - r["base_dev"] for r in per_fold), "lo": math.nan,
                             "hi": math.nan}  # a mean over folds: each fold's dev chose its p, so no CI
    report["split_sizes"] = {"pooled": len(folds.examples), "tested": int(base_test.numel()),
                             "test per fold": "/".join(str(r["n_test"]) for r in per_fold)}
    report["folds"] = {"k": len(folds), "seed": folds.seed, "pooled": folds.pooled, "n_tested": int(base_test.numel()),
                       "per_fold": per_fold,
                       "per_example": {"index": folds.tested, "fold": [f + 1 for f in fold_of],
                                       "base": base_test.tolist(), "edited": edit_test.tolist()}}
    picked = [[predicted_choices(one.base["test"]) for one in runs],
              [predicted_choices(one.results[pooled.result.method].test) for one in runs]]
    if all(p is not None for fold in picked for p in fold):
        report["predicted_labels"] = {key: label_distribution(folds.pool(per_fold)[0])
                                      for key, per_fold in zip(("base", "pruned"), picked, strict=True)}
    else:
        report.pop("predicted_labels", None)  # fold 1's alone would not describe the pooled examples
    if "calibration" in report:  # fold 1's block: every fold's chosen edit has its own content-free distribution
        edits = [content_free_prior(one.results[pooled.result.method].test) for one in runs]
        report["calibration"] = {**report["calibration"], "content_free": {"pruned": edits}}
    if "majority_rate" in report:
        from eigenprune.evaluation.stats import majority_rate

        report["majority_rate"] = {"dev": float("nan"), "test": majority_rate([folds.examples[i].label
                                                                               for i in folds.tested])}
    return report
