"""Output directories: checked and claimed before the work, written whole or not at all.

`check_new_dir(out)` runs before any long work. It refuses a destination that holds something or
that cannot be written (its parent a file, a read-only folder), and claims it for this process: an
exclusive `flock` on `.OUT.lock` next to it, which the OS drops when the process dies, even by
SIGKILL. A second eigenprune given the same `--out` fails there, at once, with one line.

`atomic_dir(out)` yields `.OUT.partial-PID` next to the destination and, when the block completes,
renames it into place. It never replaces what it did not create: if something appeared at `out`
meanwhile, the output stays in the partial folder and the error says where. An empty folder at
`out` (`--out .`, a mount point, a symlink's target) is filled instead of replaced. Symlinks are
followed, so the output lands where the link points.

A killed run leaves `.OUT.partial-PID` (and `.OUT.lock`) behind; the next claim in the same folder
removes those whose process is gone and whose lock nobody holds.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from eigenprune.core.errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: claims are checks only
    fcntl = None

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")
_CLAIMS: dict[Path, int] = {}  # real destination -> descriptor of its locked `.NAME.lock`


def _real(out: str | Path) -> Path:
    """Where the output really goes: symlinks followed, '.' and '..' resolved."""
    return Path(os.path.realpath(Path(out).expanduser()))


def _lock_path(real: Path) -> Path:
    return real.parent / f".{real.name}.lock"


def _check_free(given: Path, real: Path, overwrite: bool) -> None:
    if os.path.lexists(real) and not real.is_dir():
        raise UsageError(f"{given} already exists and is not a folder; choose another --out or remove it")
    if real.is_dir() and not overwrite and any(real.iterdir()):
        raise UsageError(f"{given} already exists; choose another --out or remove it")


def _make(given: Path, folder: Path) -> None:
    """Create `folder` (parents included) for writing `given`; one line if a parent is a file or read-only."""
    blocker = next((p for p in (folder, *folder.parents) if os.path.lexists(p) and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot write {given}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot write {given}: cannot create {folder} ({err.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {given}: the folder {folder} is not writable")


def _make_parent(given: Path, real: Path) -> None:
    _make(given, real.parent)


def make_folder(folder: str | Path) -> Path:
    """Create `folder` to write into (a study's folder, which is filled over several runs, not claimed whole):
    a parent that is a file, or a read-only one, is one line."""
    _make(Path(folder), _real(folder))
    return Path(folder)


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f"pid {int(lock.read_text().split()[0])}"
    return "another process"


def _claim(given: Path, real: Path) -> None:
    lock = _lock_path(real)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UsageError(f"cannot write {given}: cannot create {lock} ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"{given} is being written by another eigenprune ({_holder(lock)}); "
                             "choose another --out or wait for it to finish") from None
        try:  # the lock file we hold must still be the one at `lock` (its last holder may have removed it)
            held, current = os.fstat(fd), os.stat(lock)
            if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _CLAIMS[real] = fd


def release(out: str | Path) -> None:
    """Give up this process's claim on `out` (atomic_dir does this itself; the OS does it at exit)."""
    real = _real(out)
    fd = _CLAIMS.pop(real, None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_lock_path(real))  # while still locked: whoever opened it sees a stale inode and retries
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for real in list(_CLAIMS):
        release(real)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlocked(lock: Path) -> bool:
    """True if no process holds `lock` (or it does not exist)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale(folder: Path) -> list[Path]:
    """Remove the partial folders (and lock files) that killed eigenprune runs left in `folder`."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            match = _PARTIAL.match(entry.name)
            if not match or int(match["pid"]) == os.getpid() or _alive(int(match["pid"])):
                continue
            lock = folder / f".{match['name']}.lock"
            ours = folder / match["name"] in _CLAIMS  # then its lock is ours, and the partial a dead run's
            if not ours and fcntl is not None and not _unlocked(lock):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if not ours:
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
            removed.append(entry)
    return removed


def check_new_dir(out: str | Path, overwrite: bool = False, claim: bool = True) -> Path:
    """Refuse a destination that holds something or cannot be written, and claim it for this process
    (call before long work). `claim=False` only checks (for a worker whose rank 0 writes)."""
    given = Path(out)
    real = _real(given)
    if real in _CLAIMS:
        return given
    if not real.name or real == real.parent:
        raise UsageError(f"cannot write {given}: choose a folder below it")
    _check_free(given, real, overwrite)
    _make_parent(given, real)
    if not claim or fcntl is None:
        return given
    _claim(given, real)
    try:
        _check_free(given, real, overwrite)  # again: another run may have finished it before we claimed it
        remove_stale(real.parent)
    except BaseException:
        release(real)
        raise
    return given


@contextlib.contextmanager
def released_on_error(out: str | Path) -> Iterator[Path]:
    """For the work between claiming `out` (check_new_dir) and writing it (atomic_dir): a failure gives the
    claim up, so nothing of the run is left behind, not even its lock."""
    try:
        yield Path(out)
    except BaseException:
        release(out)
        raise


def _commit(tmp: Path, real: Path, given: Path, overwrite: bool) -> None:
    refused = UsageError(f"{given} appeared while this run was writing it (not from eigenprune, which claims "
                         f"it first) and was left as it is; this run's output is in {tmp}")
    if real.is_dir() and overwrite and any(real.iterdir()):
        shutil.rmtree(real)
    elif real.is_dir() and not any(real.iterdir()):  # a folder the user made ('.', a mount point): fill it
        for entry in tmp.iterdir():
            entry.rename(real / entry.name)
        tmp.rmdir()
        return
    elif os.path.lexists(real):
        raise refused
    try:
        os.rename(tmp, real)  # replaces at most an empty folder; anything else fails
    except OSError:
        raise refused from None


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block completes."""
    given = check_new_dir(out, overwrite)
    real = _real(given)
    tmp = real.parent / f".{real.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        release(real)
        raise
    try:
        _commit(tmp, real, given, overwrite)
    finally:
        release(real)
