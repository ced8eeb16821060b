"""`eigenprune track OUT --report-to TRACKERS`: log a finished run, compare or study folder to trackers.

What `--report-to` does at the end of a command (`experiments/tracking.py`), for a folder that is already
written: one made without `--report-to`, or one whose tracker failed at logging time (the warning names this
command). For a study it logs every cell, not only the ones its last invocation ran. It reads only the folder's report
files (TensorBoard's writer, torch.utils.tensorboard, imports torch).
"""

from __future__ import annotations

from pathlib import Path

from eigenprune.cli.common import add_common, check_report_to, report_to_names
from eigenprune.core.errors import UsageError


def cmd_track(args) -> int:
    if not args.report_to:
        raise UsageError("track needs --report-to TRACKERS (tensorboard, mlflow, wandb)")
    if not Path(args.out).is_dir():
        raise UsageError(f"{args.out} is not a folder; give a run, compare or study output folder")
    check_report_to(args.report_to)
    from eigenprune.experiments.tracking import log_folder

    return 0 if log_folder(args.out, args.report_to, every_cell=True) else 1


def add_track_parser(sub, fmt) -> None:
    p = sub.add_parser("track", help="log a finished run, compare or study folder to TensorBoard, MLflow or wandb",
                       description="Log an output folder's settings, dev curves, chosen settings, test results and "
                                   "plots to experiment trackers, as --report-to does when a command finishes.",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune track runs/cmp --report-to tensorboard\n"
                           "  eigenprune track runs/paper --report-to mlflow,tensorboard   # a study: every cell"))
    p.add_argument("out", help="a folder holding report.json, comparison.json or study.json")
    p.add_argument("--report-to", type=report_to_names, default=(), metavar="TRACKERS", required=True,
                   help="tensorboard, mlflow and/or wandb, comma-separated")
    add_common(p, quiet=False)  # TensorBoard's writer comes with torch
    p.set_defaults(func=cmd_track)
