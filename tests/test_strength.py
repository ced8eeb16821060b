"""The kept-fraction search LASER and SVD clipping share (`baselines.strength.choose_keep`): the fixed grid
as before, extension past the grid's edge toward rank 1, refinement between neighbours, the budget, one
evaluation per distinct edit, and choices made on dev only (through both methods on a tiny model)."""

import json
import math

import pytest
import torch
from helpers import sensitive, write_task

from eigenprune.edits.scoring import ScoreConfig
from eigenprune.evaluation.splits import split_task
from eigenprune.evaluation.tasks import load_task
from eigenprune.methods.laser import LaserConfig, kept_rank, run_laser
from eigenprune.methods.strength import choose_keep
from eigenprune.methods.svd_clip import ClipConfig, run_svd_clip
from eigenprune.protocol.config import RunConfig
from eigenprune.protocol.harness import Harness, best_on_dev

N_DEV, RANK = 40, 200  # a synthetic dev split and every cell's full rank


class Synthetic:
    """Dev numbers as a function of (cell, keep): `peak[cell]` is the best kept fraction (None: flat); every
    call recorded. Correct answers rise toward the peak on a log scale; the NLL falls with them."""

    def __init__(self, peaks, height=(0.5, 0.5)):
        self.peaks, self.height, self.calls = peaks, height, []

    def __call__(self, cell, keep, with_nll):
        self.calls.append((cell, keep, with_nll))
        peak = self.peaks[cell]
        score = 0.0 if peak is None else self.height[cell] * math.exp(-abs(math.log(keep / peak)))
        right = round(N_DEV * (0.25 + score))
        dev = torch.arange(N_DEV) < right  # (n_dev,)
        return dev, torch.full((N_DEV,), 10.0 - score) if with_nll else None


def choose(evaluate, keeps=(0.5, 0.1), extra=0, select="accuracy+loss", cells=2, base_right=10):
    base_nll = torch.full((N_DEV,), 10.0)
    return choose_keep(cells, keeps, evaluate, torch.arange(N_DEV) < base_right, lambda: base_nll, extra=extra,
                       select=select, limit=lambda cell: 1 / RANK, ranks=lambda cell, keep: kept_rank(RANK, keep))


def test_without_a_search_it_is_the_fixed_grid_chosen_by_accuracy():
    evaluate = Synthetic([0.5, 0.1])
    result = choose(evaluate, keeps=(0.1, 0.5, 1.0, 0.5))  # 1.0 is the unedited candidate; duplicates once
    assert [(c, k) for c, k, _ in evaluate.calls] == [(0, 0.5), (0, 0.1), (1, 0.5), (1, 0.1)]  # mildest first
    assert not any(with_nll for *_, with_nll in evaluate.calls) and result.search is None
    accs = [float(t.dev.double().mean()) for t in result.tried]
    assert result.chosen == best_on_dev(10 / N_DEV, accs) == 0  # a tie between cells: the earlier one
    assert choose(Synthetic([None, None]), base_right=10).chosen == -1  # nothing beats the base: the base


def test_extends_past_the_grid_edge_toward_rank_one_within_budget():
    evaluate = Synthetic([None, 0.02])  # cell 1 peaks below the grid's smallest fraction
    result = choose(evaluate, keeps=(0.5, 0.1), extra=3)
    new = result.tried[4:]
    assert result.search == {"cell": 1, "budget": 3, "select": "accuracy+loss", "stopped": "budget",
                             "evaluations": 3}
    assert len(new) == 3 and all(t.cell == 1 for t in new)  # only the winning cell is searched
    assert new[0].phase == "extend" and new[0].keep < 0.1 and all(t.keep >= 1 / RANK for t in new)
    assert result.best.keep < 0.1 and result.best.cell == 1  # past the grid's edge
    assert len(evaluate.calls) == 4 + 3


def test_refines_between_the_best_and_its_neighbours():
    evaluate = Synthetic([0.22, None])  # cell 0 peaks between 0.5 and 0.1
    result = choose(evaluate, keeps=(0.5, 0.1, 0.01), extra=4)
    new = result.tried[6:]
    assert {t.phase for t in new} == {"refine"} and len(new) <= 4
    assert all(0.01 < t.keep < 0.5 for t in new)
    assert abs(math.log(result.best.keep / 0.22)) < abs(math.log(0.1 / 0.22))  # closer to the peak than the grid


