"""A study is one family of tests: study.json's adjusted p-values are holm() of the raw p-values recomputed from
the cells' per-example correctness (stratified by fold where the cell used folds), "significant" and bold follow
the adjusted value, cells that cannot detect a 5-point gain are marked, and `study --plan` prints the n needed."""

import numpy as np
import pytest

from eigenprune.evaluation.paired import paired_difference
from eigenprune.evaluation.significance import holm, mcnemar_exact, min_detectable_effect, n_needed
from eigenprune.reports.study_report import build, render_markdown, summarize_cell


def cell_report(base, methods: dict, folds=None) -> dict:
    """A comparison.json as compare writes it, from per-example correctness."""
    rows = {}
    for name, after in methods.items():
        d = paired_difference(base, after, folds).to_dict()
        rows[name] = {"test": {"acc": float(np.mean(after)), "lo": 0.0, "hi": 1.0, "n": len(after)},
                      "dev": {"acc": 0.5}, "config": {}, "diff_vs_base": d | {"p_adjusted": d["p"]},
                      "dev_evaluations": 1, "changed_params": 1, "wall_s": 1.0}
    per = {"base": list(base), "methods": {k: list(v) for k, v in methods.items()}}
    if folds is not None:
        per["fold"] = list(folds)
    return {"eval_mode": "choice", "split_sizes": {"test": len(base)}, "implicit": [], "verdict": "",
            "methods_run": list(methods), "base": {"dev": {"acc": 0.5}, "test": {"acc": float(np.mean(base)),
                                                                               "n": len(base)}},
            "methods": rows, "per_example": per} | ({"folds": {"k": 2}} if folds is not None else {})


def changed(base: np.ndarray, gains: int, losses: int, start: int = 0) -> np.ndarray:
    """`base` with `gains` wrong answers made right and `losses` right answers made wrong."""
    after = base.copy()
    wrong, right = np.flatnonzero(base == 0)[start:], np.flatnonzero(base == 1)[start:]
    after[wrong[:gains]], after[right[:losses]] = 1, 0
    return after


def study_of(*reports) -> dict:
    cells = [summarize_cell({"key": f"k{i}", "dir": f"cells/k{i}", "model": "m", "task": f"t{i}", "targets": "key"},
                            r) for i, r in enumerate(reports)]
    spec = {"study": {"models": ["m"], "tasks": [f"t{i}" for i in range(len(reports))], "targets": ["key"],
                      "methods": ["a", "b"]}}
    return build(spec, "s.toml", cells, {})


@pytest.fixture
def study():
    base = np.r_[np.ones(60), np.zeros(60)]
    folds = np.r_[np.zeros(70), np.ones(50)]
    one = cell_report(base, {"a": changed(base, 9, 0), "b": changed(base, 6, 0)})  # raw p < 0.05 each
    two = cell_report(base, {"a": changed(base, 8, 0, 3), "b": changed(base, 2, 2)}, folds)
    return study_of(one, two), (one, two)


def test_adjusted_p_values_are_holm_of_p_values_recomputed_from_per_example_data(study):
    study, reports = study
    raw, adjusted = [], []
    for cell, report in zip(study["cells"], reports, strict=True):
        per = report["per_example"]
        for name, row in cell["methods"].items():
            assert row["diff_vs_base"]["p"] == mcnemar_exact(per["base"], per["methods"][name], per.get("fold"))
            raw.append(row["diff_vs_base"]["p"])
            adjusted.append(row["diff_vs_base"]["p_adjusted"])
    assert adjusted == holm(raw)
    assert study["family"]["size"] == 4 and study["family"]["adjustment"] == "holm"
    assert adjusted != pytest.approx([min(1.0, 4 * p) for p in raw])  # Holm, not Bonferroni


def test_stratified_cells_keep_their_fold_strata_in_the_interval(study):
    study, (_, two) = study
    d = study["cells"][1]["methods"]["a"]["diff_vs_base"]
    per = two["per_example"]
    stratified = paired_difference(per["base"], per["methods"]["a"], per["fold"])
    pooled = paired_difference(per["base"], per["methods"]["a"])
    assert (d["lo"], d["hi"]) == (stratified.lo, stratified.hi) != (pooled.lo, pooled.hi)


