"""The sentences every verdict shares about a paired difference (method − base on the same test examples).

`run`, `compare` and `study` reports all read a `paired.PairedDifference` dict ({"diff", "lo", "hi", "p",
"n", "discordant", "mde", "interval"}, plus "p_adjusted" in a family) and say the same things about it in
the same words: the difference with its interval and exact p-value, the effect the design could have
detected, and — where the difference is not significant — the largest gain it leaves possible ("no gain
larger than +X points, 95% upper bound"), never "did not help". Also the warning for a base model that
answers one label almost always. Pure string functions of the JSON, so saved reports re-render.
"""

from __future__ import annotations

import math

from eigenprune.evaluation.stats import ALPHA


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def points(fraction: float, signed: bool = False) -> str:
    """A change in accuracy in percentage points: 0.0312 -> '3.1' ('+3.1' signed)."""
    return f"{100 * fraction:{'+' if signed else ''}.1f}"


def pvalue(p: float | None) -> str:
    """'p = 0.031', 'p < 0.001', or 'no exact test' for None."""
    if p is None:
        return "no exact test"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def diff_text(d: dict) -> str:
    """'+0.025 [-0.010, +0.060]' (the difference and its 95% interval)."""
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def test_text(d: dict) -> str:
    """The exact test in brief: 'exact paired p = 0.031, Holm-adjusted 0.093' (or why there is none)."""
    if d.get("p") is None:
        return "seed-averaged values: bootstrap CI, no exact test"
    adjusted = d.get("p_adjusted")
    return f"exact paired {pvalue(d['p'])}" + ("" if adjusted is None else f", Holm-adjusted {adjusted:.3f}")


def mde_text(d: dict) -> str:
    """What the design could detect: n, the share of answers that changed and the minimum detectable effect
    at 80% power and the 5% level."""
    n, changed = d.get("n"), d.get("discordant")
    if n is None or changed is None:
        return "the detectable effect is unknown (this report predates it)"
    share = f"{changed} of {n} answers changed"
    if changed == 0:
        return f"{share}, so no change in accuracy was detectable"
    if not _finite(d.get("mde")):
        return f"{share}: too few for the exact test to detect any change at the 5% level with 80% power"
    return (f"{share}; with these, a change of {points(d['mde'])} points is detected with 80% power at the "
            f"{round(100 * ALPHA)}% level")


def bound_text(d: dict) -> str:
    """For a difference that is not significant: 'no gain larger than +4.2 points (95% upper bound)'."""
    hi = d["hi"]
    if hi <= 0:
        return f"no gain at all inside the 95% interval (its upper bound is {points(hi, signed=True)} points)"
    return f"no gain larger than {points(hi, signed=True)} points (95% upper bound)"


def brief(d: dict) -> str:
    """A short clause for a difference that is not significant, as a list in a verdict: 'no gain larger than
    +4.2 points (95% upper bound; exact paired p = 0.210, Holm-adjusted 0.630; 7 of 80 answers changed,
    detectable 9.8 points)'."""
    n, changed, mde = d.get("n"), d.get("discordant"), d.get("mde")
    power = ("" if changed is None else f"; {changed} of {n} answers changed, " +
             ("nothing detectable" if not _finite(mde) else f"detectable {points(mde)} points"))
    return f"{bound_text(d).replace(' (95% upper bound)', '')} (95% upper bound; {test_text(d)}{power})"


def one_label_text(who: str, labels: dict | None) -> str:
    """The warning for a model that answers one label for >= 90% of the test examples ('' otherwise)."""
    if not labels or not labels.get("one_label"):
        return ""
    return (f"{who} answers '{labels['top']}' for {100 * labels['top_share']:.0f}% of the {labels['n']} test "
            "examples, so its accuracy is that label's share and an edit can gain only by moving the label prior.")


def labels_text(labels: dict | None) -> str:
    """'entailment 40, neutral 10, contradiction 6' (the predicted-label counts, most answered first)."""
    if not labels:
        return "–"
    counts = sorted(labels["counts"].items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{label} {n}" for label, n in counts)


def calibration_text(record: dict | None) -> str:
    """The sentence that says choice scores were calibrated, with the base model's content-free distribution
    ('' when they were not)."""
    if not record:
        return ""
    fillers = ", ".join(repr(f) for f in record.get("fillers") or [])
    prior = record.get("base_content_free") or {}
    shown = ", ".join(f"{label} {share:.2f}" for label, share in prior.items())
    return ("Choices were scored with contextual calibration (Zhao et al. 2021): each model's log-probability of a "
            f"choice minus the one it gives after the task's prompt with every field content-free ({fillers}), "
            "the base and every edit alike, each with its own content-free distribution"
            + (f"; the base model's was {shown}." if shown else "."))
