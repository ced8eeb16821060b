"""`eigenprune run` end to end on a tiny model: complete directory, honest selection, bit-exact rerun."""

import json

import pytest
import torch
from helpers import without_timings

from eigenprune.cli import main
from eigenprune.experiments import run as experiment
from eigenprune.protocol.config import RunConfig
from eigenprune.protocol.harness import Harness
from eigenprune.protocol.search import Candidate, Step, choose


def stable(report: dict) -> dict:
    return without_timings(report)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, saved_model_dir):
    out = tmp_path_factory.mktemp("runs") / "mult"
    code = main(["run", "--model", str(saved_model_dir), "--task", "int-mult", "--limit", "12", "--p", "0.05,0.3",
                 "--out", str(out), "--quiet", "--n-boot", "200"])
    assert code == 0
    return out


def test_run_writes_a_complete_directory(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"report.json", "report.md", "config.json", "edit", "scores", "accuracy_vs_p.png"} <= names
    report = json.loads((finished_run / "report.json").read_text())
    for key in ("model", "task", "targets", "eval_mode", "split_seed", "split_sizes", "base", "pruned", "chosen_p",
                "sweep", "diff_ci", "timings", "verdict"):
        assert key in report, key
    assert report["split_sizes"] == {"train": 12, "dev": 12, "test": 12}
    assert report["eval_mode"] == "exact"
    assert [row["p"] for row in report["sweep"]] == [0.05, 0.3]
    assert set(report["timings"]) >= {"load", "base_eval", "scoring", "sweep"}
    assert report["chosen_p"] in (0.0, 0.05, 0.3)


def test_config_records_the_chosen_p_not_a_freeze_p(finished_run):
    """config.json holds what was chosen (the saved edit's p), and no `freeze.p`, which a run never applies."""
    config = json.loads((finished_run / "config.json").read_text())
    report = json.loads((finished_run / "report.json").read_text())
    assert "p" not in config["freeze"]
    assert config["chosen"]["p"] == report["chosen_p"]
    assert config["chosen"]["n_frozen"] == report["n_frozen"]
    assert config["p"] == [0.05, 0.3]  # the fractions tried


def test_an_old_config_with_freeze_p_still_reruns(finished_run, tmp_path):
    """config.json files written before `chosen` carry `freeze.p: 0.0` and no `chosen`: they load unchanged."""
    from eigenprune.protocol.config import config_from_file, to_json

    config = json.loads((finished_run / "config.json").read_text())
    old = {k: v for k, v in config.items() if k != "chosen"}
    old["freeze"] = {**old["freeze"], "p": 0.0}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert config_from_file(tmp_path / "old.json") == config_from_file(finished_run / "config.json")
    assert to_json(config_from_file(tmp_path / "old.json")) == {k: v for k, v in config.items()
                                                                 if k not in ("chosen", "recorded")}


def test_config_rerun_reproduces_the_report(finished_run, tmp_path):
    code = main(["run", "--config", str(finished_run / "config.json"), "--out", str(tmp_path / "again"), "--quiet"])
    assert code == 0
    first = json.loads((finished_run / "report.json").read_text())
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert stable(again) == stable(first)


def test_device_map_auto_runs_the_same_experiment(finished_run, tmp_path, saved_model_dir):
    """accelerate's placement (one CPU here) changes nothing; config.json keeps it for a rerun."""
    out = tmp_path / "auto"
    code = main(["run", "--model", str(saved_model_dir), "--task", "int-mult", "--limit", "12", "--p", "0.05,0.3",
                 "--out", str(out), "--quiet", "--n-boot", "200", "--device-map", "auto"])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["device_map"] == "auto"
    first, auto = (json.loads((d / "report.json").read_text()) for d in (finished_run, out))
    assert stable(auto) == stable(first)


def test_a_failed_run_leaves_no_directory(tmp_path, saved_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("eigenprune.reports.run_report.write_report", broken)
    with pytest.raises(RuntimeError):
        main(["run", "--model", str(saved_model_dir), "--task", "int-mult", "--limit", "6", "--p", "0.1",
              "--out", str(tmp_path / "r"), "--quiet", "--n-boot", "50"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("base, devs, expected", [
    (0.5, [0.4, 0.5], 0.0),  # nothing beats the base model: keep it
    (0.5, [0.6, 0.6], 0.01),  # ties go to the smaller p
    (0.5, [0.4, 0.7], 0.1),
])
def test_choice_of_p_uses_dev_and_keeps_base_when_nothing_helps(base, devs, expected):
    steps = [Step(0.0, Candidate(base, 1.0), "base")] + [Step(p, Candidate(d, 1.0), "grid")
                                                        for p, d in zip((0.01, 0.1), devs, strict=True)]
    assert choose(steps, "accuracy").value == expected


def test_test_split_never_influences_the_choice(saved_model_dir, monkeypatch, tmp_path):
    """Scramble every test evaluation: the chosen p and the dev numbers must not move."""
    reports = []
    for scramble in (False, True):
        original = Harness.evaluate

        def evaluate(self, split, original=original, scramble=scramble):
            correct = original(self, split)
            return torch.ones_like(correct) if scramble and split == "test" else correct

        monkeypatch.setattr(Harness, "evaluate", evaluate)
        cfg = RunConfig(task="int-mult", model=str(saved_model_dir), limit=10, p=[0.05, 0.3], n_boot=50)
        reports.append(experiment.execute(cfg, tmp_path / f"r{scramble}", quiet=True))
    assert reports[0]["chosen_p"] == reports[1]["chosen_p"]
    assert [r["dev_acc"] for r in reports[0]["sweep"]] == [r["dev_acc"] for r in reports[1]["sweep"]]


@pytest.mark.parametrize("kwargs, field", [({"p": []}, "p"), ({"p": [1.0]}, "p"), ({"seeds": 0}, "seeds"),
                                           ({"eval_mode": "x"}, "eval_mode"), ({"dev_fraction": 1.0}, "dev_fraction")])
def test_run_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RunConfig(task="int-mult", **kwargs)


def test_seeds_report_mean_and_sd(saved_model_dir, tmp_path):
    cfg = RunConfig(task="int-mult", model=str(saved_model_dir), limit=8, p=[0.1], seeds=2, n_boot=50)
    report = experiment.execute(cfg, tmp_path / "r", quiet=True)
    assert report["repeats"]["seeds"] == [0, 1]
    assert set(report["repeats"]["pruned_test"]) == {"mean", "sd"}


def test_examples_longer_than_the_context_are_a_usage_error(saved_model_dir, tmp_path, capsys):
    code = main(["run", "--model", str(saved_model_dir), "--task", "cb", "--limit", "4", "--out", str(tmp_path / "r"),
                 "--quiet"])
    assert code == 2 and "the model takes at most 256" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_an_edit_that_changes_nothing_is_not_chosen(saved_model_dir, monkeypatch, tmp_path):
    """Regression: base dev accuracy was a float32 mean, the sweep's a float64 one; 7/10 rounds down in float32,
    so an edit with exactly the base's answers looked better than the base and was chosen."""
    monkeypatch.setattr(Harness, "evaluate", lambda self, split: torch.tensor([True] * 7 + [False] * 3))
    cfg = RunConfig(task="int-mult", model=str(saved_model_dir), limit=6, p=[0.05, 0.3], n_boot=50)
    report = experiment.execute(cfg, tmp_path / "r", quiet=True)
    assert report["chosen_p"] == 0.0