def test_significant_and_bold_follow_the_adjusted_p_value(study):
    study, _ = study
    rows = [r for c in study["cells"] for r in c["methods"].values()]
    for r in rows:
        d = r["diff_vs_base"]
        assert (r["significant"] == "gain") == (d["p_adjusted"] < 0.05 and d["diff"] > 0)
    first_b = study["cells"][0]["methods"]["b"]["diff_vs_base"]
    assert first_b["p"] < 0.05 <= first_b["p_adjusted"]  # significant alone, not in the family
    md = render_markdown(study, heatmap=None)
    line = next(x for x in md.splitlines() if x.startswith("| m | t0 | key | b |"))
    assert "**" not in line and "▲" not in line
    line = next(x for x in md.splitlines() if x.startswith("| m | t0 | key | a |"))
    assert "**" in line and "▲ gain" in line
    assert "Holm-adjusted together" in md and "4 method − base test differences" in md


def test_cells_that_cannot_detect_five_points_are_marked(study):
    study, _ = study
    for cell in study["cells"]:
        for r in cell["methods"].values():
            d = r["diff_vs_base"]
            expected = d["mde"] is None or d["mde"] > 0.05
            assert r["cannot_detect_5pt"] == expected
            mde = min_detectable_effect(d["n"], d["discordant"] / d["n"])
            assert d["mde"] is None or d["mde"] == pytest.approx(mde)
    assert any(r["cannot_detect_5pt"] for c in study["cells"] for r in c["methods"].values())
    assert "†" in render_markdown(study, heatmap=None)


def test_study_plan_prints_the_n_needed(tmp_path, capsys):
    from helpers import sensitive, write_task

    from eigenprune.cli import main

    write_task(tmp_path / "sums.jsonl")
    model, tok = sensitive()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "s.toml").write_text('[study]\nmodels = ["model"]\ntasks = ["sums.jsonl"]\ntargets = ["all"]\n'
                                     'methods = ["eigenprune"]\n\n[settings]\nlimit = 40\n')
    code = main(["study", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--plan"])
    out = capsys.readouterr().out
    assert code == 0 and "discordance unknown" in out and "--assume-discordance" in out
    code = main(["study", str(tmp_path / "s.toml"), "--out", str(tmp_path / "o"), "--plan", "--assume-discordance",
                 "0.2", "--effect", "0.1"])
    out = capsys.readouterr().out
    assert code == 0 and f"{n_needed(0.1, 0.2)} examples needed for 10.0 points" in out
    assert "20.0% of answers change" in out


def test_winners_curse_is_mean_dev_gain_minus_mean_test_gain_over_folds():
    """Hand-computed: two folds, dev gains +0.10 and +0.30, test gains +0.05 and −0.05 → curse 0.20 − 0.00."""
    base = np.r_[np.ones(10), np.zeros(10)]
    report = cell_report(base, {"a": changed(base, 1, 0), "ctl": base.copy()}, np.r_[np.zeros(10), np.ones(10)])
    report["folds"] |= {"per_fold": [{"base_dev_acc": 0.5, "base_test_acc": 0.4},
                                     {"base_dev_acc": 0.2, "base_test_acc": 0.6}]}
    report["methods"]["a"]["runs"] = [{"fold": 1, "dev_acc": 0.6, "test_acc": 0.45},
                                      {"fold": 2, "dev_acc": 0.5, "test_acc": 0.55}]
    report["methods"]["ctl"]["dev_evaluations"] = 0  # chose nothing on dev: no curse
    study = study_of(report)
    curse = study["cells"][0]["methods"]["a"]["winners_curse"]
    assert (curse["dev_gain"], curse["test_gain"], curse["curse"]) == pytest.approx((0.2, 0.0, 0.2))
    assert study["cells"][0]["methods"]["ctl"]["winners_curse"] is None
    assert study["winners_curse"]["a"]["curse"] == pytest.approx(0.2) and "ctl" not in study["winners_curse"]
    text = render_markdown(study, heatmap=None)
    assert "| +0.200 (+0.200 − +0.000) |" in text and "Winner's curse over the study" in text


def test_winners_curse_on_a_fixed_split_uses_the_one_split():
    base = np.r_[np.ones(10), np.zeros(10)]
    report = cell_report(base, {"a": changed(base, 2, 0)})  # test gain +0.10
    report["methods"]["a"]["dev"] = {"acc": 0.8}  # dev gain +0.30 over the base's 0.5
    curse = study_of(report)["cells"][0]["methods"]["a"]["winners_curse"]
    assert (curse["dev_gain"], curse["test_gain"], curse["curse"]) == pytest.approx((0.3, 0.1, 0.2))
