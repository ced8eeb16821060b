"""What `eigenprune compare` writes for people: the plain-words verdict, comparison.md and comparison.png.

Everything here reads only the JSON-ready report `compare.compare` builds, so a saved comparison.json can be
re-rendered without re-running anything. With cross-fitted folds (`--folds K`, K > 1) every number is pooled
over the folds, and a "Folds" section shows what each fold chose.
"""

from __future__ import annotations

from pathlib import Path

from eigenprune.evaluation.stats import significance
from eigenprune.reports.words import brief, calibration_text, diff_text, labels_text, one_label_text, test_text


def _ci_text(c: dict) -> str:
    return f"{c['acc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def method_order(report: dict) -> list[str]:
    """Methods in the order they ran (comparison.json stores them with sorted keys)."""
    rows = report["methods"]
    ran = [m for m in report.get("methods_run", []) if m in rows]
    return ran + [m for m in rows if m not in ran]


def _folds(report: dict) -> int:
    """K of a report pooled over K > 1 folds; 1 for today's single split."""
    return (report.get("folds") or {}).get("k", 1)


def family_text(report: dict) -> str:
    """Which family the p-values were adjusted over, and its size."""
    family = report.get("family")
    if not family:
        return "p-values are not adjusted (this report predates the family adjustment)."
    return (f"p-values are Holm-adjusted over this comparison's {family['size']} method − base test "
            f"difference(s) with an exact paired test ({', '.join(family['tests']) or 'none'}); significant "
            f"means adjusted p < {family['alpha']:g}.")


def verdict(report: dict) -> str:
    """Plain words: which test differences to base are significant (Holm-adjusted exact paired tests over the
    comparison's methods), what the others leave possible and could have detected, a base model that answers
    one label, then what each method adds of its own (the random control's comparison with eigenprune, ...)."""
    rows = report["methods"]
    gains = [f"{m} ({diff_text(r['diff_vs_base'])}, {test_text(r['diff_vs_base'])})" for m, r in rows.items()
             if significance(r["diff_vs_base"]) == "gain"]
    losses = [f"{m} ({diff_text(r['diff_vs_base'])}, {test_text(r['diff_vs_base'])})" for m, r in rows.items()
              if significance(r["diff_vs_base"]) == "loss"]
    others = [f"{m}: {brief(rows[m]['diff_vs_base'])}" for m in method_order(report)
              if significance(rows[m]["diff_vs_base"]) is None]
    k = _folds(report)
    pooled = (f"Pooled over {k} cross-fitted folds ({report['folds']['n_tested']} test examples, each tested once; "
              "tests and intervals stratified by fold). ") if k > 1 else ""
    if gains:
        text = f"Significant test gain over the base model: {', '.join(gains)}."
    else:
        text = "No method's test gain over the base model is significant."
    if losses:
        text += f" Significantly worse than base: {', '.join(losses)}."
    if others:
        text += f" Not significant: {'; '.join(others)}."
    text += " " + family_text(report)
    labels = one_label_text("The base model", (report.get("base") or {}).get("predicted_labels"))
    own = [rows[m].get("verdict") for m in method_order(report)]
    calibrated = calibration_text(report.get("calibration"))
    return " ".join([pooled + text, *([labels] if labels else []), *(v for v in own if v),
                     *([calibrated] if calibrated else [])])


def _describe(config: dict) -> str:
    parts = []
    for k, v in config.items():
        if v is None or v == []:
            continue
        shown = f"{len(v)} items" if isinstance(v, list) and len(v) > 3 else v
        parts.append(f"{k}={shown}")
    return ", ".join(parts).replace("|", "/")


def _chosen(config: dict) -> str:
    """The chosen configuration; pooled over folds, the settings every fold chose alike, and which varied."""
    per_fold = config.get("per_fold")
    if not per_fold:
        return _describe(config)
    alike = {k: v for k, v in per_fold[0].items() if all(c.get(k) == v for c in per_fold)}
    varied = [k for k in per_fold[0] if k not in alike]
    return ", ".join(p for p in (_describe(alike), f"varies by fold: {', '.join(varied)}" if varied else "") if p)


def _setting(report: dict) -> str:
    k = _folds(report)
    if k == 1:
        sizes = ", ".join(f"{k} {v}" for k, v in report["split_sizes"].items())
        return (f"Split seed {report['split_seed']} ({sizes}), eval mode `{report['eval_mode']}`. Every method chose "
                "its configuration on dev only; test was evaluated once per method, for its chosen configuration.")
    folds = report["folds"]
    sources = " + ".join(f"{n} {name}" for name, n in folds["pooled"].items())
    return (f"{k} cross-fitted folds (seed {folds['seed']}) over {folds['n_tested']} examples ({sources}, pooled), "
            f"eval mode `{report['eval_mode']}`. For each fold, every method chose its configuration on a dev split "
            "carved from the other folds and was tested once, on that fold; test accuracy and test - base pool "
            "every fold's test examples (each tested once); accuracy CIs resample within folds, differences and "
            "p-values are stratified by fold. Dev acc is the mean of the folds' dev accuracies; the configuration "
            "shows what every fold chose alike.")


