"""`run --folds K`: every pooled example tested exactly once, never seen by its own fold's choices; the report
pools per-example results with fold-stratified CIs; `--folds 1` is today's run."""


import pytest
from helpers import run_report, without_timings

from eigenprune.cli import main
from eigenprune.protocol import harness as harness_module

ARGS = ["--split-seed", "2", "--targets", "all", "--p", "0.3,0.7", "--partners", "2", "--n-boot", "50",
        "--eval-mode", "choice", "--quiet"]


@pytest.fixture(scope="session")
def setup(sums_setup):
    return sums_setup


def run(setup, out, *extra) -> dict:
    return run_report(setup, out, *ARGS, *extra)


@pytest.fixture(scope="module")
def folded(setup, tmp_path_factory):
    """A 3-fold run, with the splits every Harness was built on."""
    seen = []
    plain = harness_module.Harness.__init__

    def record(self, model, tokenizer, splits, *args, **kwargs):
        seen.append(splits)
        plain(self, model, tokenizer, splits, *args, **kwargs)

    out = tmp_path_factory.mktemp("runs") / "f3"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness_module.Harness, "__init__", record)
        report = run(setup, out, "--folds", "3", "--limit", "30")
    return report, seen, out


def test_every_example_is_tested_once_and_never_seen_by_its_own_fold(folded):
    report, seen, _ = folded
    assert len(seen) == 3
    tested = [(ex.prompt, tuple(ex.choices)) for fold in seen for ex in fold.test]
    assert len(tested) == len(set(tested)) == report["folds"]["n_tested"] == 30
    for fold in seen:
        test = {(ex.prompt, tuple(ex.choices)) for ex in fold.test}
        assert not test & {(ex.prompt, tuple(ex.choices)) for ex in fold.train + fold.dev}
    assert report["base"]["test"]["n"] == report["pruned"]["test"]["n"] == 30
    assert [r["n_test"] for r in report["folds"]["per_fold"]] == [len(f.test) for f in seen]


def test_pooled_accuracy_is_the_folds_weighted_mean(folded):
    report, _, out = folded
    rows = report["folds"]["per_fold"]
    for key, model in (("base_test", "base"), ("pruned_test", "pruned")):
        pooled = sum(r[key] * r["n_test"] for r in rows) / sum(r["n_test"] for r in rows)
        assert report[model]["test"]["acc"] == pytest.approx(pooled)
    assert report["diff_ci"]["diff"] == pytest.approx(report["pruned"]["test"]["acc"] - report["base"]["test"]["acc"])
    per = report["folds"]["per_example"]
    for row in rows:  # each pooled result sits with its own fold's examples
        mine = [i for i, f in enumerate(per["fold"]) if f == row["fold"]]
        assert sum(per["base"][i] for i in mine) / len(mine) == pytest.approx(row["base_test"])
        assert sum(per["edited"][i] for i in mine) / len(mine) == pytest.approx(row["pruned_test"])
    assert len({r["pruned_test"] for r in rows}) > 1  # else a swap of folds would go unseen
    md = (out / "report.md").read_text()
    assert "## Folds" in md and "Across 3 cross-fitted folds (30 examples" in md and "stratified by fold" in md
    assert sorted(p.name for p in (out / "folds").iterdir()) == ["fold-1", "fold-2", "fold-3"]


def test_choices_do_not_depend_on_test(folded, setup, tmp_path, monkeypatch):
    report, _, _ = folded
    plain = harness_module.Harness.evaluate
    monkeypatch.setattr(harness_module.Harness, "evaluate",
                        lambda self, split: ~plain(self, split) if split == "test" else plain(self, split))
    flipped = run(setup, tmp_path / "flip", "--folds", "3", "--limit", "30")
    assert [r["chosen_p"] for r in flipped["folds"]["per_fold"]] == [r["chosen_p"] for r in report["folds"]["per_fold"]]
    assert flipped["base"]["test"]["acc"] == pytest.approx(1 - report["base"]["test"]["acc"])


def test_one_fold_is_the_fixed_split(setup, tmp_path):
    plain = run(setup, tmp_path / "a", "--limit", "12")
    one = run(setup, tmp_path / "b", "--limit", "12", "--folds", "1")
    assert without_timings(plain) == without_timings(one) and "folds" not in one


def test_folds_and_seeds_together_are_refused(setup, tmp_path, capsys):
    model, task = setup
    code = main(["run", "--model", str(model), "--task", str(task), *ARGS, "--folds", "3", "--seeds", "2",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "choose one way to repeat" in capsys.readouterr().err
