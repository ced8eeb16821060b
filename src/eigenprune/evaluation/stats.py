"""Small, seeded statistics for honest reporting: bootstrap intervals, the majority-class rate, mean/sd.

A test set of a few hundred items gives accuracies with intervals several points wide, and an edit
that moves accuracy by one point may be noise. `accuracy_ci` puts a percentile bootstrap interval
on one accuracy; `paired_diff_ci` puts one on the change between two evaluations of the *same*
examples, resampling example indices jointly so the pairing is kept. Everything is numpy and seeded:
the same inputs and seed give the same interval on every platform.

With cross-fitted folds (`splits.fold_splits`) each fold's examples were judged by a different edit, so
`fold_accuracy_ci` and `fold_paired_diff_ci` resample *within* folds (a stratified bootstrap: every
replicate keeps each fold's size). With a single fold they draw exactly what the plain ones draw.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

_MAX_DRAWS_PER_CHUNK = 2_000_000  # bounds memory: n_boot x n indices are drawn in chunks


@dataclass(frozen=True)
class Accuracy:
    """An accuracy with its 95% interval: the one shape every report writes (`{"acc", "lo", "hi", "n"}`)."""

    acc: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """A paired difference (after - before) with its 95% interval: `{"diff", "lo", "hi"}` in reports."""

    diff: float
    lo: float
    hi: float

    def to_dict(self) -> dict:
        return asdict(self)


def accuracy(correct) -> float:
    """Mean correctness in float64, so that equal accuracies compare equal wherever they were computed."""
    values = correct.double() if hasattr(correct, "double") else np.asarray(correct, dtype=np.float64)
    return float(values.mean())


ALPHA = 0.05  # the level of every "significant" in a report


def significance(difference: Mapping[str, float] | Difference) -> str | None:
    """The one rule for "significant": "gain" or "loss" (the sign of the difference), else None.

    A difference that carries an exact paired test is judged by its p-value at the 5% level: the family's
    Holm-adjusted one (`p_adjusted`, in a comparison or a study) when present, else the raw `p` (one test,
    as in `run`). One without a test (a bootstrap interval: side effects, a control averaged over seeds)
    is significant when its 95% interval excludes 0."""
    get = (lambda key: getattr(difference, key, None)) if not isinstance(difference, Mapping) else difference.get
    for key in ("p_adjusted", "p"):
        p = get(key)
        if p is not None:
            if p >= ALPHA or get("diff") == 0:
                return None
            return "gain" if get("diff") > 0 else "loss"
    lo, hi = get("lo"), get("hi")
    return "gain" if lo > 0 else "loss" if hi < 0 else None


def _as_values(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)  # (n,)
    if array.size == 0:
        raise ValueError(f"{name} is empty; a confidence interval needs at least one example")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite values")
    return array


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1 (exclusive), got {level}")


def bootstrap_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement, same size) of `values`: (n_boot,)."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    means = np.empty(n_boot)
    for start in range(0, n_boot, per_chunk):
        rows = min(per_chunk, n_boot - start)
        index = rng.integers(0, n, size=(rows, n))  # (rows, n)
        means[start:start + rows] = values[index].mean(axis=1)  # (rows,)
    return means


def _percentile_interval(estimate: float, means: np.ndarray, level: float) -> tuple[float, float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(estimate), float(lo), float(hi)


def accuracy_ci(correct: Sequence[bool] | np.ndarray, n_boot: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, lo, hi): the observed accuracy and its percentile bootstrap interval at `level`."""
    _check(n_boot, level)
    values = _as_values(correct, "correct")  # (n,)
    return _percentile_interval(values.mean(), bootstrap_means(values, n_boot, seed), level)


