"""`eigenprune study SPEC --plan`: what each cell can detect, and how many test examples a given effect needs.

A paired test's power depends on n and on the share of examples whose correctness the edit changes (the
discordance; only those examples carry information). For each cell this module finds n without loading a
model (the cell's task and split settings: its test split, or every pooled example under `--folds`) and
the discordance from, in order:

1. the cell itself when it already ran (OUT/cells/KEY/comparison.json): each method's observed share of
   changed answers, a pilot for the next, larger run;
2. `--assume-discordance D`, a stated assumption for cells that have not run.

With it: the minimum detectable effect at this n (80% power, 5% level; `significance.min_detectable_effect`)
and the n needed for `--effect` (`significance.n_needed`). A cell with neither source says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from eigenprune.evaluation.significance import min_detectable_effect, n_needed
from eigenprune.experiments.study_spec import Cell, Study


@dataclass
class CellPower:
    """One cell's design: its n and, per source of discordance, the MDE and the n needed."""

    key: str
    n: int  # test examples the cell tests (pooled over folds)
    rows: list[dict] = field(default_factory=list)  # {"source", "discordance", "mde", "n_needed"}


def test_size(cell: Cell) -> int:
    """How many test examples the cell's compare evaluates (every pooled example under folds)."""
    from eigenprune.evaluation.splits import fold_splits
    from eigenprune.evaluation.tasks import load_task

    cfg = cell.run
    task = load_task(cfg.task, cfg.template, cfg.answers)
    folds = fold_splits(task, cfg.folds, cfg.split_seed, cfg.dev_fraction, cfg.limit)
    return len(folds.tested) if len(folds) > 1 else len(folds[0].test)


def observed(folder: Path) -> dict[str, float]:
    """method -> the share of test examples whose correctness it changed, from a finished cell's comparison.json
    (its per-example correctness; methods without an exact test, e.g. seed averages, are left out)."""
    path = folder / "comparison.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    out = {}
    for name, row in report["methods"].items():
        d = row.get("diff_vs_base") or {}
        if d.get("p") is not None and d.get("n"):
            out[name] = d["discordant"] / d["n"]
    return out


def _row(source: str, n: int, discordance: float, effect: float) -> dict:
    mde = min_detectable_effect(n, discordance)
    needed = n_needed(effect, discordance) if 0 < effect <= discordance else None
    return {"source": source, "discordance": discordance, "mde": mde, "n_needed": needed}


def cell_power(study: Study, out: Path, effect: float, assume: float | None) -> list[CellPower]:
    """Every cell's power rows (see the module docstring)."""
    cells = []
    for cell in study.cells:
        power = CellPower(cell.key, test_size(cell))
        for name, share in observed(out / "cells" / cell.key).items():
            power.rows.append(_row(f"{name} (observed)", power.n, share, effect))
        if assume is not None:
            power.rows.append(_row("assumed", power.n, assume, effect))
        cells.append(power)
    return cells


def power_lines(cells: list[CellPower], effect: float, assume: float | None) -> list[str]:
    """The --plan printout: per cell, n, and per discordance source the MDE and the n needed for `effect`."""
    lines = [f"power (paired exact test, 80% power, 5% level; effect {100 * effect:+.1f} points):"]
    for cell in cells:
        lines.append(f"  {cell.key}: n = {cell.n} test examples")
        if not cell.rows:
            lines.append("    discordance unknown: run the cell (its observed share of changed answers is then used) "
                         "or pass --assume-discordance")
        for row in cell.rows:
            share = f"{100 * row['discordance']:.1f}% of answers change"
            mde = ("nothing detectable" if row["mde"] == float("inf")
                   else f"detects {100 * row['mde']:.1f} points")
            if row["n_needed"] is None:
                need = (f"a {100 * effect:.1f}-point change needs at least {100 * effect:.1f}% of answers to change"
                        if row["discordance"] > 0 else "no answer changes, so no change is detectable")
            else:
                need = f"{row['n_needed']} examples needed for {100 * effect:.1f} points" + (
                    " (this cell has enough)" if row["n_needed"] <= cell.n else "")
            lines.append(f"    {row['source']}: {share}; at n = {cell.n} it {mde}; {need}")
    if assume is None and any(not c.rows for c in cells):
        lines.append("  (pass --assume-discordance D, e.g. 0.1, to plan cells that have not run)")
    return lines
