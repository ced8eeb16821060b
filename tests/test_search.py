"""Tests for search.py: the p search on synthetic dev curves (extend at the edge, budget, refinement toward
the peak, tie rules, loss selection, the base winning, no value twice) and dev_nll against a direct
log_softmax computation on a tiny model."""

from __future__ import annotations

import math
import random
from functools import partial

import pytest
import torch
from conftest import build
from helpers import EXAMPLES
from test_evaluate import CHOICE_EXAMPLES, fake_edit

from eigenprune.core.batching import encode
from eigenprune.evaluation.evaluate import choice_nll
from eigenprune.protocol.search import (
    DEFAULT_GRID,
    Candidate,
    Step,
    choose,
    dev_nll,
)
from eigenprune.protocol.search import search_p as _search_p
from eigenprune.protocol.search import search_strength as _search_strength

# These synthetic curves have no per-example results, which the default rule ("1se") needs: the search's
# mechanics are tested under "accuracy" (a test passing select= overrides it); test_select_1se.py tests 1se.
search_p = partial(_search_p, select="accuracy")
search_strength = partial(_search_strength, select="accuracy")

BASE = Candidate(0.5, 100.0)


class Curve:
    """A synthetic dev curve: evaluate(p) -> Candidate, with every call recorded."""

    def __init__(self, accuracy, nll=lambda p: 100.0):
        self.accuracy, self.nll, self.calls = accuracy, nll, []

    def __call__(self, p: float) -> Candidate:
        self.calls.append(p)
        return Candidate(self.accuracy(p), self.nll(p), data={"p": p})


def peak(at: float, width: float = 1.0, top: float = 0.8):
    """A smooth unimodal accuracy curve in log p, highest at `at`."""
    return lambda p: max(0.0, top - 0.02 * ((math.log(p) - math.log(at)) / width) ** 2) if p > 0 else 0.0


def phases(result) -> list[str]:
    return [s.phase for s in result.steps]


def test_extends_upward_while_the_best_sits_on_the_largest_p():
    curve = Curve(lambda p: round(min(p, 0.7) - max(p - 0.7, 0) * 3, 3))  # rises to 0.7, then falls
    result = search_p(curve, Candidate(0.0, 100.0), budget=10)
    values = [s.value for s in result.steps]
    assert values[:8] == [0.0, 0.01, 0.05, 0.1, 0.3, 0.5, 0.7, 0.9]
    assert phases(result)[:8] == ["base"] + ["grid"] * 4 + ["extend"] * 3
    assert result.chosen.value == 0.7
    assert all(s.phase == "refine" for s in result.steps[8:]) and len(result.steps) == 11


def test_no_extension_when_the_best_is_inside_the_grid():
    result = search_p(Curve(peak(0.1)), BASE, budget=8)
    assert "extend" not in phases(result)
    assert all(s.value < 0.3 for s in result.steps if s.phase == "refine")  # refinement stays around 0.1


def test_past_the_extend_values_extension_halves_the_way_to_max_p():
    curve = Curve(lambda p: p)  # stronger is always better
    result = search_p(curve, Candidate(0.0, 100.0), budget=9, max_p=0.99)
    extended = [s.value for s in result.steps if s.phase == "extend"]
    assert extended == [0.5, 0.7, 0.9, 0.944, 0.967] and result.chosen.value == 0.967
    assert "refine" not in phases(result)


@pytest.mark.parametrize("budget", [4, 5, 7, 10, 13])
def test_stays_within_budget(budget):
    curve = Curve(peak(0.17))
    result = search_p(curve, BASE, budget=budget)
    assert len(curve.calls) == result.evaluations == budget and result.stopped == "budget"


def test_budget_equal_to_the_grid_is_todays_sweep():
    curve = Curve(peak(0.9))  # would extend, given the budget
    result = search_p(curve, BASE, budget=len(DEFAULT_GRID))
    assert curve.calls == list(DEFAULT_GRID) and phases(result) == ["base"] + ["grid"] * 4


