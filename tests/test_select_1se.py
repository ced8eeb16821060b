"""The one-standard-error dev choice (`--select 1se`): the weakest candidate whose dev accuracy is within one
*paired* standard error of the best, the unedited model included, for every method with a strength knob
(eigenprune's p, fixed grid and `--p auto`; smallest's p; LASER's / svd-clip's kept fraction)."""

import math

import pytest
import torch
from helpers import run_report

from eigenprune.methods.strength import choose_keep
from eigenprune.protocol.harness import chosen_on_dev
from eigenprune.protocol.search import Candidate, Step, choose, search_p

N = 100


def correct(ones: list[int], n: int = N) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    out[ones] = True
    return out


def cand(c: torch.Tensor, nll: float = 0.0) -> Candidate:
    return Candidate.from_examples(c, torch.full((c.numel(),), nll / c.numel()))


# base: 50 right. close: base + 2 more (paired SE of best - close is tiny: they differ on 1 example of 100, but
# best - base differ on 3). best: base + 3 more.
BASE = correct(list(range(50)))
CLOSE = correct(list(range(52)))
BEST = correct(list(range(53)))
# noisy: 53 right, but a different 53: unpaired-like disagreement, so its paired SE with the best is large
NOISY_BEST = correct(list(range(20, 73)))


def paired_se(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.float() - b.float()).numpy()
    return float(d.std(ddof=1) / math.sqrt(d.size))


def test_the_weakest_within_one_paired_se_of_the_best_is_chosen():
    # best - close differ on one example: gap 0.01 <= paired SE 0.01 -> close qualifies; best - base: gap 0.03 > SE
    assert 0.03 > paired_se(BEST, BASE) and 0.01 <= paired_se(BEST, CLOSE)
    steps = [Step(0.0, cand(BASE), "base"), Step(0.1, cand(CLOSE), "grid"), Step(0.3, cand(BEST), "grid")]
    assert choose(steps, "1se").value == 0.1
    assert choose(steps, "accuracy").value == 0.3
    # given strongest first, the rule still orders by strength (the base competes as the weakest)
    assert choose(list(reversed(steps)), "1se").value == 0.1


def test_the_standard_error_is_paired():
    # an unpaired SE of two 50-53% accuracies at n=100 is ~0.07, which would let the base in (gap 0.03); the
    # paired one of BASE vs BEST is 0.017: the base is out
    unpaired = math.sqrt(0.5 * 0.5 / N + 0.53 * 0.47 / N)
    assert paired_se(BEST, BASE) < 0.03 < unpaired
    steps = [Step(0.0, cand(BASE), "base"), Step(0.3, cand(BEST), "grid")]
    assert choose(steps, "1se").value == 0.3
    # the same accuracies with most examples disagreeing: paired SE ~0.1, so the base is within one SE
    assert paired_se(NOISY_BEST, BASE) > 0.03
    assert choose([Step(0.0, cand(BASE), "base"), Step(0.3, cand(NOISY_BEST), "grid")], "1se").value == 0.0


def test_the_base_competes_and_can_be_the_best():
    worse = correct(list(range(40)))
    steps = [Step(0.0, cand(BEST), "base"), Step(0.1, cand(worse), "grid"), Step(0.3, cand(CLOSE), "grid")]
    assert choose(steps, "1se").value == 0.0


def test_chosen_on_dev_matches_choose_and_keeps_best_on_dev_otherwise():
    assert chosen_on_dev(BASE, [CLOSE, BEST], "1se") == 0
    assert chosen_on_dev(BASE, [CLOSE, BEST], "accuracy") == 1
    assert chosen_on_dev(BASE, [CLOSE, BEST], "accuracy+loss") == 1  # no dev loss here: the accuracy rule
    assert chosen_on_dev(BEST, [CLOSE], "1se") == -1


def test_1se_needs_per_example_correctness():
    with pytest.raises(ValueError, match="per-example"):
        choose([Step(0.0, Candidate(0.5, 1.0), "base"), Step(0.1, Candidate(0.6, 1.0), "grid")], "1se")


