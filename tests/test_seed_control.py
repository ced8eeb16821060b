"""The random control's own spread: eigenprune against the random seeds counts seed-to-seed variation (a
two-level bootstrap: seeds, then examples within folds), ranks eigenprune among the seeds with its permutation
p-value, and says the smallest p the seed count can reach; the default seed count can reach p < 0.05."""

import json

import numpy as np
import pytest
import torch

from eigenprune.evaluation.significance import two_level_diff_ci
from eigenprune.methods.base import MethodResult
from eigenprune.methods.controls import RandomSettings, _pool_random, seed_comparison
from eigenprune.methods.registry import Pooled

N_BOOT = 400


def seeds_and_method(n: int = 2000, seed: int = 0):
    """Seeds that agree on most examples but whose accuracies spread (shifts -0.05 ... +0.05 around a common 0.5),
    and a method 0.02 above their mean: a narrow examples-only interval, a wide one once the seeds count."""
    rng = np.random.default_rng(seed)
    common = rng.random(n) < 0.5
    control = np.repeat(common[None], 5, axis=0)  # (seeds, n)
    for row, shift in zip(control, (-0.05, -0.02, 0.0, 0.02, 0.05), strict=True):
        pool = np.flatnonzero(row if shift < 0 else ~row)
        row[rng.choice(pool, round(abs(shift) * n), replace=False)] = shift > 0
    method = common.copy()
    method[rng.choice(np.flatnonzero(~common), round(0.02 * n), replace=False)] = True
    return torch.tensor(method), torch.tensor(control)


def test_the_difference_counts_the_seeds_spread():
    method, control = seeds_and_method()
    c = seed_comparison(method, control, N_BOOT)
    assert (c["diff"]["diff"], c["diff"]["lo"], c["diff"]["hi"]) == pytest.approx(
        two_level_diff_ci(method.numpy(), control.numpy(), n_boot=N_BOOT))
    width = c["diff"]["hi"] - c["diff"]["lo"]
    examples_only = c["diff_examples_only"]["hi"] - c["diff_examples_only"]["lo"]
    assert c["diff"]["diff"] == pytest.approx(0.02, abs=2e-3)
    assert c["diff"]["diff"] == pytest.approx(c["diff_examples_only"]["diff"], abs=1e-6)  # the same estimate
    assert width > 1.5 * examples_only  # ... with the seeds' variance in it
    # the case: significant when only examples are resampled, not once the seeds count
    assert c["diff_examples_only"]["lo"] > 0 and c["diff"]["lo"] <= 0


def test_identical_seeds_are_the_examples_only_interval():
    method, control = seeds_and_method()
    same = control[:1].repeat(5, 1)
    c = seed_comparison(method, same, 2000)
    assert c["diff"]["hi"] - c["diff"]["lo"] == pytest.approx(
        c["diff_examples_only"]["hi"] - c["diff_examples_only"]["lo"], rel=0.15)


@pytest.mark.parametrize("method_acc, rank, p", [(0.9, 1, 1 / 6), (0.5, 4, 4 / 6), (0.55, 3, 3 / 6), (0.0, 6, 1.0)])
def test_rank_among_the_seeds_and_its_permutation_pvalue(method_acc, rank, p):
    n = 20
    accs = [0.3, 0.4, 0.5, 0.55, 0.6]  # the method ties 0.5 / 0.55: a tie counts against it
    control = torch.tensor([[i < round(a * n) for i in range(n)] for a in accs])
    method = torch.tensor([i < round(method_acc * n) for i in range(n)])
    c = seed_comparison(method, control, 50)
    assert (c["rank"], c["of"], c["p_value"], c["p_min"]) == (rank, 6, pytest.approx(p), pytest.approx(1 / 6))


def test_the_default_seed_count_can_reach_p_below_005():
    seeds = RandomSettings().seeds
    assert 1 / (1 + seeds) < 0.05 and 1 / seeds >= 0.05  # the fewest that can
    assert seeds == 20


