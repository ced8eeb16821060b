"""What an experiment tracker is sent, read from the files a finished run, compare or study wrote.

`--report-to` (experiments/tracking.py) runs after report.json / comparison.json / study.json and the plots
are on disk, and everything it logs comes from those files through this module, so a tracker holds the same
numbers as the report, never numbers of its own. One `Record` is one tracker run:

- `params`: the settings, config.json flattened ("run.p", "compare.method_args.laser.keep", ...), and each
  chosen setting ("chosen/eigenprune/p"), as text;
- `scalars` (tag, value, step): test and dev accuracy with their 95% intervals (`test/ROW/acc|lo|hi|n`),
  every row's difference from the base model with its interval and exact p-values (`diff/ROW/...`, Holm-adjusted
  in `p_adjusted`), the chosen settings' numbers (`chosen/ROW[/fold-K]/...`), the side effects
  (`side_effects/...`), training losses (`train/ROW/loss`, step = training step) and the dev curves
  (`dev_curve/ROW[/fold-K]/dev_acc`, ...): one point per candidate tried on dev, at step round(p x 10,000)
  when every candidate has a p (so the x axis is p in basis points and runs with other grids line up), else
  at the candidate's index. Only dev numbers go on a curve: a sweep's test column is shown in the report,
  never used, and a tracker's chart of it would invite choosing on test. Step 0 for everything else;
  values that are not finite numbers (an interval that does not exist over folds) are left out;
- `texts`: the verdict; `files`: the report's JSON and Markdown and its plots (images are the .png files).

ROW is the report's own name for a row: `base` and `pruned` in report.json, `base` and each method in
comparison.json. Every part of a tag or key keeps letters, digits, '_', '-' and '.', anything else becomes
'_' (MLflow allows no '+': "lora+eigenprune" is logged as "lora_eigenprune").
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

P_STEP = 10_000  # dev-curve step per unit of p: basis points
MAX_TEXT = 6000  # MLflow's longest parameter value
_REPORT_FILES = ("report.json", "report.md", "comparison.json", "comparison.md", "study.json", "study.md")


def key(*parts) -> str:
    """A tag from its parts, each part reduced to letters, digits, '_', '-' and '.' (see the module docstring)."""
    clean = [re.sub(r"[^\w.\-]+", "_", str(p)).strip("_") or "_" for p in parts]
    return "/".join("_" if c in (".", "..") else c for c in clean)


@dataclass
class Record:
    """One tracker run: its name, settings, numbers, words and files."""

    name: str
    kind: str  # "run", "compare", "study"
    folder: Path  # the output folder the numbers come from
    params: dict[str, str] = field(default_factory=dict)
    scalars: list[tuple[str, float, int]] = field(default_factory=list)  # (tag, value, step)
    texts: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def images(self) -> list[Path]:
        return [f for f in self.files if f.suffix == ".png"]

    def add(self, tag: str, value, step: int = 0) -> None:
        """A scalar, if `value` is a finite number (bools are not numbers here)."""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            self.scalars.append((tag, float(value), int(step)))

    def add_all(self, prefix: str, block) -> None:
        """Every numeric leaf of a nested dict, at step 0, as PREFIX/KEY/SUBKEY (`prefix` is a tag already)."""
        if isinstance(block, dict):
            for k, v in block.items():
                self.add_all(f"{prefix}/{key(k)}", v)
        else:
            self.add(prefix, block)

    def param(self, name: str, value) -> None:
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        self.params[name] = text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


def _settings(record: Record, folder: Path) -> None:
    """config.json, flattened to params (the recorded data hashes and versions included)."""
    path = folder / "config.json"
    if path.is_file():
        for name, value in _flatten(json.loads(path.read_text(encoding="utf-8"))).items():
            record.param(key(*name.split(".")).replace("/", "."), value)


def _files(record: Record, folder: Path) -> None:
    record.files = [folder / n for n in _REPORT_FILES if (folder / n).is_file()] + sorted(folder.glob("*.png"))


def _interval(record: Record, what: str, row: str, block: dict | None) -> None:
    for k in ("acc", "lo", "hi", "n"):
        record.add(key(what, row, k), (block or {}).get(k))


def _difference(record: Record, row: str, d: dict | None) -> None:
    for k in ("diff", "lo", "hi", "p", "p_adjusted", "mde", "discordant", "n"):
        record.add(key("diff", row, k), (d or {}).get(k))


def _chosen(record: Record, row: str, config: dict, part: str | None = None) -> None:
    """A chosen setting (of one fold or seed: `part`): every entry as a param, its numbers as scalars."""
    where = (row,) if part is None else (row, part)
    for k, v in config.items():
        if k == "per_fold" or isinstance(v, dict):
            continue
        record.param(key("chosen", *where, k), v)
        record.add(key("chosen", *where, k), v)


def dev_steps(rows: list[dict]) -> list[int]:
    """Where each candidate of a dev curve goes on the x axis (see the module docstring)."""
    ps = [r.get("p") for r in rows]
    if rows and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in ps):
        return [round(p * P_STEP) for p in ps]
    return list(range(len(rows)))


def _curve(record: Record, row: str, rows: list[dict], part: str | None = None) -> None:
    """One dev curve (of one fold or seed: `part`): each candidate's dev numbers and numeric settings, never its
    test numbers."""
    rows = [r for r in rows if isinstance(r, dict) and r.get("dev_acc") is not None]
    where = (row,) if part is None else (row, part)
    for r, step in zip(rows, dev_steps(rows), strict=True):
        for k, v in r.items():
            if not k.startswith("test"):
                record.add(key("dev_curve", *where, k), v, step)


def _candidates(block: dict) -> list[dict]:
    """The candidates a method tried on dev: its `sweep` if it has one, else its `runs`."""
    extra = block.get("extra") or {}
    return extra.get("sweep") or block.get("runs") or []


def _side_effects(record: Record, section: dict | None) -> None:
    if not section:
        return
    names = {path: info.get("name", path) for path, info in (section.get("also") or {}).items()}
    rename = lambda d: {names.get(k, k): rename(v) for k, v in d.items()} if isinstance(d, dict) else d
    record.add_all("side_effects", rename(section.get("models") or {}))
    record.add_all("side_effects/per_method", {m: {k: v for k, v in s.items() if k != "rows"}
                                               for m, s in (section.get("per_method") or {}).items()})


def run_record(folder: Path, name: str | None = None) -> Record:
    """`eigenprune run`'s report.json (fixed split, --folds or --seeds)."""
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    record = Record(name or folder.name, "run", folder)
    _settings(record, folder)
    for what in ("test", "dev"):
        _interval(record, what, "base", report["base"][what])
        _interval(record, what, "pruned", report["pruned"][what])
    _difference(record, "pruned", report.get("diff_ci"))
    record.add_all("dev_diff/pruned", {k: report.get("dev_diff_ci", {}).get(k) for k in ("diff", "lo", "hi")})
    _chosen(record, "pruned", {"p": report.get("chosen_p"), "n_frozen": report.get("n_frozen")})
    folds = (report.get("folds") or {}).get("per_fold") or []
    repeats = (report.get("repeats") or {}).get("runs") or []
    for f in folds:
        part = f"fold-{f['fold']}"
        _chosen(record, "pruned", {"p": f["chosen_p"], "n_frozen": f["n_frozen"]}, part)
        record.add_all(key("folds", part), {k: v for k, v in f.items() if k not in ("sweep", "chosen_p", "n_frozen")})
        _curve(record, "pruned", f.get("sweep") or [], part)
    for r in repeats:
        part = f"seed-{r['seed']}"
        _chosen(record, "pruned", {"p": r["chosen_p"]}, part)
        record.add_all(key("repeats", part), {k: v for k, v in r.items() if k not in ("sweep", "chosen_p", "seed")})
        _curve(record, "pruned", r.get("sweep") or [], part)
    if not folds and not repeats:
        _curve(record, "pruned", report.get("sweep") or [])
    record.add_all("repeats", {k: report["repeats"][k] for k in ("base_test", "pruned_test", "diff")}
                   if repeats else {})
    _side_effects(record, report.get("side_effects"))
    record.texts["verdict"] = report.get("verdict", "")
    _files(record, folder)
    return record


