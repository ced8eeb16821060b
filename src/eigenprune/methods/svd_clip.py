"""SVD clipping for in-context learning (Yin et al. 2024, "Enhancing in-context learning performance
with just SVD-based weight pruning"), the paper eigenprune's seed paper builds on.

Every prompt gets k demonstrations from train prepended (the same k for every example, drawn with a
fixed seed; each demonstration is prompt + answer, separated by blank lines). Then the attention or
the MLP weights of one of the first two or last two layers are clipped to the top fraction of their
singular values (each matrix of the group to its own rank fraction, no bias). The grid is layer ×
group × kept fraction; fraction 1.0 is the demonstrations alone ("ICL only"), always a candidate
and reported on its own, since the prompt change by itself moves accuracy. The base model without
demonstrations is not a candidate: this method is defined with its prompts. Chosen on dev (with
`search` > 0 the winning cell's fraction is then searched: `strength.choose_truncation`); the
winner is evaluated on test once (ICL only is evaluated on test as well, as a reported reference).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from eigenprune.core.batching import Example
from eigenprune.core.errors import UsageError
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.targets import PRESETS, find_targets
from eigenprune.evaluation.splits import Splits
from eigenprune.methods.base import (
    MethodResult,
    accuracy,
    edit_applier,
    edit_changed_params,
    edit_saver,
    evaluate_edit,
)
from eigenprune.methods.registry import Context, Pooled, register
from eigenprune.methods.strength import choose_truncation, edit_meta, truncation_edit
from eigenprune.protocol.harness import Harness, ci, diff_ci

GROUPS = {"attn": ("query", "key", "value", "attn-out"), "mlp": ("mlp-in", "mlp-out")}
DEFAULT_KEEP = (1.0, 0.95, 0.5, 0.1, 0.05, 0.01)


@dataclass
class ClipConfig:
    """Demonstrations and the clipping grid."""

    demos: int = field(default=4, metadata={"help": "demonstrations prepended to every prompt"})
    demo_seed: int = field(default=0, metadata={"help": "seed of the demonstration draw from train"})
    keep: tuple[float, ...] = field(default=DEFAULT_KEEP, metadata={"help": "fractions of singular values kept"})
    groups: tuple[str, ...] = field(default=("attn", "mlp"), metadata={"help": "weight groups: attn, mlp"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "None: the first two and last two"})
    search: int = field(default=0, metadata={
        "help": "dev evaluations beyond the grid that extend the winning cell's kept fraction past the grid's "
                "smallest (toward rank 1) or refine it, chosen by the run's --select (0: the fixed grid)"})

    def __post_init__(self) -> None:
        self.keep, self.groups = tuple(float(k) for k in self.keep), tuple(self.groups)
        if self.search < 0:
            raise ValueError(f"search must be non-negative, got {self.search}")
        if self.demos < 0:
            raise ValueError(f"demos must be non-negative, got {self.demos}")
        if not self.keep or not all(0 < k <= 1 for k in self.keep):
            raise ValueError(f"keep fractions must be in (0, 1], got {self.keep}")
        if not self.groups or any(g not in GROUPS for g in self.groups):
            raise ValueError(f"groups must be among {', '.join(GROUPS)}, got {self.groups}")
        if self.layers is not None:
            self.layers = tuple(int(v) for v in self.layers)
            if not self.layers or min(self.layers) < 0:
                raise ValueError(f"layers must be non-negative layer indices, got {self.layers}")


def draw_demonstrations(train: Sequence[Example], k: int, seed: int) -> list[Example]:
    """k distinct train examples, in draw order (the same for every prompt)."""
    if k > len(train):
        raise UsageError(f"svd-clip needs {k} demonstrations but the train split has {len(train)} examples")
    return random.Random(seed).sample(list(train), k)


def with_demonstrations(examples: Sequence[Example], demos: Sequence[Example]) -> list[Example]:
    """Each example with the demonstrations (prompt + answer, blank-line separated) before its prompt."""
    prefix = "".join(f"{d.prompt}{d.answer}\n\n" for d in demos)
    return [dataclasses.replace(ex, prompt=prefix + ex.prompt) for ex in examples]


def group_spec(group: str) -> str:
    """One regular expression matching every matrix of a group (the union of its presets)."""
    return "|".join(f"(?:{p})" for kind in GROUPS[group] for p in PRESETS[kind])


def edge_layers(available: list[int]) -> list[int]:
    return sorted(set(available[:2]) | set(available[-2:]))


class _WithDemonstrations(Harness):
    """The caller's harness (its counting, and any override of `evaluate`) on prompts with demonstrations. A
    calibrated harness's content-free prompts get the same demonstrations: Zhao et al. put the content-free
    input where the example goes, after the demonstrations, whose prior is what calibration removes."""

    def __init__(self, parent: Harness, demos: Sequence[Example]) -> None:
        s = parent.splits
        splits = Splits(s.train, with_demonstrations(s.dev, demos), with_demonstrations(s.test, demos))
        cal = parent.calibration
        if cal is not None:
            prompts = tuple(ex.prompt for ex in with_demonstrations(cal.examples(), demos))
            cal = dataclasses.replace(cal, prompts=prompts)
        super().__init__(parent.model, parent.tokenizer, splits, parent.mode, parent.config, parent.quiet,
                         calibration=cal)
        self.parent = parent

    def evaluate(self, split: str) -> torch.Tensor:
        own = self.parent.splits, self.parent.calibration
        self.parent.splits, self.parent.calibration = self.splits, self.calibration
        try:
            return self.parent.evaluate(split)
        finally:
            self.parent.splits, self.parent.calibration = own


def icl_harness(harness: Harness, demos: Sequence[Example]) -> Harness:
    """The same model, mode and settings, with demonstrations before every dev and test prompt."""
    return _WithDemonstrations(harness, demos)


def run_svd_clip(harness: Harness, config: ClipConfig | None = None,
                 base: dict[str, torch.Tensor] | None = None) -> MethodResult:
    """Choose (layer, group, fraction) with demonstrations on dev; evaluate the winner on test once."""
    t0 = time.perf_counter()
    config = config or ClipConfig()
    model, n_boot = harness.model, harness.config.n_boot
    demos = draw_demonstrations(harness.splits.train, config.demos, config.demo_seed)
    icl = icl_harness(harness, demos)
    by_group = {g: find_targets(model, group_spec(g)) for g in config.groups}
    available = sorted({t.layer for ts in by_group.values() for t in ts if t.layer is not None})
    if not available:
        raise UsageError("svd-clip needs numbered layers; no attention or MLP matrix sits in one")
    layers = sorted(set(config.layers)) if config.layers is not None else edge_layers(available)
    missing = sorted(set(layers) - set(available))
    if missing:
        raise UsageError(f"svd-clip layers {missing} do not exist; the model has layers "
                         f"{available[0]}-{available[-1]}")
    cells = [(layer, g, [t for t in by_group[g] if t.layer == layer]) for layer in layers for g in config.groups]
    cells = [c for c in cells if c[2]]
    icl_dev = icl.evaluate("dev")  # (n_dev,)
    choice = choose_truncation(icl, [targets for *_, targets in cells], config.keep, icl_dev, config.search)
    sweep = [{"layer": cells[t.cell][0], "group": cells[t.cell][1], "keep": t.keep,
              "targets": [x.name for x in cells[t.cell][2]], **t.row()} for t in choice.tried]
    best = choice.chosen
    icl_test = icl.evaluate("test")  # reported either way; it is also the winner's test when ICL only wins
    targets, keep = (cells[choice.best.cell][2], choice.best.keep) if best >= 0 else (cells[0][2], 1.0)
    edit = truncation_edit(targets, decompose_targets(model, targets), keep)  # the same SVDs again, exactly
    if best >= 0:
        chosen = {k: v for k, v in sweep[best].items() if k not in ("dev_acc", "dev_nll", "phase")}
        dev, test = choice.best.dev, evaluate_edit(icl, edit, "test")
    else:
        chosen = {"layer": None, "group": None, "keep": 1.0, "targets": []}
        dev, test = icl_dev, icl_test
    meta = edit_meta(harness, model, targets, "svd-clip") | {
        "icl_demonstrations": [dataclasses.asdict(d) for d in demos], "icl_demo_seed": config.demo_seed}
    icl_only = {"dev": ci(icl_dev, n_boot), "test": ci(icl_test, n_boot)}
    if base is not None and "test" in base:
        icl_only["diff_vs_base"] = diff_ci(base["test"], icl_test, n_boot)
    config_out = {**chosen, "demos": config.demos, "demo_seed": config.demo_seed, "icl_only_chosen": best < 0}
    return MethodResult(
        method="svd-clip", config=config_out, dev=dev, test=test, dev_evaluations=1 + len(sweep),
        wall_s=time.perf_counter() - t0, changed_params=edit_changed_params(edit),
        save=edit_saver(edit, meta | {"svd_clip": chosen}), applied=edit_applier(edit),  # the clipping alone
        extra={"icl_only": icl_only, "layers": layers, "groups": list(config.groups),
               "keep": [1.0, *sorted({k for k in config.keep if k < 1.0}, reverse=True)],
               "demonstrations": [d.prompt + d.answer for d in demos], "sweep": sweep,
               **({"search": choice.search} if choice.search else {}),
               "_icl_test": icl_test},  # per-example, for pooling over folds (not written to JSON)
        modules=edit.modules if best >= 0 else [],
    )


def _icl_report(result: MethodResult) -> None:
    """What the report says about the demonstrations alone: clipping is worth something only beyond them."""
    icl = result.extra["icl_only"]
    text = lambda c: f"{c['acc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]" if "lo" in c else f"{c['acc']:.3f}"
    diff = icl.get("diff_vs_base")
    diff_text = f", test - base {diff['diff']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}]" if diff else ""
    folds = icl.get("folds")
    over = (f" Pooled over {folds} folds: dev is the mean of the folds' dev accuracies, test pools every fold's "
            "test examples (CIs resample within folds).") if folds else ""
    result.sections = ["\n".join(["## svd-clip: demonstrations alone (ICL only)", "",
                                  f"dev {text(icl['dev'])}, test {text(icl['test'])}{diff_text}. The prompt change "
                                  f"alone moves accuracy; clipping is worth something only beyond this.{over}"])]
    result.markers = [{"acc": icl["test"]["acc"], "marker": "D",
                       "label": f"svd-clip's demonstrations alone {icl['test']['acc']:.3f}"}]
    acc = accuracy(result.test)
    if acc <= icl["test"]["acc"]:
        result.verdict = (f"svd-clip's test accuracy ({acc:.3f}) is no higher than its demonstrations alone "
                          f"({icl['test']['acc']:.3f}): the prompt change, not the clipping, carries it.")


def _pool_icl(pooled: Pooled) -> None:
    """svd-clip over folds: its demonstrations alone, pooled like its result (every fold's ICL-only test)."""
    folds = pooled.folds
    icl_test = pooled.pool([f.extra["_icl_test"] for f in folds])  # (N,)
    dev = [f.extra["icl_only"]["dev"]["acc"] for f in folds]
    pooled.result.extra["icl_only"] = {
        "dev": {"acc": sum(dev) / len(dev), "per_fold": dev}, "test": pooled.ci(icl_test),
        "diff_vs_base": pooled.diff(pooled.base, icl_test), "folds": len(folds)}
    _icl_report(pooled.result)


@register("svd-clip", ClipConfig, default=5, pool=_pool_icl,
          flags={"--icl-demos": "demos", "--icl-seed": "demo_seed", "--clip-keep": "keep"},
          summary="in-context demonstrations, then one edge layer's attention or MLP clipped to its top singular "
                  "values (chosen on dev)")
def svd_clip(harness: Harness, config: ClipConfig, ctx: Context) -> MethodResult:
    result = run_svd_clip(harness, config, base=ctx.base)
    _icl_report(result)
    return result
