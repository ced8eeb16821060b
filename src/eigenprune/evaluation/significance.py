"""Honest verdicts on paired per-example correctness: exact tests, intervals, power and choices.

Every eigenprune verdict compares per-example correctness of the base and the edited model on the
*same* test examples, sometimes pooled over K cross-fitted folds (each fold judged by its own edit).
This module holds the pure functions that turn two such 0/1 vectors into what a report may claim
(Dror et al. 2018; Card et al. 2020; Bouthillier et al. 2021):

- `mcnemar_exact`: the exact paired test (sign test on the discordant pairs), stratified by fold.
- `holm`, `family_size`: Holm-Bonferroni adjustment over a family of such tests.
- `paired_diff_interval`: Newcombe's (1998) hybrid score interval for the change in accuracy, which
  keeps its coverage where a percentile bootstrap of a handful of discordant pairs does not.
- `min_detectable_effect`, `n_needed`: what the design could have detected ("no gain larger than X").
- `seed_rank_pvalue`, `seeds_needed`, `two_level_diff_ci`: comparing one method with a control that
  varies by random seed, so seed-to-seed variation counts as well as example sampling.
- `one_se_choice`: the one-standard-error rule for picking a strength on dev.

Only numpy and the standard library; everything random is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

_MAX_DRAWS_PER_CHUNK = 2_000_000  # bounds memory: n_boot x n indices are drawn in chunks
_TIES = 1.0 + 1e-7  # relative tolerance for "at most as likely as observed" on float probabilities


def _binary(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)  # (n,)
    if array.size == 0:
        raise ValueError(f"{name} is empty; a paired comparison needs at least one example")
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold per-example correctness as 0/1 (or bool)")
    return array


def _paired(before, after, strata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(before, after, stratum index) as (n,) arrays; one stratum when `strata` is None."""
    first, second = _binary(before, "before"), _binary(after, "after")
    if first.shape != second.shape:
        raise ValueError(f"before and after must cover the same examples, got {first.size} and {second.size}")
    if strata is None:
        return first, second, np.zeros(first.size, dtype=np.int64)
    _, group_of = np.unique(np.asarray(strata).reshape(-1), return_inverse=True)
    if group_of.shape != first.shape:
        raise ValueError(f"strata must give one fold per example, got {group_of.size} for {first.size}")
    return first, second, group_of.reshape(-1)


def _binomial_half_pmf(n: int) -> np.ndarray:
    """P(K = k) for K ~ Binomial(n, 1/2), k = 0..n, in log space so large n neither overflows nor
    loses the tails to cancellation: (n + 1,)."""
    k = np.arange(n + 1)
    log_comb = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in k])
    return np.exp(log_comb - n * math.log(2.0))


def mcnemar_exact(before: Sequence | np.ndarray, after: Sequence | np.ndarray,
                  strata: Sequence | np.ndarray | None = None) -> float:
    """Two-sided exact p-value for "the edit changes accuracy" (exact McNemar / sign test).

    Only discordant pairs carry information: b = right before and wrong after, c = wrong before and
    right after. Under H0, given stratum s's n_s = b_s + c_s discordant pairs, c_s ~ Binomial(n_s, 1/2).
    With `strata` (fold ids) the statistic is T = sum_s (c_s - b_s) = 2 * sum_s c_s - N and its null
    distribution is the convolution of the strata's binomials, computed as such. That convolution is
    Binomial(N, 1/2), so the p-value equals the pooled sign test: conditioning on each fold's discordant
    count is exactly what the pooled test does, and the folds' different edits do not change it.

    Two-sided p: the total probability of the outcomes at most as likely as the observed one. The null
    is symmetric about N/2 and unimodal, so this equals 2 x the smaller tail capped at 1. p = 1 with
    no discordant pairs.
    """
    first, second, group_of = _paired(before, after, strata)
    b = np.bincount(group_of, weights=first * (1 - second)).astype(np.int64)  # (K,)
    c = np.bincount(group_of, weights=(1 - first) * second).astype(np.int64)  # (K,)
    pmf = np.ones(1)  # distribution of sum_s c_s, built one stratum at a time
    for n_s in (b + c):
        if n_s:
            pmf = np.convolve(pmf, _binomial_half_pmf(int(n_s)))  # (sum so far + 1,)
    if pmf.size == 1:
        return 1.0
    observed = pmf[int(c.sum())]
    return float(min(1.0, pmf[pmf <= observed * _TIES].sum()))