def paired_diff_ci(before: Sequence[bool] | np.ndarray, after: Sequence[bool] | np.ndarray,
                   n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(after - before, lo, hi) for two evaluations of the same examples, by a paired bootstrap.

    Each resample draws one set of example indices and uses it for both evaluations; that is the
    same as resampling the per-example differences, which is how it is computed.
    """
    _check(n_boot, level)
    first, second = _as_values(before, "before"), _as_values(after, "after")  # (n,), (n,)
    if first.shape != second.shape:
        raise ValueError(f"before and after must cover the same examples, got {first.size} and {second.size}")
    diff = second - first  # (n,)
    return _percentile_interval(diff.mean(), bootstrap_means(diff, n_boot, seed), level)


def stratified_bootstrap_means(values: np.ndarray, groups: Sequence | np.ndarray, n_boot: int = 1000,
                                seed: int = 0) -> np.ndarray:
    """Means of `n_boot` stratified resamples of `values`: (n_boot,).

    Each replicate draws, for every group in sorted order, as many indices (with replacement) as the
    group holds from that group's examples (kept in their given order), and averages all of them. With
    one group this is `bootstrap_means(values, n_boot, seed)`, draw for draw.
    """
    labels, group_of = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    if group_of.shape != values.shape:
        raise ValueError(f"groups must give one group per value, got {group_of.size} for {values.size}")
    members = [values[group_of == g] for g in range(labels.size)]  # each (n_g,)
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)  # a fixed constant: the draws never depend on the machine
    means = np.empty(n_boot)
    for start in range(0, n_boot, per_chunk):
        rows = min(per_chunk, n_boot - start)
        total = np.zeros(rows)
        for group in members:
            index = rng.integers(0, group.shape[0], size=(rows, group.shape[0]))  # (rows, n_g)
            total += group[index].sum(axis=1)  # (rows,)
        means[start:start + rows] = total / n
    return means


def fold_accuracy_ci(correct: Sequence[bool] | np.ndarray, folds: Sequence | np.ndarray, n_boot: int = 1000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(accuracy, lo, hi) of correctness pooled over folds, resampling within each fold (`folds`: the fold
    of every example, e.g. from `splits.Folds.pool`)."""
    _check(n_boot, level)
    values = _as_values(correct, "correct")  # (n,)
    return _percentile_interval(values.mean(), stratified_bootstrap_means(values, folds, n_boot, seed), level)


def fold_paired_diff_ci(before: Sequence[bool] | np.ndarray, after: Sequence[bool] | np.ndarray,
                        folds: Sequence | np.ndarray, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float, float]:
    """(after - before, lo, hi) pooled over folds: the paired bootstrap of `paired_diff_ci`, resampling
    within each fold. With one fold it returns exactly what `paired_diff_ci` does for the same seed."""
    _check(n_boot, level)
    first, second = _as_values(before, "before"), _as_values(after, "after")  # (n,), (n,)
    if first.shape != second.shape:
        raise ValueError(f"before and after must cover the same examples, got {first.size} and {second.size}")
    diff = second - first  # (n,)
    return _percentile_interval(diff.mean(), stratified_bootstrap_means(diff, folds, n_boot, seed), level)


def majority_rate(labels: Iterable[Hashable]) -> float:
    """The share of the most common label: the accuracy of always answering it."""
    counts = Counter(labels)
    if not counts:
        raise ValueError("labels is empty")
    return max(counts.values()) / sum(counts.values())


ONE_LABEL_SHARE = 0.9  # a model that answers one label this often can gain only by moving its label prior


def label_distribution(predicted: Iterable[Hashable]) -> dict:
    """How often each label was answered: {"counts": label -> n (most answered first), "top": the most
    answered label, "top_share": its share, "one_label": top_share >= ONE_LABEL_SHARE, "n"}."""
    counts = Counter(str(label) for label in predicted)
    if not counts:
        raise ValueError("predicted is empty")
    ordered = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    top, n = next(iter(ordered)), sum(counts.values())
    return {"counts": ordered, "top": top, "top_share": ordered[top] / n, "one_label": ordered[top] / n >=
            ONE_LABEL_SHARE, "n": n}


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) across runs; the sd of a single run is nan."""
    array = np.asarray(list(values), dtype=np.float64)  # (runs,)
    if array.size == 0:
        raise ValueError("values is empty")
    sd = float(array.std(ddof=1)) if array.size > 1 else float("nan")
    return float(array.mean()), sd
