"""Ctrl-C and SIGTERM on real `python -m eigenprune` processes: at any moment, imports and model loading
included, one line ("eigenprune: interrupted" / "eigenprune: terminated"), exit 130 / 143, no traceback, and
nothing left behind: no claimed output's lock, no `.OUT.partial-PID` folder, no study cell's lock or partial."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
WORDS = {signal.SIGINT: ("eigenprune: interrupted", 130), signal.SIGTERM: ("eigenprune: terminated", 143)}


def env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "EIGENPRUNE_CACHE": str(tmp_path / "cache"),
            "HF_HUB_OFFLINE": "1"}


def interruptible() -> None:
    """In the child before exec: SIGINT back to its default. A suite started in the background (`make test &`)
    passes SIGINT on ignored, and eigenprune, like any well-behaved program, then leaves it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(tmp_path, *argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "eigenprune", *map(str, argv)], env=env(tmp_path), cwd=tmp_path,
                            preexec_fn=interruptible,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(found, proc: subprocess.Popen, timeout: float = 120) -> None:
    start_time = time.monotonic()
    while not found():
        assert proc.poll() is None, f"ended before the signal: {proc.communicate()}"
        assert time.monotonic() - start_time < timeout, "timed out waiting"
        time.sleep(0.01)


def ended_cleanly(proc: subprocess.Popen, sig: int) -> None:
    """One line, the signal's exit code, no traceback."""
    _, err = proc.communicate(timeout=120)
    line, code = WORDS[sig]
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1:] == [line], err
    assert err.count("\n") == 1, f"more than one line: {err!r}"
    assert proc.returncode == code, (proc.returncode, err)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".lock" in p.name or ".partial-" in p.name
                  or ".tmp-" in p.name)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])  # in the imports of torch and transformers, or loading
def test_a_signal_during_start_up_is_one_line(tmp_path, sums_setup, sig, delay):
    model, task = sums_setup
    proc = start(tmp_path, "run", "--model", model, "--task", task, "--limit", "12", "--p", "0.1",
                 "--no-side-effects", "--quiet", "--out", tmp_path / "out")
    time.sleep(delay)
    proc.send_signal(sig)
    ended_cleanly(proc, sig)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


CONVERTED = """
import os, signal, sys
import eigenprune.cli

def main(argv=None):  # an interrupted import: the library turns KeyboardInterrupt into an ImportError
    try:
        os.kill(os.getpid(), signal.SIG)
        import time; time.sleep(5)
    except KeyboardInterrupt:
        raise ImportError("cannot import name 'dispatch_model' from partially initialized module") from None

eigenprune.cli.main = main
from eigenprune._entry import main as entry
sys.exit(entry())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_that_a_library_turns_into_another_error_is_still_one_line(tmp_path, sig):
    script = CONVERTED.replace("signal.SIG)", f"signal.{sig.name})")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env(tmp_path), preexec_fn=interruptible,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ended_cleanly(proc, sig)


WRITER = """
import sys, time
from pathlib import Path
import eigenprune.cli
from eigenprune.core.outdir import atomic_dir

def main(argv=None):  # a command writing its output folder, stopped while it writes
    with atomic_dir(sys.argv[1]) as tmp:
        (tmp / "half").write_text("x")
        Path(sys.argv[2]).touch()
        time.sleep(60)
    return 0

eigenprune.cli.main = main
from eigenprune._entry import main as entry
sys.exit(entry())
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_writing_an_output_removes_its_partial_folder_and_lock(tmp_path, sig):
    out, inside = tmp_path / "out", tmp_path / "inside"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(inside)], env=env(tmp_path),
                            preexec_fn=interruptible,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(inside.exists, proc)
    assert f".out.partial-{proc.pid}" in leftovers(tmp_path)
    proc.send_signal(sig)
    ended_cleanly(proc, sig)
    assert not out.exists() and leftovers(tmp_path) == []


STUDY = """[study]
models = ["{model}"]
tasks = ["{task}"]
targets = ["key"]
methods = ["eigenprune"]

[settings]
limit = 12
p = [0.1, 0.3]
n_boot = 20
side_effects = false
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_cell_leaves_no_cell_lock_or_partial_and_the_study_resumes(tmp_path, sums_setup, sig):
    model, task = sums_setup
    spec = tmp_path / "s.toml"
    spec.write_text(STUDY.format(model=model, task=task))
    out = tmp_path / "out"
    proc = start(tmp_path, "study", spec, "--out", out, "--quiet")
    wait_until(lambda: any(p.name.endswith(".lock") for p in (out / "cells").glob(".*")), proc)  # a cell started
    proc.send_signal(sig)
    ended_cleanly(proc, sig)
    assert leftovers(out / "cells") == [] and list((out / "cells").iterdir()) == []
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    again = start(tmp_path, "study", spec, "--out", out, "--quiet")  # nothing in the way of the next run
    stdout, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "ran 1 cells, skipped 0" in stdout
    assert leftovers(out / "cells") == []
