"""The table of `eigenprune lm-eval`: base → edit per lm-eval task and metric, paired over the same examples."""

from __future__ import annotations

from eigenprune.evaluation.lm_eval_bridge import per_sample
from eigenprune.evaluation.stats import accuracy_ci, paired_diff_ci, significance


def paired_table(base: dict, edit: dict, tasks: list[str], n_boot: int) -> list[dict]:
    """One row per task and per-sample metric: base and edit means with CIs, and the paired difference."""
    rows = []
    for task in tasks:
        before, after = per_sample(base, task), per_sample(edit, task)
        for metric in sorted(set(before) & set(after)):
            docs = sorted(set(before[metric]) & set(after[metric]))
            if not docs:
                continue
            b = [before[metric][d] for d in docs]
            a = [after[metric][d] for d in docs]
            (acc_b, lo_b, hi_b), (acc_a, lo_a, hi_a) = accuracy_ci(b, n_boot), accuracy_ci(a, n_boot)
            diff, lo, hi = paired_diff_ci(b, a, n_boot)
            rows.append({"task": task, "metric": metric, "n": len(docs),
                         "base": {"acc": acc_b, "lo": lo_b, "hi": hi_b}, "edit": {"acc": acc_a, "lo": lo_a, "hi": hi_a},
                         "diff": {"diff": diff, "lo": lo, "hi": hi},
                         "verdict": significance({"lo": lo, "hi": hi}) or "no significant change"})
    return rows


def table_markdown(rows: list[dict], edit_dir: str) -> str:
    lines = [f"# lm-evaluation-harness: base → edit ({edit_dir})", "",
             "| task | metric | n | base [95% CI] | edit [95% CI] | edit − base [95% CI, paired] | verdict |",
             "|---|---|---:|---|---|---|---|"]
    for r in rows:
        b, e, d = r["base"], r["edit"], r["diff"]
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {b['acc']:.3f} [{b['lo']:.3f}, {b['hi']:.3f}] | "
                     f"{e['acc']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}] | {d['diff']:+.3f} [{d['lo']:+.3f}, "
                     f"{d['hi']:+.3f}] | {r['verdict']} |")
    return "\n".join(lines) + "\n"
