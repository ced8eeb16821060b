"""lm-evaluation-harness tables: base → edit per lm-eval task and metric, paired over the same examples.

One table serves `eigenprune lm-eval` (one edit) and the side effects of run/compare/study (`--also lm-eval:TASK`:
every fold's chosen edit, a `model` column added). The difference is `evaluation.paired`'s, as everywhere else:
Newcombe's paired interval and the exact McNemar p-value for 0/1 metrics (acc, acc_norm, exact_match), a paired
bootstrap and no p for graded ones; p-values are Holm-adjusted over the table's rows (`judge`).
"""

from __future__ import annotations

from eigenprune.evaluation.paired import holm_family, paired_difference
from eigenprune.evaluation.stats import Accuracy, accuracy_ci, significance


def paired_table(base: dict, edit: dict, tasks: list[str], n_boot: int) -> list[dict]:
    """One row per task and per-sample metric (lm-eval results dicts with per-sample logs): base and edit means
    with CIs, and edit − base (`paired.PairedDifference`) over the examples both evaluated."""
    from eigenprune.evaluation.lm_eval_bridge import per_sample

    rows = []
    for task in tasks:
        before, after = per_sample(base, task), per_sample(edit, task)
        for metric in sorted(set(before) & set(after)):
            docs = sorted(set(before[metric]) & set(after[metric]))
            if not docs:
                continue
            b = [before[metric][d] for d in docs]
            a = [after[metric][d] for d in docs]
            rows.append({"task": task, "metric": metric, "n": len(docs),
                         "base": Accuracy(*accuracy_ci(b, n_boot), len(docs)).to_dict(),
                         "edit": Accuracy(*accuracy_ci(a, n_boot), len(docs)).to_dict(),
                         "diff": paired_difference(b, a, n_boot=n_boot).to_dict()})
    return rows


def accuracies(results: dict, tasks: list[str], n_boot: int) -> dict[str, dict[str, dict]]:
    """{task: {metric: {"acc", "lo", "hi", "n"}}} of one model's lm-eval results (its per-sample logs)."""
    from eigenprune.evaluation.lm_eval_bridge import per_sample

    return {task: {metric: Accuracy(*accuracy_ci([v[d] for d in sorted(v)], n_boot), len(v)).to_dict()
                   for metric, v in sorted(per_sample(results, task).items())} for task in tasks}


def judge(rows: list[dict]) -> list[dict]:
    """Holm-adjust the rows' p-values as one family (`p_adjusted`) and give each its verdict; returns `rows`."""
    holm_family([r["diff"] for r in rows])
    for r in rows:
        r["verdict"] = significance(r["diff"]) or "no significant change"
    return rows


def _p(d: dict) -> str:
    if d.get("p") is None:
        return "-"
    return f"{d['p']:.3f} ({d['p_adjusted']:.3f})" if d.get("p_adjusted") is not None else f"{d['p']:.3f}"


def table_lines(rows: list[dict], with_model: bool = False) -> list[str]:
    """The Markdown table of `judge`d rows; `with_model`: a first column naming each row's edited model."""
    first = "| model " if with_model else ""
    lines = [f"{first}| task | metric | n | base [95% CI] | edit [95% CI] | edit − base [95% CI, paired] | "
             "exact p (Holm) | verdict |", f"{'|---' if with_model else ''}|---|---|---:|---|---|---|---|---|"]
    for r in rows:
        b, e, d = r["base"], r["edit"], r["diff"]
        cell = f"| {r['model']} " if with_model else ""
        lines.append(f"{cell}| {r['task']} | {r['metric']} | {r['n']} | {b['acc']:.3f} [{b['lo']:.3f}, "
                     f"{b['hi']:.3f}] | {e['acc']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}] | {d['diff']:+.3f} "
                     f"[{d['lo']:+.3f}, {d['hi']:+.3f}] | {_p(d)} | {r['verdict']} |")
    return lines


def table_markdown(rows: list[dict], edit_dir: str) -> str:
    """`eigenprune lm-eval`'s report.md."""
    return "\n".join([f"# lm-evaluation-harness: base → edit ({edit_dir})", "", *table_lines(rows)]) + "\n"


def side_effects_lines(section: dict) -> list[str]:
    """The lm-eval part of the "Side effects" section (`experiments.lm_eval_run.LmEvalProbe.section`)."""
    limit = f", the first {section['limit']} examples of each" if section.get("limit") else ""
    base = "; ".join(f"{task} {metric} {a['acc']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}] (n = {a['n']})"
                     for task, metrics in section["base"].items() for metric, a in metrics.items())
    lines = [f"lm-evaluation-harness tasks (lm-eval {section.get('lm_eval_version') or '?'}{limit}; each edit applied "
             f"in memory). Base model: {base}.", ""]
    if not section["rows"]:
        return [*lines, "No chosen edit changed the model, so no edit was evaluated on them.", ""]
    return [*lines, "Edit − base over the same examples: Newcombe's paired 95% interval and the exact McNemar p-value, "
            f"Holm-adjusted over the {section['family']} test(s) of this table:", "",
            *table_lines(section["rows"], with_model=True), ""]