def test_a_fraction_keeping_the_same_ranks_is_not_evaluated_again():
    evaluate = Synthetic([None, 1 / RANK])  # best at rank 1: the search extends into equal ranks
    result = choose(evaluate, keeps=(0.5, 0.1, 0.01), extra=6)
    ranks = [kept_rank(RANK, k) for c, k, _ in evaluate.calls if c == 1]
    assert len(ranks) == len(set(ranks))  # every evaluation of cell 1 a different edit
    assert result.search["evaluations"] == len(result.tried) - 6 <= 6


@pytest.mark.parametrize("select", ["accuracy", "accuracy+loss", "loss"])
def test_the_choice_follows_select(select):
    # cell 0: one more dev answer right at keep 0.5; cell 1: the lower NLL at 0.1 but one fewer right
    def evaluate(cell, keep, with_nll):
        right = {(0, 0.5): 12, (0, 0.1): 10, (1, 0.5): 10, (1, 0.1): 9}.get((cell, keep), 8)  # searched: worse
        nll = {(0, 0.5): 9.0, (0, 0.1): 9.5, (1, 0.5): 9.5, (1, 0.1): 5.0}.get((cell, keep), 9.9)
        return torch.arange(N_DEV) < right, torch.full((N_DEV,), nll) if with_nll else None

    result = choose_keep(2, (0.5, 0.1), evaluate, torch.arange(N_DEV) < 10, lambda: torch.full((N_DEV,), 10.0),
                         extra=1, select=select, limit=lambda cell: 1 / RANK,
                         ranks=lambda c, k: (c, kept_rank(RANK, k)))
    grid_best = min(result.tried[:4], key=lambda t: (-float(t.dev.double().mean()) if select != "loss" else 0,
                                                     float(t.nll.sum()) if select != "accuracy" else 0))
    assert result.search["cell"] == grid_best.cell == (1 if select == "loss" else 0)
    assert result.best is grid_best  # the searched fractions were worse
    assert all(t.nll is not None for t in result.tried)  # reported for every candidate, whatever chooses


def test_extra_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="extra"):
            choose(Synthetic([None, None]), extra=bad)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    task = write_task(tmp_path_factory.mktemp("task") / "sums.jsonl")
    model, tok = sensitive()
    cfg = RunConfig(task=str(task), model="tiny-gpt2", targets="all", split_seed=2, select="accuracy+loss",
                    score=ScoreConfig(partners=2), n_boot=50)
    return Harness(model, tok, split_task(load_task(str(task)), 0.2, 2, 12), "choice", cfg, quiet=True)


class InvertedTest(Harness):
    def evaluate(self, split):
        correct = super().evaluate(split)
        return ~correct if split == "test" else correct


METHODS = {"laser": lambda h: run_laser(h, LaserConfig(kinds=("mlp-in",), keep=(0.5, 0.1), search=2)),
           "svd-clip": lambda h: run_svd_clip(h, ClipConfig(demos=2, keep=(1.0, 0.5), groups=("mlp",), search=2))}


@pytest.mark.parametrize("method", METHODS)
def test_methods_search_on_dev_only_and_count_every_evaluation(harness, method):
    result = METHODS[method](harness)
    sweep, grid = result.extra["sweep"], (2 if method == "laser" else 1) * 2  # layers x fractions
    assert result.extra["search"]["evaluations"] == len(sweep) - grid <= 2
    assert result.dev_evaluations == 1 + len(sweep)
    assert all("dev_nll" in row and row["phase"] in ("grid", "extend", "refine") for row in sweep)
    flipped = InvertedTest(harness.model, harness.tokenizer, harness.splits, harness.mode, harness.config, True)
    other = METHODS[method](flipped)
    assert other.config == result.config and other.extra["sweep"] == sweep
    assert torch.equal(other.test, ~result.test)


def test_compare_with_folds_reports_the_search(sums_setup, tmp_path):
    from eigenprune.cli import build_parser

    model, task = sums_setup
    out = tmp_path / "cmp"
    args = build_parser().parse_args(
        ["compare", "--model", str(model), "--task", str(task), "--methods", "laser", "--targets", "all", "--p", "0.5",
         "--n-boot", "50", "--quiet", "--folds", "2", "--limit", "12", "--select", "loss", "--no-side-effects",
         "--set", "laser.kinds=mlp-out", "--set", "laser.keep=[0.5]", "--set", "laser.search=2", "--out", str(out)])
    assert args.func(args) == 0
    laser = json.loads((out / "comparison.json").read_text())["methods"]["laser"]
    folds = laser["extra"]["per_fold"]
    for fold in folds:
        assert fold["extra"]["search"]["select"] == "loss" and fold["extra"]["search"]["evaluations"] <= 2
        assert all("dev_nll" in row for row in fold["extra"]["sweep"])
    assert laser["dev_evaluations"] == sum(1 + len(f["extra"]["sweep"]) for f in folds)
