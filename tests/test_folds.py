"""Tests for cross-fitted folds: splits.fold_splits (every example tested once, by a fold that never trained
or chose on it; k = 1 is today's split exactly) and the fold-stratified bootstrap in stats.py."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from functools import cache

import numpy as np
import pytest

from eigenprune.core.errors import UsageError
from eigenprune.evaluation.splits import fold_splits, split_task
from eigenprune.evaluation.stats import (
    accuracy_ci,
    bootstrap_means,
    fold_accuracy_ci,
    fold_paired_diff_ci,
    paired_diff_ci,
    stratified_bootstrap_means,
)
from eigenprune.evaluation.tasks import Task, load_task


@cache
def task(name: str) -> Task:
    return load_task(name)


def fingerprint(splits) -> str:
    data = [[[e.prompt, e.answer, e.label] for e in part] for part in (splits.train, splits.dev, splits.test)]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


# split_task's output before fold_splits shared its code (computed on main at 7f74523): bit for bit
@pytest.mark.parametrize("name, seed, frac, limit, want", [
    ("int-mult", 0, 0.2, None, "3824121a6643f444"),
    ("int-mult", 3, 0.3, None, "7226bce68dc385df"),
    ("int-mult", 1, 0.2, 40, "16fac75b541c31ed"),
    ("int-mult", 2, 0.5, 7, "d0bc03f89f823fd2"),
    ("cb", 0, 0.2, None, "7a7f0c4c609ce855"),
    ("cb", 3, 0.3, None, "2a4ff7d9446c4957"),
    ("cb", 1, 0.2, 40, "bdc7b941e4076cd6"),
    ("cb", 2, 0.5, 7, "e3e3f07cb7bb32f1"),
    ("copa", 0, 0.2, None, "4d028dc13be6a6ad"),
    ("copa", 1, 0.2, 40, "2a32a733cf71c619"),
])
def test_split_task_is_unchanged(name, seed, frac, limit, want):
    assert fingerprint(split_task(task(name), frac, seed, limit)) == want


@pytest.mark.parametrize("name, seed, frac, limit", [
    ("int-mult", 0, 0.2, None), ("int-mult", 1, 0.2, 40), ("cb", 3, 0.3, None), ("copa", 2, 0.5, 7),
])
def test_one_fold_is_todays_split(name, seed, frac, limit):
    folds = fold_splits(task(name), 1, seed, frac, limit)
    today = split_task(task(name), frac, seed, limit)
    (fold,) = folds
    assert (fold.train, fold.dev, fold.test) == (today.train, today.dev, today.test)  # equal examples, equal order
    for part, index in ((fold.train, fold.train_index), (fold.dev, fold.dev_index), (fold.test, fold.test_index)):
        assert [folds.examples[i] for i in index] == part
    assert folds.pooled == {}
    assert folds.tested == sorted(fold.test_index)


def check_cross_fitted(folds, n: int) -> None:
    """Each pooled example in exactly one fold's test; within a fold, train/dev/test disjoint and complete."""
    assert len(folds.examples) == n
    tested = Counter(i for f in folds for i in f.test_index)
    assert sorted(tested) == list(range(n)) and set(tested.values()) == {1}
    for f in folds:
        train, dev, test = set(f.train_index), set(f.dev_index), set(f.test_index)
        assert not (train & test) and not (dev & test) and not (train & dev)
        assert train | dev | test == set(range(n))
        assert len(f.dev_index) == round(0.2 * (n - len(test)))
        for part, index in ((f.train, f.train_index), (f.dev, f.dev_index), (f.test, f.test_index)):
            assert [folds.examples[i] for i in index] == part
            assert list(index) == sorted(index)  # pooled order inside every split


