"""The authors' released recipe as one method, and the outcome of its tie-breaking as a control.

`released-recipe`: fine-tune every parameter (`finetune`, released defaults; shared with `finetune` and
`finetune+X` when the settings match), then freeze the fixed fraction p = 0.2 of the key components,
ranked by scores from the released pairing (`roll_pairing.py`: each example against its neighbour in
the batch), at the released batch size of 1. There every score is exactly 0, and the ranking is the
sort's tie order: a stable sort keeps (layer, head, component) order, so the first fifth of all key
components is frozen, which is every key component of the first fifth of the layers when the count
divides (SmolLM2-135M: layers 0-5 of 30), whatever the data. Nothing is chosen: dev and test are
evaluated once, and the report says which components went.

The released code scores per head (`--per-head`, the default here; with whole-layer freezing, per head
and per module freeze the same weights). Each frozen component is replaced by its mean contribution,
as everywhere in eigenprune: x̄ per offset from the last prompt token over every scoring example (the
released code averages its last scoring batch over the batch and sums over positions; at batch size
1 that is one example's inputs). `pairing="eigenprune"` scores with eigenprune's own pairing instead
(the run's --partners/--window/--score-seed/--batch-size), at the same fixed p, for contrast.

`first-layers`: that tie outcome on its own, without fine-tuning and without scoring: the first
fraction p of the key components in (layer, head, component) order, frozen with the same bias.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eigenprune.core.batching import encode
from eigenprune.edits.artifact import ScoreRun, atomic_dir, fingerprint
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import BIASES, Edit, FreezeConfig, make_edit
from eigenprune.edits.targets import find_targets
from eigenprune.evaluation.stats import accuracy, significance
from eigenprune.methods.base import MethodResult, edit_changed_params, edit_saver, evaluate_edit
from eigenprune.methods.registry import Context, register, resolve
from eigenprune.methods.roll_pairing import input_means, roll_scores
from eigenprune.methods.training import FinetuneConfig
from eigenprune.protocol.harness import Harness, diff_ci

PAIRINGS = ("roll", "eigenprune")


def _check_freeze(p: float, bias: str) -> None:
    FreezeConfig(p=p, bias=bias)  # its ValueError names the field
    if p == 0:
        raise ValueError("p must be in (0, 1), got 0")


@dataclass
class RecipeConfig(FinetuneConfig):
    """The released recipe: the fine-tune's settings (shared with `finetune` when equal), then a fixed p."""

    p: float = field(default=0.2, metadata={"help": "fraction of the components frozen, fixed (released: 0.2)"})
    pairing: str = field(default="roll", metadata={
        "help": "'roll' (released: each example against its neighbour in the batch) or 'eigenprune' (the run's)"})
    score_batch_size: int = field(default=1, metadata={"help": "roll pairing's batch size (released: 1)"})
    score_seed: int = field(default=42, metadata={"help": "seed of roll pairing's example order"})
    targets: str = field(default="key", metadata={"help": "target preset or regex (released: key)"})
    per_head: bool = field(default=True, metadata={"help": "one component set per head (released: per head)"})
    bias: str = field(default="position", metadata={"help": f"frozen components' bias: {', '.join(BIASES)}"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_freeze(self.p, self.bias)
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {', '.join(PAIRINGS)}, got '{self.pairing}'")
        if self.score_batch_size < 1:
            raise ValueError(f"score_batch_size must be at least 1, got {self.score_batch_size}")


@dataclass
class FirstLayersConfig:
    """The released recipe's tie outcome alone: the first fraction p of the components, in model order."""

    p: float = field(default=0.2, metadata={"help": "fraction of the components frozen, first ones first"})
    targets: str = field(default="key", metadata={"help": "target preset or regex (released: key)"})
    per_head: bool = field(default=True, metadata={"help": "one component set per head (released: per head)"})
    bias: str = field(default="position", metadata={"help": f"frozen components' bias: {', '.join(BIASES)}"})

    def __post_init__(self) -> None:
        _check_freeze(self.p, self.bias)


def frozen_by_layer(edit: Edit) -> dict[int, list[int]]:
    """layer -> [frozen components, components] over the edit's targets (None layers left out)."""
    table: dict[int, list[int]] = {}
    for t in edit.targets:
        if t.layer is not None:
            row = table.setdefault(t.layer, [0, 0])
            row[0] += len(edit.removed[t.name])
            row[1] += t.n_components
    return table


def describe_frozen(edit: Edit) -> str:
    """e.g. 'layers 0-5 of 30 wholly frozen (1152 of 5760 components)', plus any partly frozen layer."""
    table = frozen_by_layer(edit)
    whole = [layer for layer, (n, k) in table.items() if n == k and k]
    part = [f"layer {layer} ({n} of {k})" for layer, (n, k) in table.items() if 0 < n < k]
    span = ("no layer wholly frozen" if not whole else f"layers {whole[0]}-{whole[-1]}"
            if whole == list(range(whole[0], whole[-1] + 1)) else "layers " + ", ".join(map(str, whole)))
    text = f"{span} of {len(table)} wholly frozen" if whole else span
    if part:
        text += ", partly " + ", ".join(part)
    return f"{text} ({edit.n_frozen} of {sum(t.n_components for t in edit.targets)} components)"


def _targets(harness: Harness, spec: str, per_head: bool):
    found = find_targets(harness.model, spec, None, per_head)
    return found, decompose_targets(harness.model, found)


def _score(harness: Harness, config: RecipeConfig) -> ScoreRun:
    """Scores on train with the chosen pairing, on the model as it is now (the fine-tuned one)."""
    model, tok, examples = harness.model, harness.tokenizer, harness.splits.train
    meta = {"model": harness.config.model, "data": harness.config.task, "split_seed": harness.config.split_seed}
    if config.pairing == "eigenprune":
        from eigenprune.edits.engine import score_run
        from eigenprune.edits.scoring import ScoreConfig

        cfg = harness.config
        score_cfg = ScoreConfig(partners=cfg.partners, window=cfg.window, seed=cfg.score_seed,
                                batch_size=cfg.batch_size)
        return score_run(model, tok, examples, config.targets, None, config.per_head, score_cfg,
                         progress=harness.progress(), meta=meta)
    found, components = _targets(harness, config.targets, config.per_head)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.score_seed)).tolist()
    scores = roll_scores(model, found, components, encode(tok, examples), tok.pad_token_id,
                         config.score_batch_size, order)
    modules = sorted({t.module_name for t in found})
    return ScoreRun({**meta, "targets_spec": config.targets, "layers": None, "per_head": config.per_head,
                     "score_config": {"pairing": "roll", "batch_size": config.score_batch_size,
                                      "seed": config.score_seed},
                     "n_examples": len(examples), "base_fingerprint": fingerprint(model, modules)},
                    found, components, scores)