def compare_record(folder: Path, name: str | None = None) -> Record:
    """`eigenprune compare`'s comparison.json (a fixed split or --folds)."""
    report = json.loads((folder / "comparison.json").read_text(encoding="utf-8"))
    record = Record(name or folder.name, "compare", folder)
    _settings(record, folder)
    folded = "folds" in report
    for what in ("test", "dev"):
        _interval(record, what, "base", report["base"][what])
    for i, acc in enumerate(report["base"]["dev"].get("per_fold") or []):
        record.add(key("dev", "base", f"fold-{i + 1}", "acc"), acc)
    for name_, row in report["methods"].items():
        for what in ("test", "dev"):
            _interval(record, what, name_, row[what])
        for i, acc in enumerate(row["dev"].get("per_fold") or []):
            record.add(key("dev", name_, f"fold-{i + 1}", "acc"), acc)
        _difference(record, name_, row.get("diff_vs_base"))
        record.add_all(key("cost", name_), {k: row.get(k) for k in ("dev_evaluations", "changed_params")})
        if folded:
            for i, run in enumerate(row.get("runs") or []):
                part = f"fold-{run.get('fold', i + 1)}"
                _chosen(record, name_, run.get("config") or {}, part)
                record.add_all(key("folds", name_, part), {k: run.get(k) for k in ("dev_acc", "test_acc", "n_test")})
            for i, part in enumerate((row.get("extra") or {}).get("per_fold") or []):
                _curve(record, name_, _candidates(part), f"fold-{i + 1}")
        else:
            _chosen(record, name_, row.get("config") or {})
            _curve(record, name_, _candidates(row))
        for point in (row.get("extra") or {}).get("loss_curve") or []:
            record.add(key("train", name_, "loss"), point.get("loss"), point.get("step", 0))
    _side_effects(record, report.get("side_effects"))
    record.texts["verdict"] = report.get("verdict", "")
    _files(record, folder)
    return record


