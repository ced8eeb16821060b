"""Ctrl-C and SIGTERM end a command the same way: cleaned up, one line, exit 130 or 143.

Python turns SIGINT into KeyboardInterrupt, but SIGTERM (what SLURM, most schedulers, `kill` and
torchrun send first) kills the process outright: no `finally`, no `except BaseException`, no atexit,
so a claimed output's lock and a half-written `.OUT.partial-PID` folder stay behind. `install()`
makes SIGTERM raise `Terminated` (a KeyboardInterrupt, as Ctrl-C's `Interrupted` is), so both
signals unwind through the same cleanup (`core/outdir.py`'s atomic_dir and released_on_error, the
study's cell folders) and atexit.

A signal may land anywhere, also inside an import (the first seconds of a command are mostly imports)
where a library turns the KeyboardInterrupt into another error (an ImportError of a partially
initialised module). So the handler also records that a signal came: `signal_of(err)` then answers
for whatever exception reached the top, and `report()` prints the one line and gives the exit code.

`install()` is the first thing the command does (`eigenprune._entry.main`); it imports nothing heavy.
Library users who import eigenprune keep Python's own signal behaviour.
"""

from __future__ import annotations

import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it
_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}
_received: list[int] = []  # signals received, in order


class Interrupted(KeyboardInterrupt):
    """Ctrl-C. A subclass, not KeyboardInterrupt itself: CPython marks a bare KeyboardInterrupt raised inside
    `exec`'d source (dataclasses and namedtuples are made that way while modules import) as unhandled, even
    when it is caught later, and then ends the process by SIGINT instead of with the exit code it returned."""


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception: whatever cleans up after Ctrl-C cleans up after it too."""


def _handle(signum: int, frame) -> None:
    _received.append(signum)
    if signum == signal.SIGTERM:
        raise Terminated("terminated")
    raise Interrupted


def install() -> None:
    """Make SIGINT and SIGTERM raise (Interrupted, Terminated: both KeyboardInterrupts) and remember that they
    came. Only from the main thread; a signal the parent set to be ignored (`nohup`, a background job's SIGINT)
    stays ignored."""
    for signum in EXIT_CODES:
        if signal.getsignal(signum) is signal.SIG_IGN:
            continue
        signal.signal(signum, _handle)


def received() -> int | None:
    """The first signal this process received since `install()`, or None."""
    return _received[0] if _received else None


def signal_of(err: BaseException | None) -> int | None:
    """The signal that ended the command: the first one received, else what `err` says (a KeyboardInterrupt
    raised without the handler, e.g. from a test calling `cli.main`)."""
    if _received:
        return _received[0]
    if isinstance(err, Terminated):
        return signal.SIGTERM
    if isinstance(err, KeyboardInterrupt):
        return signal.SIGINT
    return None


def exit_code(signum: int) -> int:
    return EXIT_CODES[signum]


def message(signum: int) -> str:
    """The one line for stderr, e.g. 'eigenprune: terminated'."""
    return f"eigenprune: {_WORDS[signum]}"


def ignore_further() -> None:
    """While the last words are printed: a second Ctrl-C must not interrupt them with a traceback."""
    for signum in EXIT_CODES:
        if signal.getsignal(signum) is _handle:
            signal.signal(signum, signal.SIG_IGN)


def report(signum: int) -> int:
    """Print the one line for `signum` and return its exit code."""
    ignore_further()
    print(message(signum), file=sys.stderr)
    return exit_code(signum)
