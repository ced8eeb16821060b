"""A task's examples dealt into train / dev / test: one fixed split, or K cross-fitted folds.

`split_task` carves a seeded dev split out of a task's train examples (the task's test examples stay
its test split); its seed is what `--seeds N` varies, and `limit` caps each split. `fold_splits` pools
train and test and deals them into K seeded folds, each the test split of one run (cross-fitting):
every example is tested exactly once, by a run that never trained or chose on it; `Folds.pool` puts
the folds' per-example results back into one list for the pooled statistics (`stats.fold_*`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from eigenprune.core.batching import Example
from eigenprune.core.errors import UsageError
from eigenprune.evaluation.tasks import FIXED_SPLIT_SEED, Task


@dataclass(frozen=True)
class Splits:
    """Train (for scoring), dev (for choosing p), test (final numbers) examples of one seed."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class FoldSplit(Splits):
    """One fold's splits, and where each example sits in the pooled list (`Folds.examples`)."""

    fold: int
    train_index: tuple[int, ...]
    dev_index: tuple[int, ...]
    test_index: tuple[int, ...]


@dataclass(frozen=True)
class Folds:
    """K folds over one pooled list of examples; iterates over the `FoldSplit`s.

    `pooled` counts the examples taken from each source (e.g. {"train": 250, "validation": 56}) when
    train and test were pooled (k > 1); it is empty for k = 1, today's fixed split.
    """

    examples: list[Example]
    folds: list[FoldSplit]
    seed: int
    limit: int | None
    pooled: dict[str, int]

    def __len__(self) -> int:
        return len(self.folds)

    def __iter__(self):
        return iter(self.folds)

    def __getitem__(self, fold: int) -> FoldSplit:
        return self.folds[fold]

    @property
    def tested(self) -> list[int]:
        """Positions in `examples` of every tested example, in order (all of them when k > 1)."""
        return sorted(i for f in self.folds for i in f.test_index)

    def pool(self, per_fold: Sequence[Sequence]) -> tuple[list, list[int]]:
        """Per-fold test values (lists, arrays or tensors, each in its fold's test order) as one list in
        `tested` order, with the fold of each value: what `stats.fold_paired_diff_ci` takes."""
        if len(per_fold) != len(self.folds):
            raise ValueError(f"per_fold needs one entry per fold ({len(self.folds)}), got {len(per_fold)}")
        where: dict[int, tuple[int, object]] = {}
        for f, values in zip(self.folds, per_fold, strict=True):
            values = values.tolist() if hasattr(values, "tolist") else list(values)  # tensors, arrays
            if len(values) != len(f.test_index):
                raise ValueError(f"fold {f.fold} tests {len(f.test_index)} examples, got {len(values)} values")
            where |= {i: (f.fold, v) for i, v in zip(f.test_index, values, strict=True)}
        order = self.tested
        return [where[i][1] for i in order], [where[i][0] for i in order]


def _subsample_index(n: int, limit: int | None, rng: random.Random) -> list[int]:
    """Positions of a seeded subsample of `limit` out of `n` items, in order (all of them when n <= limit)."""
    if limit is None or n <= limit:
        return list(range(n))
    return sorted(rng.sample(range(n), limit))