@pytest.mark.parametrize("name, k, limit, n, pooled", [
    ("int-mult", 5, None, 400, {"train": 320, "test": 80}),
    ("int-mult", 2, None, 400, {"train": 320, "test": 80}),
    ("cb", 5, None, 306, {"train": 250, "validation": 56}),
    ("copa", 3, 50, 50, None),
    ("int-sum", 7, 100, 100, None),
])
def test_every_example_is_tested_exactly_once(name, k, limit, n, pooled):
    folds = fold_splits(task(name), k, seed=1, limit=limit)
    assert len(folds) == k
    check_cross_fitted(folds, n)
    sizes = [len(f.test) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    if pooled is not None:
        assert folds.pooled == pooled
    assert sum(folds.pooled.values()) == n


def test_int_mult_five_folds_test_all_400():
    t = task("int-mult")
    folds = fold_splits(t, 5, seed=0)
    tested = [ex for f in folds for ex in f.test]
    assert len(tested) == 400 and set(tested) == set(t.train + t.test)
    assert [len(f.test) for f in folds] == [80] * 5


def test_folds_are_stratified_by_label():
    folds = fold_splits(task("cb"), 4, seed=0)
    labels = sorted({ex.label for ex in folds.examples})
    for label in labels:
        counts = [sum(ex.label == label for ex in f.test) for f in folds]
        assert max(counts) - min(counts) <= 1, (label, counts)


def test_folds_are_seeded_and_limit_keeps_the_same_examples_across_seeds():
    a, b, c = (fold_splits(task("copa"), 4, seed=s, limit=60) for s in (0, 0, 1))
    assert [f.test_index for f in a] == [f.test_index for f in b]
    assert [f.dev_index for f in a] == [f.dev_index for f in b]
    assert [f.test_index for f in a] != [f.test_index for f in c]
    assert a.examples == c.examples  # the limit's subsample ignores the fold seed
    assert set(a.examples) < set(task("copa").train + task("copa").test)


def test_pool_puts_each_folds_values_back_in_pooled_order():
    folds = fold_splits(task("int-mult"), 3, seed=2, limit=30)
    values, fold_ids = folds.pool([[10_000 * f.fold + i for i in f.test_index] for f in folds])
    assert [v % 10_000 for v in values] == list(range(30))
    assert fold_ids == [v // 10_000 for v in values]
    with pytest.raises(ValueError, match="fold 1 tests"):
        folds.pool([list(f.test_index) if f.fold != 1 else [] for f in folds])


@pytest.mark.parametrize("k, limit, match", [
    (0, None, "folds"), (-2, None, "folds"), (True, None, "folds"), (2.0, None, "folds"),
    (401, None, r"folds \(k\) must be at most .*400"),
    (11, 10, r"folds \(k\) must be at most .*10"),
    (2, 3, r"folds \(k\) = 2 over 3 examples"),
    (2, 2, r"folds \(k\) = 2 over 2 examples"),
    (1, 0, "limit"),
])
def test_bad_fold_counts_name_the_field(k, limit, match):
    with pytest.raises(ValueError, match=match):
        fold_splits(task("int-mult"), k, limit=limit)
    assert issubclass(UsageError, ValueError)  # one line at the CLI


# -- stats: the bootstrap that resamples within folds ------------------------------------------------------

def binary(n: int, p: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n) < p  # (n,) bool


@pytest.mark.parametrize("n, n_boot", [(50, 300), (30_000, 150)])  # 30,000 x 150 draws span several chunks
def test_one_fold_draws_exactly_what_the_plain_bootstrap_draws(n, n_boot):
    before, after = binary(n, 0.5, 1), binary(n, 0.6, 2)
    one = np.zeros(n, dtype=int)
    values = after.astype(float)
    assert np.array_equal(stratified_bootstrap_means(values, one, n_boot, seed=3), bootstrap_means(values, n_boot, 3))
    assert fold_accuracy_ci(after, one, n_boot, seed=3) == accuracy_ci(after, n_boot, seed=3)
    assert fold_paired_diff_ci(before, after, one, n_boot, seed=3) == paired_diff_ci(before, after, n_boot, seed=3)


def test_stratified_means_match_a_direct_computation():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])  # (7,)
    folds = ["b", "a", "b", "a", "a", "c", "b"]  # interleaved: groups are by label, not by position
    means = stratified_bootstrap_means(values, folds, n_boot=6, seed=11)
    rng = np.random.default_rng(11)
    want = np.zeros(6)
    for label in ("a", "b", "c"):  # sorted labels; each group's values in their given order
        group = values[[i for i, f in enumerate(folds) if f == label]]
        draws = rng.integers(0, group.size, size=(6, group.size))
        want += group[draws].sum(axis=1)
    assert np.allclose(means, want / 7)


def test_stratified_interval_matches_the_exact_distribution():
    # fold 0 = [0, 1], fold 1 = [1, 1, 1]: a replicate's mean is (sum of two draws from {0, 1} + 3) / 5,
    # i.e. 0.6, 0.8, 1.0 with probabilities 1/4, 1/2, 1/4, so the 90% interval is [0.6, 1.0]
    correct, folds = [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]
    means = stratified_bootstrap_means(np.array(correct, float), folds, n_boot=20_000, seed=0)
    freq = [np.mean(np.isclose(means, m)) for m in (0.6, 0.8, 1.0)]
    assert freq == pytest.approx([0.25, 0.5, 0.25], abs=0.015)
    assert fold_accuracy_ci(correct, folds, n_boot=20_000, level=0.9) == pytest.approx((0.8, 0.6, 1.0))


def test_resampling_within_folds_keeps_each_folds_share():
    # one fold all right, the other all wrong: any within-fold resample has mean 0.5, a plain one varies
    correct, folds = [1] * 40 + [0] * 40, [0] * 40 + [1] * 40
    assert fold_accuracy_ci(correct, folds) == (0.5, 0.5, 0.5)
    _, lo, hi = accuracy_ci(correct)
    assert hi - lo > 0.15
    before = [0] * 80
    assert fold_paired_diff_ci(before, correct, folds) == (0.5, 0.5, 0.5)


def test_fold_intervals_check_their_inputs():
    with pytest.raises(ValueError, match="one group per value"):
        fold_accuracy_ci([1, 0, 1], [0, 1])
    with pytest.raises(ValueError, match="same examples"):
        fold_paired_diff_ci([1, 0], [1, 0, 1], [0, 0, 1])
    with pytest.raises(ValueError, match="n_boot"):
        fold_paired_diff_ci([1, 0], [1, 1], [0, 1], n_boot=0)
