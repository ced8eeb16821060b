"""`eigenprune run`: the whole experiment, honest by construction.

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

from .config import DEFAULT_PS, RunConfig, add_run_options, config_from_args, config_from_file  # noqa: F401
from .errors import UsageError
from .freeze import applied
from .harness import Harness, base_correct, best_on_dev, ci, diff_ci  # noqa: F401  (re-exported)


def choose(base_dev: float, sweep: list[dict]) -> float:
    """The p with the best dev accuracy (`harness.best_on_dev`: p = 0 competes, ties favour the smaller p)."""
    best = best_on_dev(base_dev, [row["dev_acc"] for row in sorted(sweep, key=lambda r: r["p"])])
    return sorted(sweep, key=lambda r: r["p"])[best]["p"] if best >= 0 else 0.0


def sweep_p(harness: Harness, run, base_dev: torch.Tensor, base_nll: torch.Tensor,
            sweep_test: bool) -> tuple[list[dict], dict, float]:
    """Every p tried, in the order tried (the given grid, or `--p auto`'s search), each one dev evaluation of
    an edit made from the same scores; returns (sweep rows, p -> (edit, dev, test or None), the chosen p).
    Every row carries both dev numbers, accuracy and the summed NLL of the correct answers."""
    from .search import Candidate, Step, search_p
    from .search import choose as choose_step

    cfg, results, sweep = harness.config, {}, []

    def evaluate_p(p: float) -> Candidate:
        edit = run.edit(cfg.freeze_at(p))
        with applied(harness.model, edit):
            dev, nll = harness.evaluate("dev"), harness.nll("dev")
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
            sweep_test: bool | None = None) -> tuple[dict, object, object, dict[str, torch.Tensor]]:
    """One split seed: returns (report dict, ScoreRun, chosen Edit, the chosen model's (n,) correctness per
    split). `base`: the unmodified model's correctness on dev and test, when the caller has it (else
    evaluated here); `sweep_test`: overrides the config's (evaluate every p on test, or only the chosen)."""
    from .engine import score_run

    cfg, timings = harness.config, {}
    sweep_test = cfg.sweep_test if sweep_test is None else sweep_test
    t0 = time.perf_counter()
    base = {split: base_correct(harness, base, split) for split in ("dev", "test")}
    timings["base_eval"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = score_run(harness.model, harness.tokenizer, harness.splits.train, cfg.targets, cfg.layers, cfg.per_head,
                    cfg.score, progress=not harness.quiet, meta={"model": cfg.model, "dtype": cfg.dtype,
                                                                 "data": cfg.task, "split_seed": seed})
    timings["scoring"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_nll = harness.nll("dev")
    sweep, results, chosen_p = sweep_p(harness, run, base["dev"], base_nll, sweep_test)
    timings["sweep"] = time.perf_counter() - t0
    base_ci = {k: ci(v, cfg.n_boot) for k, v in base.items()}
    t0 = time.perf_counter()
    if chosen_p == 0:
        edit, pruned = run.edit(cfg.freeze_at(0.0)), dict(base)
    else:
        edit, dev, test = results[chosen_p]
        if test is None:
            with applied(harness.model, edit):
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
    labels = [ex.label for ex in splits.test if ex.label is not None]
    if labels:
        from .stats import majority_rate

        report["majority_rate"] = {"dev": majority_rate([ex.label for ex in splits.dev]),
                                   "test": majority_rate(labels)}
    return report, run, edit, pruned


def measure_side_effects(model, tokenizer, task, cfg: RunConfig, appliers: list[tuple[str, object]],
                         quiet: bool) -> dict:
    """The "Side effects" section: the base model and each named change (`applier(model)` puts it on the model
    for a block), measured on the shipped general-English sample (the task's own text left out) and on
    `cfg.also` tasks."""
    from .side_effects import SideEffects, sample_for_task

    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    effects = SideEffects(model, tokenizer, sample_for_task(task), also=cfg.also or (), max_tokens=context,
                          eval_batch_size=cfg.eval_batch_size, progress=not quiet)  # documents cut to the context
    for name, applier in appliers:
        with applier(model):
            effects.measure(name, model)
    return effects.section(cfg.n_boot)


def execute(cfg: RunConfig, out: str | Path | None = None, quiet: bool = False, expected: dict | None = None,
            allow_changed: bool = False) -> dict:
    """Run the experiment and write its directory; returns the report. `out` is claimed first, so a clash or
    an unwritable destination fails before any work, and a failure leaves nothing there."""
    from .artifact import check_new_dir
    from .outdir import released_on_error

    out = check_new_dir(out or f"runs/{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    with released_on_error(out):
        return _execute(cfg, out, quiet, expected, allow_changed)


def _check_recorded(expected: dict | None, recorded: dict, allow_changed: bool) -> list[str]:
    """A rerun from config.json: refuse changed data or weights (unless allowed); say which versions changed."""
    from .provenance import compare

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


def _execute(cfg: RunConfig, out: Path, quiet: bool, expected: dict | None, allow_changed: bool) -> dict:
    from .artifact import atomic_dir, save_edit, save_scores
    from .evaluate import next_token_warnings
    from .models import load_model
    from .report import verdict, write_report
    from .splits import split_task
    from .stats import mean_sd
    from .tasks import load_task

    task = load_task(cfg.task, cfg.template, cfg.answers)
    mode = cfg.eval_mode or task.eval_mode
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device, device_map=cfg.device_map)
    load_s = time.perf_counter() - t0
    from .provenance import record

    recorded = record(task, model, cfg.device)
    warnings, reports, fold_edits = _check_recorded(expected, recorded, allow_changed), [], []
    if cfg.folds > 1:
        from .crossfit import run_folds

        if mode == "next-token":
            warnings += next_token_warnings(tok, task.train + task.test)
        pooled, fold_edits = run_folds(model, tok, task, mode, cfg, quiet)
        reports.append(pooled)
        _, run, edit = fold_edits[0]  # fold 1's scores and edit are the ones saved at the top level
    for seed in range(cfg.split_seed, cfg.split_seed + cfg.seeds) if cfg.folds == 1 else ():
        splits = split_task(task, cfg.dev_fraction, seed, cfg.limit)
        if mode == "next-token":
            warnings += [w for w in next_token_warnings(tok, splits.train + splits.test) if w not in warnings]
        one, one_run, one_edit, _ = run_one(Harness(model, tok, splits, mode, cfg, quiet), seed)
        if not reports:
            run, edit = one_run, one_edit  # the first seed's scores and edit are the ones saved
        reports.append(one)
        if not quiet and cfg.seeds > 1:
            print(f"seed {seed}: base test {one['base']['test']['acc']:.3f}, "
                  f"pruned {one['pruned']['test']['acc']:.3f} (p={one['chosen_p']})", file=sys.stderr)
    report = reports[0]
    report["timings"] = {"load": load_s, **report["timings"]}
    if cfg.side_effects or cfg.also:
        t0 = time.perf_counter()
        chosen = [(f"fold {fold + 1} (p = {e.config.p:g})", e) for fold, _, e in fold_edits] or [
            (f"edit (p = {edit.config.p:g})", edit)]
        appliers = [(name, lambda m, e=e: applied(m, e)) for name, e in chosen if e.n_frozen]
        report["side_effects"] = measure_side_effects(model, tok, task, cfg, appliers, quiet)
        report["timings"]["side_effects"] = time.perf_counter() - t0
    report["warnings"] = warnings
    report["versions"] = recorded["versions"]
    report["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"
    if cfg.seeds > 1:
        rows = [{"seed": r["split_seed"], "base_test": r["base"]["test"]["acc"],
                 "pruned_test": r["pruned"]["test"]["acc"], "diff": r["diff_ci"]["diff"], "chosen_p": r["chosen_p"]}
                for r in reports]
        summary = {k: dict(zip(("mean", "sd"), mean_sd(row[k] for row in rows), strict=True))
                   for k in ("base_test", "pruned_test", "diff")}
        report["repeats"] = {"seeds": [r["seed"] for r in rows], "base_test": summary["base_test"],
                             "pruned_test": summary["pruned_test"], "diff": summary["diff"],
                             "chosen_p": [r["chosen_p"] for r in rows], "runs": rows}
    report["verdict"] = verdict(report)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | {"recorded": recorded}, indent=2,
                                                    sort_keys=True) + "\n")
        save_scores(tmp / "scores", run.scores, run.targets, run.components, run.meta)
        save_edit(tmp / "edit", edit, run.edit_meta())
        for fold, fold_run, fold_edit in fold_edits:
            save_edit(tmp / "folds" / f"fold-{fold + 1}" / "edit", fold_edit, fold_run.edit_meta() | {"fold": fold + 1})
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        write_report(tmp, report, run.scores.max if cfg.freeze.aggregate == "max" else run.scores.mean, edit.removed)
    report["out"] = str(out)
    return report


def cmd_run(args) -> int:
    expected = None
    if args.config:
        cfg = config_from_file(args.config)
        expected = json.loads(Path(args.config).read_text(encoding="utf-8")).get("recorded")
    else:
        if not args.task:
            raise UsageError("run needs --task (or --config DIR/config.json)")
        cfg = config_from_args(args)
    report = execute(cfg, args.out, args.quiet, expected, args.allow_changed)
    pruned, base = report["pruned"]["test"], report["base"]["test"]
    d = report["diff_ci"]
    print(f"{report['task']}: base test {base['acc']:.3f} [{base['lo']:.3f}, {base['hi']:.3f}] -> "
          f"pruned {pruned['acc']:.3f} [{pruned['lo']:.3f}, {pruned['hi']:.3f}] at p={report['chosen_p']} "
          f"(diff {d['diff']:+.3f}, 95% CI [{d['lo']:+.3f}, {d['hi']:+.3f}], n={base['n']})")
    print(report["verdict"])
    print(f"report: {report['out']}/report.md")
    return 0


def add_run_parser(sub, fmt) -> None:
    p = sub.add_parser("run", help="the whole experiment: base, score, choose p on dev, test once, report",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune run --task int-mult --limit 100 --out runs/mult\n"
                           "  eigenprune run --model ./gpt2 --task cb --targets key --p 0.01,0.05,0.1 --seeds 3\n"
                           "  eigenprune run --config runs/mult/config.json --out runs/mult-again"))
    p.add_argument("--config", help="repeat a run from its config.json (other settings are ignored)")
    p.add_argument("--allow-changed", action="store_true",
                   help="with --config: run even if the task data or the model weights differ from the recorded run")
    add_run_options(p)
    p.add_argument("--out", help="output directory (default runs/TASK-TIMESTAMP)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)
