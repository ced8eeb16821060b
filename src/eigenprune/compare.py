"""`eigenprune compare`: eigenprune and its competitors on one model, one task split, one eval mode.

Every method gets the same `Harness` (model, splits, eval mode, settings), chooses its configuration
on dev only and has its chosen configuration evaluated on test once. The base model is evaluated
once and shared. The output directory (written atomically: complete or absent) holds
comparison.json (all numbers), comparison.md (a table and a plain-words verdict), comparison.png
(test accuracy with 95% CIs, the base model as a reference line), config.json and, for every method
that can save one, its chosen edit under edits/<method>/ (reloadable with `apply_saved_edit`).

`random` and `smallest` reuse eigenprune's scoring run (its SVDs and mean inputs) and `random` takes
eigenprune's chosen number of frozen components, so when either is asked for without `eigenprune`,
eigenprune runs as well (implicitly, and the report says so). Method modules are imported only when
their method is asked for, so a missing optional baseline (or its dependency) fails only then.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .baselines.base import MethodResult
from .compare_report import plot_comparison, render_markdown, verdict
from .errors import UsageError
from .experiment import RunConfig, _floats, add_run_options, ci, diff_ci

# method name -> (module under eigenprune.baselines, function); imported lazily
METHODS: dict[str, tuple[str, str]] = {
    "eigenprune": ("eigenprune_method", "run_eigenprune"),
    "random": ("controls", "run_random"),
    "smallest": ("controls", "run_smallest"),
    "laser": ("laser", "run_laser"),
    "svd-clip": ("svd_clip", "run_svd_clip"),
    "feature-space": ("feature_space", "run_feature_space"),
    "lora": ("lora", "run_lora"),
    "lora+eigenprune": ("lora", "run_lora_eigenprune"),
}
DEFAULT_METHODS = ("eigenprune", "random", "smallest", "laser", "svd-clip")
# arguments that only exist once eigenprune has run: a method requiring one makes eigenprune run first
FROM_EIGENPRUNE = ("score_run", "n_frozen", "eigenprune_edit", "eigenprune_result")
_NOT_JSON = ("score_run", "edit", "report")  # live objects (and run_one's full report) kept out of the JSON


@dataclass
class CompareConfig:
    """What `compare` adds to the run settings: the methods and their own grids."""

    methods: tuple[str, ...] = field(default=DEFAULT_METHODS, metadata={"help": "methods to compare"})
    random_seeds: int = field(default=5, metadata={"help": "seeds of the random control"})
    laser_kinds: tuple[str, ...] = field(default=("mlp-in", "mlp-out", "key"), metadata={"help": "LASER types"})
    laser_keep: tuple[float, ...] = field(default=(0.9, 0.5, 0.25, 0.1, 0.05, 0.01),
                                          metadata={"help": "LASER kept fractions"})
    laser_layers: tuple[int, ...] | None = field(default=None, metadata={"help": "LASER layers (None: budget)"})
    laser_last: int = field(default=4, metadata={"help": "LASER tries the last N layers ..."})
    laser_stride: int = field(default=8, metadata={"help": "... plus every N-th layer"})
    icl_demos: int = field(default=4, metadata={"help": "svd-clip demonstrations per prompt"})
    icl_seed: int = field(default=0, metadata={"help": "seed of the demonstration draw"})
    clip_keep: tuple[float, ...] = field(default=(1.0, 0.95, 0.5, 0.1, 0.05, 0.01),
                                         metadata={"help": "svd-clip kept fractions"})
    method_args: dict[str, dict] = field(default_factory=dict,
                                         metadata={"help": "method -> keyword arguments for its function"})

    def __post_init__(self) -> None:
        self.methods = tuple(dict.fromkeys(m.strip() for m in self.methods if m.strip()))
        if not self.methods:
            raise ValueError("methods needs at least one method")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods: unknown method '{unknown[0]}'; choose from {', '.join(METHODS)}")
        if self.random_seeds < 1:
            raise ValueError(f"random_seeds must be at least 1, got {self.random_seeds}")
        self.laser(), self.clip()  # their own validation, with field names of their own
        for name in self.method_args:
            if name not in METHODS:
                raise ValueError(f"method_args: unknown method '{name}'")

    def arguments(self, name: str, cfg: RunConfig) -> dict:
        """The keyword arguments compare gives method `name` beyond the shared ones; --set wins."""
        own = {"random": {"seeds": self.random_seeds}, "smallest": {"ps": list(cfg.p)},
               "laser": {"config": self.laser()}, "svd-clip": {"config": self.clip()}}
        return own.get(name, {}) | self.method_args.get(name, {})

    def laser(self):
        from .baselines.laser import LaserConfig

        return LaserConfig(self.laser_kinds, self.laser_keep, self.laser_layers, self.laser_last, self.laser_stride)

    def clip(self):
        from .baselines.svd_clip import ClipConfig

        return ClipConfig(demos=self.icl_demos, demo_seed=self.icl_seed, keep=self.clip_keep)


def load_method(name: str):
    """The method's function, imported now; a module that is missing is one line, not a traceback."""
    module_name, function = METHODS[name]
    try:
        module = importlib.import_module(f"eigenprune.baselines.{module_name}")
    except ModuleNotFoundError as err:
        raise UsageError(f"method '{name}' is not available: {err.msg} (eigenprune.baselines.{module_name} or "
                         "a package it needs is missing; `pip install 'eigenprune[baselines]'`)") from None
    if not hasattr(module, function):
        raise UsageError(f"method '{name}' is not available: eigenprune.baselines.{module_name} has no {function}")
    return getattr(module, function)


