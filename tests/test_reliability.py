"""Fault injection: nothing a user asked for is lost, nothing silently wrong is accepted, and bad input is
one line (exit 2), not a traceback. Two real processes on one --out, killed runs, truncated files, a
negated-weights model in another dtype, files from different scoring runs mixed in one folder."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build
from helpers import EXAMPLES

from eigenprune.artifact import atomic_dir, check_new_dir, load_scores, save_edit, save_scores
from eigenprune.cli import main
from eigenprune.data import encode
from eigenprune.decompose import decompose_targets
from eigenprune.errors import UsageError
from eigenprune.freeze import FreezeConfig
from eigenprune.scoring import ScoreConfig, score
from eigenprune.targets import find_targets

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

# A writer that claims --out, says so, and waits for a go file before (or while) writing it.
WRITER = r"""
import sys, time
from pathlib import Path
from eigenprune.artifact import atomic_dir, check_new_dir
from eigenprune.errors import UsageError
out, name, claimed, go, phase = sys.argv[1:6]
wait = lambda: [time.sleep(0.02) for _ in iter(lambda: Path(go).exists(), True)]
try:
    check_new_dir(out)
    Path(claimed).touch()
    if phase == "before":
        wait()
    with atomic_dir(out) as tmp:
        (tmp / "who").write_text(name)
        if phase == "inside":
            Path(claimed + ".inside").touch()
            wait()
except UsageError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
print(f"wrote {out}")
"""


def writer(tmp_path, out, name, phase="before"):
    claimed, go = tmp_path / f"{name}.claimed", tmp_path / f"{name}.go"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), name, str(claimed), str(go), phase],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, claimed, go


def wait_for(path, proc, timeout=60):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout
        time.sleep(0.02)


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---------------------------------------------------------------- data loss: two runs, one --out
def test_a_second_process_on_a_claimed_out_fails_at_once_and_the_first_keeps_its_output(tmp_path):
    out = tmp_path / "out"
    first, claimed, go = writer(tmp_path, out, "first")
    wait_for(claimed, first)
    second, _, second_go = writer(tmp_path, out, "second")
    second_go.touch()
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2 and one_line(err) and "being written by another eigenprune" in err
    assert f"pid {first.pid}" in err
    go.touch()
    stdout, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert (out / "who").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, no partial


def test_two_cli_runs_racing_for_one_out_leave_exactly_one_complete_output(tmp_path, saved_model_dir):
    out = tmp_path / "scores"
    data = {}
    for n in (4, 6):
        data[n] = tmp_path / f"d{n}.jsonl"
        data[n].write_text("".join(f'{{"prompt": "{a} + {a} =", "answer": " {2 * a}"}}\n' for a in range(n)))
    argv = lambda n: [sys.executable, "-m", "eigenprune", "score", "--model", str(saved_model_dir), "--data",
                      str(data[n]), "--partners", "2", "--quiet", "--out", str(out)]
    procs = {n: subprocess.Popen(argv(n), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in data}
    results = {n: (*proc.communicate(timeout=300), proc.returncode) for n, proc in procs.items()}
    winners = [n for n, (_, _, code) in results.items() if code == 0]
    assert len(winners) == 1, results
    for n, (stdout, err, code) in results.items():
        if n not in winners:
            assert code == 2 and one_line(err) and not stdout, results
            assert "being written by another eigenprune" in err or "already exists" in err
    assert load_scores(out).meta["n_examples"] == winners[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_final_step_never_replaces_what_it_did_not_create(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="appeared while this run was writing it") as info:
        with atomic_dir(out) as tmp:
            (tmp / "ours").write_text("ours")
            out.mkdir()
            (out / "theirs").write_text("theirs")  # not eigenprune: it does not claim first
    assert (out / "theirs").read_text() == "theirs" and not (out / "ours").exists()
    assert str(tmp) in str(info.value) and (tmp / "ours").read_text() == "ours"


# ---------------------------------------------------------------- work lost at the end
def test_an_unwritable_out_is_refused_before_any_work(capsys, tmp_path, scores_dir):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_new_dir(tmp_path / "file" / "sub" / "out")
    code = main(["prune", "--scores", str(tmp_path / "no-scores-here"), "--p", "0.1",
                 "--out", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and "is a file, not a folder" in err  # before reading the scores


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="not writable"):
            check_new_dir(folder / "out")
    finally:
        folder.chmod(0o755)


def test_out_as_a_symlink_to_an_empty_folder_writes_into_the_folder(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with atomic_dir(link) as tmp:
        (tmp / "report.md").write_text("done")
    assert link.is_symlink() and (target / "report.md").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_out_as_the_current_empty_folder_fills_it(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with atomic_dir(".") as tmp:
        (tmp / "report.md").write_text("done")
    assert (here / "report.md").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_leaves_nothing_the_next_run_does_not_clean(tmp_path, sig):
    out = tmp_path / "out"
    proc, claimed, _ = writer(tmp_path, out, "killed", phase="inside")
    wait_for(Path(str(claimed) + ".inside"), proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert f".out.partial-{proc.pid}" in leftovers  # what a killed process cannot clean itself
    with atomic_dir(out) as tmp:  # the lock died with the process; the partial goes with the next claim
        (tmp / "who").write_text("next")
    assert (out / "who").read_text() == "next"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_claim_cleans_partials_of_dead_runs_in_the_same_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".other.partial-{int(dead.stdout)}"
    (stale / "scores").mkdir(parents=True)
    live = tmp_path / f".mine.partial-{os.getppid()}"  # a live process's: kept
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists() and live.exists()


@pytest.fixture
def scores_dir(tmp_path):
    model, tok = build("llama")
    targets = find_targets(model, "key")
    comps = decompose_targets(model, targets)
    scores = score(model, targets, comps, encode(tok, EXAMPLES), tok.pad_token_id, ScoreConfig(partners=2),
                   progress=False)
    from eigenprune.artifact import fingerprint

    meta = {"model": "tiny-llama", "base_fingerprint": fingerprint(model, sorted({t.module_name for t in targets}))}
    return save_scores(tmp_path / "scores", scores, targets, comps, meta)


_unused = (load_scores, save_edit, FreezeConfig)
