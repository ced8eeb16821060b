"""Side effects of every fold's chosen edit: `run --folds` and `compare --folds` measure each fold's choice of
each method through one function (`experiments.fold_side_effects`), the random control over its seeds, and
report each method's mean and range over folds; the study reads the mean."""

import json

import pytest

from eigenprune.cli import main
from eigenprune.experiments.fold_side_effects import spread
from eigenprune.reports.study_report import method_side_effects

COMMON = ["--split-seed", "2", "--targets", "all", "--partners", "2", "--n-boot", "50", "--quiet"]


def _compare(setup, out, *extra) -> dict:
    model, task = setup
    code = main(["compare", "--model", str(model), "--task", str(task), *COMMON, *extra, "--out", str(out)])
    assert code == 0
    return json.loads((out / "comparison.json").read_text())


@pytest.fixture(scope="module")
def folds_report(sums_setup, tmp_path_factory):
    return _compare(sums_setup, tmp_path_factory.mktemp("c") / "c", "--folds", "2", "--p", "0.5,0.7,0.9",
                    "--methods", "eigenprune,random", "--set", "random.seeds=3", "--set", "random.side_effect_seeds=2",
                    "--select", "accuracy")  # both folds edit (on 2 folds of 12 the default, 1se, keeps the base)


def test_every_folds_choice_is_measured(folds_report):
    section = folds_report["side_effects"]
    runs = folds_report["methods"]["eigenprune"]["runs"]
    edited = [r["fold"] for r in runs if r["changed_params"]]
    per = section["per_method"]["eigenprune"]
    assert per["rows"] == [f"eigenprune (fold {k})" for k in edited] and per["unedited"] == len(runs) - len(edited)
    assert len(per["rows"]) + per["unedited"] == 2 and len(edited) == 2  # on this model both folds edit
    for name in per["rows"]:
        assert name in section["models"]
    rand = section["per_method"]["random"]
    rand_edited = [r["fold"] for r in folds_report["methods"]["random"]["runs"] if r["changed_params"]]
    assert rand["rows"] == [f"random (fold {k}, seed {s})" for k in rand_edited for s in (0, 1)]


def test_mean_and_range_are_over_the_folds(folds_report):
    section = folds_report["side_effects"]
    for method, per in section["per_method"].items():
        d = [section["models"][n]["delta_perplexity"]["diff"] for n in per["rows"]] + [0.0] * per["unedited"]
        k = [section["models"][n]["kl"]["value"] for n in per["rows"]] + [0.0] * per["unedited"]
        assert per["delta_perplexity"] == pytest.approx({"mean": sum(d) / len(d), "min": min(d), "max": max(d)})
        assert per["kl"] == pytest.approx({"mean": sum(k) / len(k), "min": min(k), "max": max(k)})
        # the study reads the mean, not fold 1's row
        assert method_side_effects(folds_report, method) == pytest.approx(
            {"Δppl": per["delta_perplexity"]["mean"], "KL": per["kl"]["mean"]})


def test_spread_counts_unedited_folds_as_zero():
    section = {"models": {"a (fold 1)": {"delta_perplexity": {"diff": 6.0}, "kl": {"value": 0.3}},
                          "a (fold 3)": {"delta_perplexity": {"diff": 2.0}, "kl": {"value": 0.1}}}}
    got = spread(section, ["a (fold 1)", None, "a (fold 3)"])
    assert got["delta_perplexity"] == pytest.approx({"mean": 8 / 3, "min": 0.0, "max": 6.0})
    assert got["kl"] == pytest.approx({"mean": 0.4 / 3, "min": 0.0, "max": 0.3})
    assert got["unedited"] == 1 and got["rows"] == ["a (fold 1)", "a (fold 3)"]


def test_run_folds_measures_every_fold_through_the_same_function(sums_setup, tmp_path):
    model, task = sums_setup
    out = tmp_path / "r"
    code = main(["run", "--model", str(model), "--task", str(task), *COMMON, "--eval-mode", "choice",
                 "--p", "0.5,0.9", "--folds", "2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    per = report["side_effects"]["per_method"]["eigenprune"]
    assert len(per["rows"]) + per["unedited"] == 2
    assert all(name.startswith("fold ") and "(p = " in name for name in per["rows"])
    if len(per["rows"]) + per["unedited"] > 1:
        assert "Per method, over every fold" in (out / "report.md").read_text()
