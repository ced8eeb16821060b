"""The human-readable side of `eigenprune run`: report.md, three PNG plots and the verdict paragraph.

`report.json` holds the numbers; this module turns them into something a reader can check in a
minute. The verdict comes first and is worded strictly: a gain is called significant only when the
paired bootstrap interval of (pruned − base) on test lies above 0, and the sweep table says plainly
that its test column was never used to choose p. Plots are drawn on bare `matplotlib.figure.Figure`
objects rendered by Agg, so no display, no pyplot state and nothing left open; matplotlib is imported
only when plotting, so `from eigenprune.reports.run_report import verdict` stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from eigenprune.evaluation.stats import significance
from eigenprune.reports.format import _acc_ci, _by_p, _chosen_p, _f, _interval, _is_chosen, _num, _p, _split
from eigenprune.reports.run_plots import plot_accuracy_vs_p, plot_pruned_components, plot_score_distribution
from eigenprune.reports.words import bound_text, calibration_text, labels_text, mde_text, one_label_text, test_text


def _beat_words(report: dict, base_dev: str | None = None) -> str:
    """What a p had to do to be chosen over the base model, in the words of the report's dev-choice rule;
    `base_dev`: the base model's dev accuracy, to name (a single split's verdict)."""
    named = "" if base_dev is None else f" ({base_dev})"
    rows = [r for r in report.get("sweep") or [] if isinstance(r.get("dev_acc"), float)]
    best = max(rows, key=lambda r: r["dev_acc"], default=None)  # the first (smallest p) of the best
    gained = best is not None and best["dev_acc"] > _num(_split(report, "base", "dev").get("acc"))
    if (report.get("p_search") or {}).get("select") == "1se" and (gained or base_dev is None):
        text = f"beat the base model's dev accuracy{named} by more than one paired standard error"
        return text + (f" (the best, p = {_p(best['p'])}, reached {_f(best['dev_acc'])})" if base_dev else "")
    return "beat the base model on dev" if base_dev is None else f"improved dev accuracy over the base model{named}"


def verdict(report: dict) -> str:
    """One paragraph in plain words: did pruning help on test, and is the gain outside the noise?"""
    if report.get("folds"):
        return _with_calibration(folds_verdict(report), report)
    base_dev, base_test = _split(report, "base", "dev"), _split(report, "base", "test")
    pruned_test = _split(report, "pruned", "test")
    p = _chosen_p(report)
    if p == 0 or report.get("n_frozen") == 0:
        if not report.get("sweep"):
            text = "Pruning was not tried: no pruning fraction p was swept, so the run keeps the base model"
        else:
            text = f"No p {_beat_words(report, _f(base_dev.get('acc')))}, so the run kept the base model"
        text += f" (test accuracy {_acc_ci(base_test)})."
    else:
        d = report.get("diff_ci") or {}
        diff, lo, hi = _num(d.get("diff")), _num(d.get("lo")), _num(d.get("hi"))
        if math.isnan(diff):
            diff = _num(pruned_test.get("acc")) - _num(base_test.get("acc"))
        dev_d = (report.get("dev_diff_ci") or {}).get("diff")
        if dev_d is None:
            dev_d = _num(_split(report, "pruned", "dev").get("acc")) - _num(base_dev.get("acc"))
        text = (f"Pruned (p={_p(p)}) test accuracy {_acc_ci(pruned_test)} vs base {_acc_ci(base_test)}: "
                f"difference {_f(diff, signed=True)}, 95% CI {_interval(lo, hi, signed=True)}")
        dev_gain = f"the gain on dev ({_f(dev_d, signed=True)}) did not carry to test"
        if math.isnan(lo) or math.isnan(hi):
            text += "; the interval could not be computed, so whether the change is real is unknown."
        else:
            text += f" ({test_text(d)})" if "p" in d else ""
            kind = significance({**d, "lo": lo, "hi": hi, "diff": diff})
            if kind == "gain":
                text += ": a significant gain at the 5% level."
            elif kind == "loss":
                text += f": pruning made test accuracy significantly worse, so {dev_gain}."
            else:
                text += f": {bound_text({'hi': hi})}" + (f", and {dev_gain}." if diff <= 0 else ".")
            if "discordant" in d:
                text += f" Power: {mde_text(d)}."
    majority = _num((report.get("majority_rate") or {}).get("test"))
    best = max(_num(base_test.get("acc")), _num(pruned_test.get("acc")))
    if not math.isnan(majority) and not math.isnan(best) and best <= majority:
        who = "the base model does not beat" if p == 0 else "neither model beats"
        text += f" Note that {who} always answering the majority class on test ({_f(majority)})."
    labels = report.get("predicted_labels") or {}
    flags = [one_label_text(who, labels.get(key)) for who, key in (("The base model", "base"),
                                                                   ("The pruned model", "pruned"))
             if p or key == "base"]
    text += "".join(f" {flag}" for flag in flags if flag)
    repeats = report.get("repeats") or {}
    if repeats.get("seeds"):
        rd, ps = repeats.get("diff") or {}, repeats.get("chosen_p") or []
        text += (f" Across {len(repeats['seeds'])} split seeds the test difference was "
                 f"{_f(rd.get('mean'), signed=True)} ± {_f(rd.get('sd'))} (mean ± sd); "
                 f"p = 0 (no edit) was chosen in {sum(_num(x) == 0 for x in ps)} of {len(ps)}.")
    return _with_calibration(text, report)


def _with_calibration(text: str, report: dict) -> str:
    """The verdict, and how choices were scored when they were calibrated."""
    said = calibration_text(report.get("calibration"))
    return f"{text} {said}" if said else text


def _table(header: list[str], rows: list[list]) -> list[str]:
    clean = lambda cell: str(cell).replace("|", "\\|").replace("\n", " ")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(clean(c) for c in row) + " |" for row in rows), ""]


def _results_section(report: dict) -> list[str]:
    p, lines = _chosen_p(report), ["## Base vs pruned", ""]
    label = (f"pruned (p = {_p(p)}, {report.get('n_frozen', '?')} of {report.get('n_components', '?')} components "
             "frozen)") if p else "chosen: base model (p = 0, nothing frozen)"
    rows = [[name, _acc_ci(_split(report, key, "dev")), _split(report, key, "dev").get("n", ""),
             _acc_ci(_split(report, key, "test")), _split(report, key, "test").get("n", "")]
            for name, key in (("base model", "base"), (label, "pruned"))]
    majority = report.get("majority_rate")
    if majority:
        rows.append(["always the majority class", _f(majority.get("dev")), "", _f(majority.get("test")), ""])
    labels = report.get("predicted_labels") or {}
    header = ["model", "dev accuracy [95% CI]", "dev n", "test accuracy [95% CI]", "test n"]
    if labels:
        header.append("predicted labels (test)")
        for row, key in zip(rows, ("base", "pruned"), strict=False):
            row.append(labels_text(labels.get(key)))
        rows[2:] = [[*row, ""] for row in rows[2:]]
    lines += _table(header, rows)
    d = report.get("diff_ci")
    if not p:
        lines.append("The run kept the base model, so there is no pruned-vs-base difference to test.")
    elif d:
        how = ("Newcombe's paired score interval" if d.get("interval") == "newcombe" else "paired bootstrap")
        how += ", stratified by fold" if report.get("folds") else ""
        lines.append(f"Paired difference on test (pruned − base, the same examples; {how}): "
                     f"**{_f(d.get('diff'), signed=True)}**, 95% CI {_interval(d.get('lo'), d.get('hi'), True)}"
                     + (f"; {test_text(d)}; {mde_text(d)}." if "p" in d else "."))
    dd = report.get("dev_diff_ci")
    if dd and p:
        lines.append(f"On dev: {_f(dd.get('diff'), signed=True)}, 95% CI {_interval(dd.get('lo'), dd.get('hi'), True)}"
                     " (optimistic: p was chosen to maximise dev accuracy).")
    if labels:
        lines.append("Predicted labels: how often each label was answered on test; a model that answers one label "
                     "for ≥ 90% of the examples is flagged in the verdict.")
    return [*lines, ""]


_SELECT_WORDS = {"accuracy": "the highest **dev accuracy** (ties go to the smaller p)",
                 "accuracy+loss": "the highest **dev accuracy**, ties going to the lower dev NLL of the correct "
                                  "answers, then to the smaller p",
                 "loss": "the lowest **dev NLL** of the correct answers (ties go to the smaller p)",
                 "1se": "the **smallest p whose dev accuracy is within one paired standard error of the best** "
                        "(the one-SE rule; p = 0 included)"}


def _sweep_section(report: dict) -> list[str]:
    search = report.get("p_search") or {"mode": "grid", "select": "accuracy"}
    how = ("searched (`--p auto`: the paper's grid, extended while the best p sat on its top edge, then refined "
           f"between the best p and its neighbours; {len(report.get('sweep') or [])} dev evaluations of "
           f"{search.get('budget')} allowed)" if search.get("mode") == "auto" else "the given grid")
    lines = ["## Sweep over p", "",
             f"p is chosen on **dev only**, from {how}: {_SELECT_WORDS.get(search.get('select'), '?')}. p = 0, the "
             "base model, is always a candidate. The test column is shown for transparency and was **not used "
             "for selection**.", ""]
    sweep = _by_p(report.get("sweep") or [])
    if not sweep:
        return [*lines, "No pruning fraction was swept, so the run keeps the base model.", ""]
    base_dev, base_test = _split(report, "base", "dev"), _split(report, "base", "test")
    chosen_p = _chosen_p(report)
    base_nll = _f(search.get("base_dev_nll")) if "base_dev_nll" in search else "–"
    rows = [["0 (base)", "–", 0, _acc_ci(base_dev), base_nll, _acc_ci(base_test),
             "**◀ chosen**" if chosen_p == 0 else ""]]
    for r in sweep:
        dev = f"{_f(r.get('dev_acc'))} {_interval(r.get('dev_lo'), r.get('dev_hi'))}"
        test = ("not evaluated" if r.get("test_acc") is None
                else f"{_f(r.get('test_acc'))} {_interval(r.get('test_lo'), r.get('test_hi'))}")
        mark = "**◀ chosen**" if _is_chosen(r, report) else ""
        nll = _f(r.get("dev_nll")) if r.get("dev_nll") is not None else "–"
        rows.append([_p(r.get("p")), r["_order"], r.get("n_frozen", "?"), dev, nll, test, mark])
    return [*lines, *_table(["p", "tried", "components frozen", "dev accuracy [95% CI]",
                             "dev NLL (nats, summed)", "test accuracy [95% CI] (not used for selection)", "chosen"],
                            rows),
            "Columns: **p** the fraction of components frozen (lowest scores first); **tried** the order in which "
            "p was evaluated; **components frozen** how many that fraction is; **dev accuracy** with a 95% "
            "percentile bootstrap CI; **dev NLL** the negative log-likelihood of each dev example's correct "
            "answer under teacher forcing, in nats, summed over its answer tokens and over all dev examples "
            "(lower is better; `--select loss` and `accuracy+loss` read it); **test accuracy** with its 95% CI, "
            "evaluated for transparency only; **chosen** the p the run kept.", ""]


def _folds_section(report: dict) -> list[str]:
    if not report.get("folds"):
        return []
    return folds_section(report)


def _repeats_section(repeats: dict) -> list[str]:
    lines = ["## Repeats over split seeds", "",
             f"Seeds {', '.join(str(s) for s in repeats.get('seeds', []))}; each seed re-splits train/dev, "
             "re-scores and re-chooses p. The files in this directory belong to the first seed.", ""]
    stat = lambda key: repeats.get(key) or {}
    rows = [[name, _f(stat(key).get("mean"), signed=key == "diff"), _f(stat(key).get("sd"))] for name, key in
            (("base test accuracy", "base_test"), ("pruned test accuracy", "pruned_test"),
             ("difference (pruned − base)", "diff"))]
    chosen = ", ".join(_p(p) for p in repeats.get("chosen_p", []))
    lines += _table(["quantity", "mean", "sd"], [*rows, ["chosen p (per seed)", chosen, ""]])
    runs = repeats.get("runs") or []
    if runs:
        lines += _table(["seed", "base test", "pruned test", "difference", "chosen p"],
                        [[r.get("seed"), _f(r.get("base_test")), _f(r.get("pruned_test")),
                          _f(r.get("diff"), signed=True), _p(r.get("chosen_p"))] for r in runs])
    return lines


def _settings_section(report: dict) -> list[str]:
    sizes = report.get("split_sizes") or {}
    items = [("model", report.get("model")), ("task", report.get("task")), ("targets", report.get("targets")),
             ("layers", report.get("layers") or "all"), ("per head", report.get("per_head")),
             ("components scored", report.get("n_components")), ("eval mode", report.get("eval_mode")),
             ("choice scoring", "calibrated (contextual calibration)" if report.get("calibration") else None),
             ("split seed", report.get("split_seed")), ("score seed", report.get("score_seed")),
             ("split sizes", ", ".join(f"{k} {v}" for k, v in sizes.items()) or None),
             ("scoring pairs", report.get("n_pairs")), ("scope", report.get("scope")),
             ("aggregate", report.get("aggregate")), ("bias", report.get("bias")), ("machine", report.get("machine")),
             ("versions", ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items()) or None)]
    return ["## Settings", "", *(f"- {k}: `{v}`" for k, v in items if v is not None), ""]


def _timings_section(timings: dict) -> list[str]:
    rows = [[phase, f"{_num(s):.1f}"] for phase, s in timings.items()]
    total = sum(_num(s) for s in timings.values() if not math.isnan(_num(s)))
    return ["## Timings", "", *_table(["phase", "seconds"], [*rows, ["**total**", f"**{total:.1f}**"]])]


def _plot(name: str, draw: Callable[[Path], None], out_dir: Path, written: list[Path], notes: list[str]) -> bool:
    """Draw one plot; a failure becomes a note in report.md rather than losing the finished run."""
    path = out_dir / name
    try:
        draw(path)
    except Exception as err:  # broad on purpose: the run's numbers are already safe in report.json
        notes.append(f"{name} could not be drawn: {type(err).__name__}: {err}")
        return False
    written.append(path)
    return True


def write_report(out_dir: Path, report: dict, scores: dict[str, torch.Tensor] | None = None,
                 removed: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """Write report.md and the PNG plots into `out_dir` (which exists); returns the paths written."""
    out_dir, written, notes = Path(out_dir), [], []
    md = [f"# eigenprune: {report.get('task', 'task')} on {report.get('model', 'model')}", "",
          "## Verdict", "", report.get("verdict") or verdict(report), "", *_results_section(report),
          *_folds_section(report), *_sweep_section(report)]
    if _plot("accuracy_vs_p.png", lambda path: plot_accuracy_vs_p(report, path), out_dir, written, notes):
        md += ["![accuracy vs p](accuracy_vs_p.png)", ""]
    md += ["## Where the pruned components sit", ""]
    frozen_rows = report.get("frozen_by_target") or []
    if not any(int(r.get("n_frozen") or 0) for r in frozen_rows):
        md += ["The chosen edit froze nothing, so there is no map of pruned components." if not report.get("n_frozen")
               else "The report holds no `frozen_by_target` list, so there is no map of pruned components.", ""]
    elif _plot("pruned_components.png", lambda path: plot_pruned_components(report, path), out_dir, written, notes):
        md += ["Share of each layer's and target kind's components frozen by the chosen edit.", "",
               "![pruned components](pruned_components.png)", ""]
    md += ["## Score distribution", ""]
    if not scores:
        md += ["No component scores were given, so there is no score histogram.", ""]
    elif _plot("score_distribution.png", lambda path: plot_score_distribution(report, scores, removed, path),
               out_dir, written, notes):
        md += ["![score distribution](score_distribution.png)", ""]
    if report.get("side_effects"):
        from eigenprune.reports import side_effects_report as side_effects

        drawn = _plot("side_effects.png", lambda path: side_effects.plot(report["side_effects"], path), out_dir,
                      written, notes)
        md += [side_effects.render_markdown(report["side_effects"], "side_effects.png" if drawn else None)]
    if report.get("repeats"):
        md += _repeats_section(report["repeats"])
    md += _settings_section(report)
    warnings = [*(report.get("warnings") or []), *notes]
    if warnings:
        md += ["## Warnings", "", *(f"- {w}" for w in warnings), ""]
    if report.get("timings"):
        md += _timings_section(report["timings"])
    (out_dir / "report.md").write_text("\n".join(md).rstrip() + "\n")
    return [out_dir / "report.md", *written]


def folds_verdict(report: dict) -> str:
    """The pooled result in plain words."""
    f, d = report["folds"], report["diff_ci"]
    base, edit = report["base"]["test"], report["pruned"]["test"]
    ps = [row["chosen_p"] for row in f["per_fold"]]
    text = (f"Across {f['k']} cross-fitted folds ({f['n_tested']} examples, each tested once by a run that chose p "
            f"on the other folds): edited test accuracy {edit['acc']:.3f} [{edit['lo']:.3f}, {edit['hi']:.3f}] vs base "
            f"{base['acc']:.3f} [{base['lo']:.3f}, {base['hi']:.3f}]; difference {d['diff']:+.3f}, 95% CI "
            f"[{d['lo']:+.3f}, {d['hi']:+.3f}] (stratified by fold)")
    if "p" in d:
        text += f", {test_text(d)}"
    kind = significance(d)
    if kind == "gain":
        text += ": a significant gain at the 5% level."
    elif kind == "loss":
        text += ": the edits made test accuracy significantly worse."
    elif all(p == 0 for p in ps):
        text += f": no fold found a p that {_beat_words(report)}, so every fold kept the base model."
    else:
        text += f": {bound_text(d)}."
    if "discordant" in d and not all(p == 0 for p in ps):
        text += f" Power: {mde_text(d)}."
    kept = sum(p == 0 for p in ps)
    text += f" p chosen per fold: {', '.join(f'{p:g}' for p in ps)}" + (
        f" (the base model kept in {kept} of {len(ps)})." if kept and kept < len(ps) else ".")
    majority = (report.get("majority_rate") or {}).get("test")
    if majority is not None and max(base["acc"], edit["acc"]) <= majority:
        text += f" Neither beats always answering the majority class ({majority:.3f})."
    labels = report.get("predicted_labels") or {}
    flags = [one_label_text(who, labels.get(key)) for who, key in (("The base model", "base"),
                                                                   ("The edited model", "pruned"))]
    return text + "".join(f" {flag}" for flag in flags if flag)


def console_lines(report: dict) -> list[str]:
    """What `eigenprune run` prints: one line of numbers ("kept the base model" and nothing else when no edit
    was kept), then the verdict."""
    pruned, base, d = report["pruned"]["test"], report["base"]["test"], report["diff_ci"]
    folds = report.get("folds")
    kept = all(r["chosen_p"] == 0 for r in folds["per_fold"]) if folds else _chosen_p(report) == 0
    if kept:
        line = f"{report['task']}: kept the base model"
    else:
        where = "per fold" if folds else f"at p={report['chosen_p']}"
        line = (f"{report['task']}: base test {base['acc']:.3f} [{base['lo']:.3f}, {base['hi']:.3f}] -> "
                f"pruned {pruned['acc']:.3f} [{pruned['lo']:.3f}, {pruned['hi']:.3f}] {where} "
                f"(diff {d['diff']:+.3f}, 95% CI [{d['lo']:+.3f}, {d['hi']:+.3f}], "
                + (f"{test_text(d)}, " if "p" in d else "") + f"n={base['n']})")
    return [line, report["verdict"]]


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
