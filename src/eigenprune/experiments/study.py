"""`eigenprune study SPEC --out DIR`: a grid of `compare` runs, resumable, summarised in one table.

The spec (`study_spec.py`) names models, tasks, targets and methods plus shared settings; every
model x task x target is a cell, run as one `compare(cfg, opts, OUT/cells/KEY, quiet=True)` — the
same call `eigenprune compare` makes, so a cell's numbers equal running it alone.

Resuming: `compare` writes a cell's folder atomically (complete or absent), and `cells.json` records
each finished cell's settings hash (its config.json with the spec's model and task names, plus the task
file's content). On the next run a cell whose folder holds comparison.json and whose hash matches is
skipped; a finished cell whose settings changed is reported, and the study refuses to go on unless
`--rerun-changed`, which moves the old folder to OUT/stale/KEY.TIMESTAMP (nothing is deleted) and
runs the cell again. A killed run leaves at most a `.KEY.partial-PID` folder, removed at the next
start once PID is gone. study.json, study.md and study.png are re-rendered from every cell at the end
of each run. One study at a time per OUT (a lock that the OS drops when its process dies).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from eigenprune.core.errors import UsageError
from eigenprune.core.outdir import make_folder, remove_stale
from eigenprune.experiments.study_spec import Cell, Study, load_spec  # noqa: F401  (the study API in one place)

CELLS_JSON, LOCK = "cells.json", ".study.lock"


@dataclass
class Plan:
    """Where each cell of a study stands against what OUT holds."""

    done: list[Cell] = field(default_factory=list)  # finished with the same settings: skipped
    todo: list[Cell] = field(default_factory=list)  # never finished: run
    stale: list[tuple[Cell, str]] = field(default_factory=list)  # finished with other settings: (cell, what changed)
    orphans: list[str] = field(default_factory=list)  # cell folders the spec no longer names (kept, not reported)


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:  # a signal or a full disk: no temporary file left behind
        tmp.unlink(missing_ok=True)
        raise


def _dump(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _read_index(out: Path) -> dict:
    path = out / CELLS_JSON
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["cells"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"{path} is damaged; remove it (finished cells are then recognised by their "
                         "config.json)") from None


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else k)
        return out
    return {prefix: value}


def _changes(old: dict, new: dict, limit: int = 3) -> str:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = [f"{k.removeprefix('config.').removeprefix('run.').removeprefix('compare.')}: "
             f"{json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in keys[:limit]]
    return ", ".join(shown) + (f", and {len(keys) - limit} more" if len(keys) > limit else "")


def plan(study: Study, out: str | Path) -> Plan:
    """What a run of `study` into `out` would do; reads only."""
    out = Path(out)
    index, result = _read_index(out), Plan()
    for cell in study.cells:
        folder = out / "cells" / cell.key
        if not (folder / "comparison.json").is_file():
            if folder.is_dir() and any(folder.iterdir()):
                result.stale.append((cell, "its folder holds no comparison.json"))
            else:
                result.todo.append(cell)
            continue
        summary = _summary(cell, folder)
        if isinstance(summary, str):  # damaged: redone like a changed cell (--rerun-changed)
            result.stale.append((cell, summary))
            continue
        entry = index.get(cell.key)
        if entry is not None:
            same = entry.get("settings_hash") == cell.settings_hash()
            why = "" if same else _changes(entry.get("identity", {}), cell.identity())
        else:  # finished, but killed before cells.json was updated: its config.json says what ran
            try:
                ran = json.loads((folder / "config.json").read_text())
            except (OSError, json.JSONDecodeError):
                ran = {}
            same = ran == cell.config()
            why = "" if same else _changes(ran, cell.config())
        if same:
            result.done.append(cell)
        else:
            result.stale.append((cell, why or "settings changed"))
    keys = {c.key for c in study.cells}
    folders = {p.name for p in (out / "cells").iterdir() if not p.name.startswith(".")} if (out / "cells").is_dir() \
        else set()
    result.orphans = sorted((folders | set(index)) - keys)
    return result


def _summary(cell: Cell, folder: Path) -> dict | str:
    """The cell's row of study.json from its comparison.json, or why that file is damaged (a key removed, cut
    short)."""
    from eigenprune.reports.study_report import summarize_cell

    try:
        return summarize_cell(_cell_meta(cell), json.loads((folder / "comparison.json").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError,
            AttributeError) as err:
        return "its comparison.json is damaged: " + (f"no {err}" if isinstance(err, KeyError) else
                                                     getattr(err, "msg", None) or type(err).__name__)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; --out must be a study folder (new, or one this spec ran into)")
    if out.is_dir() and any(out.iterdir()) and not any((out / n).exists() for n in (CELLS_JSON, "cells",
                                                                                  "study.json")):
        raise UsageError(f"{out} already exists and is not a study folder; choose another --out")


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One study at a time per OUT; flock is released by the OS even when the process is killed."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UsageError(f"another eigenprune study is running on {out}; wait for it or choose "
                             "another --out") from None
        yield
    finally:
        os.close(fd)


def _stale_message(out: Path, stale: list[tuple[Cell, str]]) -> str:
    listed = "; ".join(f"cells/{c.key} ({why})" for c, why in stale)
    damaged = all(why.startswith("its ") for _, why in stale)  # a damaged or unfinished folder, not the spec
    what = "cannot reuse" if damaged else "the spec changed for"
    return (f"{what} {len(stale)} finished cell(s) in {out}: {listed}. Run again with "
            f"--rerun-changed to move them to {out}/stale/ and redo them, or choose another --out")


def _progress(total: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cell", desc="study", disable=True if quiet or total == 0 else None, file=sys.stderr,
                bar_format="{desc}: {n}/{total} cells |{bar}| {elapsed} elapsed, ~{remaining} left", leave=True)


def _cell_meta(cell: Cell) -> dict:
    return {"key": cell.key, "dir": f"cells/{cell.key}", "model": cell.model, "task": cell.task,
            "targets": cell.targets, "settings_hash": cell.settings_hash()}


def render(study: Study, out: Path, last_run: dict) -> dict:
    """study.json, study.md and study.png from every cell's comparison.json (each file replaced atomically)."""
    from eigenprune.reports.study_report import build, plot_heatmaps, render_markdown

    cells = []
    for c in study.cells:
        summary = _summary(c, out / "cells" / c.key)
        if isinstance(summary, str):  # damaged since plan() looked: name the cell and how to redo it
            raise UsageError(f"cells/{c.key} in {out}: {summary}; run the study again with --rerun-changed to "
                             f"move it to {out}/stale/ and redo it")
        cells.append(summary)
    report = build(study.spec, str(study.path), cells, last_run)
    tmp = out / f".study.png.tmp-{os.getpid()}"
    try:
        plot_heatmaps(report, tmp)
        os.replace(tmp, out / "study.png")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_atomic(out / "study.md", render_markdown(report))
    _write_atomic(out / "study.json", _dump(report))
    return report