@pytest.mark.parametrize("at", [0.017, 0.07, 0.17, 0.42])
def test_refines_toward_the_peak(at):
    result = search_p(Curve(peak(at)), BASE, budget=12)
    grid_best = max((s for s in result.steps if s.phase == "grid"), key=lambda s: s.candidate.accuracy)
    assert abs(math.log(result.chosen.value / at)) < abs(math.log(grid_best.value / at))
    assert abs(math.log(result.chosen.value / at)) < 0.1  # within 10% of the peak


def test_ties_in_accuracy_go_to_the_lower_nll_then_the_smaller_p():
    flat = Curve(lambda p: 0.5, nll=lambda p: {0.05: 90.0, 0.3: 90.0}.get(p, 99.0))  # CB: accuracy never moves
    result = search_p(flat, BASE, budget=4, select="accuracy+loss")
    assert result.chosen.value == 0.05  # 0.05 and 0.3 tie on both numbers: the smaller p
    same = Curve(lambda p: 0.5, nll=lambda p: 100.0)  # ties the base on both numbers: the base
    assert search_p(same, BASE, budget=6, select="accuracy+loss").chosen.value == 0.0
    steps = [Step(0.0, Candidate(0.6, 10.0), "base"), Step(0.1, Candidate(0.7, 50.0), "grid"),
             Step(0.2, Candidate(0.7, 40.0), "grid"), Step(0.3, Candidate(0.65, 1.0), "grid")]
    assert choose(steps, "accuracy+loss").value == 0.2  # accuracy first, then NLL
    assert choose(steps, "loss").value == 0.3  # NLL outright


def test_loss_selection_chooses_the_lowest_nll_outright():
    curve = Curve(lambda p: 0.9 if p == 0.1 else 0.5, nll=lambda p: 50.0 if p == 0.3 else 80.0)
    by_accuracy = search_p(curve, BASE, budget=4)
    by_loss = search_p(Curve(curve.accuracy, curve.nll), BASE, budget=4, select="loss")
    assert (by_accuracy.chosen.value, by_loss.chosen.value) == (0.1, 0.3)
    assert by_loss.select == "loss"
    assert search_p(Curve(lambda p: 0.9, nll=lambda p: 101.0), BASE, budget=4, select="loss").chosen.value == 0.0


def test_the_base_wins_when_nothing_beats_it_and_refinement_looks_below_the_grid():
    curve = Curve(lambda p: 0.4, nll=lambda p: 120.0)
    result = search_p(curve, BASE, budget=7)
    assert result.chosen.value == 0.0 and result.chosen.candidate is BASE
    assert [s.value for s in result.steps if s.phase == "refine"] == [0.005, 0.0025, 0.00125]
    floored = search_p(Curve(curve.accuracy, curve.nll), BASE, budget=7, min_p=0.003)  # 1 / n_components, say
    assert [s.value for s in floored.steps if s.phase == "refine"] == [0.005] and floored.stopped == "resolution"


@pytest.mark.parametrize("seed", range(12))
def test_never_evaluates_a_value_twice_and_stays_in_range(seed):
    rng = random.Random(seed)
    table: dict[float, float] = {}
    curve = Curve(lambda p: table.setdefault(p, round(rng.random(), 1)), nll=lambda p: float(rng.randint(0, 3)))
    grid = sorted(rng.sample([0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5], rng.randint(1, 4)))
    result = search_p(curve, BASE, grid=grid + grid[:1], budget=rng.randint(len(grid), 60),
                      select=rng.choice(["accuracy", "loss"]))
    values = [s.value for s in result.steps]
    assert len(values) == len(set(values)) and len(curve.calls) == result.evaluations
    assert all(0 < v <= 0.999 for v in values[1:])
    assert result.chosen == choose(result.steps, result.select)


def test_a_step_curve_converges_before_the_budget():
    curve = Curve(lambda p: 0.8 if 0.1 <= p <= 0.1 else 0.5)  # only p = 0.1 is good: gaps close around it
    result = search_p(curve, BASE, budget=200)
    assert result.stopped == "resolution" and result.evaluations < 200
    assert result.chosen.value == 0.1


