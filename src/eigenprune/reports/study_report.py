"""What `eigenprune study` writes for people: study.json, study.md (one table) and study.png (heatmaps).

Everything here reads only each cell's comparison.json (and the cell's place in the grid), so the
study files are re-rendered from the cells on every run, also when every cell was skipped.

The study is one family of tests (model x task x method − base): every cell's exact paired p-values
(`diff_vs_base.p`, recomputed from the cell's per-example correctness) are Holm-adjusted together
(`p_adjusted`, the family's size in `family`), and "significant" (bold, ▲/▼, '*') follows the adjusted
value (`stats.significance`). A cell whose minimum detectable effect exceeds 5 points (or which could
detect nothing) is marked: it could not have shown a 5-point gain.
The control is the registered method whose role is "control" (`registry.controls()`: the random draw
of as many components as eigenprune froze); its test difference is shown next to every method of the
same cell.
Side effects come from a cell's "Side effects" section (`compare` measures the base and each method's
chosen configuration; under folds every fold's, and the study shows the mean over folds, `per_method`):
Δppl (edit − base perplexity on the packaged text), KL(base ‖ edit) and, on a fixed split, for every
`also` task, its accuracy difference. A method that changed no
parameter has 0 and 0; a cell measured without side effects shows "–".
"""

from __future__ import annotations

import math
from pathlib import Path

from eigenprune.evaluation.paired import holm_family, paired_difference
from eigenprune.evaluation.stats import ALPHA, significance
from eigenprune.methods.registry import controls
from eigenprune.reports.compare_report import method_order
from eigenprune.reports.words import diff_text, one_label_text, test_text

FORMAT, VERSION = "eigenprune-study", 1
NO_VALUE = "–"
DEFAULT_SIDE_EFFECTS = ("Δppl", "KL")  # the columns a person expects, shown empty until compare reports them


def _flat(value, prefix: str = "") -> dict:
    """A side-effects dict flattened to 'name' -> number or text (nested keys joined by '.')."""
    if isinstance(value, dict):
        if "diff" in value and not isinstance(value["diff"], dict):
            return {prefix: value["diff"]} if prefix else {"diff": value["diff"]}
        out = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix or "value": value}


def method_side_effects(report: dict, name: str) -> dict | None:
    """One method's side-effect numbers from its cell's comparison.json (see the module docstring); None when
    the cell has none. A method row that carries its own `side_effects` dict keeps it (flattened)."""
    row = report["methods"][name]
    if isinstance(row.get("side_effects"), dict):
        return _flat(row["side_effects"])
    section = report.get("side_effects")
    if not section:
        return None
    spread = (section.get("per_method") or {}).get(name)
    if spread is not None and len(spread["rows"]) + spread["unedited"] > 1:  # over folds (or seeds): the mean
        return {"Δppl": spread["delta_perplexity"]["mean"], "KL": spread["kl"]["mean"]}
    model = section["models"].get(name)
    if model is None:
        return {"Δppl": 0.0, "KL": 0.0} if row["changed_params"] == 0 else None
    out = {"Δppl": model["delta_perplexity"]["diff"], "KL": model["kl"]["value"]}
    for spec, acc in model.get("also", {}).items():
        out[f"{section['also'][spec]['name']} Δacc"] = acc["diff_vs_base"]["diff"]
    return out


DETECT = 0.05  # the gain a study cell should be able to detect (5 points); cells that cannot are marked


def cell_difference(report: dict, name: str) -> dict:
    """A method's test − base difference in a cell: recomputed from the cell's per-example correctness when the
    comparison.json holds it (the same function compare used), else the keys it stored (without compare's
    own `p_adjusted`, which adjusted over the cell alone)."""
    per_example = report.get("per_example")
    if per_example and name in per_example["methods"]:
        d = paired_difference(per_example["base"], per_example["methods"][name], per_example.get("fold"),
                              n_boot=report.get("n_boot", 1000)).to_dict()
        if d["interval"] == "bootstrap":  # a seed-averaged control: keep the cell's own bootstrap numbers
            d |= {k: report["methods"][name]["diff_vs_base"][k] for k in ("diff", "lo", "hi")}
        return d
    stored = report["methods"][name]["diff_vs_base"]
    return {k: stored.get(k) for k in ("diff", "lo", "hi", "p", "n", "discordant", "mde", "interval")}