@register("released-recipe", RecipeConfig,
          summary="the authors' released recipe: finetune (released settings), then freeze a fixed p = 0.2 of the "
                  "key components ranked by roll-pairing scores (all 0 at batch size 1); nothing chosen")
def released_recipe(harness: Harness, config: RecipeConfig, ctx: Context) -> MethodResult:
    stage, _ = ctx.stage(harness, resolve("finetune").method, config.as_finetune())
    t0 = time.perf_counter()
    with stage.applied(harness.model):
        run = _score(harness, config)
        edit = run.edit(FreezeConfig(p=config.p, scope="global", aggregate="max", bias=config.bias))
        dev, test = evaluate_edit(harness, edit, "dev"), evaluate_edit(harness, edit, "test")
        changed = stage.changed_params(harness.model, edit.modules)
    own_s = time.perf_counter() - t0
    first = stage.result
    scores = torch.cat([run.scores.max[t.name] for t in run.targets])
    all_zero = bool((scores == 0).all())
    where = describe_frozen(edit)
    meta = run.edit_meta() | {"method": "released-recipe"}
    save_edit = edit_saver(edit, meta)

    def save(path: Path) -> None:
        with atomic_dir(path) as tmp:
            first.save(tmp / "stage")
            save_edit(tmp / "edit")  # made for the fine-tuned weights, which its fingerprint records
            (tmp / "composite.json").write_text(json.dumps(
                {"method": "released-recipe", "stage": "finetune", "edit": "released-recipe"}, indent=2) + "\n")

    n_boot = harness.config.n_boot
    versus = diff_ci(first.test, test, n_boot)
    kind = (f"significant, exact paired p = {versus['p']:.3f}" if significance(versus)
            else f"not distinguishable from 0, exact paired p = {versus['p']:.3f}")
    how = (f"all {scores.numel()} scores were exactly 0 (batch size {config.score_batch_size}: every example was its "
           "own partner), so the stable sort's tie order chose" if all_zero else
           f"scores ranged over [{float(scores.min()):.3g}, {float(scores.max()):.3g}]; the lowest chosen were")
    loss = (f" The fine-tune's training loss went from {first.extra['first_loss']:.3g} to "
            f"{first.extra['last_loss']:.3g}" + (", diverging." if first.extra["diverged"] else "."))
    fine = (f"{config.optimizer}, lr {config.lr}, batch size {config.batch_size}, {config.epochs} epoch(s), "
            f"seed {config.seed}")
    return MethodResult(
        method="released-recipe",
        config={"p": config.p, "n_frozen": edit.n_frozen, "pairing": config.pairing,
                "score_batch_size": config.score_batch_size, "targets": config.targets, "per_head": config.per_head,
                "bias": config.bias, **first.config},
        dev=dev, test=test, dev_evaluations=0, wall_s=first.wall_s + own_s, changed_params=changed, save=save,
        extra={"frozen_by_layer": frozen_by_layer(edit), "n_components": sum(t.n_components for t in run.targets),
               "all_scores_zero": all_zero, "n_pairs": run.scores.n_pairs, "vs_finetune": versus,
               "stage": {"method": first.method, "dev_acc": accuracy(first.dev),
                         "test_acc": accuracy(first.test), "wall_s": first.wall_s,
                         **{k: first.extra[k] for k in ("first_loss", "last_loss", "diverged") if k in first.extra}}},
        modules=edit.modules,
        notes=[f"released-recipe: finetune ({fine}; its own row when asked for, one training shared), then p = "
               f"{config.p} of the {config.targets} components frozen by {config.pairing}-pairing scores: {how} "
               f"{where}. Frozen components are replaced by their mean contribution (x̄ per offset over every "
               "scoring example; the released code uses its last batch). Nothing is chosen on dev; wall time "
               "includes the fine-tune." + loss],
        verdict=(f"The released recipe's pruning step ({where}) changed test accuracy by {versus['diff']:+.3f} "
                 f"[{versus['lo']:+.3f}, {versus['hi']:+.3f}] against its own fine-tune alone ({kind})."),
    )


