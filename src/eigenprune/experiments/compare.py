"""`eigenprune compare`: eigenprune and its competitors on one model, one task split, one eval mode.

Every method gets the same `Harness` (model, splits, eval mode, settings), chooses its configuration
on dev only and has its chosen configuration evaluated on test once. The base model is evaluated
once and shared. The output directory (written atomically: complete or absent) holds
comparison.json (all numbers), comparison.md (a table and a plain-words verdict), comparison.png
(test accuracy with 95% CIs, the base model as a reference line), config.json and, for every method
that can save one, its chosen edit under edits/<method>/.

Methods come from the registry (`methods.registry`): this module never names one. A method that
needs another's results (the random control takes eigenprune's number of frozen components) has it
run first, implicitly if the user did not ask for it, and the report says so. `A+B` runs edit method
B on learned stage A's model; composites with the same stage settings share one training run.

With `--folds K` (K > 1, `splits.fold_splits`) all of this runs once per fold, that fold as test (a fresh
harness and context each time, so no fold's choices see its test), and every row pools the folds' test
correctness over the same N examples: CIs resample within folds, dev is the mean of the folds' dev
accuracies, `runs` is the per-fold table, each fold's edit is saved under edits/<method>/fold-<k>, and a
method's `pool` hook (`registry.Pooled`) writes its words from the pooled numbers. `--folds 1` is the fixed
split, and its comparison.json is what it was before folds existed.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eigenprune.core.errors import UsageError
from eigenprune.evaluation.stats import accuracy
from eigenprune.experiments import pipeline, tracking
from eigenprune.methods import registry
from eigenprune.methods.base import MethodResult
from eigenprune.protocol.config import RunConfig, compare_settings
from eigenprune.protocol.harness import ci, diff_ci
from eigenprune.reports.compare_report import plot_comparison, render_markdown, verdict


def _json_extra(extra: dict) -> dict:
    """A result's `extra` for the JSON: without keys starting with '_' (a method's own per-example data, e.g.
    for pooling over folds)."""
    return _plain({k: v for k, v in extra.items() if not k.startswith("_")})


def default_methods() -> tuple[str, ...]:
    """The methods that register a place in the default list, in that order."""
    return tuple(sorted((name for name, m in registry.methods().items() if m.default), key=lambda n:
                        registry.methods()[n].default))


@dataclass
class CompareConfig:
    """What `compare` adds to the run settings: the methods and their own settings."""

    methods: tuple[str, ...] = field(default=(), metadata={"help": "methods to compare; empty: the defaults"})
    method_args: dict[str, dict] = field(default_factory=dict,
                                         metadata={"help": "method -> {setting: value} (`--set METHOD.FIELD=VALUE`)"})

    def __post_init__(self) -> None:
        if self.methods and not any(m.strip() for m in self.methods):  # given, but empty: not "the defaults"
            raise ValueError("methods is empty; name at least one method (or leave methods out for the defaults)")
        self.methods = tuple(dict.fromkeys(m.strip() for m in self.methods if m.strip())) or default_methods()
        try:
            self.plan()
        except UsageError as err:
            raise ValueError(str(err)) from None

    def plan(self) -> tuple[list[registry.Spec], list[str], dict[str, tuple]]:
        """(specs in run order, names added because another method needs them, name -> (stage config, config)).
        Every `--set` must name a method that runs (or a part of a composite that does)."""
        specs, implicit, seen = [], [], set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            spec = registry.resolve(name)
            prefix = f"{spec.stage.name}+" if spec.stage is not None else ""
            for need in spec.method.needs:
                visit(prefix + need)
            specs.append(spec)
            if name not in self.methods:
                implicit.append(name)

        for name in self.methods:
            visit(name)
        parts = {s.name for s in specs} | {m.name for s in specs for m in s.parts}
        unused = sorted(set(self.method_args) - parts)
        if unused:
            raise UsageError(f"--set {unused[0]}.…: '{unused[0]}' is not among the methods that run "
                             f"({', '.join(s.name for s in specs)})")
        configs = {s.name: registry.configure(s, self.method_args) for s in specs}
        return specs, implicit, configs


def _plain(value):
    """JSON-ready copy: tensors become lists, tuples lists, dict keys strings."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def method_row(result: MethodResult, base: dict[str, torch.Tensor], n_boot: int) -> dict:
    return {"config": _plain(result.config), "dev": ci(result.dev, n_boot), "test": ci(result.test, n_boot),
            "diff_vs_base": diff_ci(base["test"], result.test, n_boot), "dev_evaluations": result.dev_evaluations,
            "wall_s": result.wall_s, "changed_params": result.changed_params, "runs": _plain(result.runs),
            "extra": _json_extra(result.extra), "saved_edit": None,
            "notes": result.notes, "sections": result.sections, "markers": _plain(result.markers),
            "verdict": result.verdict}


