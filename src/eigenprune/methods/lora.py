"""LoRA fine-tuning on the same train split and target matrices, alone and followed by eigenpruning.

The strongest obvious competitor to removing components is learning a low-rank change: peft LoRA
adapters on the modules eigenprune targets, trained with the teacher-forced answer loss
(`batching.collate` + `batching.batch_nll`, mean per answer token), AdamW, seeded. A few evenly spaced
checkpoints are evaluated on dev and the best one (ties: the earliest) is kept; test is evaluated
once, afterwards. The paper's fine-tuned GPT-2 rows pruned a fine-tuned model, so
`run_lora_and_eigenprune` also merges the adapters and runs the whole eigenprune experiment
(`run_eigenprune`, i.e. `methods.eigenprune.run_one`: score on train, choose p on dev, test once) on the
fine-tuned weights.

peft adapts whole modules: a target that is a slice of a fused projection (GPT-2's `c_attn` for
`key`) or a head becomes its whole module, and the result says so in `extra["whole_modules"]`.
Every run leaves the harness model exactly as it found it (weights bit for bit, requires_grad
flags, train/eval mode): the adapted modules' parameters are copied before and written back after.

A saved LoRA directory is what peft's `save_pretrained` writes plus `eigenprune_lora.json`. Reload:

    model, tok = load_model("smollm2-135m")
    model = apply_saved_lora(model, "runs/lora")   # a PeftModel; merge=True folds it into the weights
    # or with peft alone: PeftModel.from_pretrained(model, "runs/lora")

A saved LoRA + eigenprune directory holds `adapter/` (the same) and `edit/` (an eigenprune edit made
for the merged weights); `apply_saved_lora(model, dir)` merges the adapter and applies the edit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model  # imported here: a missing peft fails at import (compare)
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from eigenprune.core.batching import Example, batch_nll, collate, encode
from eigenprune.core.errors import UsageError
from eigenprune.edits.artifact import apply_saved_edit, atomic_dir, check_fingerprint, fingerprint, read_meta
from eigenprune.edits.targets import find_targets, weight_view
from eigenprune.methods.base import MethodResult, accuracy, seeded
from eigenprune.methods.registry import Context, Stage, register, resolve, run
from eigenprune.protocol.harness import Harness

LORA_FORMAT, LORA_VERSION, LORA_JSON = "eigenprune-lora", 1, "eigenprune_lora.json"
_SHOWN = ("targets", "layers", "rank", "alpha", "steps", "lr", "batch_size", "seed")  # in a result's config


@dataclass
class TuneConfig:
    """A LoRA fine-tune: where the adapters go, their size, and the optimisation."""

    targets: str | None = field(default=None, metadata={"help": "target preset or regex; None: the harness's"})
    layers: str | None = field(default=None, metadata={"help": "layer range; None: the harness's (with its targets)"})
    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapters' input"})
    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter init, batch order and dropout"})
    checkpoints: int = field(default=3, metadata={"help": "evenly spaced checkpoints compared on dev"})
    log_every: int = field(default=10, metadata={"help": "loss curve resolution in steps"})

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("alpha", "lr", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.checkpoints > self.steps:
            raise ValueError(f"checkpoints ({self.checkpoints}) cannot exceed steps ({self.steps})")

    @property
    def checkpoint_steps(self) -> list[int]:
        return [round(self.steps * (i + 1) / self.checkpoints) for i in range(self.checkpoints)]


def lora_modules(model: nn.Module, targets: str, layers: str | None = None) -> tuple[list[str], list[str]]:
    """(modules peft should adapt, those of them adapted whole although only a slice was targeted)."""
    found = find_targets(model, targets, layers)
    modules = sorted({t.module_name for t in found})
    whole = sorted({t.module_name for t in found if t.rows != (0, t.module_out)})
    return modules, whole


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' own deprecation notices, which peft reaches on every wrap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def lora_attached(model: nn.Module, modules: Sequence[str], config: TuneConfig) -> Iterator[PeftModel]:
    """`model` with fresh (seeded) LoRA adapters on `modules`, as a peft model, for the block.

    Whatever the block does (train, merge_and_unload), on exit the adapters are gone and the model's
    parameters, requires_grad flags and train/eval mode are exactly what they were on entry.
    """
    saved = {f"{m}.{n}": p.detach().clone() for m in modules for n, p in model.get_submodule(m).named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                      target_modules=list(modules), task_type="CAUSAL_LM",
                      fan_in_fan_out=any(isinstance(model.get_submodule(m), Conv1D) for m in modules))
    with seeded(config.seed, weight_view(model.get_submodule(modules[0])).device), _quiet():
        peft_model = get_peft_model(model, lora)
    try:
        yield peft_model
    finally:
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            peft_model.unload()
        with torch.no_grad():
            for name, value in saved.items():
                model.get_parameter(name).copy_(value)
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def train_lora(model: nn.Module, tokenizer, examples: Sequence[Example], config: TuneConfig,
               checkpoint: Callable[[int], None] | None = None) -> list[dict]:
    """Train the model's trainable parameters (the adapters) on the answer loss; returns the loss curve
    ({"step", "loss"} rows, each the mean over the steps since the previous row). `checkpoint(step)`
    runs at `config.checkpoint_steps`. Batches cycle through seeded permutations of the examples."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("nothing to train: the model has no trainable parameters (attach adapters first)")
    device = params[0].device
    encoded = encode(tokenizer, examples)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    curve, window = [], []
    was_training = model.training
    model.train()
    try:
        with seeded(config.seed, device):
            for step in range(1, config.steps + 1):
                while len(order) < config.batch_size:
                    order += torch.randperm(len(encoded), generator=generator).tolist()
                index, order = order[: config.batch_size], order[config.batch_size :]
                batch = collate(encoded, index, tokenizer.pad_token_id).to(device)
                loss = batch_nll(model, batch).sum() / (batch.labels != -100).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                window.append(loss.item())
                if step % config.log_every == 0 or step == config.steps:
                    curve.append({"step": step, "loss": sum(window) / len(window)})
                    window = []
                if checkpoint is not None and step in config.checkpoint_steps:
                    checkpoint(step)
    finally:
        model.train(was_training)
    return curve


