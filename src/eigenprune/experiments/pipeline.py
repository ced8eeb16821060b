"""The one pipeline behind `run` and `compare`: every method on every split, then pooled over folds.

    splits (a fixed split, K cross-fitted folds, or N split seeds)
      └─ per split: a fresh `Harness` and `Context`; the base model evaluated once on dev and test (once per
         process for the same weights, examples and settings: `base_evaluations`, `evaluation.base_memo`);
         every method (in `needs` order) chooses on dev and is tested once; the shared model is checked
         to be unchanged after each
    pooled over K > 1 folds: each method's test correctness over all N examples (`registry.Pooled`),
    CIs resampling within folds

`run` is this pipeline with the single method `eigenprune` (its report is eigenprune's own record of each
split); `compare` runs the methods asked for. Nothing here names a method.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from eigenprune.edits.artifact import fingerprint
from eigenprune.edits.targets import linear_modules
from eigenprune.evaluation.stats import accuracy
from eigenprune.methods import registry
from eigenprune.methods.base import MethodResult
from eigenprune.protocol.config import RunConfig
from eigenprune.protocol.harness import Harness


@dataclass
class SplitRun:
    """Every method's result on one split (one fold, or one split seed)."""

    split: object  # the `Splits` (or `FoldSplit`) the methods saw
    config: RunConfig  # the settings the harness carried (its split_seed is this split's)
    base: dict[str, torch.Tensor]  # "dev"/"test" -> (n,) the unmodified model's correctness
    results: dict[str, MethodResult]  # by method name, in run order
    base_s: float  # seconds spent evaluating the base model


class SharedModelCheck:
    """`check(name)` raises if a method left the shared model edited (a patched module, changed weights);
    `weights` is the digest of the unedited model's parameters (what `base_memo` keys on)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.untouched = self._weights()
        self.weights: str = self.untouched["sha256"]

    def _weights(self) -> dict:
        return fingerprint(self.model, [n for n, _ in linear_modules(self.model)])  # every parameter

    def __call__(self, name: str) -> None:
        from eigenprune.core.positions import tracker_of

        if tracker_of(self.model) is not None or self._weights() != self.untouched:
            raise RuntimeError(f"method '{name}' left the shared model changed; it must restore it")


def shared_model_check(model: torch.nn.Module) -> SharedModelCheck:
    return SharedModelCheck(model)


def base_evaluations(harness: Harness, weights: str | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The unedited model's dev and test correctness and, when the dev evaluation gives it (exact mode), its dev
    NLL: from `base_memo` when this process evaluated the same weights on the same examples and settings before
    (another cell of a study), else evaluated now and remembered. `weights`: the parameters' digest (None: no
    memo)."""
    from eigenprune.evaluation import base_memo

    base, nll = {}, None
    for split in ("dev", "test"):
        name = None if weights is None else base_memo.key(weights, harness.model, harness.tokenizer,
                                                          getattr(harness.splits, split), harness.mode,
                                                          harness.config.eval_batch_size, harness.calibration)
        found = base_memo.SHARED.get(name) if name else None
        if found is None:
            found = base_memo.BaseEvaluation(*(harness.evaluate_with_free_nll(split) if split == "dev"
                                               else (harness.evaluate(split), None)))
            if name:
                base_memo.SHARED.put(name, found)
        else:
            harness.dev_evaluations += split == "dev"  # counted as evaluated, as it was
        base[split] = found.correct
        nll = found.nll if split == "dev" else nll
    return base, nll


def run_split(split, model, tokenizer, mode: str, cfg: RunConfig, quiet: bool, specs: Sequence[registry.Spec],
              configs: dict[str, tuple], check: Callable[[str], None], label: str = "",
              calibration=None) -> SplitRun:
    """Every method on one split: a fresh harness and context, so nothing another split's methods learned or
    chose is seen here. The base model is evaluated once (`base_evaluations`) and handed to every method. A
    `calibration` (`evaluation.calibration`) calibrates every choice evaluation, the base's and each method's, alike."""
    harness = Harness(model, tokenizer, split, mode, cfg, quiet, where=[label], calibration=calibration)
    t0 = time.perf_counter()
    with harness.step("base"):
        base, base_nll = base_evaluations(harness, getattr(check, "weights", None))
    base_s = time.perf_counter() - t0
    ctx = registry.Context(base, base_nll=base_nll)
    results: dict[str, MethodResult] = {}
    for spec in specs:
        with harness.step(spec.name) if len(specs) > 1 else contextlib.nullcontext():  # `run`: one method, unnamed
            results[spec.name] = registry.run(spec, harness, *configs[spec.name], ctx)
        check(spec.name)
    return SplitRun(split, cfg, base, results, base_s)


def run_splits(splits: Sequence[tuple[object, RunConfig]], model, tokenizer, mode: str, quiet: bool,
               specs: Sequence[registry.Spec], configs: dict[str, tuple], label: Callable[[int], str] = lambda i: "",
               after: Callable[[int, SplitRun], None] | None = None, keep_live: bool = True,
               calibration=None) -> list[SplitRun]:
    """`run_split` on each (split, settings) in turn, `label(i)` naming the split in progress bars ("fold 2/5").
    `after(i, run)` sees each split's results while their live
    objects (SVDs, edits) exist; unless `keep_live`, they are released once it returns."""
    check = shared_model_check(model)
    runs = []
    for i, (split, cfg) in enumerate(splits):
        runs.append(run_split(split, model, tokenizer, mode, cfg, quiet, specs, configs, check, label(i),
                              calibration))
        if after is not None:
            after(i, runs[-1])
            check("side effects")
        if not keep_live:
            for result in runs[-1].results.values():
                result.release()
    return runs


def pool(folds, runs: Sequence[SplitRun], specs: Sequence[registry.Spec], n_boot: int,
         json_extra: Callable[[dict], dict]) -> tuple[torch.Tensor, dict[str, registry.Pooled]]:
    """Every method's test correctness pooled over the K folds' test examples (`folds.tested` order):
    (the base model's pooled (N,) correctness, method name -> its `registry.Pooled` row, words written by
    the method's pool hook). `json_extra` makes a fold's `extra` fit for the report."""
    base_test = torch.tensor(folds.pool([r.base["test"] for r in runs])[0])  # (N,)
    pooled: dict[str, registry.Pooled] = {}
    for spec in specs:
        per_fold = [r.results[spec.name] for r in runs]
        first = per_fold[0]
        row = registry.Pooled(MethodResult(
            method=first.method, config=first.config | {"per_fold": [r.config for r in per_fold]},
            dev=torch.cat([r.dev for r in per_fold]), test=torch.tensor(folds.pool([r.test for r in per_fold])[0]),
            dev_evaluations=sum(r.dev_evaluations for r in per_fold), wall_s=sum(r.wall_s for r in per_fold),
            changed_params=max(r.changed_params for r in per_fold),
            runs=[{"fold": i + 1, "config": r.config, "dev_acc": accuracy(r.dev),
                   "test_acc": accuracy(r.test), "n_test": int(r.test.numel()),
                   "changed_params": r.changed_params, "dev_evaluations": r.dev_evaluations}
                  for i, r in enumerate(per_fold)],
            extra={"per_fold": [{"extra": json_extra(r.extra), "runs": r.runs} for r in per_fold]}),
            per_fold, base_test, folds, n_boot)
        prefix = f"{spec.stage.name}+" if spec.stage is not None else ""
        row.needed = {need: pooled[prefix + need] for need in spec.method.needs}
        registry.pool_words(spec, row)
        pooled[spec.name] = row
    return base_test, pooled

