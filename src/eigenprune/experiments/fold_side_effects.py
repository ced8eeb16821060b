"""What every fold's chosen edit costs elsewhere: one `SideEffects` (one base pass), every fold's choice of every
method measured while its live edit exists, and each method's mean and range over its folds.

`run` and `compare` both measure through `FoldSideEffects`: build it once, call `measure(i, run)` from the
pipeline's `after(i, run)` hook (`pipeline.run_splits`) for every fold, then `section()`. A method that names
variants of its chosen configuration (`extra["_side_effect_variants"]`: the random control's seeds) has each
variant measured; a fold whose choice changes no parameter (p = 0) costs nothing and counts as 0 in the mean.
Pairing one fold's cost with K folds' accuracy would describe an edit the pooled accuracy never saw.
`lm-eval:TASK` entries of `also` are measured on the same edits by lm-evaluation-harness (`LmEvalProbe`) and
land in the section's `lm_eval`.
"""

from __future__ import annotations

from collections.abc import Callable
from statistics import fmean

from eigenprune.experiments.pipeline import SplitRun
from eigenprune.methods.base import MethodResult
from eigenprune.protocol.config import RunConfig, split_also

# name(method, fold index, variant tag or None, number of folds, its result) -> the measured model's row name
Namer = Callable[[str, int, str | None, int, MethodResult], str]


def method_fold_name(method: str, fold: int, tag: str | None, n_folds: int, result: MethodResult) -> str:
    """"eigenprune" on a fixed split (today's name), "eigenprune (fold 2)" over folds, "random (fold 2, seed 1)"."""
    where = [f"fold {fold + 1}"] if n_folds > 1 else []
    where += [tag] if tag else []
    return f"{method} ({', '.join(where)})" if where else method


class FoldSideEffects:
    """Side effects of each fold's chosen configuration of each method; `section()` adds `per_method`."""

    def __init__(self, model, tokenizer, task, cfg: RunConfig, n_folds: int, quiet: bool,
                 name: Namer = method_fold_name) -> None:
        from eigenprune.evaluation.side_effects import SideEffects, sample_for_task

        config = getattr(model, "config", None)
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.model, self.n_boot, self.n_folds, self.name = model, cfg.n_boot, n_folds, name
        own, lm_tasks = split_also(cfg.also)
        self.effects = SideEffects(model, tokenizer, sample_for_task(task), also=own, max_tokens=context,
                                   eval_batch_size=cfg.eval_batch_size, progress=not quiet,
                                   kl=cfg.side_effect_kl)  # documents cut to fit the context
        self.lm_eval = None  # --also lm-eval:TASK: lm-evaluation-harness on the same edits
        if lm_tasks:
            from eigenprune.experiments.lm_eval_run import LmEvalConfig, LmEvalProbe

            self.lm_eval = LmEvalProbe(model, tokenizer, LmEvalConfig(
                lm_tasks, cfg.lm_eval_include_path or [], cfg.lm_eval_limit, cfg.eval_batch_size, cfg.n_boot),
                progress=not quiet)
        self.members: dict[str, list[str | None]] = {}  # method -> measured names, None for an unedited choice

    def measure(self, fold: int, run: SplitRun) -> None:
        """Every method's chosen configuration on this fold (each of its variants, if it names some)."""
        for method, result in run.results.items():
            variants = result.extra.get("_side_effect_variants") or [(None, result.applied)]
            if any(applier is None for _, applier in variants):
                continue  # the method cannot be put on a model alone
            names = self.members.setdefault(method, [])
            if not result.changed_params:
                names.append(None)
                continue
            for tag, applier in variants:
                name = self.name(method, fold, tag, self.n_folds, result)
                with applier(self.model):
                    self.effects.measure(name, self.model)
                    if self.lm_eval is not None:
                        self.lm_eval.measure(name, self.model)
                names.append(name)

    def section(self) -> dict:
        """The "Side effects" section (`SideEffects.section`) plus `per_method`: each method's Δ perplexity and KL
        over its folds (and variants): mean, min, max, the rows measured and the unedited choices (counted 0)."""
        section = self.effects.section(self.n_boot)
        section["per_method"] = {method: spread(section, names) for method, names in self.members.items()}
        if self.lm_eval is not None:
            section["lm_eval"] = self.lm_eval.section()
        return section


def spread(section: dict, names: list[str | None]) -> dict:
    """Mean and range of Δ perplexity and KL over `names` (None: an unedited choice, 0 for both)."""
    models = section["models"]
    values = {"delta_perplexity": [models[n]["delta_perplexity"]["diff"] if n else 0.0 for n in names],
              "kl": [models[n]["kl"]["value"] if n else 0.0 for n in names]}
    return {"rows": [n for n in names if n], "unedited": names.count(None),
            **{k: {"mean": fmean(v), "min": min(v), "max": max(v)} for k, v in values.items()}}
