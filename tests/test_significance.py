"""Tests for evaluation/significance.py against hand-computed tables, independent re-derivations in the
test (binomial sums, brute-force enumeration, a second Newcombe built from other formulas) and seeded
simulations (power of the MDE, coverage of the interval, a percentile bootstrap that fails)."""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest

from eigenprune.evaluation.significance import (
    family_size,
    holm,
    mcnemar_exact,
    min_detectable_effect,
    n_needed,
    one_se_choice,
    paired_diff_interval,
    seed_rank_pvalue,
    seeds_needed,
    two_level_diff_ci,
)

Z95 = NormalDist().inv_cdf(0.975)


def table_arrays(a: int, b: int, c: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) for a 2x2 table: a both right, b right only before, c right only after, d neither."""
    before = np.r_[np.ones(a + b), np.zeros(c + d)]
    after = np.r_[np.ones(a), np.zeros(b), np.ones(c), np.zeros(d)]
    return before, after


# ---------------------------------------------------------------- Holm


@pytest.mark.parametrize("raw, expected", [
    # sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
    # NaN is not in the family (m = 3): 0.01*3=0.03, 0.02*2=0.04, 0.5*1=0.5
    ([0.02, float("nan"), 0.5, 0.01], [0.04, float("nan"), 0.5, 0.03]),
    # 0.4*2=0.8, then 0.6*1=0.6 lifted to 0.8 by monotonicity; 0.7*2=1.4 capped at 1
    ([0.6, 0.4], [0.8, 0.8]),
    ([0.9, 0.7], [1.0, 1.0]),
    ([0.01, 0.01], [0.02, 0.02]),
    ([0.3], [0.3]),
    ([], []),
])
def test_holm_matches_hand_table(raw, expected):
    assert holm(raw) == pytest.approx(expected, nan_ok=True)


def test_holm_is_not_bonferroni():
    # Bonferroni: 0.02*2=0.04, 0.03*2=0.06 -> only one survives 0.05; Holm: 0.04, max(0.04, 0.03)=0.04 -> both
    assert holm([0.02, 0.03]) == pytest.approx([0.04, 0.04])
    assert holm([0.01, 0.04, 0.03, 0.005])[1] == pytest.approx(0.06)  # Bonferroni would give 0.16


def test_family_size_ignores_nan():
    assert family_size([0.1, float("nan"), 0.2]) == 3 - 1
    assert family_size([]) == 0


# ---------------------------------------------------------------- exact McNemar


def sign_test_by_binomial_sum(b: int, c: int) -> float:
    """Two-sided sign test as 2 x the smaller tail, from exact integer binomial coefficients."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def pairs(b: int, c: int, both: int = 3, neither: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return table_arrays(both, b, c, neither)


@pytest.mark.parametrize("b, c", [(0, 0), (1, 0), (0, 5), (5, 5), (2, 10), (10, 2), (30, 50), (400, 520)])
def test_mcnemar_matches_direct_binomial_sum(b, c):
    before, after = pairs(b, c)
    assert mcnemar_exact(before, after) == pytest.approx(sign_test_by_binomial_sum(b, c), rel=1e-9, abs=1e-300)


def brute_force_stratified(strata_bc: list[tuple[int, int]]) -> float:
    """P(|T| >= |t_obs|) with T = sum of +-1 over every discordant pair, by listing all 2^N sign patterns."""
    n = sum(b + c for b, c in strata_bc)
    observed = abs(sum(c - b for b, c in strata_bc))
    hits = sum(abs(sum(signs)) >= observed for signs in itertools.product((-1, 1), repeat=n))
    return hits / 2 ** n


