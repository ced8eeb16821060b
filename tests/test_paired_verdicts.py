"""The paired difference every verdict reads (`evaluation.paired`) and its wiring into run and compare reports:
Newcombe's interval and the exact McNemar p stratified by fold, MDE at the observed discordance, the one
significance rule, compare's Holm family recomputed from its per-example rows, and the words of the verdicts."""

import math

import numpy as np
import pytest
import torch
from helpers import sensitive, write_task

from eigenprune.evaluation.paired import holm_family, paired_difference
from eigenprune.evaluation.significance import holm, mcnemar_exact, min_detectable_effect, paired_diff_interval
from eigenprune.evaluation.stats import paired_diff_ci, significance
from eigenprune.protocol.harness import diff_ci


def folds_data(seed: int = 4):
    """Two folds of very different sizes and effects: stratifying changes the interval."""
    rng = np.random.default_rng(seed)
    before = rng.integers(0, 2, 120).astype(float)
    after = before.copy()
    flip = rng.choice(100, 14, replace=False)  # fold 0 (100 examples): mostly gains
    after[flip] = 1 - after[flip]
    after[100:] = 1 - before[100:]  # fold 1 (20 examples): every answer changes
    return before, after, np.r_[np.zeros(100), np.ones(20)]


def test_paired_difference_is_newcombe_and_exact_mcnemar_stratified_by_fold():
    before, after, folds = folds_data()
    d = paired_difference(before, after, folds)
    assert (d.diff, d.lo, d.hi) == paired_diff_interval(before, after, folds)
    assert d.p == mcnemar_exact(before, after, folds)
    assert (d.lo, d.hi) != pytest.approx(paired_diff_interval(before, after)[1:])  # dropping the strata shows
    assert d.n == 120 and d.discordant == int((before != after).sum()) and d.interval == "newcombe"
    assert d.mde == min_detectable_effect(120, d.discordant / 120)


def test_seed_averaged_values_keep_todays_bootstrap_exactly():
    before = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=float)
    after = np.array([0.5, 0.5, 1, 1, 0, 1, 0.5, 0])  # a control averaged over two seeds
    d = paired_difference(before, after, n_boot=300)
    assert (d.diff, d.lo, d.hi) == paired_diff_ci(before, after, n_boot=300)
    assert d.p is None and d.mde is None and d.interval == "bootstrap"


def test_no_discordance_has_no_detectable_effect_but_keeps_a_wide_interval():
    same = np.r_[np.ones(40), np.zeros(40)]
    d = paired_difference(same, same)
    assert d.p == 1.0 and d.discordant == 0 and d.mde is None
    assert d.lo < 0 < d.hi  # not "+0.000 [+0.000, +0.000]"


@pytest.mark.parametrize("n", [40, 80, 400])
@pytest.mark.parametrize("discordance", [0.005, 0.0125, 0.05, 0.2])
def test_reported_interval_keeps_its_coverage(n, discordance):
    """The interval the reports print (`harness.diff_ci`) covers the true difference >= 93% of the time."""
    effect = discordance / 2  # discordant pairs 75:25
    b, c = (discordance - effect) / 2, (discordance + effect) / 2
    tables = np.random.default_rng(n).multinomial(n, [0.7 - b, b, c, 0.3 - c], size=400)
    seen, hits = {}, 0
    for cells in map(tuple, tables):
        if cells not in seen:
            a, bb, cc, dd = cells
            before = torch.tensor([1] * (a + bb) + [0] * (cc + dd), dtype=torch.bool)
            after = torch.tensor([1] * a + [0] * bb + [1] * cc + [0] * dd, dtype=torch.bool)
            r = diff_ci(before, after, n_boot=200)
            seen[cells] = r["lo"] - 1e-12 <= effect <= r["hi"] + 1e-12
        hits += seen[cells]
    assert hits / len(tables) >= 0.93


@pytest.mark.parametrize("d, expected", [
    ({"diff": 0.1, "lo": 0.01, "hi": 0.2, "p": 0.2}, None),  # the exact test decides, not the interval
    ({"diff": 0.1, "lo": -0.01, "hi": 0.2, "p": 0.01}, "gain"),
    ({"diff": -0.1, "lo": -0.2, "hi": -0.01, "p": 0.01, "p_adjusted": 0.06}, None),  # the family's value first
    ({"diff": -0.1, "lo": -0.2, "hi": 0.01, "p": 0.001, "p_adjusted": 0.01}, "loss"),
    ({"diff": 0.1, "lo": 0.01, "hi": 0.2, "p": None, "p_adjusted": None}, "gain"),  # no test: the interval
    ({"diff": 0.1, "lo": -0.01, "hi": 0.2}, None),
])
def test_one_significance_rule(d, expected):
    assert significance(d) == expected


