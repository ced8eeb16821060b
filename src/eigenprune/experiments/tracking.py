"""`--report-to`: a finished run, compare or study logged to TensorBoard, MLflow or Weights & Biases.

The convention of transformers' `TrainingArguments.report_to`: a comma list of tracker names, or `none`, the
default (nothing is logged, no tracker is imported). Each tracker is an optional extra
(`pip install 'eigenprune[tensorboard]'`); a missing one is a one-line usage error before any work starts.

Logging starts once the output folder is complete and reads only its files (`reports.tracker_record`), so a
tracker holds the report's numbers and nothing else. A tracker that fails then (a full disk, a server that does
not answer, no wandb login) loses no result: the folder is already written. The failure is one warning line on
stderr and the command still exits 0, because the experiment did finish: a scheduler that saw a failed job would
redo hours of work to repair a copy. `eigenprune track OUT --report-to NAME` (`log_folder`) logs it again, and
exits 1 if a tracker fails there, since logging is all it does.

Where each tracker writes:
- tensorboard: OUT/tensorboard (`tensorboard --logdir OUT`): the scalars, the settings and verdict as text, the
  plots as images. Logging a folder again replaces its event files.
- mlflow: MLFLOW_TRACKING_URI if set, else a local file store, OUT/mlruns; experiment MLFLOW_EXPERIMENT_NAME or
  "eigenprune": params, metrics (with their steps), the verdict, and the report files and plots as artifacts.
  MLflow 3 keeps its file store in maintenance mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true, which is
  set while logging to a `file:` store. (Its database stores need the full `mlflow` package, whose pins
  would change pyarrow and cryptography in eigenprune's test environment; mlflow-skinny is enough here.)
- wandb: project WANDB_PROJECT or "eigenprune", files under OUT/wandb; WANDB_MODE (offline, disabled) is wandb's
  own. The params as config, the scalars step by step, the step-0 numbers as the run's summary, the plots as
  images and the report files as one artifact.

A study is one tracker run per cell that ran in this invocation (`eigenprune track` logs every cell) plus one
for the study's summary; a cell's TensorBoard logs live in its folder, OUT/cells/KEY/tensorboard
(so they move with it to OUT/stale/ when it is redone), the summary's in OUT/tensorboard, replaced on every
invocation like study.json. In MLflow the cells are nested runs of the summary's run; in wandb they share
the group named after the spec.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from eigenprune.core.errors import UsageError

NONE = "none"


@dataclass(frozen=True)
class Tracker:
    """A tracker: the module it needs, the extra that installs it, and how it logs a summary record and the
    records nested under it (a study's cells) into an output folder."""

    module: str
    extra: str
    log: Callable  # (summary: Record, children: list[Record], root: Path) -> where it logged, in words


def _tensorboard(summary, children, root: Path) -> str:
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    from eigenprune.reports.tracker_record import key

    for record in [summary, *children]:
        logdir = record.folder / "tensorboard"
        for old in logdir.glob("events.out.tfevents.*"):  # logged again: the folder's numbers, once
            old.unlink()
        writer = SummaryWriter(log_dir=str(logdir))
        try:
            escape = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # a Markdown table cell
            writer.add_text("settings", "| setting | value |\n|---|---|\n" + "\n".join(
                f"| {escape(k)} | {escape(v)} |" for k, v in sorted(record.params.items())))
            for name, text in record.texts.items():
                writer.add_text(name, text)
            for tag, value, step in record.scalars:
                writer.add_scalar(tag, value, step)
            for png in record.images:
                with Image.open(png) as image:
                    pixels = np.asarray(image.convert("RGB"))  # (height, width, 3)
                writer.add_image(key("plots", png.stem), pixels, 0, dataformats="HWC")
        finally:
            writer.close()
    return f"{summary.folder / 'tensorboard'} (tensorboard --logdir {shlex.quote(str(root))})"


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLFLOW_ALLOW_FILE_STORE=true while logging to a `file:` store (see the module docstring)."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if uri.startswith("file:") and not (before or "").strip():  # unset or empty; an explicit "false" stands
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def mlflow_uri(root: Path) -> str:
    """The MLflow store: MLFLOW_TRACKING_URI, else the file store ROOT/mlruns."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(root) / "mlruns").resolve().as_uri()


def _mlflow(summary, children, root: Path) -> str:
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(root)
    with _file_store_allowed(uri):
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "eigenprune"
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else client.create_experiment(name)

        def one(record, tags: dict) -> str:
            run = client.create_run(experiment, run_name=record.name, tags={
                "eigenprune.kind": record.kind, "eigenprune.folder": str(record.folder.resolve()), **tags})
            run_id, status = run.info.run_id, "FAILED"
            try:
                now = int(time.time() * 1000)
                params = [Param(k, v) for k, v in record.params.items()]
                metrics = [Metric(tag, value, now, step) for tag, value, step in record.scalars]
                for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
                    client.log_batch(run_id, params=params[i:i + 100])
                for i in range(0, len(metrics), 1000):
                    client.log_batch(run_id, metrics=metrics[i:i + 1000])
                for text_name, text in record.texts.items():
                    client.log_text(run_id, text, f"{text_name}.txt")
                for path in record.files:
                    client.log_artifact(run_id, str(path))
                status = "FINISHED"
            finally:
                client.set_terminated(run_id, status)
            return run_id

        parent = one(summary, {})
        for record in children:
            one(record, {"mlflow.parentRunId": parent})
    return f"{uri}, experiment {name!r}, run {parent}"


def _wandb(summary, children, root: Path) -> str:
    import wandb

    from eigenprune.reports.tracker_record import key

    for record in [*children, summary]:
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "eigenprune", name=record.name, dir=str(root),
                         config=dict(record.params), job_type=record.kind, group=summary.name if children else None)
        try:
            steps: dict[int, dict] = {}
            for tag, value, step in record.scalars:
                steps.setdefault(step, {})[tag] = value
            last = max(steps, default=0)
            steps.setdefault(last, {}).update({key("plots", p.stem): wandb.Image(str(p)) for p in record.images})
            for step in sorted(steps):  # wandb wants its steps in order
                run.log(steps[step], step=step)
            run.summary.update({**steps.get(0, {}), **record.texts})
            artifact = wandb.Artifact(key(f"{record.kind}-{record.name}").replace("/", "-"), type="eigenprune-report")
            for path in record.files:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
        finally:
            run.finish()
    return f"project {os.environ.get('WANDB_PROJECT') or 'eigenprune'}, files in {Path(root) / 'wandb'}"


TRACKERS = {
    "tensorboard": Tracker("tensorboard", "tensorboard", _tensorboard),
    "mlflow": Tracker("mlflow", "mlflow", _mlflow),
    "wandb": Tracker("wandb", "wandb", _wandb),
}


def parse_report_to(text: str) -> tuple[str, ...]:
    """`--report-to`'s value: tracker names, comma-separated, or `none`; raises ValueError naming the choices."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names == (NONE,):
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if not names or unknown:
        said = f"unknown tracker '{unknown[0]}'" if unknown and unknown[0] != NONE else f"'{text}'"
        raise ValueError(f"{said}: --report-to takes {', '.join(TRACKERS)} (comma-separated) or {NONE}")
    return names


def _installed(module: str) -> bool:
    if sys.modules.get(module) is not None:  # imported already (or put there by a test)
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_installed(names: Iterable[str]) -> None:
    """Each named tracker's package is importable (found, not imported), or one line naming the extra."""
    for name in names:
        tracker = TRACKERS[name]
        if not _installed(tracker.module):
            raise UsageError(f"--report-to {name} needs the {tracker.module} package: "
                             f"pip install 'eigenprune[{tracker.extra}]'")


def records(out: Path, every_cell: bool = False):
    """The summary record of an output folder and the records nested under it: a study's cells that ran in its
    last invocation, or with `every_cell` all of them."""
    from eigenprune.reports.tracker_record import compare_record, run_record, study_records

    if (out / "study.json").is_file():
        return study_records(out, every_cell)
    if (out / "comparison.json").is_file():
        return compare_record(out), []
    if (out / "report.json").is_file():
        return run_record(out), []
    raise UsageError(f"{out} holds no report.json, comparison.json or study.json to log")


def log_folder(out: str | Path, names: Iterable[str], every_cell: bool = False) -> bool:
    """Log a finished output folder to each named tracker (a study: with `every_cell`, all its cells, else those
    its last invocation ran), saying where on stderr; a tracker that fails is one warning line instead (see the
    module docstring). Returns whether every tracker logged."""
    names = tuple(names)
    if not names:
        return True
    check_installed(names)
    out = Path(out)

    def warn(name: str, err: Exception) -> None:
        said = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"warning: --report-to {name} failed ({type(err).__name__}: {said}); {out} is complete and kept; "
              f"log it again with: eigenprune track {shlex.quote(str(out))} --report-to {name}", file=sys.stderr)

    try:
        summary, children = records(out, every_cell)
    except UsageError:  # `track` on a folder that holds no report
        raise
    except Exception as err:  # a report this module cannot read (a method's odd `extra`): no tracker gets it
        for name in names:
            warn(name, err)
        return False
    ok = True
    for name in names:
        try:
            where = TRACKERS[name].log(summary, children, out)
            print(f"{name}: {where}", file=sys.stderr)
        except Exception as err:  # Ctrl-C and SIGTERM (BaseException) still stop the command
            ok = False
            warn(name, err)
    return ok