def winners_curse(report: dict, name: str) -> dict | None:
    """How far a method's dev gains overstate its test gains: the mean over folds of (its chosen configuration's
    dev accuracy − the base's) minus the mean over folds of (its test accuracy − the base's), on a fixed split the
    one split's. None for a method that chose nothing on dev (a control, a fixed recipe)."""
    row = report["methods"][name]
    if not row.get("dev_evaluations"):
        return None
    per_fold = (report.get("folds") or {}).get("per_fold")
    if per_fold and all("dev_acc" in r and "test_acc" in r for r in row.get("runs", [])) and len(row["runs"]) == len(
            per_fold):
        dev = [r["dev_acc"] - f["base_dev_acc"] for r, f in zip(row["runs"], per_fold, strict=True)]
        test = [r["test_acc"] - f["base_test_acc"] for r, f in zip(row["runs"], per_fold, strict=True)]
    else:
        base = report["base"]
        dev, test = [row["dev"]["acc"] - base["dev"]["acc"]], [row["test"]["acc"] - base["test"]["acc"]]
    dev_gain, test_gain = sum(dev) / len(dev), sum(test) / len(test)
    return {"dev_gain": dev_gain, "test_gain": test_gain, "curse": dev_gain - test_gain, "folds": len(dev)}


def summarize_cell(cell: dict, report: dict) -> dict:
    """One cell of study.json: where it sits in the grid and its methods' test differences from comparison.json
    (`significant` judges the cell alone until `adjust` sets it from the p-value adjusted over the study)."""
    rows = report["methods"]
    control_name = next((name for name in controls() if name in rows), None)
    control = rows[control_name]["diff_vs_base"] if control_name else None
    diff = lambda d: {k: d[k] for k in ("diff", "lo", "hi")}
    methods = {}
    for name in method_order(report):
        row = rows[name]
        d = cell_difference(report, name)
        methods[name] = {
            "test": row["test"], "dev_acc": row["dev"]["acc"], "config": row["config"],
            "diff_vs_base": d, "significant": significance(d), "predicted_labels": row.get("predicted_labels"),
            "control_diff": None if name == control_name or control is None else diff(control),
            "side_effects": method_side_effects(report, name), "winners_curse": winners_curse(report, name),
            "dev_evaluations": row["dev_evaluations"], "changed_params": row["changed_params"],
        }
    return {
        **cell, "eval_mode": report["eval_mode"], "split_sizes": report["split_sizes"],
        "folds": (report.get("folds") or {}).get("k", 1),
        "base": {"dev_acc": report["base"]["dev"]["acc"], "test": report["base"]["test"],
                 "predicted_labels": report["base"].get("predicted_labels")},
        "methods_run": method_order(report), "implicit": report.get("implicit", []),
        "control": control_name, "methods": methods, "verdict": report.get("verdict", ""),
        "timings": {**report.get("timings", {}), "methods": {n: r.get("wall_s") for n, r in rows.items()}},
    }


def cannot_detect(d: dict, effect: float = DETECT) -> bool:
    """Whether a difference's design could not detect a gain of `effect` (its MDE is larger, or none)."""
    return d.get("discordant") is not None and (d.get("mde") is None or d["mde"] > effect)


def adjust(cells: list[dict]) -> dict:
    """Holm-adjust every method − base p-value of the study together (`p_adjusted` in each `diff_vs_base`),
    set each row's `significant` from the adjusted value and its `cannot_detect_5pt`; returns the family."""
    rows = [r for c in cells for r in c["methods"].values()]
    size = holm_family(r["diff_vs_base"] for r in rows)
    for r in rows:
        r["significant"] = significance(r["diff_vs_base"])
        r["cannot_detect_5pt"] = cannot_detect(r["diff_vs_base"])
    return {"adjustment": "holm", "alpha": ALPHA, "size": size,
            "over": "every model x task x targets x method − base test difference with an exact paired test"}


