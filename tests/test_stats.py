"""Tests for stats.py: bootstrap intervals against known cases, determinism, majority rate, mean/sd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eigenprune.evaluation.stats import accuracy_ci, bootstrap_means, majority_rate, mean_sd, paired_diff_ci


def binary(n: int, p: float, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p  # (n,) bool


@pytest.mark.parametrize("n, p", [(2000, 0.7), (5000, 0.5), (3000, 0.9)])
def test_accuracy_ci_matches_normal_approximation_for_large_n(n, p):
    correct = binary(n, p)
    acc, lo, hi = accuracy_ci(correct, n_boot=4000, seed=0)
    half = 1.959964 * math.sqrt(acc * (1 - acc) / n)
    assert acc == pytest.approx(correct.mean())
    assert lo == pytest.approx(acc - half, abs=0.004)
    assert hi == pytest.approx(acc + half, abs=0.004)


@pytest.mark.parametrize("n, p, level", [(800, 0.3, 0.9), (800, 0.6, 0.99)])
def test_paired_diff_ci_matches_normal_approximation(n, p, level):
    before = binary(n, p, seed=1)
    flips = binary(n, 0.2, seed=2)
    after = before ^ flips  # (n,) an edit that changes some answers
    diff, lo, hi = paired_diff_ci(before, after, n_boot=4000, seed=0, level=level)
    d = after.astype(float) - before.astype(float)
    z = {0.9: 1.644854, 0.99: 2.575829}[level]
    half = z * d.std() / math.sqrt(n)
    assert diff == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx((diff - half, diff + half), abs=0.008)


def test_paired_is_narrower_than_unpaired_when_answers_mostly_agree():
    before = binary(500, 0.6)
    after = before.copy()
    after[:20] = True  # a few answers improve; the rest agree
    _, lo, hi = paired_diff_ci(before, after, seed=0)
    _, lo_b, hi_b = accuracy_ci(before, seed=0)
    assert hi - lo < (hi_b - lo_b) / 2
    assert lo > 0


@pytest.mark.parametrize("values, want", [
    ([True] * 50, (1.0, 1.0, 1.0)),
    ([False] * 7, (0.0, 0.0, 0.0)),
    ([1], (1.0, 1.0, 1.0)),
])
def test_degenerate_accuracy_intervals(values, want):
    assert accuracy_ci(values) == want


def test_identical_paired_runs_give_zero_interval():
    before = binary(300, 0.4)
    assert paired_diff_ci(before, before) == (0.0, 0.0, 0.0)
    assert paired_diff_ci([0, 0, 0], [1, 1, 1]) == (1.0, 1.0, 1.0)


def test_intervals_are_deterministic_given_seed_and_accept_tensors():
    correct = binary(200, 0.55)
    assert accuracy_ci(correct, seed=3) == accuracy_ci(correct.tolist(), seed=3)
    assert accuracy_ci(correct, seed=3) == accuracy_ci(torch.from_numpy(correct), seed=3)
    assert accuracy_ci(correct, seed=3) != accuracy_ci(correct, seed=4)
    after = binary(200, 0.6, seed=5)
    assert paired_diff_ci(correct, after, seed=7) == paired_diff_ci(correct, after, seed=7)


def test_bootstrap_chunking_does_not_change_draws():
    values = binary(50, 0.5).astype(float)
    means = bootstrap_means(values, n_boot=300, seed=0)
    rng = np.random.default_rng(0)
    assert np.allclose(means, values[rng.integers(0, 50, size=(300, 50))].mean(1))
    big = bootstrap_means(binary(30_000, 0.5).astype(float), n_boot=200, seed=0)  # several chunks
    assert big.shape == (200,) and np.all((big > 0.48) & (big < 0.52))


def test_interval_contains_estimate_and_narrows_with_level():
    correct = binary(400, 0.65)
    acc, lo90, hi90 = accuracy_ci(correct, level=0.9)
    _, lo99, hi99 = accuracy_ci(correct, level=0.99)
    assert lo99 <= lo90 <= acc <= hi90 <= hi99


@pytest.mark.parametrize("call, message", [
    (lambda: accuracy_ci([]), "empty"),
    (lambda: accuracy_ci([1, 0], n_boot=0), "n_boot"),
    (lambda: accuracy_ci([1, 0], level=1.0), "level"),
    (lambda: accuracy_ci([1.0, float("nan")]), "non-finite"),
    (lambda: paired_diff_ci([1, 0], [1, 0, 1]), "same examples"),
    (lambda: majority_rate([]), "empty"),
    (lambda: mean_sd([]), "empty"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("labels, want", [
    ([0, 1, 1, 2], 0.5),
    ([" entails"] * 3 + [" contradicts"], 0.75),
    (["a"], 1.0),
])
def test_majority_rate(labels, want):
    assert majority_rate(labels) == want
    assert majority_rate(iter(labels)) == want


def test_mean_sd():
    mean, sd = mean_sd([0.5, 0.7, 0.6])
    assert mean == pytest.approx(0.6) and sd == pytest.approx(0.1)
    mean, sd = mean_sd([0.42])
    assert mean == 0.42 and math.isnan(sd)