class _Splits:
    """Folds of sizes `sizes`, pooled in fold order."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def pool(self, per_fold):
        values = [v for part in per_fold for v in (part.tolist() if hasattr(part, "tolist") else part)]
        return values, [k for k, size in enumerate(self.sizes) for _ in range(size)]


def _result(test: torch.Tensor, **extra) -> MethodResult:
    return MethodResult(method="x", config={}, dev=torch.zeros(2), test=test, dev_evaluations=0, wall_s=0.0,
                        changed_params=1, extra=extra)


def test_pooled_over_folds_resamples_seeds_then_examples_within_folds():
    # fold 0 is easy for everyone, fold 1 hard: without fold strata the interval would mix them
    rng = np.random.default_rng(3)
    sizes, n_seeds = [60, 140], 4
    seed_folds = [torch.tensor(rng.random((n_seeds, size)) < rate)
                  for size, rate in zip(sizes, (0.9, 0.2), strict=True)]
    eigen_folds = [torch.tensor(rng.random(size) < rate) for size, rate in zip(sizes, (0.92, 0.25), strict=True)]
    splits = _Splits(sizes)
    folds = [_result(s.float().mean(0), n_frozen=3, _test_seeds=s) for s in seed_folds]
    for f, s in zip(folds, seed_folds, strict=True):
        f.runs = [{"seed": j, "dev_acc": 0.5, "test": {"acc": float(s[j].float().mean()), "n": s.shape[1]}}
                  for j in range(n_seeds)]
    eigen_test = torch.cat(eigen_folds)
    rand_test = torch.cat([f.test for f in folds])
    eigen = Pooled(_result(eigen_test), [_result(e) for e in eigen_folds], torch.zeros(200), splits, N_BOOT)
    pooled = Pooled(_result(rand_test), folds, torch.zeros(200), splits, N_BOOT, needed={"eigenprune": eigen})
    _pool_random(pooled)
    versus = pooled.result.extra["vs_eigenprune"]
    seeds = torch.cat(seed_folds, dim=1).float().numpy()  # (seeds, N)
    fold_of = [0] * 60 + [1] * 140
    expected = two_level_diff_ci(eigen_test.float().numpy(), seeds, strata=fold_of, n_boot=N_BOOT)
    unstratified = two_level_diff_ci(eigen_test.float().numpy(), seeds, strata=None, n_boot=N_BOOT)
    got = (versus["diff"]["diff"], versus["diff"]["lo"], versus["diff"]["hi"])
    assert got == pytest.approx(expected) and got != pytest.approx(unstratified)
    pooled_accs = seeds.mean(axis=1)
    assert versus["random_test_accs"] == pytest.approx(pooled_accs.tolist())
    assert versus["rank"] == 1 + int((pooled_accs >= eigen_test.float().mean().item()).sum())
    assert versus["p_min"] == pytest.approx(1 / 5)
    assert "rank" in pooled.result.verdict and "cannot reach p < 0.05" in pooled.result.verdict


def test_compare_reports_the_seed_rank(sums_setup, tmp_path):
    from eigenprune.cli import main

    model, task = sums_setup
    out = tmp_path / "c"
    code = main(["compare", "--model", str(model), "--task", str(task), "--limit", "20", "--split-seed", "2",
                 "--targets", "all", "--partners", "2", "--n-boot", "100", "--quiet", "--no-side-effects",
                 "--select", "accuracy",  # an edit, so the draws freeze components (1se keeps the base here)
                 "--p", "0.5,0.9", "--methods", "eigenprune,random", "--set", "random.seeds=3", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "comparison.json").read_text())
    versus = report["methods"]["random"]["extra"]["vs_eigenprune"]
    accs, eigen = versus["random_test_accs"], report["methods"]["eigenprune"]["test"]["acc"]
    assert versus["rank"] == 1 + sum(a >= eigen for a in accs) and versus["of"] == 4
    assert versus["p_value"] == pytest.approx(versus["rank"] / 4) and versus["p_min"] == pytest.approx(0.25)
    assert "_test_seeds" not in report["methods"]["random"]["extra"]  # per-example data stays out of the JSON
    assert "permutation p" in (out / "comparison.md").read_text()