def curse_by_method(cells: list[dict]) -> dict:
    """Each method's winner's curse over the study: the mean over the cells where it chose on dev of its dev gain,
    test gain and their difference (each cell's already a mean over its folds)."""
    out = {}
    for name in dict.fromkeys(m for c in cells for m in c["methods"]):
        curses = [c["methods"][name]["winners_curse"] for c in cells
                  if name in c["methods"] and c["methods"][name].get("winners_curse")]
        if curses:
            out[name] = {k: sum(w[k] for w in curses) / len(curses) for k in ("dev_gain", "test_gain", "curse")}
            out[name]["cells"] = len(curses)
    return out


def build(spec: dict, spec_file: str, cells: list[dict], last_run: dict) -> dict:
    """study.json: the spec, every cell's summary in grid order (p-values Holm-adjusted over the study), the
    family, each method's winner's curse over the cells, and what this invocation did (`last_run`)."""
    family = adjust(cells)
    return {"format": FORMAT, "format_version": VERSION, "spec": spec, "spec_file": spec_file, "cells": cells,
            "family": family, "winners_curse": curse_by_method(cells), "last_run": last_run}


def _num(value, fmt: str = "{:+.3f}") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return NO_VALUE if value is None else str(value)
    return fmt.format(value)


def _diff(d: dict | None) -> str:
    return NO_VALUE if d is None else diff_text(d)


def side_effect_columns(study: dict) -> list[str]:
    names = []
    for cell in study["cells"]:
        for row in cell["methods"].values():
            names += [k for k in row["side_effects"] or {} if k not in names]
    return names or list(DEFAULT_SIDE_EFFECTS)


MARK = {"gain": "▲ gain", "loss": "▼ loss", None: ""}
_SIDE_FORMAT = {"Δppl": "{:+.2f}", "KL": "{:.4f}"}  # one precision per column (accuracy changes: 3 decimals)


def _side_format(column: str) -> str:
    return _SIDE_FORMAT.get(column, "{:+.3f}" if column.endswith("Δacc") else "{:.3f}")


def _p_cell(d: dict) -> str:
    if d.get("p") is None:
        return NO_VALUE
    return f"{d['p']:.3f} ({d['p_adjusted']:.3f})" if d.get("p_adjusted") is not None else f"{d['p']:.3f}"


def _curse_cell(curse: dict | None) -> str:
    if curse is None:
        return NO_VALUE
    return f"{curse['curse']:+.3f} ({curse['dev_gain']:+.3f} − {curse['test_gain']:+.3f})"


def _mde_cell(d: dict) -> str:
    if d.get("discordant") is None:
        return NO_VALUE
    mark = " †" if cannot_detect(d) else ""
    return ("none" if d.get("mde") is None else f"{d['mde']:.3f}") + mark


