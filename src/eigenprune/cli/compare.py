"""`eigenprune compare`: its flags and the command; the comparison itself is `experiments/compare.py`.

The flags are `run`'s (less --seeds, --config, --no-sweep-test), `--methods` and `--set METHOD.FIELD=VALUE`.
The list of registered methods and their settings imports every method (and so torch): it is built only
when `--help` is printed. The per-method flags of earlier releases (`--laser-keep` = `--set laser.keep=`)
still work, hidden from the help, with a note to use `--set`; `LEGACY_FLAGS` lists them so the parser needs
no registry (a test keeps it equal to the methods' registered `flags=`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from eigenprune.cli.common import add_common, add_report_to, check_out, check_report_to, check_task
from eigenprune.core.errors import UsageError
from eigenprune.protocol.config import COMPARE_EXCLUDES, add_run_options, config_from_args

# flag -> (method, setting): the registry's `flags=` of the built-in methods
LEGACY_FLAGS = {
    "--random-seeds": ("random", "seeds"),
    "--laser-kinds": ("laser", "kinds"), "--laser-keep": ("laser", "keep"), "--laser-layers": ("laser", "layers"),
    "--laser-last": ("laser", "last"), "--laser-stride": ("laser", "stride"),
    "--icl-demos": ("svd-clip", "demos"), "--icl-seed": ("svd-clip", "demo_seed"), "--clip-keep": ("svd-clip", "keep"),
}
_LEGACY_DEST = "legacy_flag"


def _method_arg(text: str) -> tuple[str, str, str]:
    key, eq, raw = text.partition("=")
    method, dot, arg = key.rpartition(".")
    if not (eq and dot and method and arg.isidentifier()):
        raise argparse.ArgumentTypeError(f"expected METHOD.FIELD=VALUE, got '{text}'")
    return method, arg, raw


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:  # `--methods ""` is a mistake, not a request for the defaults
        raise argparse.ArgumentTypeError(f"expected comma-separated method names, got '{text}'")
    return names


def method_args(args) -> dict[str, dict]:
    """method -> {setting: raw value} from `--set` and the legacy flags (each of which gets a note)."""
    given: dict[str, dict] = {}
    for key, raw in vars(args).items():
        if key.startswith(_LEGACY_DEST + ":") and raw is not None:
            flag = key.split(":", 1)[1]
            method, name = LEGACY_FLAGS[flag]
            print(f"note: {flag} is deprecated; use --set {method}.{name}={raw}", file=sys.stderr)
            given.setdefault(method, {})[name] = raw
    for method, arg, raw in args.method_args or []:
        given.setdefault(method, {})[arg] = raw
    return given


def cmd_compare(args) -> int:
    if not args.task:
        raise UsageError("compare needs --task")
    given = method_args(args)
    cfg = config_from_args(args, exclude=COMPARE_EXCLUDES)
    check_task(cfg.task)
    check_out(args.out)
    check_report_to(args.report_to)
    from eigenprune.experiments.compare import CompareConfig, compare

    try:
        opts = CompareConfig(methods=tuple(args.methods or ()), method_args=given)
    except ValueError as err:
        raise UsageError(str(err)) from None
    report = compare(cfg, opts, args.out, args.quiet, args.report_to)
    base = report["base"]["test"]
    print(f"{report['task']}: base test {base['acc']:.3f} [{base['lo']:.3f}, {base['hi']:.3f}] (n={base['n']})")
    for name, row in report["methods"].items():
        t, d = row["test"], row["diff_vs_base"]
        print(f"  {name:<16} test {t['acc']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}]  diff {d['diff']:+.3f} "
              f"[{d['lo']:+.3f}, {d['hi']:+.3f}]  dev evals {row['dev_evaluations']}")
    print(report["verdict"])
    print(f"report: {report['out']}/comparison.md")
    return 0


def methods_help() -> str:
    """The registered methods: each one's summary and the names of its `--set` settings (imports every method)."""
    import textwrap

    from eigenprune.experiments.compare import default_methods
    from eigenprune.methods import registry

    lines = [f"\n\nmethods (default: {','.join(default_methods())}); what each setting means and its default: "
             "--help-method NAME"]
    for name, m in registry.methods().items():
        kind = " (a learned stage: also STAGE+METHOD)" if m.stage is not None else ""
        needs = f" (runs {', '.join(m.needs)} first)" if m.needs else ""
        lines += textwrap.wrap(f"{name}{kind}{needs}: {m.summary}", 100, initial_indent="  ",
                               subsequent_indent="    ", break_long_words=False)
        fields = [f.name for f in dataclasses.fields(m.config)]
        lines += textwrap.wrap(f"--set {name}.FIELD=VALUE, FIELD one of: {', '.join(fields)}", 100,
                               initial_indent="    ", subsequent_indent="      ", break_long_words=False)
    return "\n".join(lines)


class _MethodHelp(argparse.Action):
    """`--help-method NAME`: one method's summary and every setting with its help and default; then exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        from eigenprune.methods import registry

        try:
            spec = registry.resolve(values)
        except UsageError as err:
            parser.error(str(err))
        for m in spec.parts:  # a composite: its stage, then its method
            print(f"{m.name}: {m.summary}\nsettings (--set {spec.name}.FIELD=VALUE):")
            print(registry.settings.describe_fields(m.config))
        parser.exit()


def add_compare_parser(sub, fmt) -> None:
    """`compare`: `run`'s settings (less --seeds, --config, --no-sweep-test), the methods and their settings."""
    p = sub.add_parser("compare", help="eigenprune against random/smallest controls, LASER, SVD clipping, LoRA, ...",
                       description="Run eigenprune and the methods you might use instead on the same model and "
                                   "split; each chooses on dev and is tested once.",
                       formatter_class=fmt, lazy_epilog=methods_help, epilog=(
                           "examples:\n  eigenprune compare --task int-mult --methods eigenprune,random,laser "
                           "--set laser.keep=0.5,0.1 --out runs/cmp\n"
                           "  eigenprune compare --task cb --methods eigenprune,lora,lora+eigenprune "
                           "--set lora.steps=100 --out runs/cmp-cb"))
    add_run_options(p, exclude=COMPARE_EXCLUDES)
    p.add_argument("--methods", type=_names, help="method names or STAGE+METHOD composites (default: listed below)")
    p.add_argument("--set", dest="method_args", action="append", type=_method_arg, metavar="METHOD.FIELD=VALUE",
                   help="one setting of one method (or composite), VALUE as text or JSON; repeatable "
                        "(e.g. lora.steps=50, laser.keep=0.5,0.1)")
    for flag in LEGACY_FLAGS:  # deprecated spellings of --set: they work, unlisted
        p.add_argument(flag, dest=f"{_LEGACY_DEST}:{flag}", default=None, help=argparse.SUPPRESS)
    p.add_argument("--help-method", action=_MethodHelp, metavar="NAME",
                   help="print one method's settings, what each means and its default, and exit")
    p.add_argument("--out", help="output directory (default runs/compare-TASK-TIMESTAMP)")
    add_report_to(p)
    add_common(p)
    p.set_defaults(func=cmd_compare)
