"""`run` reports what the chosen edit costs elsewhere: perplexity and KL on the shipped text sample, and
accuracy on `--also` tasks; `--no-side-effects` skips it."""


import pytest
from helpers import run_report

from eigenprune.cli import main

ARGS = ["--limit", "12", "--split-seed", "2", "--targets", "all", "--p", "0.5,0.9", "--partners", "2",
        "--n-boot", "50", "--eval-mode", "choice", "--quiet",
        "--select", "accuracy"]  # dev chooses p = 0.5; the default rule (1se) keeps the base on 12 examples


def run(setup, out, *extra) -> dict:
    return run_report(setup, out, *ARGS, *extra)


def test_the_chosen_edit_is_measured_beside_the_base(sums_setup, tmp_path):
    report = run(sums_setup, tmp_path / "r", "--also", "int-sum")
    section = report["side_effects"]
    assert report["chosen_p"] == 0.5  # on this split dev prefers an edit (see test_p_search_run)
    assert section["model_order"] == ["base", "edit (p = 0.5)"]
    edit = section["models"]["edit (p = 0.5)"]
    assert edit["kl"]["value"] > 0 and "diff_vs_base" in edit["also"]["int-sum"]
    assert section["sample"]["documents"] > 100
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Side effects" in md and "side_effects.png" in md and (tmp_path / "r" / "side_effects.png").exists()
    assert "side_effects" in report["timings"]


def test_no_side_effects_skips_them(sums_setup, tmp_path):
    report = run(sums_setup, tmp_path / "r", "--no-side-effects")
    assert "side_effects" not in report and "## Side effects" not in (tmp_path / "r" / "report.md").read_text()


def test_an_unknown_also_task_is_one_line(sums_setup, tmp_path, capsys):
    model, task = sums_setup
    code = main(["run", "--model", str(model), "--task", str(task), *ARGS, "--also", "int-div", "--out",
                 str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "int-div" in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="session")
def setup(sums_setup):
    return sums_setup


def test_side_effect_kl_linear_is_recorded_and_said_and_close_to_the_exact_kl(sums_setup, tmp_path):
    from eigenprune.evaluation.side_effects import KL_PATHS
    from eigenprune.protocol.config import RunConfig, compare_settings
    from eigenprune.protocol.defaults import KL_PATHS as FLAG_CHOICES

    assert FLAG_CHOICES == KL_PATHS  # the flag's choices, spelled torch-free, are the probe's
    exact = run(sums_setup, tmp_path / "exact")["side_effects"]["models"]["edit (p = 0.5)"]["kl"]
    linear = run(sums_setup, tmp_path / "linear", "--side-effect-kl", "linear")["side_effects"]
    kl = linear["models"]["edit (p = 0.5)"]["kl"]
    assert "path" not in exact and kl["path"] == "linear" and "path" not in linear["models"]["base"]
    assert kl["value"] == pytest.approx(exact["value"], rel=1e-3)  # float32 rounding apart, the same KL
    assert "by the linear path (`--side-effect-kl linear`)" in (tmp_path / "linear" / "report.md").read_text()
    assert "linear path" not in (tmp_path / "exact" / "report.md").read_text()
    # a comparison (a study cell's identity) records it only off its default, so finished cells keep their hash
    assert "side_effect_kl" not in compare_settings(RunConfig(task="x"))
    assert compare_settings(RunConfig(task="x", side_effect_kl="linear"))["side_effect_kl"] == "linear"
    with pytest.raises(ValueError, match="side_effect_kl must be one of exact, linear"):
        RunConfig(task="x", side_effect_kl="fast")
