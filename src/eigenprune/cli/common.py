"""What every subcommand's parser shares, all of it importable without torch.

`eigenprune --help`, a mistyped flag, an unknown task or an `--out` that exists answer in well under a
second: the parsers are built from torch-free config dataclasses, these checks run before any command
imports torch or transformers, and the commands import the work they do inside their `cmd_*` functions.
`cap_threads` keeps torch from starting more compute threads than the machine has free cores.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from eigenprune.core import settings
from eigenprune.core.errors import UsageError

FMT = argparse.RawDescriptionHelpFormatter
# the built-in tasks (`evaluation.tasks.BUILTIN_TASKS`, which imports torch; a test keeps the two equal)
TASK_NAMES = ("int-sum", "int-mult", "cb", "copa", "rte")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit 2), like every other usage error, and an
    epilog part that is costly to build (`compare`'s method list imports every method) is built only when
    the help is printed."""

    def __init__(self, *args, lazy_epilog: Callable[[], str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_epilog = lazy_epilog

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        if self.lazy_epilog is not None:
            self.epilog = (self.epilog or "") + self.lazy_epilog()
            self.lazy_epilog = None
        return super().format_help()


def from_flags(cls, args: argparse.Namespace):
    """A config from the flags `settings.add_flags` made for it; a bad value is one line."""
    try:
        return settings.from_dict(cls, settings.flag_values(args, cls))
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_task(name: str | None) -> None:
    """An unknown task name or a missing task file, said at once (the same words `load_task` uses)."""
    if name is None or name in TASK_NAMES or Path(name).expanduser().exists():
        return
    if not name.endswith(".jsonl") and "/" not in name:
        raise UsageError(f"unknown task {name!r}; built-in tasks: {', '.join(TASK_NAMES)} "
                         "(or give a path to a JSONL file)")
    raise UsageError(f"task file not found: {Path(name).expanduser()} (built-in tasks: {', '.join(TASK_NAMES)})")


def check_out(out: str | Path | None) -> None:
    """An `--out` that holds something, or cannot be written, said before any import or work (nothing claimed:
    the command claims it when it starts)."""
    if out is not None:
        from eigenprune.core.outdir import check_new_dir

        check_new_dir(out, claim=False)


def other_runnable() -> float:
    """How many other processes want a core now: /proc/loadavg's runnable count less this process. An
    instantaneous count, not the 1-minute load average, which lags: right after `make test` it still says one
    core is busy, and a demo started then would run on one thread of an idle machine. Elsewhere, the 1-minute
    load average."""
    try:
        runnable = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
        return max(0.0, float(runnable) - 1.0)
    except (OSError, IndexError, ValueError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


def free_cores() -> int:
    """The cores this process may use (its CPU affinity) less the ones other processes keep busy now
    (`other_runnable`), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, round(cores - other_runnable())))


def cap_threads(threads: int | None) -> int | None:
    """Set torch's compute threads: `threads` (--threads) if given, else OMP_NUM_THREADS if set, else the free
    cores. torch starts one thread per physical core whatever else runs; on a busy machine those threads wait on
    each other and cost CPU time for nothing. Before torch is imported this sets OMP_NUM_THREADS (read once, at
    import); after, `torch.set_num_threads` (a caller that imported torch first keeps its own setting unless
    --threads says otherwise). Returns the thread count set, or None when it left torch alone."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if "torch" in sys.modules:
        if threads is None:
            return None
        import torch

        torch.set_num_threads(threads)
        return threads
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        threads = free_cores()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def add_common(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    """--threads on every command that computes, and --quiet where there are progress bars."""
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (default: OMP_NUM_THREADS, else the cores other processes leave free)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")


def report_to_names(text: str) -> tuple[str, ...]:
    from eigenprune.experiments.tracking import parse_report_to  # torch-free, imports no tracker

    try:
        return parse_report_to(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_report_to(p: argparse.ArgumentParser) -> None:
    """--report-to on run, compare and study (transformers' `report_to` convention)."""
    p.add_argument("--report-to", type=report_to_names, default=(), metavar="TRACKERS",
                   help="log the finished report (settings, dev curves, choices, test results, plots) to "
                        "tensorboard, mlflow and/or wandb, each an extra (default: none)")


def check_report_to(names: tuple[str, ...]) -> None:
    """A tracker whose package is missing, said before any work (one line naming the extra)."""
    if names:
        from eigenprune.experiments.tracking import check_installed

        check_installed(names)