@dataclass
class _Tuned:
    """A finished fine-tune: the chosen checkpoint's dev correctness and the adapter, saved by peft."""

    dev: torch.Tensor  # (n_dev,) bool
    chosen_step: int
    curve: list[dict]
    checkpoints: list[dict]
    adapter: dict[str, bytes]  # file name -> content of what peft's save_pretrained wrote
    lora_params: int
    train_s: float


def _fine_tune(harness: Harness, peft_model: PeftModel, config: TuneConfig) -> _Tuned:
    """Train, evaluate the checkpoints on dev, load the best one (ties: the earliest) and keep the files
    peft's `save_pretrained` writes for it (a few MB at most), so `save` can write them later."""
    trainable = {n: p for n, p in harness.model.named_parameters() if p.requires_grad}
    snapshots, rows = {}, []

    def checkpoint(step: int) -> None:
        dev = harness.evaluate("dev")
        rows.append({"step": step, "dev_acc": accuracy(dev)})
        snapshots[step] = (dev, {n: p.detach().clone() for n, p in trainable.items()})

    t0 = time.perf_counter()
    curve = train_lora(harness.model, harness.tokenizer, harness.splits.train, config, checkpoint)
    train_s = time.perf_counter() - t0
    best = max(rows, key=lambda row: row["dev_acc"])["step"]  # max keeps the first of equals
    dev, state = snapshots[best]
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state[name])
    with tempfile.TemporaryDirectory(prefix="eigenprune-lora-") as staging:
        # no embedding layers are adapted; "auto" would look for the base model's config, even on the Hub
        peft_model.save_pretrained(staging, save_embedding_layers=False)
        adapter = {f.name: f.read_bytes() for f in Path(staging).iterdir() if f.is_file()}
    return _Tuned(dev, best, curve, rows, adapter, sum(p.numel() for p in trainable.values()), train_s)


