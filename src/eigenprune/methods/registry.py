"""The method registry: every method of `eigenprune compare` registers itself here, and nothing else names it.

A method is one module under `eigenprune.methods` (or a third-party module announced under the
`eigenprune.methods` entry-point group) that calls `register`:

    @register("laser", LaserConfig, summary="one matrix, one layer, best rank-k approximation")
    def laser(harness, config: LaserConfig, ctx: Context) -> MethodResult: ...

- `config` is a dataclass whose fields (with `metadata={"help": ...}`) are the method's settings: `--set
  laser.keep=0.5,0.1` is validated and converted against it (`settings.replace`), and `--help` lists them.
- `run(harness, config, ctx)` chooses on dev only, evaluates its choice on test once, leaves the model as
  it found it and returns a `MethodResult` (whose `notes`, `sections`, `markers` and `verdict` carry
  whatever the method wants said in the report: `compare_report` renders them without knowing the method).
- `needs`: other methods whose results on the same model `run` reads (`ctx.result(name)`); `compare` runs
  them first, adding them when the user did not ask for them.
- `stage`: for a learned stage (LoRA, fine-tuning), `stage(harness, config, ctx) -> Stage` trains once and
  hands back the changed weights. Such a method composes: `A+B` runs edit method B on A's model (B's base
  candidate is A's model), and every composite with the same stage settings shares one training run.
- `pool`: with `--folds K` (K > 1) `compare` runs every method once per fold and pools the test correctness
  over all folds; `pool(pooled: Pooled)` writes the pooled row's words (verdict, sections, markers, notes)
  from the pooled numbers. Without a hook a method keeps the notes that every fold said alike, and its
  fold-specific words are left out (they would describe one fold, not the pooled result).
- `role`: "method" (default) or "control": a control (the random-components draw) is what a method's gain
  is judged against, and reports find it by this role, never by its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from eigenprune.core import settings
from eigenprune.core.errors import UsageError
from eigenprune.evaluation.stats import accuracy
from eigenprune.methods.base import MethodResult
from eigenprune.protocol.harness import Harness

ENTRY_POINT_GROUP = "eigenprune.methods"


@dataclass
class NoSettings:
    """A method without settings of its own (it follows the run's)."""


@dataclass
class Stage:
    """A finished learned stage: its own row, and the weights it changed (applied to the shared model on demand)."""

    result: MethodResult  # the stage alone, chosen on dev and tested once like any method
    weights: dict[str, torch.Tensor]  # parameter name -> value after the stage (only the changed ones)
    save_with_edit: Callable[[Path, MethodResult, dict], None] | None = None  # stage + edit in one directory

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model holding the stage's weights for the block; the originals are back afterwards."""
        saved = {}
        try:
            with torch.no_grad():
                for name, value in self.weights.items():
                    param = model.get_parameter(name)
                    saved[name] = param.detach().clone()
                    param.copy_(value)
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    model.get_parameter(name).copy_(value)

    def changed_params(self, model: torch.nn.Module, modules: list[str]) -> int:
        """The stage's changed entries plus those of `modules` (an edit on top) whose weights it left alone."""
        extra = sum(model.get_submodule(m).weight.numel() for m in modules if f"{m}.weight" not in self.weights)
        return self.result.changed_params + extra


@dataclass(frozen=True)
class Method:
    """A registered method: its settings, its entry point and what it needs."""

    name: str
    config: type
    run: Callable[[Harness, Any, Context], MethodResult]
    summary: str
    needs: tuple[str, ...] = ()
    stage: Callable[[Harness, Any, Context], Stage] | None = None
    # deprecated shorthand `compare` flags -> config field, kept for the built-in methods' old spellings; the
    # parser lists them in `cli/compare.py` LEGACY_FLAGS without importing any method (a test keeps the two equal).
    # A new method gives none: `--set METHOD.FIELD=VALUE` reaches every setting.
    flags: dict[str, str] = field(default_factory=dict)
    default: int = 0  # its place in `compare`'s default method list (0: not in it)
    pool: Callable[[Pooled], None] | None = None  # fills a row pooled over folds with words of its own
    role: str = "method"  # "control": the yardstick a method's gain is judged against (see `controls()`)


ROLES = ("method", "control")
_METHODS: dict[str, Method] = {}
_UNAVAILABLE: dict[str, str] = {}  # module -> why it could not be imported
_DISCOVERED = False


def register(name: str, config: type = NoSettings, *, summary: str, needs: tuple[str, ...] = (),
             stage: Callable | None = None, flags: dict[str, str] | None = None, default: int = 0,
             pool: Callable | None = None, role: str = "method") -> Callable:
    """Decorator: register `run` as method `name` (a name may contain neither '+' nor ',')."""
    if role not in ROLES:
        raise ValueError(f"method '{name}': role must be one of {', '.join(ROLES)}, got '{role}'")
    if not name or "+" in name or "," in name or "." in name:
        raise ValueError(f"a method name may not be empty or contain '+', ',' or '.': '{name}'")
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"method '{name}': config must be a dataclass, got {config!r}")

    def wrap(run: Callable) -> Callable:
        _METHODS[name] = Method(name, config, run, summary, tuple(needs), stage, dict(flags or {}), default, pool,
                                role)
        return run

    return wrap


