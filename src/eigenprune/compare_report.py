"""What `eigenprune compare` writes for people: the plain-words verdict, comparison.md and comparison.png.

Everything here reads only the JSON-ready report `compare.compare` builds, so a saved comparison.json can be
re-rendered without re-running anything.
"""

from __future__ import annotations

from pathlib import Path


def _ci_text(c: dict) -> str:
    return f"{c['acc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def _diff_text(d: dict) -> str:
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def method_order(report: dict) -> list[str]:
    """Methods in the order they ran (comparison.json stores them with sorted keys)."""
    rows = report["methods"]
    return [m for m in report.get("methods_run", rows) if m in rows] + [m for m in rows
                                                                      if m not in report.get("methods_run", ())]


def verdict(report: dict) -> str:
    """Plain words: which test differences to base are significant, and is eigenprune more than random?"""
    rows = report["methods"]
    gains = [f"{m} ({_diff_text(r['diff_vs_base'])})" for m, r in rows.items() if r["diff_vs_base"]["lo"] > 0]
    losses = [f"{m} ({_diff_text(r['diff_vs_base'])})" for m, r in rows.items() if r["diff_vs_base"]["hi"] < 0]
    if gains:
        text = f"Significant test gain over the base model (paired 95% CI above 0): {', '.join(gains)}."
    else:
        text = ("No method's test gain over the base model is significant: every paired 95% CI of "
                "(method - base) on test reaches 0 or below.")
    if losses:
        text += f" Significantly worse than base: {', '.join(losses)}."
    versus = report.get("eigenprune_vs_random")
    if versus is not None and versus["n_frozen"] == 0:
        text += (" eigenprune chose p = 0 (the base model), so the random control is the base model too and "
                 "there is no eigenprune effect to tell apart from freezing random components.")
    elif versus is not None:
        d, accs = versus["diff"], versus["random_test_accs"]
        eigen_acc = rows["eigenprune"]["test"]["acc"]
        where = "above" if eigen_acc > max(accs) else "below" if eigen_acc < min(accs) else "inside"
        kind = ("distinguishable from freezing random components (the CI excludes 0)" if d["lo"] > 0 or d["hi"] < 0
                else "not distinguishable from freezing random components (the CI includes 0)")
        text += (f" eigenprune vs the random control ({versus['n_frozen']} components, {len(accs)} seeds): "
                 f"test difference {_diff_text(d)}; eigenprune's effect is {kind}, and its test accuracy "
                 f"{eigen_acc:.3f} lies {where} the random seeds' range [{min(accs):.3f}, {max(accs):.3f}].")
    icl = rows.get("svd-clip", {}).get("extra", {}).get("icl_only")
    if icl and rows["svd-clip"]["test"]["acc"] <= icl["test"]["acc"]:
        text += (f" svd-clip's test accuracy ({rows['svd-clip']['test']['acc']:.3f}) is no higher than its "
                 f"demonstrations alone ({icl['test']['acc']:.3f}): the prompt change, not the clipping, "
                 "carries it.")
    return text


def _describe(config: dict) -> str:
    parts = []
    for k, v in config.items():
        if v is None or v == []:
            continue
        shown = f"{len(v)} items" if isinstance(v, list) and len(v) > 3 else v
        parts.append(f"{k}={shown}")
    return ", ".join(parts).replace("|", "/")


def render_markdown(report: dict) -> str:
    sizes = ", ".join(f"{k} {v}" for k, v in report["split_sizes"].items())
    base = report["base"]
    lines = [f"# eigenprune compare: {report['task']} on {report['model']}", "", "## Verdict", "",
             report["verdict"], "", "## Results", "",
             f"Split seed {report['split_seed']} ({sizes}), eval mode `{report['eval_mode']}`. Every method chose "
             "its configuration on dev only; test was evaluated once per method, for its chosen configuration.", "",
             "| method | chosen configuration | dev acc | test acc [95% CI] | test - base [95% CI] | dev evals "
             "| wall s | changed params |", "|---|---|---|---|---|---|---|---|",
             f"| base | unmodified model | {base['dev']['acc']:.3f} | {_ci_text(base['test'])} | - | 1 | "
             f"{report['timings']['base_eval']:.1f} | 0 |"]
    for name in method_order(report):
        r = report["methods"][name]
        lines.append(f"| {name} | {_describe(r['config'])} | {r['dev']['acc']:.3f} | {_ci_text(r['test'])} | "
                     f"{_diff_text(r['diff_vs_base'])} | {r['dev_evaluations']} | {r['wall_s']:.1f} | "
                     f"{r['changed_params']} |")
    lines += ["", "![test accuracy per method](comparison.png)", ""]
    random_runs = report["methods"].get("random", {}).get("runs") or []
    if random_runs:
        lines += ["## Random control, per seed", "", "| seed | components | dev acc | test acc [95% CI] |",
                  "|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['n_frozen']} | {r['dev_acc']:.3f} | {_ci_text(r['test'])} |"
                  for r in random_runs]
        lines.append("")
    icl = report["methods"].get("svd-clip", {}).get("extra", {}).get("icl_only")
    if icl:
        diff = f", test - base {_diff_text(icl['diff_vs_base'])}" if "diff_vs_base" in icl else ""
        lines += ["## svd-clip: demonstrations alone (ICL only)", "",
                  f"dev {_ci_text(icl['dev'])}, test {_ci_text(icl['test'])}{diff}. The prompt change alone "
                  "moves accuracy; clipping is worth something only beyond this.", ""]
    notes = ["dev evals counts the configurations compared on dev, the base (or ICL-only) candidate included; "
             "the random control chooses nothing (its number of components is eigenprune's dev choice), so 0.",
             "The random row's dev/test are per-example correctness averaged over its seeds.",
             "changed params counts weight (and bias) entries of the merged model that differ from the base."]
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
                    color="#d62728" if name == "eigenprune" else "#1f77b4")
        for run in rows[name]["runs"] if name == "random" else []:
            ax.plot([run["test"]["acc"]], [y], "x", color="0.4", markersize=5)
        icl = rows[name].get("extra", {}).get("icl_only") if name == "svd-clip" else None
        if icl:  # the prompt change alone: clipping is worth something only beyond it
            ax.plot([icl["test"]["acc"]], [y], "D", mfc="none", color="0.3", markersize=6,
                    label=f"svd-clip's demonstrations alone {icl['test']['acc']:.3f}")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"test accuracy (n={base['n']}), 95% bootstrap CI")
    ax.set_title(f"{report['task']} on {Path(str(report['model'])).name}")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    fig.savefig(path)