def _required(fn) -> set[str]:
    return {n for n, p in list(inspect.signature(fn).parameters.items())[1:]
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def plan(methods: tuple[str, ...]) -> tuple[list[str], list[str], dict]:
    """(methods in run order, methods added implicitly, name -> function); eigenprune runs first."""
    functions = {name: load_method(name) for name in methods}
    implicit = []
    if "eigenprune" not in functions and any(_required(fn) & set(FROM_EIGENPRUNE) for fn in functions.values()):
        functions["eigenprune"], implicit = load_method("eigenprune"), ["eigenprune"]
    order = (["eigenprune"] if "eigenprune" in functions else []) + [m for m in methods if m != "eigenprune"]
    return order, implicit, functions


def _arguments(name: str, fn, shared: dict, own: dict) -> dict:
    """Shared values (base, eigenprune's results, ...) go only to parameters named like them; a method's own
    arguments (its grid, --set) must be accepted by name or by **kwargs."""
    params = inspect.signature(fn).parameters
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(own) - named)
        if unknown:
            raise UsageError(f"method '{name}' takes no argument '{unknown[0]}' (its arguments: "
                             f"{', '.join(sorted(named - {'harness'}))})")
    return {k: v for k, v in shared.items() if k in named} | own


def _plain(value):
    """JSON-ready copy: tensors become lists, tuples lists, dict keys strings."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def method_row(result: MethodResult, base: dict[str, torch.Tensor], n_boot: int) -> dict:
    return {"config": _plain(result.config), "dev": ci(result.dev, n_boot), "test": ci(result.test, n_boot),
            "diff_vs_base": diff_ci(base["test"], result.test, n_boot), "dev_evaluations": result.dev_evaluations,
            "wall_s": result.wall_s, "changed_params": result.changed_params, "runs": _plain(result.runs),
            "extra": _plain({k: v for k, v in result.extra.items() if k not in _NOT_JSON}), "saved_edit": None}


def compare(cfg: RunConfig, opts: CompareConfig, out: str | Path | None = None, quiet: bool = False) -> dict:
    """Run every method on the same splits and write the comparison directory; returns the report."""
    from .artifact import atomic_dir, fingerprint
    from .evaluate import next_token_warnings
    from .experiment import Harness
    from .models import load_model
    from .positions import tracker_of
    from .targets import linear_modules
    from .tasks import load_task, split_task

    out = Path(out or f"runs/compare-{Path(cfg.task).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise UsageError(f"{out} already exists; choose another --out or remove it")
    order, implicit, functions = plan(opts.methods)
    for name, fn in functions.items():  # a bad --set fails now, not after an hour of other methods
        _arguments(name, fn, {}, opts.arguments(name, cfg))
        if name.startswith("lora"):
            from .baselines.lora import tune_config

            tune_config(opts.arguments(name, cfg))
    # LoRA alone and LoRA + eigenprune with the same settings share one fine-tune
    share_tune = {"lora", "lora+eigenprune"} <= set(order) and (
        opts.arguments("lora", cfg) == opts.arguments("lora+eigenprune", cfg))
    task = load_task(cfg.task, cfg.template, cfg.answers)
    mode = cfg.eval_mode or task.eval_mode
    splits = split_task(task, cfg.dev_fraction, cfg.split_seed, cfg.limit)
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device, device_map=cfg.device_map)
    timings = {"load": time.perf_counter() - t0}
    warnings = next_token_warnings(tok, splits.train + splits.test) if mode == "next-token" else []
    harness = Harness(model, tok, splits, mode, cfg, quiet)
    t0 = time.perf_counter()
    base = {"dev": harness.evaluate("dev"), "test": harness.evaluate("test")}
    timings["base_eval"] = time.perf_counter() - t0
    weights = lambda: fingerprint(model, [n for n, _ in linear_modules(model)])  # every linear layer's weights
    untouched = weights()
    shared = {"base": base, "freeze": cfg.freeze(0.0)}
    results: dict[str, MethodResult] = {}
    pending: dict[str, MethodResult] = {}  # results computed alongside another method's
    for name in order:
        if not quiet:
            print(f"compare: running {name}", file=sys.stderr)
        kwargs = _arguments(name, functions[name], shared, opts.arguments(name, cfg))
        if name in pending:
            result = pending.pop(name)
        elif share_tune and name in ("lora", "lora+eigenprune"):
            from .baselines.lora import run_lora_and_eigenprune

            pair = dict(zip(("lora", "lora+eigenprune"), run_lora_and_eigenprune(harness, **kwargs), strict=True))
            result = pair.pop(name)
            pending |= pair
        else:
            result = functions[name](harness, **kwargs)
        if tracker_of(model) is not None or weights() != untouched:
            raise RuntimeError(f"method '{name}' left the shared model changed; it must restore it")
        results[name] = result
        if name == "eigenprune":
            shared |= {"score_run": result.extra["score_run"], "n_frozen": result.extra["edit"].n_frozen,
                        "eigenprune_edit": result.extra["edit"], "eigenprune_result": result}
    report = {
        "model": cfg.model, "task": cfg.task, "eval_mode": mode, "split_seed": cfg.split_seed,
        "split_sizes": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        "methods_asked": list(opts.methods), "methods_run": order, "implicit": implicit,
        "base": {k: ci(v, cfg.n_boot) for k, v in base.items()},
        "methods": {name: method_row(r, base, cfg.n_boot) for name, r in results.items()},
        "timings": timings, "warnings": warnings,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if "eigenprune" in results and "random" in results:
        eigen, rand = results["eigenprune"], results["random"]
        report["eigenprune_vs_random"] = {"n_frozen": eigen.extra["edit"].n_frozen,
                                          "diff": diff_ci(rand.test, eigen.test, cfg.n_boot),
                                          "random_test_accs": [r["test"]["acc"] for r in rand.runs]}
    report["verdict"] = verdict(report)
    with atomic_dir(out) as tmp:
        for name, result in results.items():
            if result.save is not None:
                folder = Path("edits") / name
                result.save(tmp / folder)
                report["methods"][name]["saved_edit"] = str(folder)
        run_settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_COMPARE}
        (tmp / "config.json").write_text(json.dumps(
            {"run": run_settings, "compare": _plain(dataclasses.asdict(opts))}, indent=2, sort_keys=True) + "\n")
        (tmp / "comparison.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        plot_comparison(report, tmp / "comparison.png")
        (tmp / "comparison.md").write_text(render_markdown(report))
    report["out"] = str(out)
    return report


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _method_arg(text: str) -> tuple[str, str, object]:
    key, eq, raw = text.partition("=")
    method, dot, arg = key.rpartition(".")
    if not (eq and dot and method and arg.isidentifier()):
        raise argparse.ArgumentTypeError(f"expected METHOD.ARG=VALUE, got '{text}'")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, arg, value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


_NOT_COMPARE = ("seeds", "sweep_test")  # run settings compare does not use: one split seed, test only once
_RUN_FIELDS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in _NOT_COMPARE]
_COMPARE_FIELDS = {f.name for f in dataclasses.fields(CompareConfig)}


def cmd_compare(args) -> int:
    if not args.task:
        raise UsageError("compare needs --task")
    values = {k: getattr(args, k) for k in _RUN_FIELDS if getattr(args, k, None) is not None}
    options = {k: getattr(args, k) for k in _COMPARE_FIELDS if getattr(args, k, None) is not None}
    if "method_args" in options:
        grouped: dict[str, dict] = {}
        for method, arg, value in options["method_args"]:
            grouped.setdefault(method, {})[arg] = value
        options["method_args"] = grouped
    try:
        cfg, opts = RunConfig(**values), CompareConfig(**options)
    except ValueError as err:
        raise UsageError(str(err)) from None
    report = compare(cfg, opts, args.out, args.quiet)
    base = report["base"]["test"]
    print(f"{report['task']}: base test {base['acc']:.3f} [{base['lo']:.3f}, {base['hi']:.3f}] (n={base['n']})")
    for name, row in report["methods"].items():
        t, d = row["test"], row["diff_vs_base"]
        print(f"  {name:<16} test {t['acc']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}]  diff {d['diff']:+.3f} "
              f"[{d['lo']:+.3f}, {d['hi']:+.3f}]  dev evals {row['dev_evaluations']}")
    print(report["verdict"])
    print(f"report: {report['out']}/comparison.md")
    return 0


def add_compare_parser(sub, fmt) -> None:
    """`compare`: `run`'s settings (less --seeds, --config, --no-sweep-test) and the methods' own grids."""
    p = sub.add_parser("compare", help="eigenprune against random/smallest controls, LASER, SVD clipping, ...",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune compare --model ./tiny --task int-mult --limit 50 --out runs/cmp\n"
                           "  eigenprune compare --task cb --methods eigenprune,random,laser --laser-layers 20,24\n"
                           "  eigenprune compare --task rte --methods svd-clip --icl-demos 2 --clip-keep 1,0.5,0.1"))
    add_run_options(p)
    p.add_argument("--methods", type=_names, help=f"comma-separated, from {', '.join(METHODS)} "
                   f"(default {','.join(DEFAULT_METHODS)}); random/smallest run eigenprune too")
    p.add_argument("--random-seeds", type=int, help="seeds of the random control (default 5)")
    p.add_argument("--laser-kinds", type=_names, help="LASER matrix types (default mlp-in,mlp-out,key)")
    p.add_argument("--laser-keep", type=_floats, help="LASER kept fractions (default 0.9,0.5,0.25,0.1,0.05,0.01)")
    p.add_argument("--laser-layers", type=_ints, help="LASER layers to try (default: last 4 + every 8th)")
    p.add_argument("--laser-last", type=int, help="LASER tries the last N layers (default 4)")
    p.add_argument("--laser-stride", type=int, help="... plus every N-th layer from 0 (default 8; 0: none)")
    p.add_argument("--icl-demos", type=int, help="svd-clip: demonstrations prepended to prompts (default 4)")
    p.add_argument("--icl-seed", type=int, help="svd-clip: seed of the demonstration draw (default 0)")
    p.add_argument("--clip-keep", type=_floats, help="svd-clip kept fractions (default 1,0.95,0.5,0.1,0.05,0.01)")
    p.add_argument("--set", dest="method_args", action="append", type=_method_arg, metavar="METHOD.ARG=VALUE",
                   help="an argument for one method's function, VALUE as JSON or text; repeatable "
                        "(e.g. lora.steps=50, feature-space.max_layers=2)")
    p.add_argument("--out", help="output directory (default runs/compare-TASK-TIMESTAMP)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)