def _discover() -> None:
    """Import every module of this package (each registers its methods) and the entry-point plug-ins."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in ("base", "registry"):
            continue
        try:
            importlib.import_module(f"{__package__}.{info.name}")
        except ImportError as err:  # an optional dependency (peft for LoRA) is missing
            _UNAVAILABLE[info.name] = str(err)
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except ImportError as err:
            _UNAVAILABLE[entry.name] = str(err)


def methods() -> dict[str, Method]:
    """Every registered method, by name."""
    _discover()
    return dict(_METHODS)


def controls() -> list[str]:
    """The registered methods whose role is "control", by name."""
    return [name for name, m in methods().items() if m.role == "control"]


@dataclass(frozen=True)
class Spec:
    """A method name as asked for: a plain method, or `stage+method`."""

    name: str
    method: Method
    stage: Method | None = None

    @property
    def parts(self) -> list[Method]:
        return [m for m in (self.stage, self.method) if m is not None]


def _unknown(name: str) -> UsageError:
    known = ", ".join(methods())
    missing = "".join(f"; {module} could not be loaded ({why}; `pip install 'eigenprune[baselines]'`?)"
                      for module, why in _UNAVAILABLE.items())
    return UsageError(f"unknown method '{name}'; choose from {known}, or STAGE+METHOD{missing}")


def resolve(name: str) -> Spec:
    """The registered method(s) behind `name`; a UsageError (one line) when there is none."""
    registered = methods()
    parts = name.split("+")
    if any(p not in registered for p in parts):
        raise _unknown(next(p for p in parts if p not in registered))
    if len(parts) == 1:
        return Spec(name, registered[name])
    if len(parts) > 2:
        raise UsageError(f"'{name}': a composite is one learned stage and one method, e.g. lora+eigenprune")
    stage, method = (registered[p] for p in parts)
    if stage.stage is None:
        stages = ", ".join(m.name for m in registered.values() if m.stage is not None)
        raise UsageError(f"'{name}': '{stage.name}' is not a learned stage; a composite starts with one of {stages}")
    if method.stage is not None:
        raise UsageError(f"'{name}': '{method.name}' is itself a learned stage; the second part must be an edit")
    return Spec(name, method, stage)


def configure(spec: Spec, given: dict[str, dict]) -> tuple[Any, Any]:
    """(stage config or None, method config) for `spec` from `--set` values: `given[name][field]`.
    A stage takes its own name's settings, then the composite's; the method likewise. A composite's setting
    must belong to one of its two parts."""
    own = given.get(spec.name, {}) if spec.stage is not None else {}
    for key in own:
        if not any(key in {f.name for f in dataclasses.fields(m.config)} for m in spec.parts):
            fields = sorted({f.name for m in spec.parts for f in dataclasses.fields(m.config)})
            raise UsageError(f"{spec.name} has no setting '{key}'; its settings: {', '.join(fields)}")
    configs = []
    for part in spec.parts:
        names = {f.name for f in dataclasses.fields(part.config)}
        overrides = dict(given.get(part.name, {})) | {k: v for k, v in own.items() if k in names}
        try:
            configs.append(settings.replace(part.config(), overrides, where=f"{part.name}: "))
        except ValueError as err:
            raise UsageError(str(err)) from None
    return (configs[0], configs[1]) if spec.stage is not None else (None, configs[0])


class Context:
    """What a method reads besides its harness: the current model's base correctness (when known), the
    results of the methods it needs (on the same model) and the learned stages trained so far."""

    def __init__(self, base: dict[str, torch.Tensor] | None = None, stages: dict | None = None,
                 base_nll: torch.Tensor | None = None) -> None:
        self.base = base
        self.base_nll = base_nll  # (n_dev,) the base's dev NLL when its evaluation gave it for free (exact mode)
        self.results: dict[str, MethodResult] = {}
        self._stages = stages if stages is not None else {}  # (name, settings) -> (Stage, its context)

    def result(self, name: str) -> MethodResult:
        if name not in self.results:
            raise RuntimeError(f"'{name}' has not run on this model; declare it in the method's `needs`")
        return self.results[name]

    def stage(self, harness: Harness, method: Method, config: Any) -> tuple[Stage, Context]:
        """The stage trained with `config` (trained now, once per distinct settings) and the context of the
        model it produced (its base correctness and the results of edits run on it)."""
        key = (method.name, repr(settings.to_dict(config)))
        if key not in self._stages:
            stage = method.stage(harness, config, self)
            with stage.applied(harness.model):
                base = {split: harness.evaluate(split) for split in ("dev", "test")}
            self._stages[key] = (stage, Context(base, self._stages))
        return self._stages[key]


def run(spec: Spec, harness: Harness, stage_config: Any, config: Any, ctx: Context) -> MethodResult:
    """Run `spec` (a composite: its edit on its stage's model) and record the result in the right context."""
    if spec.stage is None:
        result = spec.method.run(harness, config, ctx)
        ctx.results[spec.name] = result
        return result
    stage, inner_ctx = ctx.stage(harness, spec.stage, stage_config)
    with stage.applied(harness.model):
        inner = spec.method.run(harness, config, inner_ctx)
        changed = stage.changed_params(harness.model, inner.modules)
    inner_ctx.results[spec.method.name] = inner
    return compose(spec.name, stage, inner, changed)


@contextlib.contextmanager
def _both(stage: Stage, inner: MethodResult, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    with stage.applied(model), inner.applied(model):
        yield model


def compose(name: str, stage: Stage, inner: MethodResult, changed_params: int) -> MethodResult:
    """One row for an edit made on a stage's model: the edit's dev/test, both parts' settings and costs."""
    first = stage.result
    config = first.config | {f"{inner.method}_{k}" if k in first.config else k: v for k, v in inner.config.items()}
    meta = {"method": name, "stage": first.method, "edit": inner.method}
    save = None
    if inner.save is not None and first.save is not None:
        def save(path: Path) -> None:
            if stage.save_with_edit is not None:
                stage.save_with_edit(path, inner, meta)
            else:
                from eigenprune.edits.artifact import atomic_dir

                with atomic_dir(path) as tmp:
                    first.save(tmp / "stage")
                    inner.save(tmp / "edit")
                    (tmp / "composite.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    extra = {**first.extra, **inner.extra,
             "stage": {"method": first.method, "dev_acc": accuracy(first.dev),
                       "test_acc": accuracy(first.test), "wall_s": first.wall_s}}
    notes = [f"{name}: {inner.method} on the {first.method} model; its base candidate is that model "
             f"(dev {extra['stage']['dev_acc']:.3f}, test {extra['stage']['test_acc']:.3f}), trained once and shared "
             "by every composite with the same stage settings; wall time includes the training."]
    return MethodResult(
        method=name, config=config, dev=inner.dev, test=inner.test,
        dev_evaluations=first.dev_evaluations + inner.dev_evaluations, wall_s=first.wall_s + inner.wall_s,
        changed_params=changed_params, save=save, runs=inner.runs, extra=extra, modules=inner.modules,
        notes=notes + inner.notes, sections=inner.sections, markers=inner.markers, verdict=inner.verdict,
        applied=None if inner.applied is None else lambda model: _both(stage, inner, model),
    )


@dataclass
class Pooled:
    """One method's results over K > 1 cross-fitted folds (`splits.Folds`), as its `pool` hook sees them.

    `result` is the row `compare` reports: its `test` is the per-example correctness of every fold's chosen
    configuration on that fold's test examples, pooled over all N examples (in `Folds.tested` order), and
    its words (`verdict`, `sections`, `markers`, `notes`) are the hook's to write. Its `dev` is the folds' dev
    correctness one after another (dev splits overlap across folds: a mean, never a sample for a CI). `ci`
    and `diff` are the intervals of the pooled report, stratified by fold (`stats.fold_accuracy_ci`,
    `paired.paired_difference`).
    """

    result: MethodResult
    folds: list[MethodResult]  # the method's own result on each fold, in fold order
    base: torch.Tensor  # (N,) the unmodified model's pooled test correctness
    splits: Any  # the `splits.Folds` the folds came from
    n_boot: int
    needed: dict[str, Pooled] = field(default_factory=dict)  # the pooled methods it `needs`, by plain name

    @property
    def fold_of(self) -> list[int]:
        """The fold of each pooled test example."""
        return self.splits.pool([f.test for f in self.folds])[1]

    def pool(self, per_fold: list) -> torch.Tensor:
        """Per-fold test values (each in its fold's test order) as one (N,) tensor in pooled order."""
        return torch.tensor(self.splits.pool(per_fold)[0])

    def ci(self, correct: torch.Tensor) -> dict:
        """Pooled accuracy with its 95% CI resampling within folds: {"acc", "lo", "hi", "n"}."""
        from eigenprune.evaluation.stats import Accuracy, fold_accuracy_ci

        return Accuracy(*fold_accuracy_ci(correct.numpy(), self.fold_of, n_boot=self.n_boot),
                        int(correct.numel())).to_dict()

    def diff(self, before: torch.Tensor, after: torch.Tensor) -> dict:
        """Pooled paired difference (after - before), stratified by fold: Newcombe's interval and the exact
        McNemar p (`paired.paired_difference`)."""
        from eigenprune.evaluation.paired import paired_difference

        return paired_difference(before.double().numpy(), after.double().numpy(), self.fold_of,
                                 n_boot=self.n_boot).to_dict()

    def need(self, name: str) -> Pooled:
        if name not in self.needed:
            raise RuntimeError(f"'{name}' has not been pooled; declare it in the method's `needs`")
        return self.needed[name]


def pool_words(spec: Spec, pooled: Pooled) -> None:
    """The pooled row's words: the notes (and sections) every fold said alike, then the method's `pool` hook.
    A fold's verdict, markers and other sections judge that fold's numbers, so without a hook they are left
    out, and a note says so."""
    result, folds = pooled.result, pooled.folds
    alike = lambda words: [w for w in getattr(folds[0], words) if all(w in getattr(f, words) for f in folds)]
    result.notes, result.sections, result.markers, result.verdict = alike("notes"), alike("sections"), [], ""
    if spec.method.pool is not None:
        spec.method.pool(pooled)
        return
    dropped = [f for f in folds if f.verdict or f.markers or len(f.sections) > len(result.sections)
               or len(f.notes) > len(result.notes)]
    if dropped:
        result.notes.append(f"{spec.name}: its words about single folds (verdict, sections, plot marks or notes "
                            "that differ between folds) are left out of this pooled report; comparison.json "
                            "holds each fold's numbers.")
