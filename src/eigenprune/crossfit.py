"""`run --folds K`: every example tested once, by a run that chose p on the other folds.

`run_folds` runs the whole experiment (`experiment.run_one`: base, score on the fold's train, choose p
on its dev, test once) once per fold of `splits.fold_splits`, and pools what each fold's test split
says: the base model's and the chosen edit's per-example correctness on all N pooled examples, with
CIs that resample within folds (`stats.fold_accuracy_ci`, `stats.fold_paired_diff_ci`). Nothing a
fold learns on its test split reaches its own choices; each fold's p may differ, and the report says
which. The sweep, the plots and the saved scores are fold 1's (each fold's chosen edit is saved too).
`folds_verdict` and `folds_section` put it in words for report.md.
"""

from __future__ import annotations

import math

import torch

from .harness import Harness


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_folds(model, tokenizer, task, mode: str, cfg, quiet: bool) -> tuple[dict, list[tuple]]:
    """(the pooled report, [(fold number, ScoreRun, chosen Edit)] per fold)."""
    from .experiment import run_one
    from .splits import fold_splits
    from .stats import fold_accuracy_ci, fold_paired_diff_ci

    folds = fold_splits(task, cfg.folds, cfg.split_seed, cfg.dev_fraction, cfg.limit)
    reports, bases, chosen, saved = [], [], [], []
    for fold in folds:
        harness = Harness(model, tokenizer, fold, mode, cfg, quiet)
        base = {split: harness.evaluate(split) for split in ("dev", "test")}
        one, run, edit, pruned = run_one(harness, cfg.split_seed, base)
        reports.append(one)
        bases.append(base)
        chosen.append(pruned)
        saved.append((fold.fold, run, edit))
    base_test, fold_of = folds.pool([b["test"] for b in bases])
    edit_test, _ = folds.pool([c["test"] for c in chosen])
    base_test, edit_test = torch.tensor(base_test, dtype=torch.float64), torch.tensor(edit_test, dtype=torch.float64)
    n_boot = cfg.n_boot
    acc = lambda values: dict(zip(("acc", "lo", "hi"), fold_accuracy_ci(values.numpy(), fold_of, n_boot=n_boot),
                                  strict=True)) | {"n": int(values.numel())}
    mean_dev = lambda rows: {"acc": _mean(r["acc"] for r in rows), "lo": math.nan, "hi": math.nan,
                             "n": sum(r["n"] for r in rows)}
    per_fold = [{"fold": fold.fold + 1, "n_train": len(fold.train), "n_dev": len(fold.dev), "n_test": len(fold.test),
                 "chosen_p": r["chosen_p"], "n_frozen": r["n_frozen"], "base_dev": r["base"]["dev"]["acc"],
                 "pruned_dev": r["pruned"]["dev"]["acc"], "base_test": r["base"]["test"]["acc"],
                 "pruned_test": r["pruned"]["test"]["acc"]} for fold, r in zip(folds, reports, strict=True)]
    report = dict(reports[0])  # fold 1's sweep, components and score counts, for the plots
    report["timings"] = {k: sum(r["timings"].get(k, 0.0) for r in reports) for k in reports[0]["timings"]}
    report["base"] = {"dev": mean_dev([r["base"]["dev"] for r in reports]), "test": acc(base_test)}
    report["pruned"] = {"dev": mean_dev([r["pruned"]["dev"] for r in reports]), "test": acc(edit_test)}
    report["diff_ci"] = dict(zip(("diff", "lo", "hi"), fold_paired_diff_ci(base_test.numpy(), edit_test.numpy(),
                                                                           fold_of, n_boot=n_boot), strict=True))
    report["dev_diff_ci"] = {"diff": _mean(r["pruned_dev"] - r["base_dev"] for r in per_fold), "lo": math.nan,
                             "hi": math.nan}  # a mean over folds: each fold's dev chose its p, so no CI
    report["split_sizes"] = {"pooled": len(folds.examples), "tested": int(base_test.numel()),
                             "test per fold": "/".join(str(r["n_test"]) for r in per_fold)}
    report["folds"] = {"k": len(folds), "seed": folds.seed, "pooled": folds.pooled, "n_tested": int(base_test.numel()),
                       "per_fold": per_fold,
                       "per_example": {"index": folds.tested, "fold": [f + 1 for f in fold_of],
                                       "base": base_test.tolist(), "edited": edit_test.tolist()}}
    if "majority_rate" in report:
        from .stats import majority_rate

        report["majority_rate"] = {"dev": float("nan"), "test": majority_rate([folds.examples[i].label
                                                                               for i in folds.tested])}
    return report, saved


def folds_verdict(report: dict) -> str:
    """The pooled result in plain words."""
    f, d = report["folds"], report["diff_ci"]
    base, edit = report["base"]["test"], report["pruned"]["test"]
    ps = [row["chosen_p"] for row in f["per_fold"]]
    text = (f"Across {f['k']} cross-fitted folds ({f['n_tested']} examples, each tested once by a run that chose p "
            f"on the other folds): edited test accuracy {edit['acc']:.3f} [{edit['lo']:.3f}, {edit['hi']:.3f}] vs base "
            f"{base['acc']:.3f} [{base['lo']:.3f}, {base['hi']:.3f}]; difference {d['diff']:+.3f}, 95% CI "
            f"[{d['lo']:+.3f}, {d['hi']:+.3f}] (resampled within folds)")
    if d["lo"] > 0:
        text += ": the gain is significant at the 95% level."
    elif d["hi"] < 0:
        text += ": the edits made test accuracy significantly worse."
    elif all(p == 0 for p in ps):
        text += ": no fold found a p that beat the base model on dev, so every fold kept it."
    else:
        text += ": the interval includes 0, so the gain is not significant."
    kept = sum(p == 0 for p in ps)
    text += f" p chosen per fold: {', '.join(f'{p:g}' for p in ps)}" + (
        f" (the base model kept in {kept} of {len(ps)})." if kept and kept < len(ps) else ".")
    majority = (report.get("majority_rate") or {}).get("test")
    if majority is not None and max(base["acc"], edit["acc"]) <= majority:
        text += f" Neither beats always answering the majority class ({majority:.3f})."
    return text


def folds_section(report: dict) -> list[str]:
    f = report["folds"]
    pooled = ", ".join(f"{n} from {src}" for src, n in f.get("pooled", {}).items())
    source = f" ({pooled})" if pooled else ""
    lines = ["## Folds", "",
             f"{f['k']} seeded folds (seed {f['seed']}) over {f['n_tested']} examples{source}. Each fold was the "
             "test split of one whole run: its dev split came from the other folds, scoring used the rest, p was "
             "chosen on that dev split, and the fold's test split was evaluated once. The accuracies above pool "
             "every example's result; their CIs resample examples within folds. The sweep "
             "and plots below are fold 1's.", "",
             "| fold | train / dev / test | chosen p | components frozen | base dev | edited dev | base test | "
             "edited test |", "|---|---|---|---|---|---|---|---|"]
    for r in f["per_fold"]:
        lines.append(f"| {r['fold']} | {r['n_train']} / {r['n_dev']} / {r['n_test']} | {r['chosen_p']:g} | "
                     f"{r['n_frozen']} | {r['base_dev']:.3f} | {r['pruned_dev']:.3f} | {r['base_test']:.3f} | "
                     f"{r['pruned_test']:.3f} |")
    return [*lines, ""]