def tune_config(overrides: dict, config: TuneConfig | None = None) -> TuneConfig:
    """`config` (default: TuneConfig()) with `overrides` applied; an unknown or bad setting is a UsageError
    (compare calls this before any method runs, so a typo in `--set lora.x=...` costs nothing)."""
    known = {f.name for f in dataclasses.fields(TuneConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UsageError(f"LoRA has no setting '{unknown[0]}'; its settings: {', '.join(sorted(known))}")
    try:
        return dataclasses.replace(config or TuneConfig(), **overrides)
    except (TypeError, ValueError) as err:
        raise UsageError(f"LoRA: {err}") from None


def _resolve(harness: Harness, config: TuneConfig | None, overrides: dict) -> TuneConfig:
    """The config with the overrides applied; no targets means the harness's targets and layers."""
    config = tune_config(overrides, config)
    if config.targets is None:
        config = dataclasses.replace(config, targets=harness.config.targets,
                                     layers=config.layers if config.layers is not None else harness.config.layers)
    return config


def _write(directory: Path, adapter: dict[str, bytes], meta: dict) -> None:
    directory.mkdir(exist_ok=True)
    for name, content in adapter.items():
        (directory / name).write_bytes(content)
    (directory / LORA_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@dataclass
class _Base:
    """What the base model's adapted modules were before any change: their fingerprint and size."""

    modules: list[str]
    whole: list[str]  # adapted whole although only a slice of them was targeted
    fingerprint: dict
    weights: int

    @classmethod
    def of(cls, model: nn.Module, config: TuneConfig) -> _Base:
        modules, whole = lora_modules(model, config.targets, config.layers)
        return cls(modules, whole, fingerprint(model, modules),
                   sum(weight_view(model.get_submodule(m)).numel() for m in modules))


def _lora_result(harness: Harness, config: TuneConfig, base: _Base, tuned: _Tuned, test: torch.Tensor,
                 dev_evaluations: int, wall_s: float) -> MethodResult:
    meta = {"format": LORA_FORMAT, "format_version": LORA_VERSION, "method": "lora",
            "base_model": harness.config.model, "data": harness.config.task, "config": dataclasses.asdict(config),
            "chosen_step": tuned.chosen_step, "base_fingerprint": base.fingerprint}

    def save(path: Path) -> None:
        with atomic_dir(path) as tmp:
            _write(tmp, tuned.adapter, meta)

    return MethodResult(
        method="lora", config={**{k: getattr(config, k) for k in _SHOWN}, "chosen_step": tuned.chosen_step},
        dev=tuned.dev, test=test, dev_evaluations=dev_evaluations, wall_s=wall_s,
        changed_params=base.weights, save=save, runs=tuned.checkpoints,
        extra={"tune_config": dataclasses.asdict(config), "loss_curve": tuned.curve,
               "target_modules": base.modules, "whole_modules": base.whole,
               "lora_params": tuned.lora_params, "train_s": tuned.train_s,
               "changed_params_counts": "weights of the adapted modules (all change when the adapter is merged)"},
    )


def lora_stage(harness: Harness, config: TuneConfig, ctx: Context | None = None) -> Stage:
    """Fine-tune once: the LoRA row (adapters unmerged for its own dev/test) and the merged weights, which
    `Stage.applied` puts into the shared model for the edits composed on top (`lora+eigenprune`)."""
    t0 = time.perf_counter()
    config = _resolve(harness, config, {})
    model = harness.model
    base = _Base.of(model, config)
    before = harness.dev_evaluations
    with lora_attached(model, base.modules, config) as peft_model:
        tuned = _fine_tune(harness, peft_model, config)
        test = harness.evaluate("test")  # the adapted model, adapters not merged
        result = _lora_result(harness, config, base, tuned, test, harness.dev_evaluations - before,
                              time.perf_counter() - t0)
        peft_model.merge_and_unload()  # in place: the adapted modules now hold the fine-tuned weights
        weights = {f"{m}.{n}": p.detach().clone() for m in base.modules
                   for n, p in model.get_submodule(m).named_parameters()}
    meta = {"format": LORA_FORMAT, "format_version": LORA_VERSION, "base_model": harness.config.model,
            "data": harness.config.task, "config": dataclasses.asdict(config), "chosen_step": tuned.chosen_step,
            "base_fingerprint": base.fingerprint}

    def save_with_edit(path: Path, edit: MethodResult, composite: dict) -> None:
        """adapter/ (as the LoRA row saves it), edit/ (made for the merged weights) and the composite's record;
        `apply_saved_lora` merges the adapter and applies the edit."""
        with atomic_dir(path) as tmp:
            _write(tmp / "adapter", tuned.adapter, {**meta, "method": "lora"})
            edit.save(tmp / "edit")  # made for the merged weights, which its fingerprint records
            _write(tmp, {}, {**meta, "method": composite["method"], "edit": composite["edit"],
                             "chosen_p": edit.config.get("p")})

    stage = Stage(result=result, weights=weights, save_with_edit=save_with_edit)
    result.applied = stage.applied  # the merged fine-tuned weights (the row itself was evaluated unmerged)
    return stage


@register("lora", TuneConfig, stage=lora_stage,
          summary="LoRA adapters on the target matrices, trained on train, checkpoint chosen on dev")
def lora_method(harness: Harness, config: TuneConfig, ctx: Context) -> MethodResult:
    return ctx.stage(harness, resolve("lora").method, config)[0].result


def run_lora(harness: Harness, config: TuneConfig | None = None, **overrides: Any) -> MethodResult:
    """LoRA fine-tune on train, checkpoint chosen on dev, test once; the harness model is restored.

    `overrides` are `TuneConfig` fields, e.g. `run_lora(harness, steps=100, lr=5e-4)`.
    """
    return lora_stage(harness, tune_config(overrides, config)).result


def run_lora_and_eigenprune(harness: Harness, config: TuneConfig | None = None,
                            **overrides: Any) -> tuple[MethodResult, MethodResult]:
    """One fine-tune, two results: LoRA alone, and `lora+eigenprune` (the merged fine-tuned model eigenpruned
    with the harness's settings; p = 0, the fine-tuned model itself, competes). The harness model is restored."""
    ctx = Context()
    spec = resolve("lora+eigenprune")
    stage_config = tune_config(overrides, config)
    pruned = run(spec, harness, stage_config, spec.method.config(), ctx)
    return ctx.stage(harness, spec.stage, stage_config)[0].result, pruned


def apply_saved_lora(model: nn.Module, directory: str | Path, merge: bool = False) -> nn.Module:
    """Reload a saved LoRA (a peft model; merged into the weights if `merge`) or LoRA + eigenprune
    directory (merged, then the edit applied) onto a freshly loaded base model, which must match."""
    directory = Path(directory)
    meta = read_meta(directory / LORA_JSON, LORA_FORMAT, (LORA_VERSION,), "a saved LoRA directory")
    check_fingerprint(model, meta["base_fingerprint"], "adapter")
    pruned = (directory / "edit").is_dir()
    with _quiet():
        adapted = PeftModel.from_pretrained(model, directory / "adapter" if pruned else directory)
    if not (merge or pruned):
        return adapted
    merged = adapted.merge_and_unload()
    if pruned:
        apply_saved_edit(merged, directory / "edit")
    return merged