def test_holm_family_adjusts_only_the_tested():
    family = [{"p": 0.01}, {"p": None}, {"p": 0.04}, {"p": 0.03}]
    assert holm_family(family) == 3
    assert [f["p_adjusted"] for f in family] == [pytest.approx(v) if v is not None else None
                                                 for v in (0.03, None, 0.06, 0.06)]


# -------------------------------------------------------------------------------- end to end: compare and run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paired")
    model, tok = sensitive()
    model.save_pretrained(folder / "m")
    tok.save_pretrained(folder / "m")
    return str(folder / "m"), str(write_task(folder / "t.jsonl"))


def run_compare(setup, out, *argv) -> dict:
    import json

    from eigenprune.cli import main

    model, task = setup
    code = main(["compare", "--model", model, "--task", task, "--limit", "20", "--split-seed", "2", "--targets",
                 "all", "--partners", "2", "--n-boot", "100", "--no-side-effects", "--quiet", "--p", "0.5,0.9",
                 "--out", str(out), *argv])
    assert code == 0
    return json.loads((out / "comparison.json").read_text())


@pytest.mark.parametrize("folds", [1, 2])
def test_compare_p_values_are_mcnemar_on_its_rows_and_holm_over_its_methods(setup, tmp_path, folds):
    report = run_compare(setup, tmp_path / "c", "--methods", "eigenprune,laser,smallest", "--folds", str(folds),
                         "--set", "laser.kinds=mlp-in,mlp-out", "--set", "laser.keep=0.5,0.1")
    per = report["per_example"]
    strata = per.get("fold")
    assert (strata is not None) == (folds > 1)
    raw = []
    for name, row in report["methods"].items():
        d = row["diff_vs_base"]
        assert d["p"] == mcnemar_exact(per["base"], per["methods"][name], strata)
        assert (d["diff"], d["lo"], d["hi"]) == pytest.approx(paired_diff_interval(per["base"],
                                                                                   per["methods"][name], strata))
        assert row["test"]["acc"] == pytest.approx(np.mean(per["methods"][name]))
        raw.append(d["p"])
    assert [r["diff_vs_base"]["p_adjusted"] for r in report["methods"].values()] == holm(raw)
    assert report["family"]["size"] == 3 and report["family"]["adjustment"] == "holm"
    assert "Holm-adjusted over this comparison's 3" in report["verdict"]


def test_compare_verdict_states_bounds_power_and_family():
    from eigenprune.reports.compare_report import verdict

    d = {"diff": 0.02, "lo": -0.03, "hi": 0.071, "p": 0.3, "p_adjusted": 0.6, "n": 80, "discordant": 10,
         "mde": 0.095, "interval": "newcombe"}
    report = {"methods": {"m": {"diff_vs_base": d, "test": {"acc": 0.5}}}, "base": {},
              "family": {"size": 2, "alpha": 0.05, "tests": ["m", "k"], "adjustment": "holm"}}
    text = verdict(report)
    assert "no gain larger than +7.1 points (95% upper bound" in text
    assert "exact paired p = 0.300, Holm-adjusted 0.600" in text and "10 of 80 answers changed" in text
    assert "detectable 9.5 points" in text and "Holm-adjusted over this comparison's 2" in text
    assert "did not help" not in text


def test_run_console_says_kept_the_base_model_and_nothing_else():
    from eigenprune.reports.run_report import console_lines

    base = {"acc": 0.5, "lo": 0.4, "hi": 0.6, "n": 80}
    report = {"task": "cb", "chosen_p": 0.0, "base": {"test": base}, "pruned": {"test": base},
              "diff_ci": {"diff": 0.0, "lo": -0.05, "hi": 0.05, "p": 1.0}, "verdict": "V."}
    assert console_lines(report) == ["cb: kept the base model", "V."]
    report["chosen_p"] = 0.1
    line = console_lines(report)[0]
    assert "at p=0.1" in line and "exact paired p = 1.000" in line


def test_run_verdict_gives_the_upper_bound_and_the_detectable_effect():
    from eigenprune.reports.run_report import verdict

    acc = lambda a: {"acc": a, "lo": a - 0.05, "hi": a + 0.05, "n": 80}
    report = {"chosen_p": 0.05, "n_frozen": 3, "sweep": [{"p": 0.05}], "base": {"dev": acc(0.5), "test": acc(0.5)},
              "pruned": {"dev": acc(0.55), "test": acc(0.525)},
              "diff_ci": {"diff": 0.025, "lo": -0.02, "hi": 0.0712, "p": 0.45, "n": 80, "discordant": 16,
                          "mde": min_detectable_effect(80, 16 / 80)}}
    text = verdict(report)
    assert "no gain larger than +7.1 points (95% upper bound)" in text
    assert f"a change of {100 * report['diff_ci']['mde']:.1f} points is detected with 80% power" in text
    assert math.isfinite(report["diff_ci"]["mde"])