def stratified_inputs(strata_bc: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    befores, afters, folds = [], [], []
    for fold, (b, c) in enumerate(strata_bc):
        before, after = pairs(b, c, both=fold + 1, neither=2)
        befores.append(before)
        afters.append(after)
        folds.append(np.full(before.size, fold))
    return np.concatenate(befores), np.concatenate(afters), np.concatenate(folds)


@pytest.mark.parametrize("strata_bc", [[(1, 3), (0, 2), (2, 1)], [(0, 4), (3, 0)], [(2, 2), (0, 5), (1, 0)]])
def test_stratified_mcnemar_equals_brute_force_convolution(strata_bc):
    before, after, folds = stratified_inputs(strata_bc)
    p = mcnemar_exact(before, after, strata=folds)
    assert p == pytest.approx(brute_force_stratified(strata_bc), rel=1e-12)
    assert p == pytest.approx(mcnemar_exact(before, after), rel=1e-12)  # the convolution is the pooled test


def test_stratified_mcnemar_is_not_net_count_pooling():
    # fold 1: b=5, c=5 (cancels); fold 2: b=0, c=6. Correct: N=16, C=11 -> 2*P(C>=11) = 2*6885/65536.
    # Pooling only each fold's net change would see 6 discordant pairs all one way: 2/64 = 0.03125.
    before, after, folds = stratified_inputs([(5, 5), (0, 6)])
    p = mcnemar_exact(before, after, strata=folds)
    assert p == pytest.approx(2 * 6885 / 65536, rel=1e-12)
    assert p != pytest.approx(2 / 64, rel=0.1)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="same examples"):
        mcnemar_exact([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([1, 2], [1, 0])


# ---------------------------------------------------------------- Newcombe interval


def wilson_by_quadratic(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson limits as the roots of (p - pi)^2 = z^2 pi (1 - pi) / n in pi."""
    p = successes / n
    roots = np.sort(np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]).real)
    return float(max(roots[0], 0.0)), float(min(roots[1], 1.0))


def newcombe_reference(before: np.ndarray, after: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """A second method-10 interval (corrected phi when positive) from moments rather than cell counts."""
    n = before.size
    p_after, p_before = after.mean(), before.mean()
    l_after, u_after = wilson_by_quadratic(int(after.sum()), n, z)
    l_before, u_before = wilson_by_quadratic(int(before.sum()), n, z)
    sd = before.std() * after.std()
    phi = 0.0
    if sd > 0:
        phi = ((before * after).mean() - p_before * p_after) / sd
        if phi > 0:
            phi = max(phi - 1 / (2 * n * sd), 0.0)
    diff = p_after - p_before
    lo = diff - math.sqrt((p_after - l_after) ** 2 - 2 * phi * (p_after - l_after) * (u_before - p_before)
                          + (u_before - p_before) ** 2)
    hi = diff + math.sqrt((u_after - p_after) ** 2 - 2 * phi * (u_after - p_after) * (p_before - l_before)
                          + (p_before - l_before) ** 2)
    return diff, lo, hi


def test_newcombe_published_example():
    # Newcombe (1998), Table II, example (a): a=36, b=12, c=2, d=0; method 10 gives 0.0569 to 0.3404 for
    # first - second. Here the first column is `after`, so before/after are swapped to match.
    before, after = table_arrays(36, 12, 2, 0)
    diff, lo, hi = paired_diff_interval(after, before)
    assert diff == pytest.approx(10 / 50)
    assert (lo, hi) == pytest.approx((0.0569, 0.3404), abs=5e-5)


@pytest.mark.parametrize("cells", [(36, 12, 2, 0), (14, 5, 0, 22), (1, 1, 7, 12), (59, 6, 16, 80), (20, 0, 0, 20),
                                   (30, 2, 3, 5), (0, 3, 4, 0), (50, 0, 0, 0), (10, 0, 5, 0)])
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_newcombe_matches_independent_implementation(cells, level):
    before, after = table_arrays(*cells)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    assert paired_diff_interval(before, after, level=level) == pytest.approx(newcombe_reference(before, after, z),
                                                                             abs=1e-9)


def test_newcombe_keeps_width_without_discordant_pairs():
    # 40 right and 40 wrong both times: uncorrected phi = 1 would give the point interval [0, 0]
    diff, lo, hi = paired_diff_interval(*table_arrays(40, 0, 0, 40))
    assert diff == 0.0 and lo < -0.01 and hi > 0.01


def simulate_tables(n: int, accuracy: float, discordance: float, effect: float, reps: int, seed: int) -> np.ndarray:
    """(reps, 4) cell counts a, b, c, d with P(b) = (psi - effect)/2, P(c) = (psi + effect)/2."""
    b, c = (discordance - effect) / 2, (discordance + effect) / 2
    a = accuracy - b
    return np.random.default_rng(seed).multinomial(n, [a, b, c, 1 - a - b - c], size=reps)


def coverage(tables: np.ndarray, truth: float, interval) -> float:
    verdict = {}
    for cells in map(tuple, tables):
        if cells not in verdict:
            _, lo, hi = interval(cells)
            verdict[cells] = lo - 1e-12 <= truth <= hi + 1e-12
    return float(np.mean([verdict[tuple(cells)] for cells in tables]))


def newcombe_of(cells) -> tuple[float, float, float]:
    return paired_diff_interval(*table_arrays(*cells))


@pytest.mark.parametrize("n", [40, 80, 400])
@pytest.mark.parametrize("discordance", [0.005, 0.0125, 0.05, 0.2])
def test_newcombe_coverage(n, discordance):
    for accuracy, share in itertools.product((0.5, 0.7), (0.0, 0.5)):
        effect = share * discordance  # discordant pairs split 50:50 or 75:25
        tables = simulate_tables(n, accuracy, discordance, effect, reps=1000, seed=n)
        assert coverage(tables, effect, newcombe_of) >= 0.93, (accuracy, effect)


def percentile_bootstrap_of(cells, n_boot: int = 200) -> tuple[float, float, float]:
    a, b, c, d = cells
    n = a + b + c + d
    draws = np.random.default_rng(1).multinomial(n, [b / n, c / n, (a + d) / n], size=n_boot)  # (n_boot, 3)
    lo, hi = np.quantile((draws[:, 1] - draws[:, 0]) / n, [0.025, 0.975])
    return (c - b) / n, lo, hi


def test_percentile_bootstrap_fails_where_newcombe_holds():
    # n = 80, one discordant pair expected: with none observed (~37%) the bootstrap interval is [0, 0]
    tables = simulate_tables(80, 0.7, 0.0125, 0.00625, reps=600, seed=3)
    assert coverage(tables, 0.00625, newcombe_of) >= 0.93
    assert coverage(tables, 0.00625, percentile_bootstrap_of) < 0.8


def mover_reference(before, after, folds) -> tuple[float, float, float]:
    parts = [(np.mean(folds == f), newcombe_reference(before[folds == f], after[folds == f])) for f in np.unique(folds)]
    diff = sum(w * d for w, (d, _, _) in parts)
    down = math.sqrt(sum((w * (d - lo)) ** 2 for w, (d, lo, _) in parts))
    up = math.sqrt(sum((w * (hi - d)) ** 2 for w, (d, _, hi) in parts))
    return diff, diff - down, diff + up


def fold_data(n: int, accuracy: float, discordance: float, effect: float, seed: int):
    rng = np.random.default_rng(seed)
    b, c = (discordance - effect) / 2, (discordance + effect) / 2
    kind = rng.choice(4, size=n, p=[accuracy - b, b, c, 1 - accuracy - c])  # 0 a, 1 b, 2 c, 3 d
    folds = rng.choice(5, size=n, p=[0.1, 0.15, 0.2, 0.25, 0.3])  # unequal fold sizes
    return (kind <= 1).astype(float), ((kind == 0) | (kind == 2)).astype(float), folds


def test_stratified_interval_is_size_weighted_square_and_add():
    before, after, folds = fold_data(200, 0.6, 0.2, 0.05, seed=5)
    diff, lo, hi = paired_diff_interval(before, after, strata=folds)
    assert diff == pytest.approx(after.mean() - before.mean())  # the pooled mean, not a mean of fold means
    assert (diff, lo, hi) == pytest.approx(mover_reference(before, after, folds), abs=1e-9)
    assert paired_diff_interval(before, after, strata=np.zeros(200)) == pytest.approx(
        paired_diff_interval(before, after))


@pytest.mark.parametrize("n", [80, 400])
@pytest.mark.parametrize("discordance", [0.0125, 0.05, 0.2])
def test_stratified_interval_coverage(n, discordance):
    effect = discordance / 2
    hits = 0
    for rep in range(300):
        before, after, folds = fold_data(n, 0.7, discordance, effect, seed=1000 * n + rep)
        _, lo, hi = paired_diff_interval(before, after, strata=folds)
        hits += lo <= effect <= hi
    assert hits / 300 >= 0.93


# ---------------------------------------------------------------- minimum detectable effect


def connor_n(effect: float, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float:
    z_a, z_b = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power)
    return (z_a * math.sqrt(discordance) + z_b * math.sqrt(discordance - effect ** 2)) ** 2 / effect ** 2


def test_mde_gives_the_nominal_power_in_simulation():
    n, psi = 400, 0.1
    effect = min_detectable_effect(n, psi)
    draws = np.random.default_rng(0).multinomial(n, [(psi - effect) / 2, (psi + effect) / 2, 1 - psi], size=4000)
    b, c = draws[:, 0], draws[:, 1]
    z = (c - b) / np.sqrt(np.maximum(b + c, 1))  # normal-approximation McNemar statistic
    power = np.mean(np.abs(z) > Z95)
    assert power == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("n, psi, alpha, power", [(400, 0.1, 0.05, 0.8), (100, 0.3, 0.05, 0.9), (2000, 0.02, 0.01, 0.8),
                                                  (60, 0.5, 0.1, 0.5), (500, 0.05, 0.05, 0.3)])
def test_mde_solves_connor_and_round_trips(n, psi, alpha, power):
    effect = min_detectable_effect(n, psi, alpha, power)
    assert connor_n(effect, psi, alpha, power) == pytest.approx(n, rel=1e-9)
    assert n_needed(effect, psi, alpha, power) == n
    assert min_detectable_effect(n + 50, psi, alpha, power) < effect


def test_mde_is_infinite_when_nothing_can_be_detected():
    assert min_detectable_effect(400, 0.0) == math.inf
    assert min_detectable_effect(3, 0.5) == math.inf
    assert min_detectable_effect(40, 0.01) == math.inf  # would need a change larger than the discordant share
    with pytest.raises(ValueError, match="discordance"):
        n_needed(0.2, 0.1)


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("value, seeds, expected", [
    (0.8, [0.7, 0.75, 0.8, 0.9], (3, 3 / 5, 1 / 5)),  # 0.8 and 0.9 are at least as good
    (0.95, [0.7, 0.75, 0.8, 0.9], (1, 1 / 5, 1 / 5)),
    (0.1, [0.7, 0.75, 0.8, 0.9], (5, 1.0, 1 / 5)),
    (0.9, [0.5] * 19, (1, 0.05, 0.05)),  # best of 19 seeds: p = 0.05, not below it
])
def test_seed_rank_pvalue_hand_cases(value, seeds, expected):
    assert seed_rank_pvalue(value, seeds) == pytest.approx(expected)


@pytest.mark.parametrize("alpha, expected", [(0.05, 20), (0.01, 100), (0.1, 10), (0.2, 5), (0.3, 3), (0.5, 2)])
def test_seeds_needed(alpha, expected):
    m = seeds_needed(alpha)
    assert m == expected
    assert seed_rank_pvalue(1.0, [0.0] * m)[2] < alpha <= seed_rank_pvalue(1.0, [0.0] * (m - 1))[2]


# ---------------------------------------------------------------- two-level bootstrap


def examples_only_ci(method, control, n_boot=1000, seed=0):
    rng = np.random.default_rng(seed)
    diff = method - control.mean(axis=0)  # (n,) seeds fixed, examples resampled
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    return np.quantile(means, [0.025, 0.975])


def seeded_runs(n: int = 300, n_seeds: int = 8, spread: float = 0.12, seed: int = 0):
    rng = np.random.default_rng(seed)
    method = (rng.random(n) < 0.7).astype(float)
    accuracies = np.linspace(0.6 - spread, 0.6 + spread, n_seeds)  # seeds that disagree on accuracy
    control = (rng.random((n_seeds, n)) < accuracies[:, None]).astype(float)
    return method, control


def test_two_level_is_wider_when_seeds_disagree():
    method, control = seeded_runs()
    diff, lo, hi = two_level_diff_ci(method, control, n_boot=2000)
    assert diff == pytest.approx(method.mean() - control.mean())
    ex_lo, ex_hi = examples_only_ci(method, control, n_boot=2000)
    assert hi - lo > 1.3 * (ex_hi - ex_lo)


def test_two_level_matches_examples_only_when_seeds_agree():
    _, control = seeded_runs()
    same = np.repeat(control[:1], 8, axis=0)
    method = same[0].copy()
    method[:40] = 1 - method[:40]  # close to the control, so only a paired draw keeps the interval narrow
    _, lo, hi = two_level_diff_ci(method, same, n_boot=2000)
    ex_lo, ex_hi = examples_only_ci(method, same, n_boot=2000)
    assert hi - lo == pytest.approx(ex_hi - ex_lo, rel=0.1)


def test_two_level_with_folds_is_seeded_and_contains_estimate():
    method, control = seeded_runs(n=250)
    folds = np.arange(250) % 5
    first = two_level_diff_ci(method, control, strata=folds, n_boot=500, seed=3)
    assert first == two_level_diff_ci(method, control, strata=folds, n_boot=500, seed=3)
    assert first[1] < first[0] < first[2]
    with pytest.raises(ValueError, match="n_seeds"):
        two_level_diff_ci(method, control[:, :10])


# ---------------------------------------------------------------- one-standard-error rule


def variant(best: np.ndarray, lose: int, gain: int) -> np.ndarray:
    """`best` with `lose` of its right answers made wrong and `gain` of its wrong answers made right."""
    out = best.copy()
    out[np.flatnonzero(best == 1)[:lose]] = 0
    out[np.flatnonzero(best == 0)[:gain]] = 1
    return out


BEST = np.r_[np.ones(70), np.zeros(30)]  # 100 dev examples, accuracy 0.70


def test_one_se_picks_weaker_strength_within_one_se():
    # idx 2: gap 0.02 over 20 discordant (11 lost, 9 gained): SE = sqrt((20 - 100*0.02^2)/99)/10 = 0.045 >= 0.02
    # idx 1: gap 0.10 over 14 (12 lost, 2 gained): SE = sqrt((14 - 100*0.1^2)/99)/10 = 0.036 < 0.10
    # idx 0: gap 0.15 with 15 lost: SE = sqrt((15 - 100*0.15^2)/99)/10 = 0.036 < 0.15
    candidates = [variant(BEST, 15, 0), variant(BEST, 12, 2), variant(BEST, 11, 9), BEST, variant(BEST, 5, 0)]
    assert one_se_choice(candidates) == 2


def test_one_se_keeps_base_when_nothing_beats_it_by_one_se():
    base = variant(BEST, 6, 4)  # best is 0.02 ahead over 10 discordant pairs: SE = 0.032
    assert one_se_choice([base, variant(BEST, 3, 2), BEST, variant(BEST, 20, 0)]) == 0


def test_one_se_picks_best_when_far_ahead_and_uses_the_paired_se():
    # base trails by 0.03 with all 3 changes one way: paired SE = sqrt((3 - 100*0.03^2)/99)/10 = 0.017 < 0.03,
    # while an unpaired SE sqrt(0.7*0.3/100) = 0.046 would wrongly keep the base
    assert one_se_choice([variant(BEST, 3, 0), BEST, variant(BEST, 2, 1)]) == 1
    assert one_se_choice([variant(BEST, 40, 0), variant(BEST, 25, 0), BEST]) == 2


def test_one_se_ties_go_to_the_weaker_strength():
    assert one_se_choice([BEST, BEST.copy()]) == 0


def test_one_se_on_one_dev_example_is_the_best_accuracy():
    # no standard error from one example: the best answer wins, ties to the weaker; none at all is an error
    assert one_se_choice([[False], [True], [True]]) == 1 and one_se_choice([[True], [False], [True]]) == 0
    with pytest.raises(ValueError, match="is empty"):
        one_se_choice([[], []])
