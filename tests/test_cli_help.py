"""The command line answers at once and reads well: no torch before a command runs, help a person can read.

Every command's parser is built without torch, and a usage error (a bad flag, an unknown task, an `--out`
that exists, a missing study spec) is said before torch or transformers is imported: a fresh interpreter
runs each case and reports what it imported.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eigenprune.cli import build_parser
from eigenprune.cli.common import TASK_NAMES, Parser, cap_threads, free_cores

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROBE = """
import contextlib, io, json, sys
from eigenprune.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "err": err.getvalue(), "heavy": [m for m in ("torch", "transformers", "numpy")
                                                                  if m in sys.modules]}))
"""


def probe(*argv) -> dict:
    """Run `eigenprune ARGV` in a fresh interpreter: its exit code, stderr, and which heavy modules it imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], capture_output=True, text=True,
                          env={"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def taken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taken")
    (folder / "something").write_text("x")
    return folder


CASES = {
    "help": (lambda t: ["--help"], 0, ""),
    "run help": (lambda t: ["run", "--help"], 0, ""),
    "study help": (lambda t: ["study", "--help"], 0, ""),
    "track help": (lambda t: ["track", "--help"], 0, ""),
    "unknown tracker": (lambda t: ["compare", "--task", "cb", "--report-to", "tensorbord"], 2, "unknown tracker"),
    "bad flag": (lambda t: ["run", "--task", "int-mult", "--bogus"], 2, "unrecognized arguments: --bogus"),
    "bad value": (lambda t: ["run", "--task", "int-mult", "--p", "2"], 2, "p values must be in (0, 1)"),
    "unknown task": (lambda t: ["run", "--task", "int-mul", "--out", t / "new"], 2, "unknown task 'int-mul'"),
    "missing task file": (lambda t: ["compare", "--task", "x/y.jsonl"], 2, "task file not found"),
    "out exists (run)": (lambda t: ["run", "--task", "int-mult", "--out", t], 2, "already exists"),
    "out exists (compare)": (lambda t: ["compare", "--task", "cb", "--out", t], 2, "already exists"),
    "out exists (prune)": (lambda t: ["prune", "--scores", t, "--p", "0.1", "--out", t], 2, "already exists"),
    "export without --merge": (lambda t: ["export", "--edit", t, "--out", t / "m"], 2, "needs --merge"),
    "missing spec": (lambda t: ["study", t / "nope.toml"], 2, "study spec not found"),
    "bad --set": (lambda t: ["compare", "--task", "cb", "--set", "laser.keep"], 2, "expected METHOD.FIELD=VALUE"),
    "bad --threads": (lambda t: ["run", "--task", "cb", "--threads", "0"], 2, "--threads must be at least 1"),
}


@pytest.mark.parametrize("case", CASES)
def test_usage_errors_and_help_import_no_torch(case, taken):
    argv, code, message = CASES[case]
    result = probe(*argv(taken))
    assert result["code"] == code, result["err"]
    assert message in result["err"]
    if code:
        assert len(result["err"].strip().splitlines()) == 1, result["err"]  # one line, no traceback
    assert result["heavy"] == [], f"{case} imported {result['heavy']}"


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices), {a.dest: a.help for a in action._choices_actions}


def test_every_command_and_flag_says_what_it_is():
    commands, summaries = subparsers(build_parser())
    assert set(commands) == {"run", "compare", "study", "targets", "score", "prune", "export", "generate", "lm-eval",
                             "track"}
    for name, parser in commands.items():
        assert summaries[name] and "\n" not in summaries[name], name  # a one-line description in `eigenprune --help`
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings} has no help text"


def test_compare_help_is_short_and_hides_legacy_flags(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    commands, _ = subparsers(build_parser())
    text = commands["compare"].format_help()
    assert len(text.splitlines()) <= 120
    assert "LEGACY" not in text and ":" not in "".join(a.metavar or "" for a in commands["compare"]._actions)
    assert "--laser-keep" not in text and "--set laser.FIELD=VALUE" in text  # the registry's methods, built lazily
    assert "lora (a learned stage" in text


def test_legacy_flags_still_work_with_a_note(capsys):
    from eigenprune.cli.compare import method_args

    args = build_parser().parse_args(["compare", "--task", "cb", "--laser-keep", "0.5,0.1", "--set", "lora.steps=5"])
    assert method_args(args) == {"laser": {"keep": "0.5,0.1"}, "lora": {"steps": "5"}}
    assert "--laser-keep is deprecated; use --set laser.keep=0.5,0.1" in capsys.readouterr().err


def test_static_tables_match_what_they_stand_for():
    """The parser's torch-free copies: the legacy flags are the registry's `flags=`, the task names the tasks'."""
    from eigenprune.cli.compare import LEGACY_FLAGS
    from eigenprune.evaluation.tasks import BUILTIN_TASKS
    from eigenprune.methods import registry

    registered = {flag: (name, field) for name, m in registry.methods().items() for flag, field in m.flags.items()}
    assert LEGACY_FLAGS == registered
    assert TASK_NAMES == tuple(BUILTIN_TASKS)


def test_lazy_epilog_is_built_only_for_help():
    calls = []
    parser = Parser(prog="x", lazy_epilog=lambda: calls.append(1) or "\nlater")
    parser.add_argument("--a", help="a")
    parser.parse_args(["--a", "1"])
    assert calls == []
    assert parser.format_help().rstrip().endswith("later") and calls == [1]


def test_threads_are_capped_to_free_cores(monkeypatch):
    import torch

    from eigenprune.cli import common

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(common, "other_runnable", lambda: cores + 8.0)
    assert free_cores() == 1  # a busy machine: one thread
    monkeypatch.setattr(common, "other_runnable", lambda: 0.0)
    assert free_cores() == cores  # a quiet one: every core
    monkeypatch.undo()
    assert 0.0 <= common.other_runnable() < 1000  # the real reading: this process is not counted
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cap_threads(None) is None and torch.get_num_threads() == 2  # torch already loaded: left alone
        assert cap_threads(1) == 1 and torch.get_num_threads() == 1  # unless --threads says
    finally:
        torch.set_num_threads(before)
    script = "from eigenprune.cli.common import cap_threads; n = cap_threads(None); import torch; print(n, " \
             "torch.get_num_threads())"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    n, threads = map(int, result.stdout.split())
    assert n == threads  # set before torch was imported: torch starts with that many threads