def render_markdown(study: dict, heatmap: str | None = "study.png") -> str:
    cells = study["cells"]
    family = study.get("family") or {"size": 0, "alpha": ALPHA}
    control = next((c["control"] for c in cells if c.get("control")), (controls() or ["control"])[0])
    side = side_effect_columns(study)
    rows = [(c, m, r) for c in cells for m, r in c["methods"].items()]
    where = lambda c: f"{c['task']} ({c['model']}, {c['targets']})"
    gains = [f"{m} on {where(c)}: {diff_text(r['diff_vs_base'])}, {test_text(r['diff_vs_base'])}"
             for c, m, r in rows if r["significant"] == "gain"]
    losses = [f"{m} on {where(c)}" for c, m, r in rows if r["significant"] == "loss"]
    grid = study["spec"]["study"]
    head = (f"{len(cells)} cells ({len(grid['models'])} models x {len(grid['tasks'])} tasks x "
            f"{len(grid['targets'])} targets), methods {', '.join(grid['methods'])}. The family: "
            f"{family['size']} method − base test differences with an exact paired test, Holm-adjusted together; "
            f"significant means adjusted p < {family['alpha']:g}.")
    verdict = (f"Significant test gains over the base model after Holm adjustment over the study's {family['size']} "
               f"tests: {'; '.join(gains)}." if gains else
               f"No method's test gain over the base model is significant after Holm adjustment over the study's "
               f"{family['size']} tests.")
    if losses:
        verdict += f" Significantly worse than the base: {'; '.join(losses)}."
    blind = [f"{m} on {where(c)}" for c, m, r in rows if r.get("cannot_detect_5pt") and r["significant"] is None]
    if blind:
        verdict += (f" {len(blind)} of {len(rows)} results (marked †) could not have detected a 5-point change "
                    "(80% power, 5% level), so their 'not significant' says little: the table gives each one's "
                    "95% upper bound.")
    one_label = [one_label_text(f"On {where(c)} the base model", c["base"].get("predicted_labels")) for c in cells]
    verdict += "".join(f" {text}" for text in one_label if text)
    lines = [f"# eigenprune study: {Path(study['spec_file']).name}", "", head, "", verdict, "", "## Results", "",
             "| model | task | targets | method | base test | method test | test - base [95% CI] | p (Holm) | MDE "
             f"| sig. | dev gain − test gain | {control} control: test - base | " + " | ".join(side) + " |",
             "|---" * (12 + len(side)) + "|"]
    for c, m, r in rows:
        effects, d = r["side_effects"] or {}, r["diff_vs_base"]
        shown = _diff(d) if r["significant"] is None else f"**{_diff(d)}**"
        lines.append(f"| {c['model']} | {c['task']} | {c['targets']} | {m} | {c['base']['test']['acc']:.3f} | "
                     f"{r['test']['acc']:.3f} | {shown} | {_p_cell(d)} | {_mde_cell(d)} | {MARK[r['significant']]} | "
                     f"{_curse_cell(r.get('winners_curse'))} | {_diff(r['control_diff'])} | "
                     + " | ".join(_num(effects.get(k), _side_format(k)) for k in side)
                     + " |")
    lines += ["", "Columns: **base test** / **method test** test accuracy; **test - base** the paired change in test "
              "accuracy with Newcombe's hybrid score 95% interval (stratified by fold under folds; a seed-averaged "
              "control keeps a paired bootstrap CI), bold where significant; **p (Holm)** the exact McNemar p-value "
              "and, in brackets, the Holm-adjusted one over the whole study; **MDE** the smallest change in accuracy "
              "(a fraction) the exact test detects with 80% power at the 5% level given the cell's n and the share "
              "of answers that changed, † where it exceeds 0.05 or nothing was detectable; **sig.** follows the "
              "adjusted p; **dev gain − test gain** the winner's curse of the method's dev choices (mean over folds of "
              "its chosen configuration's dev gain over the base, minus the mean test gain; dev and test gains in "
              f"brackets), – for a method that chose nothing on dev; **{control} control** its own test − base in the "
              "same cell; "
              + ", ".join(f"**{k}**" for k in side) + " side effects (see the notes)."]
    if heatmap:
        lines += ["", f"![test - base per task and method]({heatmap})"]
    lines += ["", "## Cells", ""]
    for c in cells:
        sizes = ", ".join(f"{k} {v}" for k, v in c["split_sizes"].items())
        lines.append(f"- [{c['key']}]({c['dir']}/comparison.md): {c['eval_mode']}, {sizes}. {c['verdict']}")
    notes = ["Each cell is one `eigenprune compare` run; every method chose its configuration on dev and was "
             "evaluated on test once. A cell's comparison.md adjusts over its own methods only; this table adjusts "
             "over the study.",
             f"The {control} control freezes as many components as eigenprune chose, at random; its difference is "
             "repeated on every row of its cell so a method's gain can be read against it."]
    curse = study.get("winners_curse") or {}
    if curse:
        notes.append("Winner's curse over the study (mean over cells of dev gain − test gain; a method whose dev "
                     "choices chase noise has a large one): " + "; ".join(
                         f"{m} {w['curse']:+.3f} (dev {w['dev_gain']:+.3f}, test {w['test_gain']:+.3f}, "
                         f"{w['cells']} cell{'s' * (w['cells'] != 1)})" for m, w in curse.items()) + ".")
    implicit = sorted({m for c in cells for m in c["implicit"]})
    if implicit:
        notes.append(f"Run implicitly, because other methods need their results: {', '.join(implicit)}.")
    if all(r["side_effects"] is None for _, _, r in rows):
        notes.append("Side effects (Δppl, KL): not measured in these cells.")
    else:
        folded = (" Under folds they are the mean over every fold's chosen configuration (the random control's over "
                  "its first `side_effect_seeds` draws in every fold); each cell's comparison.md gives the range."
                  if any(c.get("folds", 1) > 1 for c in cells) else "")
        notes.append("Side effects, from each cell's comparison.md (CIs there): Δppl is the edit's perplexity minus "
                     "the base's on the packaged general-English text (the task's own text left out), KL the mean "
                     f"per-token KL(base ‖ edit) in nats; a method that changed nothing has 0 and 0.{folded}")
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def _row_labels(study: dict, model: str) -> list[tuple[str, str, str]]:
    several = len(study["spec"]["study"]["targets"]) > 1
    return [(c["task"], c["targets"], f"{c['task']} · {c['targets']}" if several else c["task"])
            for c in study["cells"] if c["model"] == model]


