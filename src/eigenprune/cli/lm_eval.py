"""`eigenprune lm-eval`: an edit judged by lm-evaluation-harness tasks, base → edit with paired CIs.

lm-eval is an optional extra (`pip install 'eigenprune[lm-eval]'`); without it the command says so in one line.
"""

from __future__ import annotations

from eigenprune.cli.common import add_common, check_out
from eigenprune.core.errors import UsageError


def cmd_lm_eval(args) -> int:
    if args.out:
        check_out(args.out)  # before any heavy import: a clash answers at once
    from eigenprune.cli import _load
    from eigenprune.edits.artifact import load_edit
    from eigenprune.evaluation.lm_eval_bridge import require_lm_eval
    from eigenprune.experiments.lm_eval_run import LmEvalConfig, run_lm_eval

    require_lm_eval()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        config = LmEvalConfig(tasks, args.include_path or [], args.limit, args.batch_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    _, meta = load_edit(args.edit)
    args.model = args.model or meta["base_model"]
    args.dtype = args.dtype or meta["base_fingerprint"]["dtype"]
    model, tok = _load(args)
    report = run_lm_eval(model, tok, args.edit, config, args.out)
    from eigenprune.reports.lm_eval_report import table_markdown

    print(table_markdown(report["rows"], args.edit), end="")
    if args.out:
        print(f"lm-eval results (base/, edit/) and report.md -> {args.out}")
    return 0


def add_lm_eval_parser(sub, fmt) -> None:
    p = sub.add_parser("lm-eval", help="evaluate base and edit on lm-evaluation-harness tasks (paired CIs)",
                       formatter_class=fmt, description=(
                           "Evaluate the base model and the edited model (the edit applied in memory, so edits that\n"
                           "cannot be merged are evaluated too) with EleutherAI's lm-evaluation-harness; write\n"
                           "lm-eval's results for both and a table of base -> edit with paired CIs per task."),
                       epilog=(
                           "examples:\n  eigenprune lm-eval --edit runs/cb-edit --tasks eigenprune_cb --out runs/lm\n"
                           "  eigenprune lm-eval --edit runs/edit --tasks my_task --include-path my-yamls --limit 100"
                           "\n\neigenprune_cb, eigenprune_copa, eigenprune_rte: eigenprune's own prompts and choices "
                           "(validation split) as local lm-eval tasks, offline."))
    p.add_argument("--edit", required=True, help="edit directory written by `prune` (or a run's edit)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", action="append", help="folder of local lm-eval YAML tasks (repeatable)")
    p.add_argument("--limit", type=int, default=None, help="the first N examples of each task")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size (default 16)")
    p.add_argument("--out", default=None, help="folder to write (must not exist)")
    p.add_argument("--model", default=None, help="base model (default: the one the edit records)")
    p.add_argument("--dtype", default=None, help="default: the dtype the edit was made in")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
    add_common(p, quiet=False)
    p.set_defaults(func=cmd_lm_eval)