@register("first-layers", FirstLayersConfig,
          summary="freeze the first p = 0.2 of the key components in (layer, head, component) order, as the "
                  "released recipe's all-zero scores do; no fine-tune, no scores, nothing chosen")
def first_layers(harness: Harness, config: FirstLayersConfig, ctx: Context) -> MethodResult:
    t0 = time.perf_counter()
    found, components = _targets(harness, config.targets, config.per_head)
    tok = harness.tokenizer
    means = input_means(harness.model, found, encode(tok, harness.splits.train), tok.pad_token_id,
                        harness.config.eval_batch_size)
    ties = {t.name: torch.zeros(t.n_components) for t in found}  # every score equal: the tie order decides
    edit = make_edit(found, components, ties, means, FreezeConfig(p=config.p, scope="global", bias=config.bias))
    dev, test = evaluate_edit(harness, edit, "dev"), evaluate_edit(harness, edit, "test")
    modules = sorted({t.module_name for t in found})
    meta = {"base_model": harness.config.model, "data": harness.config.task, "targets_spec": config.targets,
            "per_head": config.per_head, "base_fingerprint": fingerprint(harness.model, modules),
            "method": "first-layers"}
    where = describe_frozen(edit)
    return MethodResult(
        method="first-layers", config={**dataclasses.asdict(config), "n_frozen": edit.n_frozen},
        dev=dev, test=test, dev_evaluations=0, wall_s=time.perf_counter() - t0,
        changed_params=edit_changed_params(edit), save=edit_saver(edit, meta), modules=edit.modules,
        extra={"frozen_by_layer": frozen_by_layer(edit), "n_components": sum(t.n_components for t in found)},
        notes=[f"first-layers: the first {config.p} of the {config.targets} components in (layer, head, component) "
               f"order frozen, no fine-tune, no scores ({where}), each replaced by its mean contribution (x̄ per "
               "offset over train): what the released recipe's all-zero scores freeze. Nothing is chosen on dev."],
    )