def _folds_section(report: dict) -> list[str]:
    """K, the pooled counts and, per method, what each fold chose and scored."""
    folds = report["folds"]
    sources = ", ".join(f"{n} from {name}" for name, n in folds["pooled"].items())
    lines = ["## Folds", "", f"{folds['k']} folds, seed {folds['seed']}, {folds['n_tested']} examples pooled "
             f"({sources}); every example is in exactly one fold's test and in no split of that fold's run. "
             "The CIs of pooled accuracies resample within folds (each replicate keeps every fold's size); "
             "differences and exact p-values are stratified by fold.", "",
             "| fold | train | dev | test | base dev acc | base test acc |",
             "|---|---|---|---|---|---|",
             *(f"| {f['fold']} | {f['train']} | {f['dev']} | {f['test']} | {f['base_dev_acc']:.3f} | "
               f"{f['base_test_acc']:.3f} |" for f in folds["per_fold"]), ""]
    for name in method_order(report):
        lines += [f"### {name}", "", "| fold | chosen configuration | dev acc | test acc | n test |",
                  "|---|---|---|---|---|",
                  *(f"| {r['fold']} | {_describe(r['config'])} | {r['dev_acc']:.3f} | {r['test_acc']:.3f} | "
                    f"{r['n_test']} |" for r in report["methods"][name]["runs"]), ""]
    return lines


def _effects(report: dict, name: str) -> str:
    """The Δ perplexity and KL cells of a method's row ("" without a side-effects section)."""
    section = report.get("side_effects")
    if section is None:
        return ""
    from eigenprune.reports.side_effects_report import columns

    if name in section["models"]:
        cells = columns(section, name)
        return f" {cells['Δ perplexity']} | {cells['KL']} |"
    return " 0 (no change) | 0 |" if name == "base" or report["methods"][name]["changed_params"] == 0 else " – | – |"


def _p_cell(d: dict) -> str:
    if d.get("p") is None:
        return "– (seed-averaged)"
    adjusted = d.get("p_adjusted")
    return f"{d['p']:.3f}" + ("" if adjusted is None else f" ({adjusted:.3f})")


def _mde_cell(d: dict) -> str:
    if d.get("discordant") is None:
        return "–"
    mde = d.get("mde")
    return f"{d['discordant']} / {'none' if mde is None else format(mde, '.3f')}"


def render_markdown(report: dict) -> str:
    base = report["base"]
    effects = report.get("side_effects") is not None
    labelled = report["eval_mode"] == "choice" and "predicted_labels" in base
    extra_head = (" Δ perplexity | KL |" if effects else "") + (" predicted labels (test) |" if labelled else "")
    extra_cols = 2 * effects + labelled
    lines = [f"# eigenprune compare: {report['task']} on {report['model']}", "", "## Verdict", "",
             report["verdict"], "", "## Results", "", _setting(report), "",
             "| method | chosen configuration | dev acc | test acc [95% CI] | test - base [95% CI] | p (Holm) "
             "| changed / MDE | dev evals | wall s | changed params |" + extra_head,
             "|---" * (10 + extra_cols) + "|",
             f"| base | unmodified model | {base['dev']['acc']:.3f} | {_ci_text(base['test'])} | - | - | - | 1 | "
             f"{report['timings']['base_eval']:.1f} | 0 |" + ("  |  |" if effects else "")
             + (f" {labels_text(base.get('predicted_labels'))} |" if labelled else "")]
    for name in method_order(report):
        r = report["methods"][name]
        d = r["diff_vs_base"]
        lines.append(f"| {name} | {_chosen(r['config'])} | {r['dev']['acc']:.3f} | {_ci_text(r['test'])} | "
                     f"{diff_text(d)} | {_p_cell(d)} | {_mde_cell(d)} | {r['dev_evaluations']} | "
                     f"{r['wall_s']:.1f} | {r['changed_params']} |" + _effects(report, name)
                     + (f" {labels_text(r.get('predicted_labels'))} |" if labelled else ""))
    lines += ["", *_columns(report, effects, labelled), "",
              "![test - base per method, paired 95% CI](comparison.png)", ""]
    if effects:
        from eigenprune.reports.side_effects_report import render_markdown as effects_markdown

        where = " (fold 1's chosen configurations)" if _folds(report) > 1 else ""
        lines += [effects_markdown(report["side_effects"]).replace("## Side effects", f"## Side effects{where}", 1)]
    if _folds(report) > 1:
        lines += _folds_section(report)
    for name in method_order(report):
        lines += [part for section in report["methods"][name].get("sections", []) for part in (section, "")]
    notes = ["dev evals counts the configurations compared on dev, the unedited candidate included.",
             "changed params counts weight (and bias) entries of the merged model that differ from the base."]
    if _folds(report) > 1:
        notes[0] = notes[0][:-1] + ", summed over folds."
        notes[1] += " Over folds: the most that any fold's chosen edit changed."
        notes.append("wall s sums the folds; each fold's chosen edit is saved under edits/<method>/fold-<k>.")
    notes += [note for name in method_order(report) for note in report["methods"][name].get("notes", [])]
    if report["implicit"]:
        notes.append(f"Run implicitly, because other methods need its scores: {', '.join(report['implicit'])}.")
    notes += [f"Warning: {w}" for w in report["warnings"]]
    return "\n".join([*lines, "## Notes", "", *(f"- {n}" for n in notes), ""])


