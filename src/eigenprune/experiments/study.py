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
start once PID is gone. study.json, study.md and study.png are re-rendered from every cell when the last
cell lands (rendering reads only the cells, so whichever process renders writes the same study; its
`last_run` says what that process did).

Many processes may work on one OUT at once (`--jobs N` workers, SLURM array tasks, a second study
started by hand): each takes one cell at a time through a claim file (`study_claims.py`), so every cell
runs exactly once; a process with nothing left to take waits for the cells others are running (and
takes over any whose process died). A cell that raises is recorded (`cells/.KEY.failed`), the others
go on, and the run ends in one line naming the failed cells; the next run retries them.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from eigenprune.core.errors import UsageError
from eigenprune.core.outdir import make_folder, remove_stale
from eigenprune.experiments import study_claims as claims
from eigenprune.experiments.study_claims import LOCK  # noqa: F401  (the study's files, named in one place)
from eigenprune.experiments.study_spec import Cell, Study, load_spec  # noqa: F401  (the study API in one place)

CELLS_JSON = "cells.json"
POLL_S = 1.0  # how often a process with nothing left to take looks at the cells others are running


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


def _write_index(out: Path, index: dict) -> None:
    _write_atomic(out / CELLS_JSON, _dump({"format": "eigenprune-study-cells", "format_version": 1, "cells": index}))


def prepare(study: Study, out: Path, rerun_changed: bool) -> tuple[Plan, list[str]]:
    """Before taking cells (under the claims' mutex, so concurrent starts agree): remove what killed runs left,
    move changed cells to OUT/stale/ (with `rerun_changed`), record finished cells in cells.json, copy the spec."""
    make_folder(out / "cells")  # a parent that is a file, or read-only: one line
    with claims.mutex(out):
        remove_stale(out / "cells")
        state = plan(study, out)
        if state.stale and not rerun_changed:
            raise UsageError(_stale_message(out, state.stale))
        index = _read_index(out)
        stamp, moved = time.strftime("%Y%m%d-%H%M%S"), []
        for cell, _ in state.stale:
            (out / "stale").mkdir(exist_ok=True)
            (out / "cells" / cell.key).rename(out / "stale" / f"{cell.key}.{stamp}")
            index.pop(cell.key, None)
            moved.append(cell.key)
        for cell in state.done:  # finished before cells.json knew them (a kill between the two writes)
            index.setdefault(cell.key, _entry(cell))
        _write_index(out, index)
        _write_atomic(out / f"spec{study.path.suffix}", study.text)
    return state, moved


def _done(out: Path, cell: Cell) -> bool:
    return (out / "cells" / cell.key / "comparison.json").is_file()


def _next_cell(study: Study, out: Path, since: float, only: set[str] | None) -> tuple:
    """(the first cell this process may run, claimed, and its claim) or (None, None); and whether other processes
    are running cells this one may still have to take over. Call under the claims' mutex."""
    others = False
    for cell in study.cells:
        if (only is not None and cell.key not in only) or _done(out, cell):
            continue
        failure = claims.read_failure(out, cell.key)
        if failure is not None and failure.when >= since:  # failed during this run: the next run retries it
            continue
        claim = claims.try_claim(out, cell.key)
        if claim is not None:
            return cell, claim, others
        others = True
    return None, None, others


def _failing_line(err: Exception) -> str:
    if isinstance(err, UsageError):
        return str(err)
    frame = traceback.extract_tb(err.__traceback__)[-1]
    return f"{traceback.format_exception_only(err)[-1].strip()} (at {Path(frame.filename).name}:{frame.lineno})"