def plot_heatmaps(study: dict, path: Path) -> None:
    """Tasks x methods per model, colour = test - base, annotated with the difference and '*' where it is
    significant after Holm adjustment over the study; grey where a method did not run in a cell."""
    import numpy as np
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(c["model"] for c in study["cells"]))
    methods = list(dict.fromkeys(m for c in study["cells"] for m in c["methods_run"]))
    diffs = [r["diff_vs_base"]["diff"] for c in study["cells"] for r in c["methods"].values()]
    scale = max([abs(d) for d in diffs] + [0.01])
    heights = [len(_row_labels(study, m)) for m in models]
    fig = Figure(figsize=(2.2 + 1.0 * len(methods), 1.0 + sum(0.45 * h + 0.7 for h in heights)), dpi=120,
                 layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False, height_ratios=[h + 1 for h in heights])[:, 0]
    image = None
    for ax, model in zip(axes, models, strict=True):
        labels = _row_labels(study, model)
        by_place = {(c["task"], c["targets"]): c for c in study["cells"] if c["model"] == model}
        values = np.full((len(labels), len(methods)), np.nan)
        for i, (task, targets, _) in enumerate(labels):
            for j, method in enumerate(methods):
                row = by_place[(task, targets)]["methods"].get(method)
                if row is None:
                    ax.text(j, i, NO_VALUE, ha="center", va="center", color="0.4")
                    continue
                values[i, j] = row["diff_vs_base"]["diff"]
                mark = "*" if row["significant"] else ""
                ax.text(j, i, f"{values[i, j]:+.3f}{mark}", ha="center", va="center", fontsize=8,
                        color="white" if abs(values[i, j]) > 0.6 * scale else "black")
        image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu", vmin=-scale, vmax=scale, aspect="auto")
        ax.set_facecolor("0.85")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), [label for _, _, label in labels])
        ax.set_title(model, fontsize=10)
    fig.colorbar(image, ax=list(axes), label="test accuracy - base", shrink=0.8)
    fig.suptitle("test accuracy - base model; * significant (exact paired test, Holm-adjusted over the study)",
                 fontsize=9, wrap=True)
    fig.savefig(path, format="png")
