"""What `eigenprune compare` writes for people: the plain-words verdict, comparison.md and comparison.png.

Everything here reads only the JSON-ready report `compare.compare` builds, so a saved comparison.json can be
re-rendered without re-running anything. With cross-fitted folds (`--folds K`, K > 1) every number is pooled
over the folds, and a "Folds" section shows what each fold chose.
"""

from __future__ import annotations

from pathlib import Path

from eigenprune.evaluation.stats import significance


def _ci_text(c: dict) -> str:
    return f"{c['acc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def _diff_text(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def method_order(report: dict) -> list[str]:
    """Methods in the order they ran (comparison.json stores them with sorted keys)."""
    rows = report["methods"]
    ran = [m for m in report.get("methods_run", []) if m in rows]
    return ran + [m for m in rows if m not in ran]


def _folds(report: dict) -> int:
    """K of a report pooled over K > 1 folds; 1 for today's single split."""
    return (report.get("folds") or {}).get("k", 1)


def verdict(report: dict) -> str:
    """Plain words: which test differences to base are significant, then what each method adds of its own
    (the random control's comparison with eigenprune, svd-clip's demonstrations alone, ...)."""
    rows = report["methods"]
    gains = [f"{m} ({_diff_text(r['diff_vs_base'])})" for m, r in rows.items()
             if significance(r["diff_vs_base"]) == "gain"]
    losses = [f"{m} ({_diff_text(r['diff_vs_base'])})" for m, r in rows.items()
              if significance(r["diff_vs_base"]) == "loss"]
    k = _folds(report)
    pooled = (f"Pooled over {k} cross-fitted folds ({report['folds']['n_tested']} test examples, each tested once; "
              "CIs resample within folds). ") if k > 1 else ""
    if gains:
        text = f"Significant test gain over the base model (paired 95% CI above 0): {', '.join(gains)}."
    else:
        text = ("No method's test gain over the base model is significant: every paired 95% CI of "
                "(method - base) on test reaches 0 or below.")
    if losses:
        text += f" Significantly worse than base: {', '.join(losses)}."
    own = [rows[m].get("verdict") for m in method_order(report)]
    return " ".join([pooled + text, *(v for v in own if v)])


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
            "every fold's test examples (each tested once), and their CIs resample within folds. Dev acc is the "
            "mean of the folds' dev accuracies; the configuration shows what every fold chose alike.")


def _folds_section(report: dict) -> list[str]:
    """K, the pooled counts and, per method, what each fold chose and scored."""
    folds = report["folds"]
    sources = ", ".join(f"{n} from {name}" for name, n in folds["pooled"].items())
    lines = ["## Folds", "", f"{folds['k']} folds, seed {folds['seed']}, {folds['n_tested']} examples pooled "
             f"({sources}); every example is in exactly one fold's test and in no split of that fold's run. "
             "The CIs of pooled accuracies and differences resample within folds (each replicate keeps every "
             "fold's size).", "", "| fold | train | dev | test | base dev acc | base test acc |",
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


def render_markdown(report: dict) -> str:
    base = report["base"]
    effects = report.get("side_effects") is not None
    lines = [f"# eigenprune compare: {report['task']} on {report['model']}", "", "## Verdict", "",
             report["verdict"], "", "## Results", "", _setting(report), "",
             "| method | chosen configuration | dev acc | test acc [95% CI] | test - base [95% CI] | dev evals "
             "| wall s | changed params |" + (" Δ perplexity | KL |" if effects else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if effects else ""),
             f"| base | unmodified model | {base['dev']['acc']:.3f} | {_ci_text(base['test'])} | - | 1 | "
             f"{report['timings']['base_eval']:.1f} | 0 |" + ("  |  |" if effects else "")]
    for name in method_order(report):
        r = report["methods"][name]
        lines.append(f"| {name} | {_chosen(r['config'])} | {r['dev']['acc']:.3f} | {_ci_text(r['test'])} | "
                     f"{_diff_text(r['diff_vs_base'])} | {r['dev_evaluations']} | {r['wall_s']:.1f} | "
                     f"{r['changed_params']} |" + _effects(report, name))
    lines += ["", "![test accuracy per method](comparison.png)", ""]
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


def plot_comparison(report: dict, path: Path) -> None:
    """Test accuracy with its 95% CI per method; the base model is the vertical line and band."""
    from matplotlib.figure import Figure

    rows = report["methods"]
    names = method_order(report)
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(names)), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    base = report["base"]["test"]
    ax.axvspan(base["lo"], base["hi"], color="0.85", label="base 95% CI")
    ax.axvline(base["acc"], color="0.3", linestyle="--", label=f"base {base['acc']:.3f}")
    for y, name in enumerate(names):
        t = rows[name]["test"]
        ax.errorbar([t["acc"]], [y], xerr=[[t["acc"] - t["lo"]], [t["hi"] - t["acc"]]], fmt="o", capsize=4,
                    color="#d62728" if y == 0 else "#1f77b4")  # the first method asked for stands out
        for mark in rows[name].get("markers", []):  # the method's own reference points (seeds, ICL alone, ...)
            ax.plot([mark["acc"]], [y], mark.get("marker", "x"), mfc="none", color="0.3", markersize=6,
                    label=mark.get("label"))
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    k = _folds(report)
    ax.set_xlabel(f"test accuracy pooled over {k} folds (n={base['n']}), 95% CI resampling within folds" if k > 1
                  else f"test accuracy (n={base['n']}), 95% bootstrap CI")
    ax.set_title(f"{report['task']} on {Path(str(report['model'])).name}")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    fig.savefig(path)