def family_size(pvalues: Sequence[float]) -> int:
    """How many tests the family holds: the p-values that are not NaN."""
    return int(np.count_nonzero(~np.isnan(np.asarray(pvalues, dtype=np.float64))))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (Holm 1979).

    The i-th smallest of m p-values is multiplied by (m - i + 1), a running maximum keeps the adjusted
    values monotone in the raw ones, and each is capped at 1. NaN (a test that could not be run) stays
    NaN and is not counted in m.
    """
    raw = np.asarray(pvalues, dtype=np.float64).reshape(-1)  # (tests,)
    adjusted = np.full(raw.shape, np.nan)
    present = np.flatnonzero(~np.isnan(raw))
    order = present[np.argsort(raw[present], kind="stable")]  # ascending p
    m = order.size
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * raw[index]))
        adjusted[index] = running
    return [float(value) for value in adjusted]


def _wilson(successes: float, n: float, z: float) -> tuple[float, float]:
    centre = (successes + z * z / 2) / (n + z * z)
    half = z * math.sqrt(successes * (n - successes) / n + z * z / 4) / (n + z * z)
    return max(0.0, centre - half), min(1.0, centre + half)


def _newcombe(a: int, b: int, c: int, d: int, z: float) -> tuple[float, float, float]:
    """(after - before, lo, hi) by Newcombe's method 10 for one 2x2 table of counts: a both right,
    b right only before, c right only after, d both wrong."""
    n = a + b + c + d
    p_after, p_before = (a + c) / n, (a + b) / n
    l_after, u_after = _wilson(a + c, n, z)
    l_before, u_before = _wilson(a + b, n, z)
    margins = float(a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if cross > 0:  # continuity-corrected phi: keeps b = c = 0 from collapsing the interval to a point
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0  # Newcombe: 0 when a margin is empty
    down_a, up_b = p_after - l_after, u_before - p_before
    up_a, down_b = u_after - p_after, p_before - l_before
    diff = p_after - p_before
    lower = math.sqrt(max(0.0, down_a ** 2 - 2 * phi * down_a * up_b + up_b ** 2))
    upper = math.sqrt(max(0.0, up_a ** 2 - 2 * phi * up_a * down_b + down_b ** 2))
    return diff, diff - lower, diff + upper


def paired_diff_interval(before: Sequence | np.ndarray, after: Sequence | np.ndarray,
                         strata: Sequence | np.ndarray | None = None,
                         level: float = 0.95) -> tuple[float, float, float]:
    """(after - before, lo, hi): Newcombe's hybrid score interval for a change in paired accuracy.

    One stratum: Newcombe (1998), method 10: Wilson intervals (l_i, u_i) for the two marginal accuracies
    combined through the phi correlation of the 2x2 table, phi = (ad - bc) / sqrt(efgh) with e..h its
    margins, set to 0 when a margin is empty (the paper's rule). When ad > bc, ad - bc is replaced by
    max(ad - bc - n/2, 0), the corrected phi of Newcombe's method 11 that Newcombe & Altman (Statistics
    with Confidence, 2000, ch. 6) pair with uncorrected Wilson intervals. Without it a table with no
    discordant pairs and accuracy near 0.5 has phi = 1 and a zero-width interval (simulated coverage
    0.55 at n = 80, 0.4 discordant pairs expected, all one way; 0.72-0.93 in 9 of the 48 cases the tests
    check). Tables with ad <= bc get method 10 unchanged. Known limit: when every discordant pair goes
    one way and only ~2 are expected, coverage still dips to ~0.87-0.92.

    With `strata` (folds, possibly of different sizes) the estimate is the pooled mean difference
    D = sum_s w_s D_s with w_s = n_s / N, and the interval combines each fold's Newcombe interval by
    square-and-add (MOVER, Zou & Donner 2008, the construction method 10 itself uses):
    D - sqrt(sum_s w_s^2 (D_s - l_s)^2) to D + sqrt(sum_s w_s^2 (u_s - D_s)^2). The folds are disjoint
    examples judged by different edits, so their differences are independent and their variances add
    with weights w_s^2; fixed size weights (not inverse-variance ones) keep the estimand the pooled
    mean. With one stratum this is method 10 exactly. Bounds are clipped to [-1, 1].
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level}")
    first, second, group_of = _paired(before, after, strata)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    n = first.size
    diff, down, up = 0.0, 0.0, 0.0
    for s in range(int(group_of.max()) + 1):
        x, y = first[group_of == s], second[group_of == s]  # (n_s,), (n_s,)
        cells = (int(x @ y), int(x @ (1 - y)), int((1 - x) @ y), int((1 - x) @ (1 - y)))
        d_s, lo_s, hi_s = _newcombe(*cells, z)
        weight = x.size / n
        diff += weight * d_s
        down += (weight * (d_s - lo_s)) ** 2
        up += (weight * (hi_s - d_s)) ** 2
    return float(diff), max(-1.0, diff - math.sqrt(down)), min(1.0, diff + math.sqrt(up))


