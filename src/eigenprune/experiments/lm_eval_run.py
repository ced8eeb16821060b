"""The base model and edited ones on lm-evaluation-harness tasks, paired example by example.

`run_lm_eval` is `eigenprune lm-eval`: one saved edit, applied in memory (`apply_saved_edit`), so position-dependent
edits, which no merged model can hold, are evaluated as they are. The output folder holds lm-eval's own results JSON
(and per-sample logs) for both models, `base/` and `edit/`, and report.json / report.md: per task and metric, base →
edit with CIs and the paired difference (`reports.lm_eval_report`).

`LmEvalProbe` is the side effect `--also lm-eval:TASK` of run/compare/study: the base evaluated once, then each
edit while it is applied (every fold's choice, through `fold_side_effects.FoldSideEffects`), and one table of
base → edit rows whose p-values are Holm-adjusted together.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from eigenprune.core.outdir import atomic_dir, check_new_dir
from eigenprune.evaluation.lm_eval_bridge import evaluate_tasks, require_lm_eval
from eigenprune.reports.lm_eval_report import accuracies, judge, paired_table, table_markdown


@dataclass
class LmEvalConfig:
    """What to evaluate and how."""

    tasks: list[str] = field(metadata={"help": "lm-eval task names (eigenprune_cb etc. are written on the fly)"})
    include_path: list[str] = field(default_factory=list, metadata={"help": "folders of local lm-eval YAML tasks"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N examples of each task"})
    batch_size: int = field(default=16, metadata={"help": "lm-eval batch size"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples for the CIs"})

    def __post_init__(self) -> None:
        if not self.tasks or not all(self.tasks):
            raise ValueError("tasks must name at least one lm-eval task")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if self.batch_size < 1 or self.n_boot < 1:
            raise ValueError("batch_size and n_boot must be at least 1")


def _write_results(folder: Path, results: dict) -> None:
    """lm-eval's results JSON (as its own CLI writes it, samples apart) and one samples JSONL per task."""
    from lm_eval.utils import handle_non_serializable

    folder.mkdir()
    summary = {k: v for k, v in results.items() if k != "samples"}
    (folder / "results.json").write_text(json.dumps(summary, indent=2, default=handle_non_serializable) + "\n")
    for task, samples in results.get("samples", {}).items():
        (folder / f"samples_{task}.jsonl").write_text(
            "".join(json.dumps(s, default=handle_non_serializable) + "\n" for s in samples))


def run_lm_eval(model, tokenizer, edit_dir: str | Path, config: LmEvalConfig, out: str | Path | None = None) -> dict:
    """Evaluate `model` (the edit's base, as loaded) without and with the saved edit; returns the report and,
    with `out`, writes it (base/, edit/, report.json, report.md). The model is left without the edit."""
    from eigenprune.edits.artifact import apply_saved_edit
    from eigenprune.edits.freeze import remove_edit

    require_lm_eval()
    if out is not None:
        check_new_dir(out)
    with tempfile.TemporaryDirectory(prefix="eigenprune-lm-eval-") as folder:
        run = dict(include_path=config.include_path, limit=config.limit, batch_size=config.batch_size,
                   task_folder=folder)
        base = evaluate_tasks(model, tokenizer, config.tasks, **run)
        _, meta = apply_saved_edit(model, edit_dir)
        try:
            edited = evaluate_tasks(model, tokenizer, config.tasks, **run)
        finally:
            remove_edit(model)
        rows = judge(paired_table(base, edited, config.tasks, config.n_boot))
        report = {"edit": str(edit_dir), "base_model": meta.get("base_model"), "config": dataclasses.asdict(config),
                  "rows": rows, "lm_eval_version": base.get("lm_eval_version")}
        if out is not None:
            with atomic_dir(out) as tmp:
                _write_results(tmp / "base", base)
                _write_results(tmp / "edit", edited)
                if any(Path(folder).iterdir()):  # eigenprune_<task> YAMLs: what lm-eval read
                    shutil.copytree(folder, tmp / "tasks")
                (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
                (tmp / "report.md").write_text(table_markdown(rows, str(edit_dir)))
    return report



class LmEvalProbe:
    """lm-eval tasks on the base model (evaluated here, once) and on each edit `measure` is handed."""

    def __init__(self, model, tokenizer, config: LmEvalConfig, progress: bool = True) -> None:
        require_lm_eval()
        self.tokenizer, self.config, self.progress = tokenizer, config, progress
        self._folder = tempfile.TemporaryDirectory(prefix="eigenprune-lm-eval-")  # eigenprune_<task> YAMLs
        self.base = self._evaluate(model)
        self.edits: dict[str, dict] = {}

    def _evaluate(self, model) -> dict:
        c = self.config
        return evaluate_tasks(model, self.tokenizer, c.tasks, c.include_path, c.limit, c.batch_size, self._folder.name,
                              progress=self.progress)

    def measure(self, name: str, model) -> None:
        """lm-eval on `model` as it is now (the edit `name` applied)."""
        if name in self.edits:
            raise ValueError(f"lm-eval side effects of {name!r} are already measured")
        self.edits[name] = self._evaluate(model)

    def section(self) -> dict:
        """JSON-ready: the settings, and one row per edit, task and metric (base → edit, paired, Holm over all)."""
        rows = [{"model": name, **row} for name, results in self.edits.items()
                for row in paired_table(self.base, results, self.config.tasks, self.config.n_boot)]
        judge(rows)
        c = self.config
        return {"tasks": list(c.tasks), "include_path": list(c.include_path), "limit": c.limit,
                "lm_eval_version": self.base.get("lm_eval_version"), "base": accuracies(self.base, c.tasks, c.n_boot),
                "family": sum(r["diff"]["p"] is not None for r in rows), "rows": rows}
