"""The "Side effects" section in words, a table and a plot, from `evaluation.side_effects.summarize`'s dict."""

from __future__ import annotations

from pathlib import Path

from eigenprune.evaluation.side_effects import BASE
from eigenprune.evaluation.stats import significance


def _value(c: dict, fmt: str = ".2f") -> str:
    return f"{c['value']:{fmt}} [{c['lo']:{fmt}}, {c['hi']:{fmt}}]"


def _diff(c: dict, fmt: str = "+.2f") -> str:
    return f"{c['diff']:{fmt}} [{c['lo']:{fmt}}, {c['hi']:{fmt}}]"


def columns(section: dict, name: str) -> dict[str, str]:
    """The "Δ perplexity" and "KL" cells of one model's row in `compare`'s table ("-" for the base)."""
    row = section["models"][name]
    if name == BASE:
        return {"Δ perplexity": "-", "KL": "-"}
    return {"Δ perplexity": _diff(row["delta_perplexity"]), "KL": _value(row["kl"], ".4f")}


def render_markdown(section: dict, plot_file: str | None = "side_effects.png") -> str:
    """The report's "Side effects" section in Markdown."""
    s, level = section["sample"], round(100 * section["bootstrap"]["level"])
    models = section["models"]
    where = ", ".join(f"{k} {v}" for k, v in sorted(s["sources"].items()))
    lines = ["## Side effects", "",
             f"Perplexity on {s['documents']} general-English documents ({s['tokens']:,} scored tokens; {where}; "
             "the text of the pruned task left out), each scored as the continuation of its first token, with a "
             f"{level}% bootstrap CI over documents. Δ perplexity is edit − base with a paired bootstrap CI; KL is "
             "the mean per-token KL(base ‖ edit) of the next-token distributions, in nats.", "",
             f"| model | perplexity [{level}% CI] | Δ perplexity [{level}% CI] | KL [{level}% CI] | wall s |",
             "|---|---|---|---|---|"]
    for name in section["model_order"]:
        cells = columns(section, name)
        lines.append(f"| {name} | {_value(models[name]['perplexity'])} | {cells['Δ perplexity']} | {cells['KL']} | "
                     f"{models[name]['wall_s']:.1f} |")
    worse = [n for n in section["model_order"] if n != BASE and significance(models[n]["delta_perplexity"]) == "gain"]
    lines += ["", f"Perplexity significantly higher than the base's: {', '.join(worse)}." if worse else
              "No edit raises perplexity significantly (every paired CI of edit − base reaches 0 or below).", ""]
    lines += _per_method(section)
    if plot_file:
        lines += [f"![side effects: perplexity and KL per model]({plot_file})", ""]
    if section["also"]:
        lines += [f"Accuracy on other tasks (test split; {level}% CIs, paired for edit − base):", "",
                  "| task (mode, n) | model | accuracy | model − base |", "|---|---|---|---|"]
        for spec, info in section["also"].items():
            for name in section["model_order"]:
                a = models[name]["also"][spec]
                diff = _diff(a["diff_vs_base"], "+.3f") if "diff_vs_base" in a else "-"
                lines.append(f"| {info['name']} ({info['eval_mode']}, {info['n']}) | {name} | "
                             f"{a['acc']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] | {diff} |")
        lines.append("")
    return "\n".join(lines)


def _per_method(section: dict) -> list[str]:
    """Each method's cost over its folds' chosen edits (and the random control's seeds): mean and range; only
    where some method has more than one (a fixed split's table above says it all)."""
    per = section.get("per_method") or {}
    if not any(len(m["rows"]) + m["unedited"] > 1 for m in per.values()):
        return []
    lines = ["Per method, over every fold's chosen edit (the random control: over its measured seeds too); a fold "
             "that chose no edit counts 0:", "",
             "| method | edits measured | unedited folds | Δ perplexity mean [min, max] | KL mean [min, max] |",
             "|---|---|---|---|---|"]
    for name, m in per.items():
        d, k = m["delta_perplexity"], m["kl"]
        lines.append(f"| {name} | {len(m['rows'])} | {m['unedited']} | {d['mean']:+.2f} [{d['min']:+.2f}, "
                     f"{d['max']:+.2f}] | {k['mean']:.4f} [{k['min']:.4f}, {k['max']:.4f}] |")
    return [*lines, ""]


def plot(section: dict, path: str | Path) -> None:
    """Per model: perplexity with its CI (left) and mean KL(base ‖ model) with its CI (right)."""
    from matplotlib.figure import Figure

    names = section["model_order"]
    models = section["models"]
    fig = Figure(figsize=(9, 1.4 + 0.45 * len(names)), dpi=120, layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    for y, name in enumerate(names):
        color = "0.3" if name == BASE else "#1f77b4"
        p = models[name]["perplexity"]
        left.errorbar([p["value"]], [y], xerr=[[p["value"] - p["lo"]], [p["hi"] - p["value"]]], fmt="o",
                      capsize=4, color=color)
        k = models[name].get("kl", {"value": 0.0, "lo": 0.0, "hi": 0.0})
        right.errorbar([k["value"]], [y], xerr=[[k["value"] - k["lo"]], [k["hi"] - k["value"]]], fmt="o",
                       capsize=4, color=color)
    base = models[BASE]["perplexity"]
    left.axvspan(base["lo"], base["hi"], color="0.88")
    left.set_yticks(range(len(names)), names)
    left.invert_yaxis()
    level = round(100 * section["bootstrap"]["level"])
    left.set_xlabel(f"perplexity, {level}% bootstrap CI over {section['sample']['documents']} documents")
    right.set_xlabel("mean KL(base ‖ model), nats per token")
    fig.suptitle("Side effects on general English text")
    fig.savefig(path)