def run_study(study: Study, out: str | Path, rerun_changed: bool = False, quiet: bool = False,
              report_to: tuple[str, ...] = ()) -> dict:
    """Run the cells OUT does not hold yet (see the module docstring), re-render the study files and log the
    study and the cells that ran to the `report_to` trackers (`experiments.tracking`)."""
    from eigenprune.experiments import tracking
    from eigenprune.experiments.compare import compare

    tracking.check_installed(report_to)
    out = Path(out)
    _check_out(out)
    state = plan(study, out)  # refuse before writing anything
    if state.stale and not rerun_changed:
        raise UsageError(_stale_message(out, state.stale))
    t0 = time.perf_counter()
    make_folder(out / "cells")  # a parent that is a file, or read-only: one line
    with _locked(out):
        if (out / "cells").is_dir():
            remove_stale(out / "cells")  # what killed cells left behind
        state = plan(study, out)  # again, under the lock
        index = _read_index(out)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for cell, _ in state.stale:
            (out / "stale").mkdir(exist_ok=True)
            (out / "cells" / cell.key).rename(out / "stale" / f"{cell.key}.{stamp}")
            index.pop(cell.key, None)
            moved.append(cell.key)
        todo = state.todo + [c for c, _ in state.stale]
        order = {c.key: i for i, c in enumerate(study.cells)}
        todo.sort(key=lambda c: order[c.key])
        for cell in state.done:  # finished before cells.json knew them (a kill between the two writes)
            index.setdefault(cell.key, _entry(cell))
        _write_atomic(out / CELLS_JSON, _dump({"format": "eigenprune-study-cells", "format_version": 1,
                                               "cells": index}))
        _write_atomic(out / f"spec{study.path.suffix}", study.text)
        if not quiet:
            print(f"study: {len(study.cells)} cells: {len(state.done)} finished earlier (skipped), {len(todo)} to run"
                  + (f", {len(moved)} moved to {out}/stale/" if moved else "")
                  + (f"; not in this spec (kept, not reported): {', '.join(state.orphans)}" if state.orphans else ""),
                  file=sys.stderr)
        ran = []
        with _progress(len(todo), quiet) as bar:
            for cell in todo:
                bar.set_description_str(f"study ({cell.key})")
                try:
                    compare(cell.run, cell.opts, out / "cells" / cell.key, quiet=quiet)  # its bars below the study's
                except UsageError as err:  # e.g. targets that match no module of this model: say which cell
                    raise UsageError(f"cell {cell.key}: {err} (finished cells are kept; fix the spec and run "
                                     "again)") from None
                index[cell.key] = _entry(cell)
                _write_atomic(out / CELLS_JSON, _dump({"format": "eigenprune-study-cells", "format_version": 1,
                                                       "cells": index}))
                ran.append(cell.key)
                bar.update(1)
        last_run = {"ran": ran, "skipped": [c.key for c in state.done], "moved_to_stale": moved,
                    "not_in_spec": state.orphans, "wall_s": time.perf_counter() - t0}
        report = render(study, out, last_run)
        tracking.log_folder(out, report_to)
    report["out"] = str(out)
    return report


def _entry(cell: Cell) -> dict:
    return {"dir": f"cells/{cell.key}", "model": cell.model, "task": cell.task, "targets": cell.targets,
            "settings_hash": cell.settings_hash(), "identity": cell.identity()}
