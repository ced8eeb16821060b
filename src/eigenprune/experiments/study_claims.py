"""Who runs which cell of a study: claim files, heartbeats, failure records and the study's event log.

Any number of processes (`--jobs N` workers, SLURM array tasks, a second `eigenprune study` started
by hand) may work on one `--out`. Each takes one cell at a time by creating `cells/.KEY.claim`
(O_CREAT|O_EXCL, so exactly one creator wins) holding its host, pid, start time and where it runs;
the file's mtime is its heartbeat, refreshed every `HEARTBEAT_S` seconds by a thread while the cell
runs. A claim is stale when its process is gone (same host, pid dead) or its heartbeat is older than
`STALE_AFTER_S` (another host, or a process frozen on a dead file system); the next process to look
takes it over and says so in `study.log`. Checking a claim and taking it happen under `mutex(out)`, a
`flock` on `.study.lock` held for milliseconds (the OS drops it if its holder dies), which also keeps
concurrent updates of `cells.json` from losing each other's entries.

A cell that raises writes `cells/.KEY.failed` (the failing line, the traceback, when, where): `--status`
shows it, and the next run retries it (a run does not retry failures recorded after it started, so
two processes on one spec do not take turns failing the same cell). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK, LOG = ".study.lock", "study.log"
HEARTBEAT_S = 30.0  # how often a running cell's claim is touched
STALE_AFTER_S = 600.0  # a claim untouched this long is taken over (20 missed heartbeats)


def _cells(out: Path) -> Path:
    return out / "cells"


def claim_path(out: Path, key: str) -> Path:
    return _cells(out) / f".{key}.claim"


def failed_path(out: Path, key: str) -> Path:
    return _cells(out) / f".{key}.failed"


def where() -> str:
    """This process as `--status` shows it: host, pid and, under SLURM, the job (array task)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job and "SLURM_ARRAY_TASK_ID" in os.environ \
        else os.environ.get("SLURM_JOB_ID")
    return f"{socket.gethostname()} pid {os.getpid()}" + (f" (slurm job {job})" if job else "")


@contextlib.contextmanager
def mutex(out: Path) -> Iterator[None]:
    """The short critical section around claiming and index updates (blocking; the OS drops it on death)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: O_EXCL alone (two processes may then both take over one stale claim)
        yield
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # a file system without flock (Lustre mounted noflock): O_EXCL alone
            if err.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOLCK):
                raise
            _warn_once(f"{out} does not support file locks ({err.strerror}): claims rely on exclusive creation "
                       "alone, so two processes may rarely both take over one dead process's cell")
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"eigenprune study: warning: {message}", file=sys.stderr)


def log(out: Path, message: str) -> None:
    """One line appended to OUT/study.log: when, which process, what (one write, so lines do not interleave)."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {where()}: {message}\n"
    fd = os.open(out / LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@dataclass
class Claim:
    """A claim file's content, and its heartbeat (the file's mtime)."""

    key: str
    host: str
    pid: int
    started: float  # time.time() when the cell was claimed
    where: str  # host, pid and slurm job, for people
    heartbeat: float = 0.0

    def stale(self, now: float | None = None) -> str | None:
        """Why this claim no longer stands for a running cell, or None while it does."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname() and self.pid > 0 and not _alive(self.pid):
            return f"its process ({self.where}) is gone"
        if now - self.heartbeat > STALE_AFTER_S:
            return f"no heartbeat from {self.where} for {now - self.heartbeat:.0f} s"
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def read_claim(out: Path, key: str) -> Claim | None:
    """The cell's claim, or None when it has none. A file cut short (its writer killed between creating and
    filling it) counts as a claim by a dead process."""
    path = claim_path(out, key)
    try:
        heartbeat, text = path.stat().st_mtime, path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        return Claim(key, data["host"], int(data["pid"]), float(data["started"]), data["where"], heartbeat)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return Claim(key, socket.gethostname(), -1, heartbeat, "a process killed while claiming", 0.0)


def try_claim(out: Path, key: str) -> Claim | None:
    """Claim the cell for this process, taking over a stale claim (logged); None while another process holds it.
    Call under `mutex(out)`."""
    current = read_claim(out, key)
    if current is not None:
        why = current.stale()
        if why is None:
            return None
        log(out, f"took over cell {key}: {why}")
        claim_path(out, key).unlink(missing_ok=True)
    claim = Claim(key, socket.gethostname(), os.getpid(), time.time(), where())
    try:
        fd = os.open(claim_path(out, key), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # only without flock (not POSIX): another process was first
        return None
    try:
        os.write(fd, json.dumps({k: v for k, v in asdict(claim).items() if k != "heartbeat"}).encode())  # = mtime
    finally:
        os.close(fd)
    claim.heartbeat = time.time()
    return claim


def release(out: Path, claim: Claim) -> None:
    """Remove the claim if it is still this process's (a stale-claim takeover may have replaced it)."""
    current = read_claim(out, claim.key)
    if current is not None and (current.host, current.pid, current.started) == (claim.host, claim.pid,
                                                                                 claim.started):
        claim_path(out, claim.key).unlink(missing_ok=True)


@contextlib.contextmanager
def heartbeat(out: Path, claim: Claim, every: float = HEARTBEAT_S) -> Iterator[None]:
    """Touch the claim every `every` seconds while the block runs (a daemon thread: it never keeps a process up)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            with contextlib.suppress(OSError):  # taken over meanwhile, or the file system hiccupped
                os.utime(claim_path(out, claim.key))

    thread = threading.Thread(target=beat, name=f"heartbeat-{claim.key}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class Failure:
    """A cell's failed attempt: its failing line, when and where."""

    key: str
    line: str
    when: float
    where: str
    traceback: str = ""


def record_failure(out: Path, failure: Failure) -> None:
    tmp = failed_path(out, failure.key).with_name(f".{failure.key}.failed.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(asdict(failure), indent=2) + "\n")
    os.replace(tmp, failed_path(out, failure.key))


def read_failure(out: Path, key: str) -> Failure | None:
    try:
        data = json.loads(failed_path(out, key).read_text())
        return Failure(key, data["line"], float(data["when"]), data["where"], data.get("traceback", ""))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return Failure(key, "(its failure record is damaged)", 0.0, "?")


def clear_failure(out: Path, key: str) -> None:
    failed_path(out, key).unlink(missing_ok=True)


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def status_lines(out: Path, keys: list[str]) -> list[str]:
    """`study --status`: one line per cell (done, running where and since when, failed with its failing line, or
    to run), then the counts. Reads only."""
    lines, counts, now = [], {"done": 0, "running": 0, "failed": 0, "to run": 0}, time.time()
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        claim, failure = read_claim(out, key), read_failure(out, key)
        if (_cells(out) / key / "comparison.json").is_file():
            state, detail = "done", ""
        elif claim is not None:
            why = claim.stale(now)
            state = "running"
            detail = (f"on {claim.where} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(claim.started))}"
                      f" ({_ago(now - claim.started)})"
                      + (f"; stale, the next run takes it over: {why}" if why else ""))
        elif failure is not None:
            state = "failed"
            detail = (f"{failure.line} (on {failure.where}, "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(failure.when))})")
        else:
            state, detail = "to run", ""
        counts[state] += 1
        lines.append(f"{state:<8} {key:<{width}}  {detail}".rstrip())
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()) + f" (of {len(keys)} cells; log: "
                 f"{out / LOG})")
    return lines
