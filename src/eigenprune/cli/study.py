"""`eigenprune study SPEC`: its flags and the command; the study itself is `experiments/study.py`.

The spec file and `--out` are checked before anything heavy is imported; checking the spec's contents
(its methods, its settings) needs the registry, and so torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from eigenprune.cli.common import add_common, add_report_to, check_report_to, free_cores
from eigenprune.core import settings
from eigenprune.core.errors import UsageError
from eigenprune.experiments.study_executor import ExecutorConfig


def _check_paths(spec: str, out: str | None) -> None:
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"study spec not found: {path}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"{out} is a file; --out must be a study folder (new, or one this spec ran into)")


def _executor(args, table: dict) -> ExecutorConfig:
    """The spec's [executor] table with the flags given on top."""
    try:
        return settings.from_dict(ExecutorConfig, {**table, **settings.flag_values(args, ExecutorConfig)})
    except ValueError as err:
        raise UsageError(str(err)) from None


def cmd_study(args) -> int:
    _check_paths(args.spec, args.out)
    check_report_to(args.report_to)
    if args.name == "slurm" and importlib.util.find_spec("submitit") is None:  # before seconds of imports
        raise UsageError("--executor slurm needs submitit: pip install 'eigenprune[slurm]'")
    from eigenprune.experiments.study import _check_out, load_spec, plan, run_study

    study = load_spec(args.spec)
    out = Path(args.out or f"runs/study-{study.path.stem}")
    if args.status:
        from eigenprune.experiments.study_claims import status_lines

        _check_out(out)
        print("\n".join(status_lines(out, [c.key for c in study.cells])))
        return 0
    if args.plan:
        _check_out(out)
        state = plan(study, out)
        for title, cells in (("finished (skipped)", state.done), ("to run", state.todo)):
            print(f"{title}: {', '.join(c.key for c in cells) or 'none'}")
        for cell, why in state.stale:
            print(f"changed since it ran: {cell.key} ({why})")
        if state.orphans:
            print(f"in {out}/cells but not in the spec (kept, not reported): {', '.join(state.orphans)}")
        from eigenprune.experiments.study_power import cell_power, power_lines

        print("\n".join(power_lines(cell_power(study, out, args.effect, args.assume_discordance), args.effect,
                                     args.assume_discordance)))
        return 0
    if args.worker:  # one of `--jobs N`: take cells until none is free; the parent renders
        run_study(study, out, args.rerun_changed, quiet=True, worker=True)
        return 0
    cfg = _executor(args, study.executor)
    if cfg.name == "slurm":
        from eigenprune.experiments.study_executor import submit_slurm

        submit_slurm(study, out, cfg, args.rerun_changed, args.quiet)
        return 0
    if cfg.jobs > 1 or cfg.devices:
        from eigenprune.experiments.study_executor import run_local

        threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or free_cores())
        report = run_local(study, out, cfg, threads, args.rerun_changed, args.quiet, report_to=args.report_to)
    else:
        report = run_study(study, out, args.rerun_changed, args.quiet, report_to=args.report_to)
    for cell in report["cells"]:
        base = cell["base"]["test"]
        print(f"{cell['key']}: base test {base['acc']:.3f} (n={base['n']})")
        for name, row in cell["methods"].items():
            d = row["diff_vs_base"]
            mark = {"gain": "  significant gain", "loss": "  significantly worse"}.get(row["significant"], "")
            adjusted = "" if d.get("p_adjusted") is None else f"  p {d['p']:.3f} (Holm {d['p_adjusted']:.3f})"
            print(f"  {name:<16} test {row['test']['acc']:.3f}  diff {d['diff']:+.3f} [{d['lo']:+.3f}, "
                  f"{d['hi']:+.3f}]{adjusted}{mark}")
    last = report["last_run"]
    print(f"ran {len(last['ran'])} cells, skipped {len(last['skipped'])}; report: {report['out']}/study.md")
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got '{text}'") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def add_study_parser(sub, fmt) -> None:
    """`study`: a spec file, an output folder, and how to treat cells whose settings changed."""
    p = sub.add_parser("study", help="a grid of compare runs (models x tasks x targets x methods), resumable",
                       formatter_class=fmt, description=(
                           "Run every model x task x target of a spec as one `eigenprune compare` of all its methods,\n"
                           "then write OUT/study.md, study.json and study.png (test - base per task and method).\n"
                           "Running again skips finished cells; a changed spec names the cells it invalidates.\n"
                           "Cells run in parallel with --jobs N or --executor slurm; processes on one --out share the\n"
                           "work (each cell runs once), so a second study on the same spec joins the first."),
                       epilog=(
                           "examples:\n  eigenprune study studies/smollm2-paper-tasks.toml --out runs/paper\n"
                           "  eigenprune study my-study.toml --out runs/s --plan     # what would run, skip, redo\n"
                           "  eigenprune study my-study.toml --plan --assume-discordance 0.1 --effect 0.05\n"
                           "  eigenprune study my-study.toml --out runs/s --rerun-changed\n"
                           "  eigenprune study my-study.toml --out runs/s --jobs 4            # 4 worker processes\n"
                           "  eigenprune study my-study.toml --out runs/s --jobs 2 --devices 0,1  # one GPU each\n"
                           "  eigenprune study my-study.toml --out runs/s --executor slurm --partition gpu\n"
                           "  eigenprune study my-study.toml --out runs/s --status   # done, running, failed\n\n"
                           "spec format: see studies/README.md"))
    p.add_argument("spec", help="study spec, a .toml or .json file (task and model paths are relative to it)")
    p.add_argument("--out", help="study folder; running again resumes it (default runs/study-SPECNAME)")
    p.add_argument("--rerun-changed", action="store_true",
                   help="redo finished cells whose settings changed (old folders go to OUT/stale/)")
    p.add_argument("--plan", action="store_true", help="print which cells would run, be skipped or redone, and "
                   "what each can detect (n needed for --effect); run none")
    p.add_argument("--effect", type=_fraction, default=0.05,
                   help="with --plan: the change in accuracy to plan for, a fraction (default 0.05 = 5 points)")
    p.add_argument("--assume-discordance", type=_fraction, default=None, metavar="D",
                   help="with --plan: the share of test answers an edit changes, for cells that have not run "
                        "(finished cells use their observed share)")
    add_report_to(p)
    p.add_argument("--status", action="store_true", help="print which cells are done, running (where, since when), "
                   "failed (the failing line) or still to run; run none")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --jobs N's processes
    settings.add_flags(p.add_argument_group("where cells run (override the spec's [executor] table)"), ExecutorConfig)
    add_common(p)
    p.set_defaults(func=cmd_study)