def test_the_search_explores_toward_the_best_and_chooses_by_the_rule():
    # dev accuracy rises with p up to 0.3 and falls after; each step a superset of the previous (tiny paired SE)
    ladder = {0.0: 50, 0.01: 50, 0.05: 51, 0.1: 52, 0.3: 53, 0.5: 40, 0.7: 30, 0.9: 20}
    seen = []

    def evaluate(p: float) -> Candidate:
        seen.append(p)
        k = ladder.get(p, 52)
        return cand(correct(list(range(k))), nll=-p)

    result = search_p(evaluate, cand(correct(list(range(50)))), budget=6, select="1se")
    assert seen[:5] == [0.01, 0.05, 0.1, 0.3, 0.5]  # as `accuracy` would: extended while 0.3 was the edge
    assert result.chosen.value == 0.1 and result.select == "1se"  # 0.1 (52) is within one SE of 0.3 (53)
    accuracy_rule = search_p(lambda p: cand(correct(list(range(ladder.get(p, 52)))), nll=-p),
                             cand(correct(list(range(50)))), budget=6, select="accuracy")
    assert accuracy_rule.chosen.value == 0.3 and [s.value for s in accuracy_rule.steps] == [0.0, *seen]


def test_choose_keep_fixed_grid_uses_the_rule_across_cells():
    # two cells x keeps (0.5, 0.1): strength 1 - keep; cell 1 keep 0.5 is close to the best (cell 0 keep 0.1)
    devs = {(0, 0.5): BASE, (0, 0.1): BEST, (1, 0.5): CLOSE, (1, 0.1): BASE}
    evaluate = lambda cell, keep, with_nll: (devs[(cell, keep)], None)
    kw = {"limit": lambda cell: 0.01, "ranks": lambda cell, keep: keep}
    rule = choose_keep(2, [1.0, 0.5, 0.1], evaluate, BASE, lambda: None, select="1se", **kw)
    plain = choose_keep(2, [1.0, 0.5, 0.1], evaluate, BASE, lambda: None, select="accuracy", **kw)
    assert (plain.best.cell, plain.best.keep) == (0, 0.1)
    assert (rule.best.cell, rule.best.keep) == (1, 0.5)
    assert choose_keep(1, [0.5], lambda c, k, w: (CLOSE, None), BEST, lambda: None, select="1se", **kw).chosen == -1


@pytest.fixture(scope="session")
def setup(sums_setup):
    return sums_setup


ARGS = ["--limit", "12", "--split-seed", "2", "--targets", "all", "--partners", "2", "--n-boot", "50",
        "--eval-mode", "choice", "--quiet", "--no-side-effects"]


def test_run_with_1se_chooses_by_the_rule_on_the_real_sweep(setup, tmp_path):
    report = run_report(setup, tmp_path / "r", *ARGS, "--p", "0.5,0.7,0.9", "--select", "1se")
    # p = 0.5, 0.7, 0.9 tie on dev above the base (test_p_search_run): the rule never takes a stronger tied edit
    assert report["p_search"]["select"] == "1se" and report["chosen_p"] in (0.0, 0.5)
    assert "one paired standard error" in (tmp_path / "r" / "report.md").read_text()


def test_the_default_rule_is_1se_and_its_verdict_says_what_the_base_had_to_lose_by(setup, tmp_path):
    from eigenprune.protocol.config import RunConfig

    assert RunConfig(task="x").select == "1se"  # issue 21: the smaller winner's curse at an equal or better test gain
    default = run_report(setup, tmp_path / "d", *ARGS, "--p", "0.5,0.7,0.9")
    explicit = run_report(setup, tmp_path / "e", *ARGS, "--p", "0.5,0.7,0.9", "--select", "1se")
    assert default["p_search"] == explicit["p_search"] and default["chosen_p"] == explicit["chosen_p"] == 0.0
    best = max(default["sweep"], key=lambda r: r["dev_acc"])
    assert best["p"] == 0.5 and best["dev_acc"] > default["base"]["dev"]["acc"]  # a gain within one SE
    assert (f"by more than one paired standard error (the best, p = 0.5, reached {best['dev_acc']:.3f}), so the run "
            "kept the base model") in default["verdict"]
    from eigenprune.reports.run_report import verdict

    flat = {**default, "sweep": [{**r, "dev_acc": default["base"]["dev"]["acc"]} for r in default["sweep"]]}
    assert verdict(flat).startswith("No p improved dev accuracy over the base model (")  # no gain at all: no SE
    plain = run_report(setup, tmp_path / "a", *ARGS, "--p", "0.5,0.7,0.9", "--select", "accuracy")
    assert plain["chosen_p"] == 0.5 and "one paired standard error" not in plain["verdict"]


def test_compare_with_1se_runs_every_strength_method(setup, tmp_path):
    from eigenprune.cli import main

    model, task = setup
    out = tmp_path / "c"
    code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, "--p", "0.5,0.9", "--select", "1se",
                 "--methods", "eigenprune,smallest,laser,svd-clip", "--set", "laser.kinds=mlp-in",
                 "--set", "laser.keep=0.5,0.1", "--set", "svd-clip.demos=2", "--set", "svd-clip.keep=[1, 0.5]",
                 "--out", str(out)])
    assert code == 0
