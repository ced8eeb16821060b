"""`run --p auto` and `--select`: the search's candidates go through the real experiment, stay in budget, and
the report shows every p tried with both dev numbers; the chosen p follows the selection rule."""


import pytest
from helpers import run_report

from eigenprune.cli import main

ARGS = ["--limit", "12", "--split-seed", "2", "--targets", "all", "--partners", "2", "--n-boot", "50",
        "--eval-mode", "choice", "--quiet"]


@pytest.fixture(scope="session")
def setup(sums_setup):
    return sums_setup


def run(setup, out, *extra) -> dict:
    return run_report(setup, out, *ARGS, *extra)


@pytest.mark.parametrize("budget", [4, 7])
def test_auto_starts_from_the_grid_extends_at_its_edge_and_stays_in_budget(setup, tmp_path, budget):
    report = run(setup, tmp_path / "r", "--p", "auto", "--p-budget", str(budget), "--select", "accuracy+loss")
    tried = [row["p"] for row in report["sweep"]]
    assert tried[:4] == [0.01, 0.05, 0.1, 0.3] and len(tried) == budget and len(set(tried)) == len(tried)
    assert report["p_search"]["tried"] == tried and report["p_search"]["mode"] == "auto"
    assert all("dev_nll" in row and "dev_acc" in row for row in report["sweep"])
    # on this model the grid's dev accuracies tie and the lowest dev NLL sits on its top edge, p = 0.3
    grid = report["sweep"][:4]
    assert len({r["dev_acc"] for r in grid}) == 1 and min(grid, key=lambda r: r["dev_nll"])["p"] == 0.3
    if budget > 4:
        assert tried[4] == 0.5  # so the search went past the edge first
    assert "--p auto" in (tmp_path / "r" / "report.md").read_text()


# on this model p = 0.5, 0.7 and 0.9 tie on dev accuracy (above the base) and the dev NLL falls with p
@pytest.mark.parametrize("select, chosen", [("accuracy", 0.5), ("accuracy+loss", 0.9), ("loss", 0.9)])
def test_the_selection_rule_decides_among_ties(setup, tmp_path, select, chosen):
    report = run(setup, tmp_path / "r", "--p", "0.5,0.7,0.9", "--select", select)
    rows = report["sweep"]
    assert len({r["dev_acc"] for r in rows}) == 1 and report["base"]["dev"]["acc"] < rows[0]["dev_acc"]
    assert sorted(rows, key=lambda r: r["dev_nll"])[0]["p"] == 0.9
    assert report["chosen_p"] == chosen and report["p_search"]["select"] == select


def test_bad_search_settings_are_one_line(setup, tmp_path, capsys):
    model, task = setup
    for extra, message in ((["--p", "sometimes"], "p must be fractions or 'auto'"),
                           (["--p", "auto", "--p-budget", "2"], "p_budget must be at least 4"),
                           (["--select", "vibes"], "select must be one of")):
        code = main(["run", "--model", str(model), "--task", str(task), *ARGS, *extra, "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