def _z_values(alpha: float, power: float) -> tuple[float, float]:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be between 0 and 1 (exclusive), got {power}")
    normal = NormalDist()
    return normal.inv_cdf(1 - alpha / 2), normal.inv_cdf(power)


def min_detectable_effect(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |change in accuracy| (a fraction) a two-sided paired test on `n` examples detects with
    probability `power`, when a share `discordance` = (b + c) / n of the pairs disagree.

    Normal approximation of McNemar's test (Connor 1987): n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2
    with psi = discordance, z_a = z_{1 - alpha/2}, z_b = z_power. Solved for d in closed form (the
    quadratic (n + z_b^2) d^2 - 2 sqrt(n psi) z_a d + (z_a^2 - z_b^2) psi = 0, larger root). Returns
    inf when no effect is detectable: no discordance, n <= z_a^2, or a root above psi (a change can
    never exceed the share of pairs that disagree).
    """
    if not 0.0 <= discordance <= 1.0:
        raise ValueError(f"discordance must be between 0 and 1, got {discordance}")
    z_a, z_b = _z_values(alpha, power)
    if discordance == 0.0 or n <= z_a * z_a:
        return math.inf
    root = math.sqrt(discordance) * (math.sqrt(n) * z_a + z_b * math.sqrt(n - z_a * z_a + z_b * z_b))
    effect = root / (n + z_b * z_b)
    return effect if effect <= discordance else math.inf


def n_needed(effect: float, discordance: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Examples needed to detect a change `effect` (fraction) with `power` by a two-sided paired test at
    level `alpha`, given the discordant share; the inverse of `min_detectable_effect` (Connor 1987)."""
    if not 0.0 < abs(effect) <= discordance <= 1.0:
        raise ValueError(f"need 0 < |effect| <= discordance <= 1, got effect {effect}, discordance {discordance}")
    z_a, z_b = _z_values(alpha, power)
    effect = abs(effect)
    n = (z_a * math.sqrt(discordance) + z_b * math.sqrt(discordance - effect * effect)) ** 2 / effect ** 2
    return math.ceil(n - 1e-9)  # the slack absorbs rounding when n comes back from the MDE


def seed_rank_pvalue(value: float, seed_values: Sequence[float]) -> tuple[int, float, float]:
    """(rank, p, p_min) of `value` (e.g. eigenprune's accuracy) among a control's random seeds.

    rank = 1 + #seeds at least as good (1 is best; ties count against `value`, the conservative side);
    p = rank / (1 + #seeds), the permutation p-value of "value is just another seed"; p_min = 1 / (1 +
    #seeds), the smallest p that many seeds can ever give.
    """
    seeds = np.asarray(seed_values, dtype=np.float64).reshape(-1)  # (n_seeds,)
    if seeds.size == 0 or np.isnan(seeds).any() or math.isnan(value):
        raise ValueError("seed_rank_pvalue needs at least one seed value and no NaN")
    rank = 1 + int(np.count_nonzero(seeds >= value))
    return rank, rank / (1 + seeds.size), 1 / (1 + seeds.size)


def seeds_needed(alpha: float = 0.05) -> int:
    """Fewest control seeds for which `seed_rank_pvalue` can reach p strictly below `alpha`:
    1 / (1 + m) < alpha. At alpha = 0.05, 19 seeds give p_min = 0.05 exactly, not below, so 20."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {alpha}")
    m = max(0, int(1 / alpha) - 2)  # below the answer even when 1/alpha rounds up by an ulp
    while not 1 / (1 + m) < alpha:
        m += 1
    return m


def two_level_diff_ci(method: Sequence | np.ndarray, control_seeds: Sequence | np.ndarray,
                      strata: Sequence | np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(method - control, lo, hi): accuracy of `method` minus the mean accuracy over the control's seeds,
    with a two-level percentile bootstrap (Bouthillier et al. 2021).

    `control_seeds` is (n_seeds, n): one row of per-example correctness per random seed. Each replicate
    resamples seeds (rows) with replacement, then examples with replacement within each stratum (fold),
    the same example draw for method and control so the pairing is kept. Where seeds disagree the
    interval is wider than an examples-only bootstrap, as it should be; with identical rows it is the
    same. Draws are chunked so at most ~2M indices are held at once.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level}")
    treated = _binary(method, "method")  # (n,)
    control = np.asarray(control_seeds, dtype=np.float64)
    if control.ndim != 2 or control.shape[1] != treated.size:
        raise ValueError(f"control_seeds must be (n_seeds, {treated.size}), got shape {control.shape}")
    _binary(control, "control_seeds")
    _, _, group_of = _paired(treated, treated, strata)
    members = [np.flatnonzero(group_of == g) for g in range(int(group_of.max()) + 1)]  # each (n_g,)
    n_seeds, n = control.shape
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    diffs = np.empty(n_boot)
    for start in range(0, n_boot, per_chunk):
        rows = min(per_chunk, n_boot - start)
        picks = rng.integers(0, n_seeds, size=(rows, n_seeds))  # (rows, n_seeds) seed draws
        weights = np.zeros((rows, n_seeds))
        np.add.at(weights, (np.arange(rows)[:, None], picks), 1.0 / n_seeds)
        seed_mean = weights @ control  # (rows, n) per-example control accuracy over the drawn seeds
        index = np.concatenate([idx[rng.integers(0, idx.size, size=(rows, idx.size))] for idx in members],
                               axis=1)  # (rows, n) examples drawn within folds
        drawn = treated[index] - np.take_along_axis(seed_mean, index, axis=1)  # (rows, n)
        diffs[start:start + rows] = drawn.mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(diffs, [alpha, 1.0 - alpha])
    return float(treated.mean() - control.mean()), float(lo), float(hi)


def one_se_choice(candidates: Sequence[Sequence | np.ndarray]) -> int:
    """Index of the weakest candidate whose dev accuracy is within one paired standard error of the best.

    `candidates` are per-example dev correctness vectors over the same examples, ordered from the
    unedited model (index 0, which competes) to the strongest change. The best is the highest accuracy
    (the weakest one on ties); candidate i qualifies when acc_best - acc_i <= sd(best - i) / sqrt(n)
    (ddof=1), the standard error of the paired difference over the same examples. With one dev example there
    is no standard error: the rule is then the best accuracy, the weakest on ties (a dev split that small
    tells nothing either way; the run's default settings never make one, a `--limit` of a dozen can).
    """
    if len(candidates) == 0:
        raise ValueError("one_se_choice needs at least one candidate")
    table = np.stack([_binary(c, f"candidates[{i}]") for i, c in enumerate(candidates)])  # (k, n)
    accuracy = table.mean(axis=1)  # (k,)
    best = int(np.argmax(accuracy))
    gaps = table[best] - table  # (k, n) per-example paired differences
    n = table.shape[1]
    se = gaps.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(table))  # (k,)
    return int(np.flatnonzero(accuracy[best] - accuracy <= se + 1e-12)[0])