def _columns(report: dict, effects: bool, labelled: bool) -> list[str]:
    """Every column of the results table, explained once."""
    stratified = ", stratified by fold" if _folds(report) > 1 else ""
    lines = ["Columns: **dev acc** accuracy on dev (where each method chose); **test acc** accuracy on test with a "
             "95% percentile bootstrap CI; **test - base** the paired change in test accuracy with Newcombe's hybrid "
             f"score 95% interval{stratified} (a seed-averaged control keeps a paired bootstrap CI); **p (Holm)** "
             f"the two-sided exact McNemar p-value{stratified} and, in brackets, Holm-adjusted over the family; "
             "**changed / MDE** the test examples whose correctness changed, and the smallest change in accuracy "
             "(a fraction) the exact test detects with 80% power at the 5% level given n and that many changes "
             "(none: too few changes to detect any); **dev evals**, **wall s**, **changed params**: see the notes.",
             family_text(report)]
    if effects:
        lines.append("**Δ perplexity** edit − base perplexity on general English text, **KL** mean per-token "
                     "KL(base ‖ edit) in nats (see Side effects).")
    if labelled:
        lines.append("**predicted labels** how often each label was answered on test (a model answering one "
                     "label for ≥ 90% of examples is flagged in the verdict).")
    return [" ".join(lines)]


def plot_data(report: dict) -> list[dict]:
    """What `plot_comparison` draws, one entry per method in run order: {"name", "diff", "lo", "hi",
    "significant", "marks": [{"x", "marker", "label"}]} — the paired test − base difference and its interval
    from `diff_vs_base` (as the verdict judges it), and the method's own points (e.g. each random seed's
    accuracy) moved to the same scale: accuracy − base test accuracy."""
    base_acc = report["base"]["test"]["acc"]
    out = []
    for name in method_order(report):
        row = report["methods"][name]
        d = row["diff_vs_base"]
        marks = [{"x": mark["acc"] - base_acc, "marker": mark.get("marker", "x"),
                  "label": mark.get("label") or f"{name}: one draw (seed) each"} for mark in row.get("markers", [])]
        out.append({"name": name, "diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "significant": significance(d),
                    "marks": marks})
    return out


def plot_comparison(report: dict, path: Path) -> list[dict]:
    """Test accuracy − base per method with its paired 95% interval (the difference the verdict tests), 0 the
    base model; filled where significant. Returns what it drew (`plot_data`)."""
    from matplotlib.figure import Figure

    data = plot_data(report)
    fig = Figure(figsize=(7.5, 1.6 + 0.45 * len(data)), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    ax.axvline(0.0, color="0.3", linestyle="--", label=f"base model (test acc {report['base']['test']['acc']:.3f})")
    labelled = set()
    for y, row in enumerate(data):
        color = "#d62728" if y == 0 else "#1f77b4"  # the first method asked for stands out
        ax.errorbar([row["diff"]], [y], xerr=[[row["diff"] - row["lo"]], [row["hi"] - row["diff"]]], fmt="o",
                    capsize=4, color=color, mfc=color if row["significant"] else "white")
        for mark in row["marks"]:  # the method's own reference points (seeds, ICL alone, ...)
            label = None if mark["label"] in labelled else mark["label"]
            labelled.add(mark["label"])
            ax.plot([mark["x"]], [y], mark["marker"], mfc="none", color="0.3", markersize=6, label=label)
    ax.plot([], [], "o", color="0.4", label="filled: significant (Holm-adjusted exact p < 0.05)")
    ax.plot([], [], "o", color="0.4", mfc="white", label="open: not significant")
    ax.set_yticks(range(len(data)), [row["name"] for row in data])
    ax.invert_yaxis()
    k, n = _folds(report), report["base"]["test"]["n"]
    ax.set_xlabel(f"test accuracy − base, pooled over {k} folds (n={n}), paired 95% CI stratified by fold" if k > 1
                  else f"test accuracy − base (n={n}), paired 95% CI (Newcombe)")
    ax.set_title(f"{report['task']} on {Path(str(report['model'])).name}", wrap=True)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    fig.savefig(path)
    return data
