"""`--report-to`: what run, compare and study log to TensorBoard and MLflow equals their report files.

Each tracker's files are read back with its own reader (TensorBoard's EventAccumulator, MLflow's MlflowClient on
the local file store) and every number checked against report.json / comparison.json: test accuracy and the
difference from the base with their intervals and p-values, the chosen setting of each fold, every fold's dev
curve point, the plots. wandb is a fake module that records its calls, so it needs no install. `none` (the
default) writes nothing and imports no tracker; a missing package is one line naming the extra, said before
any work; a tracker that fails at logging time is one warning line and the outputs stay.
"""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from helpers import sensitive, write_task

from eigenprune.cli import main
from eigenprune.experiments import tracking
from eigenprune.reports.tracker_record import P_STEP, key

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["--targets", "all", "--partners", "2", "--n-boot", "50", "--split-seed", "2", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def _local_stores():
    """MLflow logs to OUT/mlruns, never to a server the environment names, and allows its file store itself."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE", "WANDB_MODE",
                     "WANDB_PROJECT"):
            mp.delenv(name, raising=False)
        yield


def cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="module")
def ran(sums_setup, tmp_path_factory):
    """`run` on a fixed split (with side effects: three plots), logged to both trackers; (folder, report)."""
    model, task = sums_setup
    out = tmp_path_factory.mktemp("track") / "run"
    cli("run", "--model", model, "--task", task, "--limit", "12", "--p", "0.3,0.5,0.7", *FAST,
        "--report-to", "tensorboard,mlflow", "--out", out)
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def ran_folds(sums_setup, tmp_path_factory):
    model, task = sums_setup
    out = tmp_path_factory.mktemp("track") / "run-folds"
    cli("run", "--model", model, "--task", task, "--limit", "24", "--p", "0.3,0.7", "--folds", "2", *FAST,
        "--select", "loss", "--no-side-effects", "--report-to", "tensorboard", "--out", out)
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def compared(sums_setup, tmp_path_factory):
    """`compare --folds 2` of eigenprune and the random control, logged to both trackers. `--select loss`: the
    folds choose different edits, so a fold logged with another fold's choice shows."""
    model, task = sums_setup
    out = tmp_path_factory.mktemp("track") / "compare"
    cli("compare", "--model", model, "--task", task, "--limit", "20", "--p", "0.1,0.5", "--folds", "2", *FAST,
        "--no-side-effects", "--select", "loss", "--methods", "eigenprune,random", "--set", "random.seeds=2",
        "--report-to", "tensorboard,mlflow", "--out", out)
    return out, json.loads((out / "comparison.json").read_text())


def tensorboard(logdir: Path) -> EventAccumulator:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def points(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def f32(value: float) -> float:
    """What a TensorBoard scalar holds: the number as float32."""
    return float(np.float32(value))


def curve(rows: list[dict]) -> list[tuple[int, float]]:
    """A dev curve as it must be logged: (round(p x 10,000), dev accuracy) per candidate."""
    return [(round(r["p"] * P_STEP), f32(r["dev_acc"])) for r in rows]


def test_tensorboard_holds_the_run_report(ran):
    out, report = ran
    events = tensorboard(out / "tensorboard")
    expect = {"test/base/acc": report["base"]["test"]["acc"], "test/pruned/acc": report["pruned"]["test"]["acc"],
              "test/pruned/lo": report["pruned"]["test"]["lo"], "test/pruned/hi": report["pruned"]["test"]["hi"],
              "dev/pruned/acc": report["pruned"]["dev"]["acc"], "diff/pruned/diff": report["diff_ci"]["diff"],
              "diff/pruned/lo": report["diff_ci"]["lo"], "diff/pruned/hi": report["diff_ci"]["hi"],
              "diff/pruned/p": report["diff_ci"]["p"], "chosen/pruned/p": report["chosen_p"]}
    for tag, value in expect.items():
        assert points(events, tag) == [(0, f32(value))], tag
    assert len(report["sweep"]) == 3
    assert points(events, "dev_curve/pruned/dev_acc") == curve(report["sweep"])
    assert not [t for t in events.Tags()["scalars"] if t.startswith("dev_curve/") and "/test" in t]
    kl = report["side_effects"]["models"]
    for name, row in kl.items():
        if "kl" in row:
            assert points(events, key("side_effects", name, "kl", "value")) == [(0, f32(row["kl"]["value"]))]
    plots = sorted(p.stem for p in out.glob("*.png"))
    assert len(plots) >= 2 and sorted(events.Tags()["images"]) == [f"plots/{p}" for p in plots]
    assert "settings/text_summary" in events.Tags()["tensors"]


def test_tensorboard_has_every_folds_dev_curve_and_choice(ran_folds):
    out, report = ran_folds
    events = tensorboard(out / "tensorboard")
    folds = report["folds"]["per_fold"]
    assert len(folds) == 2 and folds[0]["chosen_p"] != folds[1]["chosen_p"]
    for f in folds:
        assert len(f["sweep"]) == 2
        assert points(events, f"dev_curve/pruned/fold-{f['fold']}/dev_acc") == curve(f["sweep"])
        assert points(events, f"chosen/pruned/fold-{f['fold']}/p") == [(0, f32(f["chosen_p"]))]
    assert points(events, "test/pruned/acc") == [(0, f32(report["pruned"]["test"]["acc"]))]


def test_tensorboard_holds_the_comparison(compared):
    out, report = compared
    events = tensorboard(out / "tensorboard")
    assert points(events, "test/base/acc") == [(0, f32(report["base"]["test"]["acc"]))]
    for name, row in report["methods"].items():
        assert points(events, f"test/{name}/acc") == [(0, f32(row["test"]["acc"]))]
        for k in ("diff", "lo", "hi", "p", "p_adjusted"):  # no exact test (seed-averaged correctness): no p
            value = row["diff_vs_base"][k]
            got = points(events, f"diff/{name}/{k}") if f"diff/{name}/{k}" in events.Tags()["scalars"] else []
            assert got == ([] if value is None else [(0, f32(value))]), (name, k)
        for run in row["runs"]:
            for k, v in run["config"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert points(events, f"chosen/{name}/fold-{run['fold']}/{k}") == [(0, f32(v))]
    sweeps = [part["extra"]["sweep"] for part in report["methods"]["eigenprune"]["extra"]["per_fold"]]
    assert len(sweeps) == 2 and sweeps[0] != sweeps[1]
    assert len({json.dumps(r["config"]) for r in report["methods"]["eigenprune"]["runs"]}) == 2, "folds chose alike"
    for i, sweep in enumerate(sweeps):
        assert points(events, f"dev_curve/eigenprune/fold-{i + 1}/dev_acc") == curve(sweep)
    assert events.Tags()["images"] == ["plots/comparison"]


def mlflow_runs(out: Path, monkeypatch) -> tuple[MlflowClient, list]:
    """The runs in OUT/mlruns (MLflow 3 reads its file store only when allowed; eigenprune allowed it only while
    logging)."""
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=tracking.mlflow_uri(out))
    experiment = client.get_experiment_by_name("eigenprune")
    return client, client.search_runs([experiment.experiment_id])


def history(client: MlflowClient, run_id: str, tag: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))


def test_mlflow_file_store_holds_the_comparison(compared, monkeypatch):
    out, report = compared
    client, runs = mlflow_runs(out, monkeypatch)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    config = json.loads((out / "config.json").read_text())
    assert run.data.params["run.p"] == json.dumps(config["run"]["p"])
    assert run.data.params["run.folds"] == "2" and run.data.params["compare.methods"] == json.dumps(
        config["compare"]["methods"])
    metrics = run.data.metrics
    assert metrics["test/base/acc"] == report["base"]["test"]["acc"]
    for name, row in report["methods"].items():
        assert metrics[f"test/{name}/acc"] == row["test"]["acc"]
        assert metrics[f"test/{name}/lo"] == row["test"]["lo"] and metrics[f"test/{name}/hi"] == row["test"]["hi"]
        for k in ("diff", "lo", "hi", "p", "p_adjusted"):
            assert metrics.get(f"diff/{name}/{k}") == row["diff_vs_base"][k], (name, k)
        for r in row["runs"]:
            assert run.data.params[f"chosen/{name}/fold-{r['fold']}/n_frozen"] == json.dumps(r["config"]["n_frozen"])
    for i, part in enumerate(report["methods"]["eigenprune"]["extra"]["per_fold"]):
        want = sorted((round(r["p"] * P_STEP), r["dev_acc"]) for r in part["extra"]["sweep"])
        assert history(client, run.info.run_id, f"dev_curve/eigenprune/fold-{i + 1}/dev_acc") == want
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"comparison.json", "comparison.md", "comparison.png", "verdict.txt"} <= files