def work(study: Study, out: Path, since: float, quiet: bool = False, wait: bool = True, only: set[str] | None = None,
         bar=None) -> list[str]:
    """The claim loop every process runs: take the next free cell, run it, record it; with `wait`, stay until the
    cells other processes hold have landed (taking over any whose process died). The cells this process ran."""
    from eigenprune.experiments import compare as compare_module

    ran, first_done = [], sum(_done(out, c) for c in study.cells)
    while True:
        with claims.mutex(out):
            cell, claim, others = _next_cell(study, out, since, only)
        if cell is None:
            if not (wait and others):
                return ran
            time.sleep(POLL_S)
        else:
            claims.log(out, f"started cell {cell.key}")
            if bar is not None:
                bar.set_description_str(f"study ({cell.key})")
            try:
                with claims.heartbeat(out, claim):
                    compare_module.compare(cell.run, cell.opts, out / "cells" / cell.key, quiet=quiet)
            except Exception as err:  # the other cells go on; the run ends naming this one
                line = _failing_line(err)
                if not isinstance(err, UsageError):  # a bug: its traceback, here and in the failure record
                    traceback.print_exc(file=sys.stderr)
                claims.record_failure(out, claims.Failure(cell.key, line, time.time(), claims.where(),
                                                          traceback.format_exc()))
                claims.release(out, claim)
                claims.log(out, f"cell {cell.key} failed: {line}")
                continue
            except BaseException:  # Ctrl-C, SIGTERM: the cell is free again at once
                claims.release(out, claim)
                claims.log(out, f"stopped in cell {cell.key}")
                raise
            with claims.mutex(out):
                index = _read_index(out)
                index[cell.key] = _entry(cell)
                _write_index(out, index)
                claims.clear_failure(out, cell.key)
                claims.release(out, claim)
            claims.log(out, f"finished cell {cell.key}")
            ran.append(cell.key)
        if bar is not None:
            bar.n = sum(_done(out, c) for c in study.cells) - first_done
            bar.refresh()


def failures(study: Study, out: Path, since: float = 0.0) -> dict[str, str]:
    """Unfinished cells whose last attempt (at or after `since`) failed: key -> failing line."""
    found = {}
    for cell in study.cells:
        failure = None if _done(out, cell) else claims.read_failure(out, cell.key)
        if failure is not None and failure.when >= since:
            found[cell.key] = failure.line
    return found


def failed_message(failed: dict[str, str]) -> str:
    (key, line), more = next(iter(failed.items())), list(failed)[1:]
    return (f"cell {key}: {line}" + (f"; {len(more)} more cell(s) failed: {', '.join(more)}" if more else "")
            + " (finished cells are kept; --status shows each failure; running again retries the failed cells)")


def complete(study: Study, out: Path) -> bool:
    return all(_done(out, c) for c in study.cells)


def run_study(study: Study, out: str | Path, rerun_changed: bool = False, quiet: bool = False,
              worker: bool = False, report_to: tuple[str, ...] = ()) -> dict:
    """Run the cells OUT does not hold yet, alongside any other process on OUT (see the module docstring), render
    the study files and log the study and the cells that ran to the `report_to` trackers (`experiments.tracking`).
    A `worker` (one of `--jobs N`) takes cells until none is free, and renders and logs nothing."""
    from eigenprune.experiments import tracking

    tracking.check_installed(report_to)
    out = Path(out)
    _check_out(out)
    state = plan(study, out)  # refuse before writing anything
    if state.stale and not rerun_changed:
        raise UsageError(_stale_message(out, state.stale))
    t0, since = time.perf_counter(), time.time()
    state, moved = prepare(study, out, rerun_changed)
    todo = [c for c in study.cells if not _done(out, c)]
    if not quiet and not worker:
        print(f"study: {len(study.cells)} cells: {len(state.done)} finished earlier (skipped), {len(todo)} to run"
              + (f", {len(moved)} moved to {out}/stale/" if moved else "")
              + (f"; not in this spec (kept, not reported): {', '.join(state.orphans)}" if state.orphans else ""),
              file=sys.stderr)
    with _progress(len(todo), quiet or worker) as bar:
        ran = work(study, out, since, quiet, wait=not worker, bar=bar)
    failed = failures(study, out, since)
    if failed:
        raise UsageError(failed_message(failed))
    if worker:
        return {"ran": ran, "out": str(out)}
    unfinished = [c.key for c in study.cells if not _done(out, c)]
    if unfinished:  # not expected (the loop waits for every cell): say so rather than render a partial study
        raise UsageError(f"cells not finished: {', '.join(unfinished)}; --status shows where they stand, running "
                         "again runs them")
    last_run = {"ran": ran, "skipped": [c.key for c in state.done], "moved_to_stale": moved,
                "not_in_spec": state.orphans, "wall_s": time.perf_counter() - t0}
    report = render(study, out, last_run)
    tracking.log_folder(out, report_to)
    report["out"] = str(out)
    return report


def _entry(cell: Cell) -> dict:
    return {"dir": f"cells/{cell.key}", "model": cell.model, "task": cell.task, "targets": cell.targets,
            "settings_hash": cell.settings_hash(), "identity": cell.identity()}