def study_records(folder: Path, every_cell: bool = False) -> tuple[Record, list[Record]]:
    """study.json as one record (every cell's rows under CELL/..., differences Holm-adjusted over the whole
    study) and one compare record per cell that ran in the last invocation (`last_run.ran`), or per cell."""
    study = json.loads((folder / "study.json").read_text(encoding="utf-8"))
    record = Record(Path(study.get("spec_file", folder.name)).stem, "study", folder)
    for name, value in _flatten(study.get("spec") or {}).items():
        record.param(key(*name.split(".")).replace("/", "."), value)
    record.add_all("family", {"size": (study.get("family") or {}).get("size")})
    for cell in study["cells"]:
        _interval(record, key(cell["key"], "test"), "base", cell["base"]["test"])
        for name, row in cell["methods"].items():
            _interval(record, key(cell["key"], "test"), name, row["test"])
            record.add_all(key(cell["key"], "diff", name), {k: (row.get("diff_vs_base") or {}).get(k) for k in
                                                            ("diff", "lo", "hi", "p", "p_adjusted", "mde")})
            record.add(key(cell["key"], "significant", name), {"gain": 1, "loss": -1}.get(row.get("significant"), 0))
        record.texts[key("verdict", cell["key"])] = cell.get("verdict", "")
    _files(record, folder)
    ran = [c["key"] for c in study["cells"]] if every_cell else (study.get("last_run") or {}).get("ran") or []
    cells = [compare_record(folder / "cells" / k, k) for k in ran
             if (folder / "cells" / k / "comparison.json").is_file()]
    return record, cells
