"""Plots and tables that agree with the verdicts: the comparison plot draws each method's paired difference from
report.json (as the verdict tests it), every marker has a legend entry, the side-effects plot draws the paired
Δ perplexity, study columns share one precision, and run's sweep table says what its NLL column is."""

import json

import pytest

from eigenprune.reports.compare_report import plot_comparison, plot_data
from eigenprune.reports.side_effects_report import plot as plot_side_effects
from eigenprune.reports.side_effects_report import plot_data as side_effects_data


def comparison(folds: int = 1) -> dict:
    d = lambda diff, lo, hi, p: {"diff": diff, "lo": lo, "hi": hi, "p": p, "p_adjusted": min(1.0, 2 * p), "n": 80,
                                 "discordant": 12, "mde": 0.12, "interval": "newcombe"}
    report = {"task": "cb", "model": "/a/very/long/path/to/the/model/folder/smollm2-135m",
              "methods_run": ["eigenprune", "random"],
              "base": {"test": {"acc": 0.5, "lo": 0.4, "hi": 0.6, "n": 80}},
              "methods": {"eigenprune": {"test": {"acc": 0.525, "lo": 0.43, "hi": 0.62}, "diff_vs_base": d(
                  0.025, -0.01, 0.06, 0.2), "markers": []},
                          "random": {"test": {"acc": 0.45, "lo": 0.35, "hi": 0.55}, "diff_vs_base": d(
                              -0.05, -0.09, -0.01, 0.01), "markers": [
                              {"acc": 0.4375, "marker": "x", "label": None},
                              {"acc": 0.4625, "marker": "x", "label": None}]}}}
    return report | ({"folds": {"k": folds, "n_tested": 80}} if folds > 1 else {})


@pytest.mark.parametrize("folds", [1, 3])
def test_comparison_plot_draws_the_paired_differences_of_the_report(tmp_path, folds):
    report = comparison(folds)
    drawn = plot_comparison(report, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0 and drawn == plot_data(report)
    for row in drawn:
        d = report["methods"][row["name"]]["diff_vs_base"]
        assert (row["diff"], row["lo"], row["hi"]) == (d["diff"], d["lo"], d["hi"])  # not the accuracies
    random = next(r for r in drawn if r["name"] == "random")
    assert random["significant"] == "loss" and drawn[0]["significant"] is None  # Holm-adjusted 0.02 and 0.4
    assert [m["x"] for m in random["marks"]] == pytest.approx([-0.0625, -0.0375])  # seed acc - base acc
    assert all(m["label"] for m in random["marks"])  # every marker is named in the legend


def test_comparison_plot_legend_names_every_marker(tmp_path):
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig
    Figure.savefig = lambda self, *a, **k: saved.append(self) or original(self, *a, **k)
    try:
        plot_comparison(comparison(), tmp_path / "c.png")
    finally:
        Figure.savefig = original
    texts = [t.get_text() for legend in saved[0].legends for t in legend.get_texts()]
    assert any("random" in t and "seed" in t for t in texts) and any("base model" in t for t in texts)
    assert saved[0].axes[0].get_title() == "cb on smollm2-135m"  # a path would be clipped


def test_side_effects_plot_draws_the_paired_delta_perplexity(tmp_path):
    section = {"model_order": ["base", "eigenprune"], "bootstrap": {"level": 0.95}, "sample": {"documents": 30},
               "models": {"base": {"perplexity": {"value": 40.0, "lo": 38.0, "hi": 42.0}},
                          "eigenprune": {"perplexity": {"value": 41.0, "lo": 39.0, "hi": 43.0},
                                         "delta_perplexity": {"diff": 1.0, "lo": 0.4, "hi": 1.7},
                                         "kl": {"value": 0.01, "lo": 0.008, "hi": 0.012}}}}
    drawn = plot_side_effects(section, tmp_path / "s.png")
    assert drawn == side_effects_data(section)
    assert [(r["name"], r["delta"], r["lo"], r["hi"], r["significant"]) for r in drawn] == [
        ("eigenprune", 1.0, 0.4, 1.7, "gain")]


def test_study_side_effect_columns_share_one_precision():
    from eigenprune.reports.study_report import _num, _side_format

    shown = [_num(v, _side_format("Δppl")) for v in (2920.0, 5.073, 0.00653)]
    assert shown == ["+2920.00", "+5.07", "+0.01"]
    assert {len(_num(v, _side_format("KL")).split(".")[1]) for v in (0.5, 0.01234, 3.0)} == {4}


def test_run_sweep_table_says_what_the_nll_is_and_explains_every_column(tmp_path):
    from test_report import make_report

    from eigenprune.reports.run_report import write_report

    report, scores, removed = make_report()
    write_report(tmp_path, report, scores, removed)
    md = (tmp_path / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| p | tried |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "dev NLL (nats, summed)" in columns
    explained = next(line for line in md.splitlines() if line.startswith("Columns: **p**"))
    for name in ("p", "tried", "components frozen", "dev accuracy", "dev NLL", "test accuracy", "chosen"):
        assert f"**{name}**" in explained
    assert "summed over its answer tokens and over all dev examples" in explained
    json.dumps(report)  # the report stays JSON