def test_a_decreasing_keep_fraction_knob():
    # LASER-style: keep = 1 is the base, smaller keeps are stronger; the best keep is 0.02
    curve = Curve(peak(0.02))
    result = search_strength(curve, BASE, (0.5, 0.25, 0.1), none=1.0, limit=0.001, extend=(0.05, 0.01), budget=9)
    assert [s.value for s in result.steps if s.phase == "extend"] == [0.05, 0.01, 0.00316]  # 0.01 beat 0.05
    assert all(0.001 <= v < 1 for v in curve.calls) and len(set(curve.calls)) == len(curve.calls)
    assert abs(math.log(result.chosen.value / 0.02)) < 0.3
    tie = Curve(lambda keep: 0.5, nll=lambda keep: 100.0)
    assert search_strength(tie, BASE, (0.5, 0.1), none=1.0, limit=0.001, budget=2).chosen.value == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 3}, r"budget \(3\) is smaller than the grid \(4 values\)"),
    ({"budget": 0}, "budget must be a positive integer"),
    ({"select": "f1"}, "select must be one of"),
    ({"grid": ()}, "grid needs at least one value"),
    ({"grid": (0.0, 0.1)}, "grid values must lie between"),
    ({"grid": (0.1, 1.0)}, "grid values must lie between"),
    ({"extend": (0.5, 1.2)}, "extend values must lie between"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        search_p(Curve(peak(0.1)), BASE, **kwargs)


def test_candidates_check_their_numbers_and_evaluate_must_return_one():
    with pytest.raises(ValueError, match="accuracy"):
        Candidate(1.5, 1.0)
    with pytest.raises(ValueError, match="nll"):
        Candidate(0.5, float("nan"))
    with pytest.raises(TypeError, match="Candidate"):
        search_p(lambda p: 0.5, BASE)
    c = Candidate.from_examples(torch.tensor([True, False, True, True]), torch.tensor([1.0, 2.0, 0.5, 0.25]))
    assert (c.accuracy, c.nll) == (0.75, 3.75)


# -- dev_nll ---------------------------------------------------------------------------------------------

def direct_nll(model, tokenizer, examples, table=None) -> torch.Tensor:
    """One example at a time, no padding: -sum log_softmax at the positions that predict the answer (with
    test_evaluate.fake_edit's offset-dependent bias added by hand when `table` is given)."""
    out = []
    for enc in encode(tokenizer, examples):
        ids = torch.tensor([enc.prompt_ids + enc.answer_ids])  # (1, pos)
        with torch.no_grad():
            logits = model(ids).logits.float()[0]  # (pos, vocab)
        start = len(enc.prompt_ids) - 1
        if table is not None:
            logits = logits + table[(torch.arange(ids.shape[1]) - start).clamp(-1, 3) + 1]
        logp = torch.log_softmax(logits, -1)  # (pos, vocab)
        out.append(-sum(float(logp[start + j, t]) for j, t in enumerate(enc.answer_ids)))
    return torch.tensor(out)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_dev_nll_matches_a_direct_log_softmax(name):
    model, tok = build(name)
    model.train()
    got = dev_nll(model, tok, EXAMPLES, batch_size=4)
    assert model.training  # the mode the model came in with
    model.eval()
    assert torch.allclose(got, direct_nll(model, tok, EXAMPLES), atol=1e-4)
    assert torch.equal(dev_nll(model, tok, EXAMPLES, batch_size=1), dev_nll(model, tok, EXAMPLES, batch_size=1))
    assert torch.allclose(dev_nll(model, tok, EXAMPLES, batch_size=1), got, atol=1e-4)
    assert dev_nll(model, tok, []).shape == (0,)


def test_dev_nll_tells_an_edited_model_where_prompts_end():
    model, tok = build("gpt2")
    with fake_edit(model, model.config.vocab_size) as table:
        got = dev_nll(model, tok, CHOICE_EXAMPLES, batch_size=4)
        by_choice = choice_nll(model, tok, CHOICE_EXAMPLES, batch_size=4)
    assert torch.allclose(got, direct_nll(model, tok, CHOICE_EXAMPLES, table), atol=1e-4)
    assert torch.allclose(got, torch.stack([n[ex.label] for n, ex in zip(by_choice, CHOICE_EXAMPLES, strict=True)]),
                          atol=1e-4)  # what choice evaluation computes for the correct choice
