"""The one paired difference every verdict reads: method − base on the same test examples.

`paired_difference(before, after, strata)` turns two per-example correctness vectors (pooled over folds
when `strata` gives each example's fold) into a `PairedDifference`: the change in accuracy, Newcombe's
hybrid score interval (`significance.paired_diff_interval`, stratified by fold), the exact McNemar
p-value (`significance.mcnemar_exact`, stratified likewise), n, the number of discordant examples and
the minimum detectable effect at 80% power and the 5% level for that n and discordance
(`significance.min_detectable_effect`). The percentile bootstrap it replaces gave "+0.000 [+0.000,
+0.000]" when only a couple of answers changed and covered the true difference 66% of the time there.

A control whose per-example values are averages over random seeds (floats in [0, 1]) has no exact paired
test: it keeps the (fold-stratified) percentile bootstrap of `stats`, `p` is None and `interval` says
"bootstrap". `holm_family` adjusts a family of these differences (a comparison's methods, a study's
cells) and writes `p_adjusted` into each. What counts as significant is `stats.significance`'s to say.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from eigenprune.evaluation.significance import holm, mcnemar_exact, min_detectable_effect, paired_diff_interval
from eigenprune.evaluation.stats import fold_paired_diff_ci, paired_diff_ci

POWER, ALPHA = 0.8, 0.05  # what "minimum detectable effect" means in every report


@dataclass(frozen=True)
class PairedDifference:
    """after − before with its 95% interval, the exact paired p-value and what the design could detect.

    JSON: {"diff", "lo", "hi", "p", "n", "discordant", "mde", "interval"}; `p` and `mde` are None where they
    do not exist (seed-averaged values; no discordant example, or too few to detect anything)."""

    diff: float
    lo: float
    hi: float
    p: float | None  # two-sided exact McNemar p (stratified by fold); None for seed-averaged values
    n: int  # examples compared
    discordant: int  # examples whose correctness differs between before and after
    mde: float | None  # smallest |change| detectable with 80% power at the 5% level; None: none is
    interval: str  # "newcombe" (paired score interval) or "bootstrap" (seed-averaged values)

    def to_dict(self) -> dict:
        return asdict(self)


def _binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def paired_difference(before: Sequence | np.ndarray, after: Sequence | np.ndarray,
                      strata: Sequence | np.ndarray | None = None, n_boot: int = 1000,
                      seed: int = 0) -> PairedDifference:
    """after − before on the same examples (see the module docstring); `strata`: each example's fold.
    `n_boot`/`seed` serve only the bootstrap of seed-averaged values."""
    first = np.asarray(before, dtype=np.float64).reshape(-1)  # (n,)
    second = np.asarray(after, dtype=np.float64).reshape(-1)  # (n,)
    if first.shape != second.shape:
        raise ValueError(f"before and after must cover the same examples, got {first.size} and {second.size}")
    n, discordant = int(first.size), int(np.count_nonzero(first != second))
    if not (_binary(first) and _binary(second)):
        diff, lo, hi = (paired_diff_ci(first, second, n_boot=n_boot, seed=seed) if strata is None
                        else fold_paired_diff_ci(first, second, strata, n_boot=n_boot, seed=seed))
        return PairedDifference(diff, lo, hi, None, n, discordant, None, "bootstrap")
    diff, lo, hi = paired_diff_interval(first, second, strata)
    p = mcnemar_exact(first, second, strata)
    mde = min_detectable_effect(n, discordant / n, alpha=ALPHA, power=POWER)
    return PairedDifference(diff, lo, hi, p, n, discordant, None if math.isinf(mde) else mde, "newcombe")


def holm_family(differences: Iterable[MutableMapping]) -> int:
    """Holm-adjust the p-values of a family of difference dicts in place (`p_adjusted`; None where `p` is
    None, which is not counted); returns the family's size, the number of tests adjusted over."""
    members = list(differences)
    raw = [math.nan if d.get("p") is None else float(d["p"]) for d in members]
    for d, adjusted in zip(members, holm(raw), strict=True):
        d["p_adjusted"] = None if math.isnan(adjusted) else adjusted
    return sum(not math.isnan(p) for p in raw)