def compare(cfg: RunConfig, opts: CompareConfig, out: str | Path | None = None, quiet: bool = False,
            report_to: tuple[str, ...] = ()) -> dict:
    """Run every method on the same splits (on every fold, with `cfg.folds` > 1) and write the comparison
    directory, then log it to the `report_to` trackers (`experiments.tracking`); returns the report. `out` is
    claimed first; a failure leaves nothing there."""
    from eigenprune.core.outdir import released_on_error
    from eigenprune.edits.artifact import check_new_dir

    tracking.check_installed(report_to)
    out = check_new_dir(out or f"runs/compare-{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    with released_on_error(out):
        report = _compare(cfg, opts, out, quiet)
    tracking.log_folder(out, report_to)
    return report


def _compare(cfg: RunConfig, opts: CompareConfig, out: Path, quiet: bool) -> dict:
    from eigenprune.core.models import load_model
    from eigenprune.edits.artifact import atomic_dir
    from eigenprune.evaluation.calibration import calibration_for
    from eigenprune.evaluation.evaluate import next_token_warnings
    from eigenprune.evaluation.splits import fold_splits
    from eigenprune.evaluation.tasks import load_task

    specs, implicit, configs = opts.plan()  # a bad --set fails now, not after an hour of other methods
    task = load_task(cfg.task, cfg.template, cfg.answers)
    mode = cfg.eval_mode or task.eval_mode
    calibration = calibration_for(task, mode) if cfg.calibrate else None  # a task it does not fit: one line, now
    folds = fold_splits(task, cfg.folds, cfg.split_seed, cfg.dev_fraction, cfg.limit)  # k = 1: today's split
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device, device_map=cfg.device_map, progress=not quiet)
    timings = {"load": time.perf_counter() - t0}
    checked = folds.examples if len(folds) > 1 else folds[0].train + folds[0].test
    warnings = next_token_warnings(tok, checked) if mode == "next-token" else []
    costs = None  # every fold's chosen configurations' side effects, measured while they live

    def after(i: int, run: pipeline.SplitRun) -> None:
        nonlocal costs
        if cfg.side_effects or cfg.also:
            from eigenprune.experiments.fold_side_effects import FoldSideEffects

            t0 = time.perf_counter()
            costs = costs or FoldSideEffects(model, tok, task, cfg, len(folds), quiet)
            costs.measure(i, run)
            timings["side_effects"] = timings.get("side_effects", 0.0) + time.perf_counter() - t0

    label = (lambda i: f"fold {i + 1}/{len(folds)}") if len(folds) > 1 else (lambda i: "")
    runs = pipeline.run_splits([(split, cfg) for split in folds], model, tok, mode, quiet, specs, configs,
                               label=label, after=after if cfg.side_effects or cfg.also else None,
                               keep_live=len(folds) == 1,  # no hook, no check of the model after it
                               calibration=calibration)
    timings["base_eval"] = sum(r.base_s for r in runs)
    report = {
        "model": cfg.model, "task": cfg.task, "eval_mode": mode, "split_seed": cfg.split_seed,
        "split_sizes": {"train": len(folds[0].train), "dev": len(folds[0].dev), "test": len(folds[0].test)},
        "methods_asked": list(opts.methods), "methods_run": [s.name for s in specs], "implicit": implicit,
    }
    if len(folds) == 1:
        base, results = runs[0].base, runs[0].results
        report |= {"base": {k: ci(v, cfg.n_boot) for k, v in base.items()},
                   "methods": {name: method_row(r, base, cfg.n_boot) for name, r in results.items()}}
        saves = [(name, None, r.save) for name, r in results.items()]
    else:
        report |= pooled_report(folds, runs, specs, cfg.n_boot)
        saves = [(name, i, r.results[name].save) for name in report["methods"] for i, r in enumerate(runs)]
    side_effects = costs.section() if costs is not None else None
    add_per_example(report, folds, runs)
    if calibration is not None:
        from eigenprune.evaluation.calibration import calibration_record
        from eigenprune.evaluation.evaluate import content_free_prior

        report["calibration"] = calibration_record(calibration, content_free_prior(runs[0].base["test"]), {
            name: [content_free_prior(r.results[name].test) for r in runs] for name in report["methods"]})
    report["family"] = adjust_family(report)
    if side_effects is not None:
        report["side_effects"] = side_effects
    report |= {"timings": timings, "warnings": warnings,
               "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"}
    report["verdict"] = verdict(report)
    with atomic_dir(out) as tmp:
        for name, i, save in saves:  # with folds, every fold's chosen edit: edits/<method>/fold-<k>
            if save is None:
                continue
            row = report["methods"][name]
            folder = Path("edits") / name if i is None else Path("edits") / name / f"fold-{i + 1}"
            save(tmp / folder)
            if i is None:
                row["saved_edit"] = str(folder)
            else:
                row["saved_edit"].append(str(folder))
                row["runs"][i]["saved_edit"] = str(folder)
        run_settings = compare_settings(cfg)
        (tmp / "config.json").write_text(json.dumps(
            {"run": run_settings, "compare": _plain(dataclasses.asdict(opts))}, indent=2, sort_keys=True) + "\n")
        (tmp / "comparison.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        plot_comparison(report, tmp / "comparison.png")
        if side_effects is not None:
            from eigenprune.reports.side_effects_report import plot

            plot(side_effects, tmp / "side_effects.png")
        (tmp / "comparison.md").write_text(render_markdown(report))
    report["out"] = str(out)
    return report


def add_per_example(report: dict, folds, runs: list[pipeline.SplitRun]) -> None:
    """Every test example's correctness for the base and each method (`per_example`, pooled `tested` order and
    each example's fold under folds), from which every p-value and interval of the report can be recomputed;
    and, in `choice` mode, the labels each answered (`predicted_labels` of the base and of each row)."""
    from eigenprune.evaluation.evaluate import predicted_choices
    from eigenprune.evaluation.stats import label_distribution

    pooled = len(folds) > 1
    gather = (lambda per_fold: folds.pool(per_fold)[0]) if pooled else (lambda per_fold: list(per_fold[0]))
    number = lambda v: int(v) if isinstance(v, bool) else v
    block = {"base": [number(v) for v in gather([r.base["test"].tolist() for r in runs])],
             "methods": {name: [number(v) for v in gather([r.results[name].test.tolist() for r in runs])]
                         for name in report["methods"]}}
    if pooled:
        block["fold"] = [f + 1 for f in folds.pool([r.base["test"].tolist() for r in runs])[1]]
    report["per_example"] = block

    def labels(tensors: list) -> dict | None:
        picked = [predicted_choices(t) for t in tensors]
        return None if any(p is None for p in picked) else label_distribution(gather(picked))

    if report["eval_mode"] == "choice":
        report["base"]["predicted_labels"] = labels([r.base["test"] for r in runs])
        for name, row in report["methods"].items():
            row["predicted_labels"] = labels([r.results[name].test for r in runs])


def adjust_family(report: dict) -> dict:
    """Holm-adjust every method − base test difference of the comparison (`p_adjusted` in each row's
    `diff_vs_base`): the family is this comparison's methods with an exact paired test."""
    from eigenprune.evaluation.paired import holm_family
    from eigenprune.evaluation.stats import ALPHA

    names = [name for name in report["methods"]]
    size = holm_family(report["methods"][name]["diff_vs_base"] for name in names)
    tested = [name for name in names if report["methods"][name]["diff_vs_base"]["p"] is not None]
    return {"adjustment": "holm", "alpha": ALPHA, "size": size, "tests": tested,
            "over": "the method − base test differences of this comparison"}


def _mean_dev(devs: list[torch.Tensor]) -> dict:
    """Dev accuracy over folds: the mean of the per-fold dev accuracies (dev splits overlap across folds, so
    they are not pooled and get no CI)."""
    accs = [accuracy(d) for d in devs]
    return {"acc": sum(accs) / len(accs), "per_fold": accs, "n": [int(d.numel()) for d in devs]}


def pooled_report(folds, runs: list[pipeline.SplitRun], specs: list[registry.Spec], n_boot: int) -> dict:
    """The report's folds, base and method rows for K > 1 folds: every method's test correctness pooled over
    all N examples, CIs resampling within folds, and a per-fold table of what each fold chose."""
    bases = [r.base for r in runs]
    base_test, pooled = pipeline.pool(folds, runs, specs, n_boot, _json_extra)
    rows = {}
    for name, row in pooled.items():
        r, per_fold = row.result, row.folds
        rows[name] = {
            "config": _plain(r.config), "dev": _mean_dev([f.dev for f in per_fold]), "test": row.ci(r.test),
            "diff_vs_base": row.diff(base_test, r.test), "dev_evaluations": r.dev_evaluations, "wall_s": r.wall_s,
            "changed_params": r.changed_params, "runs": _plain(r.runs), "saved_edit": [],
            "extra": _json_extra(r.extra),
            "notes": r.notes, "sections": r.sections, "markers": _plain(r.markers), "verdict": r.verdict}
    per_fold = [{"fold": f.fold + 1, "train": len(f.train), "dev": len(f.dev), "test": len(f.test),
                 "base_dev_acc": accuracy(b["dev"]), "base_test_acc": accuracy(b["test"])}
                for f, b in zip(folds, bases, strict=True)]
    return {"folds": {"k": len(folds), "seed": folds.seed, "limit": folds.limit, "pooled": dict(folds.pooled),
                      "n_tested": len(folds.tested), "per_fold": per_fold},
            "base": {"dev": _mean_dev([b["dev"] for b in bases]),
                     "test": next(iter(pooled.values())).ci(base_test)},  # every row resamples the same folds
            "methods": rows}