def _carve_dev(n: int, dev_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(dev, train) positions out of `n`: a seeded `dev_fraction` share (at least 1, leaving at least 1)."""
    n_dev = min(max(round(dev_fraction * n), 1), n - 1)
    order = list(range(n))
    rng.shuffle(order)
    return sorted(order[:n_dev]), sorted(order[n_dev:])


def _check_split_args(dev_fraction: float, seed: int, limit: int | None) -> None:
    if not 0.0 < dev_fraction < 1.0:
        raise UsageError(f"dev fraction must be between 0 and 1 (exclusive), got {dev_fraction}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"split seed must be a non-negative integer, got {seed!r}")


def _split_index(task: Task, dev_fraction: float, seed: int, limit: int | None) -> tuple[list[int], ...]:
    """`split_task`'s (train, dev, test) as positions: train and dev in `task.train`, test in `task.test`."""
    _check_split_args(dev_fraction, seed, limit)
    n = len(task.train)
    if n < 2:
        raise UsageError(f"task {task.name} has {n} train example(s); carving a dev split needs at least 2")
    rng = random.Random(seed)
    dev, train = _carve_dev(n, dev_fraction, rng)
    # the test subsample ignores the split seed, so repeats over seeds share one test set
    test = _subsample_index(len(task.test), limit, random.Random(FIXED_SPLIT_SEED))
    train = [train[i] for i in _subsample_index(len(train), limit, rng)]
    dev = [dev[i] for i in _subsample_index(len(dev), limit, rng)]
    return train, dev, test


def split_task(task: Task, dev_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> Splits:
    """Carve a seeded dev split out of `task.train`; `limit` caps each split (seeded subsample).

    Examples keep their file order inside each split. The test split never depends on the seed (a
    `limit` subsamples it with a fixed seed), so repeats over seeds are judged on the same items.
    """
    train, dev, test = _split_index(task, dev_fraction, seed, limit)
    return Splits([task.train[i] for i in train], [task.train[i] for i in dev], [task.test[i] for i in test])


def _fold_of(examples: Sequence[Example], k: int, rng: random.Random) -> list[int]:
    """A fold for every example: each label's examples (all, when unlabelled) shuffled, then dealt round
    the folds in one run, so fold sizes differ by at most one and so do a label's counts per fold."""
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(-1 if ex.label is None else ex.label, []).append(i)
    fold = [0] * len(examples)
    dealt = 0
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        for i in members:
            fold[i] = dealt % k
            dealt += 1
    return fold


def fold_splits(task: Task, k: int, seed: int = 0, dev_fraction: float = 0.2, limit: int | None = None) -> Folds:
    """K cross-fitted folds: each fold is the test split of one run, whose dev and train come from the others.

    k = 1 is today's fixed split, exactly `split_task(task, dev_fraction, seed, limit)`: one fold, no
    pooling, and `limit` caps each split as it always has.

    k > 1 pools `task.train + task.test` (in that order; `Folds.pooled` says how many came from each,
    for the report: SuperGLUE's test examples are its validation set), deals them into k seeded folds
    stratified by label, and carves each fold's dev split (`dev_fraction` of the other folds, seeded)
    out of the other folds; the rest is that fold's train. Every pooled example is in exactly one
    fold's test and never in that fold's train or dev.

    `limit` with k > 1 caps the *pooled* examples at N (a subsample with the fixed split seed, so every
    fold seed sees the same N examples) before they are dealt into folds: each fold then tests about
    N / k of them, and a report pools all N.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"folds (k) must be a positive integer, got {k!r}")
    if k == 1:
        train, dev, test = _split_index(task, dev_fraction, seed, limit)
        n_train = len(task.train)
        test = [n_train + i for i in test]
        pool = task.train + task.test
        fold = FoldSplit([pool[i] for i in train], [pool[i] for i in dev], [pool[i] for i in test],
                         0, tuple(train), tuple(dev), tuple(test))
        return Folds(pool, [fold], seed, limit, {})
    _check_split_args(dev_fraction, seed, limit)
    pool = task.train + task.test
    keep = _subsample_index(len(pool), limit, random.Random(FIXED_SPLIT_SEED))
    pool = [pool[i] for i in keep]
    n = len(pool)
    if k > n:
        raise UsageError(f"folds (k) must be at most the number of examples ({n}), got {k}")
    if n - -(-n // k) < 2:
        raise UsageError(f"folds (k) = {k} over {n} examples leaves fewer than 2 outside a fold for its "
                         "train and dev; use fewer folds or more examples")
    rng = random.Random(seed)
    fold_of = _fold_of(pool, k, rng)
    folds = []
    for f in range(k):
        test = [i for i in range(n) if fold_of[i] == f]
        rest = [i for i in range(n) if fold_of[i] != f]
        dev_pos, train_pos = _carve_dev(len(rest), dev_fraction, rng)
        dev, train = [rest[j] for j in dev_pos], [rest[j] for j in train_pos]
        folds.append(FoldSplit([pool[i] for i in train], [pool[i] for i in dev], [pool[i] for i in test],
                               f, tuple(train), tuple(dev), tuple(test)))
    n_train = sum(1 for i in keep if i < len(task.train))
    return Folds(pool, folds, seed, limit, {"train": n_train, task.test_name: n - n_train})