def test_mlflow_file_store_holds_the_run(ran, monkeypatch):
    out, report = ran
    client, runs = mlflow_runs(out, monkeypatch)
    (run,) = runs
    assert run.data.metrics["test/pruned/acc"] == report["pruned"]["test"]["acc"]
    assert run.data.metrics["diff/pruned/p"] == report["diff_ci"]["p"]
    assert run.data.params["chosen/pruned/p"] == json.dumps(report["chosen_p"])
    assert run.data.params["model"] == report["model"] and run.data.params["p"] == "[0.3, 0.5, 0.7]"
    want = sorted((round(r["p"] * P_STEP), r["dev_acc"]) for r in report["sweep"])
    assert history(client, run.info.run_id, "dev_curve/pruned/dev_acc") == want
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md"} | {p.name for p in out.glob("*.png")} <= files


STUDY = """[study]
models = ["model"]
tasks = ["reversed.jsonl", "sums.jsonl"]
targets = ["all"]
methods = ["eigenprune"]

[settings]
limit = 12
split_seed = 2
p = [0.3, 0.5]
partners = "2"
n_boot = 50
side_effects = false
"""


def test_study_logs_one_run_per_cell_and_one_for_the_study(tmp_path, monkeypatch):
    model, tok = sensitive()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    lines = write_task(tmp_path / "sums.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "reversed.jsonl").write_text("".join(reversed(lines)))
    (tmp_path / "study.toml").write_text(STUDY)
    out = tmp_path / "out"
    cli("study", tmp_path / "study.toml", "--out", out, "--quiet", "--report-to", "tensorboard,mlflow")
    study = json.loads((out / "study.json").read_text())
    keys = [c["key"] for c in study["cells"]]
    assert len(keys) == 2
    for cell in study["cells"]:
        events = tensorboard(out / "cells" / cell["key"] / "tensorboard")
        report = json.loads((out / "cells" / cell["key"] / "comparison.json").read_text())
        assert points(events, "test/eigenprune/acc") == [(0, f32(report["methods"]["eigenprune"]["test"]["acc"]))]
        summary = tensorboard(out / "tensorboard")
        d = cell["methods"]["eigenprune"]["diff_vs_base"]  # Holm-adjusted over the whole study
        assert points(summary, f"{cell['key']}/diff/eigenprune/p_adjusted") == [(0, f32(d["p_adjusted"]))]
    client, runs = mlflow_runs(out, monkeypatch)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [r.info.run_name for r in parents] == ["study"]
    assert sorted(r.info.run_name for r in children) == sorted(keys)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    cli("study", tmp_path / "study.toml", "--out", out, "--quiet", "--report-to", "tensorboard,mlflow")  # resumed
    _, runs = mlflow_runs(out, monkeypatch)
    assert len(runs) == 4, "a resumed study logs its summary again, and no skipped cell"
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1, "the summary is replaced"
    for k in keys:
        assert len(list((out / "cells" / k / "tensorboard").glob("events.out.tfevents.*"))) == 1


class FakeWandb(types.ModuleType):
    """The part of wandb's API the adapter uses, recording every call."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.runs: list[dict] = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(init=kwargs, logged=[], artifacts=[], finished=False, summary={})
        run.log = lambda data, step: run.logged.append((step, dict(data)))
        run.log_artifact = run.artifacts.append
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    def Image(self, path):  # noqa: N802 (wandb's name)
        return ("image", path)

    def Artifact(self, name, type):  # noqa: N802, A002
        art = types.SimpleNamespace(name=name, type=type, files=[])
        art.add_file = art.files.append
        return art


def test_wandb_gets_the_comparison(compared, monkeypatch):
    out, report = compared
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert tracking.log_folder(out, ["wandb"])
    (run,) = fake.runs
    assert run.init["dir"] == str(out) and run.init["name"] == out.name and run.init["project"] == "eigenprune"
    assert run.init["config"]["run.folds"] == "2"
    steps = [s for s, _ in run.logged]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), "wandb wants increasing steps"
    logged = {(s, k): v for s, data in run.logged for k, v in data.items()}
    for name, row in report["methods"].items():
        assert logged[(0, f"test/{name}/acc")] == row["test"]["acc"]
        assert run.summary.get(f"diff/{name}/p_adjusted") == row["diff_vs_base"]["p_adjusted"]
    for i, part in enumerate(report["methods"]["eigenprune"]["extra"]["per_fold"]):
        for r in part["extra"]["sweep"]:
            assert logged[(round(r["p"] * P_STEP), f"dev_curve/eigenprune/fold-{i + 1}/dev_acc")] == r["dev_acc"]
    assert ("image", str(out / "comparison.png")) in logged.values()
    (artifact,) = run.artifacts
    assert str(out / "comparison.json") in artifact.files and run.finished


def test_a_failing_tracker_is_one_warning_and_the_outputs_stay(sums_setup, tmp_path, monkeypatch, capsys):
    def broken(summary, children, root):
        raise OSError("disk full\nsecond line")

    monkeypatch.setitem(tracking.TRACKERS, "tensorboard", tracking.Tracker("tensorboard", "tensorboard", broken))
    model, task = sums_setup
    out = tmp_path / "run"
    capsys.readouterr()
    cli("run", "--model", model, "--task", task, "--limit", "12", "--p", "0.5", *FAST, "--no-side-effects",
        "--report-to", "tensorboard", "--out", out)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: --report-to tensorboard failed (OSError: disk full)")
    assert err[0].endswith(f"log it again with: eigenprune track {out} --report-to tensorboard")
    assert (out / "report.json").is_file() and (out / "report.md").is_file() and (out / "edit").is_dir()

    monkeypatch.undo()  # the tracker works again: the command the warning names logs the folder
    cli("track", out, "--report-to", "tensorboard")
    report = json.loads((out / "report.json").read_text())
    assert points(tensorboard(out / "tensorboard"), "test/pruned/acc") == [(0, f32(report["pruned"]["test"]["acc"]))]


PROBE = """
import contextlib, io, json, sys
sys.modules["wandb"] = None  # as if not installed, wherever this runs
from eigenprune.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
heavy = ("torch", "tensorboard", "mlflow", "torch.utils.tensorboard")
print(json.dumps({"code": code, "err": err.getvalue(), "imported": [m for m in heavy if m in sys.modules]}))
"""


def probe(*argv) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv, message", [
    (["run", "--task", "int-mult", "--report-to", "wandb"], "--report-to wandb needs the wandb package: "
                                                             "pip install 'eigenprune[wandb]'"),
    (["compare", "--task", "cb", "--report-to", "tensorboard,wandb"], "pip install 'eigenprune[wandb]'"),
    (["run", "--task", "int-mult", "--report-to", "tensorbord"], "unknown tracker 'tensorbord'"),
    (["run", "--task", "int-mult", "--report-to", "none,mlflow"], "--report-to takes tensorboard, mlflow, wandb"),
    (["track", "{out}", "--report-to", "tensorboard"], "is not a folder"),
    (["track", ".", "--report-to", "wandb"], "pip install 'eigenprune[wandb]'"),
])
def test_a_missing_or_unknown_tracker_is_one_line_before_any_work(argv, message, tmp_path):
    out = tmp_path / "new"
    argv = [a.replace("{out}", str(out)) for a in argv]
    got = probe(*argv, *(["--out", out] if argv[0] != "track" else []))
    lines = got["err"].strip().splitlines()
    assert got["code"] == 2 and len(lines) == 1 and message in lines[0], got
    assert got["imported"] == [], f"imported {got['imported']} before saying so"
    assert not (tmp_path / "new").exists()


def test_none_is_the_default_and_logs_nothing(sums_setup, tmp_path, monkeypatch):
    for module in ("tensorboard", "mlflow", "wandb", "torch.utils.tensorboard"):  # importing one now fails
        monkeypatch.setitem(sys.modules, module, None)
    model, task = sums_setup
    args = ["run", "--model", model, "--task", task, "--limit", "12", "--p", "0.5", *FAST, "--no-side-effects"]
    for out, extra in ((tmp_path / "default", []), (tmp_path / "none", ["--report-to", "none"])):
        cli(*args, *extra, "--out", out)
        assert (out / "report.json").is_file()
        assert not {"tensorboard", "mlruns", "wandb"} & {p.name for p in out.iterdir()}


def test_report_to_parses_like_transformers():
    assert tracking.parse_report_to("none") == ()
    assert tracking.parse_report_to("TensorBoard, mlflow,tensorboard") == ("tensorboard", "mlflow")
    for bad in ("", ",", "all", "none,wandb"):
        with pytest.raises(ValueError, match="--report-to takes"):
            tracking.parse_report_to(bad)


def test_run_seeds_log_each_seeds_dev_curve_and_choice(ran, tmp_path):
    """`run --seeds N` keeps every seed's sweep in `repeats.runs` (read from a copy of a report with two seeds)."""
    from eigenprune.reports.tracker_record import run_record

    out, report = ran
    seeds = [dict(seed=s, base_test=0.5, pruned_test=0.25 * s, diff=0.25 * s - 0.5, chosen_p=p,
                  sweep=[dict(r, dev_acc=r["dev_acc"] / s) for r in report["sweep"]]) for s, p in ((1, 0.3), (2, 0.7))]
    report = dict(report, repeats={"seeds": [1, 2], "runs": seeds, "chosen_p": [0.3, 0.7],
                                   **{k: {"mean": 0.1, "sd": 0.2} for k in ("base_test", "pruned_test", "diff")}})
    (tmp_path / "report.json").write_text(json.dumps(report))
    logged = {}
    for tag, value, step in run_record(tmp_path).scalars:
        logged.setdefault(tag, []).append((step, value))
    for s in seeds:
        want = [(round(r["p"] * P_STEP), r["dev_acc"]) for r in s["sweep"]]
        assert logged[f"dev_curve/pruned/seed-{s['seed']}/dev_acc"] == want
        assert logged[f"chosen/pruned/seed-{s['seed']}/p"] == [(0, s["chosen_p"])]
        assert logged[f"repeats/seed-{s['seed']}/pruned_test"] == [(0, s["pruned_test"])]
    assert logged["repeats/diff/mean"] == [(0, 0.1)]


def test_a_report_that_cannot_be_read_is_a_warning_per_tracker(compared, monkeypatch, capsys):
    out, _ = compared

    def unreadable(folder, every_cell=False):
        raise KeyError("sweep")

    monkeypatch.setattr(tracking, "records", unreadable)
    assert tracking.log_folder(out, ["tensorboard", "mlflow"]) is False
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" failed")[0] for line in err] == ["warning: --report-to tensorboard",
                                                           "warning: --report-to mlflow"]
