"""`eigenprune run`: its flags (generated from `RunConfig`) and the command; the experiment is `experiments/run.py`.

Nothing here imports torch: the settings, the task name and `--out` are checked first, and the experiment
is imported only when they pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from eigenprune.cli.common import add_common, add_report_to, check_out, check_report_to, check_task
from eigenprune.core.errors import UsageError
from eigenprune.protocol.config import add_run_options, config_from_args, config_from_file


def cmd_run(args) -> int:
    expected = None
    if args.config:
        cfg = config_from_file(args.config)
        expected = json.loads(Path(args.config).read_text(encoding="utf-8")).get("recorded")
    else:
        if not args.task:
            raise UsageError("run needs --task (or --config DIR/config.json)")
        cfg = config_from_args(args)
    check_task(cfg.task)
    check_out(args.out)
    check_report_to(args.report_to)
    from eigenprune.experiments.run import execute

    report = execute(cfg, args.out, args.quiet, expected, args.allow_changed, args.report_to)
    from eigenprune.reports.run_report import console_lines

    print("\n".join(console_lines(report)))
    print(f"report: {report['out']}/report.md")
    return 0


def add_run_parser(sub, fmt) -> None:
    p = sub.add_parser("run", help="the whole experiment: base, score, choose p on dev, test once, report",
                       description="Score every component once on train, try each p on dev (p = 0, the base model, "
                                   "always competes), test the chosen edit once, and write a report.",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune run --task int-mult --limit 100 --out runs/mult\n"
                           "  eigenprune run --model ./gpt2 --task cb --targets key --p 0.01,0.05,0.1 --seeds 3\n"
                           "  eigenprune run --config runs/mult/config.json --out runs/mult-again"))
    p.add_argument("--config", help="repeat a run from its config.json (other settings are ignored)")
    p.add_argument("--allow-changed", action="store_true",
                   help="with --config: run even if the task data or the model weights differ from the recorded run")
    add_run_options(p)
    p.add_argument("--out", help="output directory (default runs/TASK-TIMESTAMP)")
    add_report_to(p)
    add_common(p)
    p.set_defaults(func=cmd_run)
