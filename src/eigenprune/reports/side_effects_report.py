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
    linear = [n for n in section["model_order"] if models[n].get("kl", {}).get("path") == "linear"]
    if linear:
        lines += ["", f"KL of {', '.join(linear)} by the linear path (`--side-effect-kl linear`): from the edit's own "
                  "LM head and log-sum-exp, without the base's logits; it differs from the exact KL by float32 "
                  "rounding, 1e-7 to about 3e-5 nats a token (larger logits worse), which matters only for KLs that "
                  "small."]
    exact = [n for n in section["model_order"] if n != BASE and n not in linear]
    if section.get("kl_requested") == "linear" and exact:
        lines += ["", f"KL of {', '.join(exact)} by the exact path although the linear one was asked for: it needs an "
                  "edit that keeps the base's LM head (a plain float32 Linear) and logits that are the head's output "
                  "(not soft-capped)."]
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
    if section.get("lm_eval"):
        from eigenprune.reports.lm_eval_report import side_effects_lines

        lines += side_effects_lines(section["lm_eval"])
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


def plot_data(section: dict) -> list[dict]:
    """What `plot` draws, one entry per edited model: {"name", "delta", "lo", "hi", "significant", "kl", "kl_lo",
    "kl_hi"} — the paired Δ perplexity (edit − base) and its interval exactly as the table and the words judge
    it, and the mean KL(base ‖ edit) with its interval."""
    models = section["models"]
    out = []
    for name in section["model_order"]:
        if name == BASE:
            continue
        d, k = models[name]["delta_perplexity"], models[name].get("kl", {"value": 0.0, "lo": 0.0, "hi": 0.0})
        out.append({"name": name, "delta": d["diff"], "lo": d["lo"], "hi": d["hi"], "significant": significance(d),
                    "kl": k["value"], "kl_lo": k["lo"], "kl_hi": k["hi"]})
    return out


def plot(section: dict, path: str | Path) -> list[dict]:
    """Per edited model: Δ perplexity (edit − base) with its paired CI, 0 being the base model (left), and the
    mean KL(base ‖ model) with its CI (right). Returns what it drew (`plot_data`)."""
    from matplotlib.figure import Figure

    data = plot_data(section)
    level = round(100 * section["bootstrap"]["level"])
    fig = Figure(figsize=(9, 1.8 + 0.45 * max(1, len(data))), dpi=120, layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    base = section["models"][BASE]["perplexity"]
    left.axvline(0.0, color="0.3", linestyle="--", label=f"base model (perplexity {base['value']:.2f})")
    for y, row in enumerate(data):
        filled = "#1f77b4" if row["significant"] else "white"
        left.errorbar([row["delta"]], [y], xerr=[[row["delta"] - row["lo"]], [row["hi"] - row["delta"]]], fmt="o",
                      capsize=4, color="#1f77b4", mfc=filled)
        right.errorbar([row["kl"]], [y], xerr=[[row["kl"] - row["kl_lo"]], [row["kl_hi"] - row["kl"]]], fmt="o",
                       capsize=4, color="#1f77b4")
    left.plot([], [], "o", color="#1f77b4", label=f"filled: the paired {level}% CI excludes 0")
    left.plot([], [], "o", color="#1f77b4", mfc="white", label="open: it includes 0")
    left.set_yticks(range(len(data)), [row["name"] for row in data])
    left.invert_yaxis()
    left.set_xlabel(f"Δ perplexity (edit − base), paired {level}% bootstrap CI over "
                    f"{section['sample']['documents']} documents")
    right.set_xlabel(f"mean KL(base ‖ model), nats per token, {level}% CI")
    fig.suptitle("Side effects on general English text")
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    fig.savefig(path)
    return data
