"""Full-parameter fine-tuning with the authors' released hyperparameters, as a learned stage (`finetune`).

The authors' released `main.py` fine-tunes every parameter before it prunes: Adam (not AdamW), lr 0.01,
batch size 1, one epoch over train in a shuffled order, `torch.manual_seed(42)`, the cross-entropy of
the answer token at the last prompt position. `finetune` does that on the train split (every setting
overridable) and chooses nothing: the final model is evaluated on dev and test once. The released code
keeps no checkpoints, so there are none to choose among here either.

The loss is `batching.batch_nll`, the teacher-forced answer NLL, averaged over the batch's answer tokens.
For a one-token answer that is the released loss exactly. For a multi-token answer (SmolLM2 splits
numbers into digits) every answer token counts by default (`answer_tokens="all"`: a model evaluated by
exact match has to produce all of them). `answer_tokens="last"` is the released loss as released: the
authors' code takes `logits[:, -1, :]` of the prompt, the prediction at the last prompt position, i.e.
only the first answer token (`"first"` is the same setting under its earlier name).

As a stage (`finetune+eigenprune`, and `released-recipe`) it hands every parameter it changed to the
edit on top; every method with the same settings shares one training run. The harness model is given
back exactly (values, requires_grad flags, gradients, train/eval mode). A saved fine-tune holds the
changed parameters (for a full fine-tune: the whole model) and `eigenprune_finetune.json`:

    model, tok = load_model("smollm2-135m")
    apply_saved_finetune(model, "runs/cmp/edits/finetune")   # also a finetune+X directory (stage/ + edit/)
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eigenprune.core.batching import Batch, Example, batch_nll, check_fits, collate, encode
from eigenprune.edits.artifact import apply_saved_edit, atomic_dir, check_fingerprint, fingerprint, read_meta
from eigenprune.edits.targets import linear_modules
from eigenprune.methods.base import MethodResult, seeded
from eigenprune.methods.registry import Context, Stage
from eigenprune.protocol.harness import Harness

FINETUNE_FORMAT, FINETUNE_VERSION, FINETUNE_JSON = "eigenprune-finetune", 1, "eigenprune_finetune.json"
OPTIMIZERS = ("adam", "adamw", "sgd")
ANSWER_TOKENS = ("all", "last", "first")  # "first" = "last": the answer token predicted at the prompt's last position


@dataclass
class FinetuneConfig:
    """A full-parameter fine-tune; the defaults are the authors' released ones."""

    optimizer: str = field(default="adam", metadata={"help": f"one of {', '.join(OPTIMIZERS)} (released: adam)"})
    lr: float = field(default=0.01, metadata={"help": "learning rate (released: 0.01)"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (released: none)"})
    batch_size: int = field(default=1, metadata={"help": "examples per step (released: 1)"})
    epochs: int = field(default=1, metadata={"help": "passes over train, each in a fresh seeded order (released: 1)"})
    seed: int = field(default=42, metadata={"help": "seed of the example order and dropout (released: 42)"})
    answer_tokens: str = field(default="all", metadata={
        "help": "loss over 'all' answer tokens, or 'last': only the prediction at the prompt's last position "
                "(logits[:, -1, :], the released loss; its first answer token; 'first' is the same), equal for "
                "one-token answers"})
    max_grad_norm: float | None = field(default=None, metadata={"help": "gradient clipping norm (released: none)"})
    log_every: int = field(default=16, metadata={"help": "loss curve resolution in steps"})

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("answer_tokens", ANSWER_TOKENS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
        for name in ("batch_size", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (or null), got {self.max_grad_norm}")

    def as_finetune(self) -> FinetuneConfig:
        """Only the fine-tune's own settings (a subclass adds its own): the key its training is shared under."""
        return FinetuneConfig(**{f.name: getattr(self, f.name) for f in fields(FinetuneConfig)})


@contextlib.contextmanager
def restored(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """For the block, the model may change in any way training changes it; afterwards its parameter values,
    requires_grad flags, gradients and train/eval mode are exactly what they were. Yields the original values."""
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
                p.requires_grad_(flags[name])
                p.grad = grads[name]
        model.train(was_training)


def first_token_only(batch: Batch) -> Batch:
    """The batch with only the first answer token labelled (predicted at the last prompt position)."""
    pos = torch.arange(batch.labels.shape[1], device=batch.labels.device)
    keep = pos[None, :] == (batch.prompt_lengths[:, None] - 1)  # (batch, pos)
    return replace(batch, labels=batch.labels.masked_fill(~keep, -100))


def _optimizer(params: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[config.optimizer]
    return kind(params, lr=config.lr, weight_decay=config.weight_decay)


def train_full(model: nn.Module, tokenizer, examples: Sequence[Example], config: FinetuneConfig) -> dict:
    """Train every parameter on the answer loss (in place; the caller restores). Returns the loss curve
    ({"step", "loss"} rows, each the mean since the previous row), the first and last step's loss and the
    steps whose loss was not finite (lr 0.01 on every parameter can diverge: that is a finding, not hidden)."""
    encoded = encode(tokenizer, examples)
    check_fits(model, encoded)
    for p in model.parameters():
        p.requires_grad_(True)
    params = list(model.parameters())
    device = params[0].device
    optimizer = _optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    curve, window, losses, nonfinite, step = [], [], [], [], 0
    model.train()
    with seeded(config.seed, device):
        for _ in range(config.epochs):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                batch = collate(encoded, order[start : start + config.batch_size], tokenizer.pad_token_id).to(device)
                if config.answer_tokens in ("last", "first"):
                    batch = first_token_only(batch)
                loss = batch_nll(model, batch).sum() / (batch.labels != -100).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                step += 1
                value = loss.item()
                losses.append(value)
                if not math.isfinite(value):
                    nonfinite.append(step)
                window.append(value)
                if step % config.log_every == 0:
                    curve.append({"step": step, "loss": sum(window) / len(window)})
                    window = []
    if window:
        curve.append({"step": step, "loss": sum(window) / len(window)})
    optimizer.zero_grad(set_to_none=True)
    return {"steps": step, "loss_curve": curve, "first_loss": losses[0], "last_loss": losses[-1],
            "nonfinite_steps": nonfinite}


def _base_fingerprint(model: nn.Module) -> dict:
    return fingerprint(model, [n for n, _ in linear_modules(model)])


def _saver(weights: dict[str, torch.Tensor], meta: dict):
    def save(path: Path) -> None:
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "weights.safetensors")
            (tmp / FINETUNE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return save


def finetune_stage(harness: Harness, config: FinetuneConfig, ctx: Context | None = None) -> Stage:
    """Fine-tune once on train, evaluate the final model on dev and test once (nothing chosen), and keep every
    parameter that changed, which `Stage.applied` puts into the shared model for the edits composed on top."""
    t0 = time.perf_counter()
    config = config.as_finetune()
    model = harness.model
    base_fp = _base_fingerprint(model)
    with restored(model) as original:
        log = train_full(model, harness.tokenizer, harness.splits.train, config)
        train_s = time.perf_counter() - t0
        dev, test = harness.evaluate("dev"), harness.evaluate("test")
        weights, changed = {}, 0
        for name, p in model.named_parameters():
            differs = int((p.detach() != original[name]).sum())
            if differs:
                weights[name] = p.detach().clone()
                changed += differs
    meta = {"format": FINETUNE_FORMAT, "format_version": FINETUNE_VERSION, "method": "finetune",
            "base_model": harness.config.model, "data": harness.config.task, "config": vars(config),
            "base_fingerprint": base_fp, "parameters": sorted(weights)}
    diverged = bool(log["nonfinite_steps"])
    notes = [f"finetune: every parameter trained ({config.optimizer}, lr {config.lr}, batch size {config.batch_size}, "
             f"{config.epochs} epoch(s), {log['steps']} steps, seed {config.seed}; released defaults unless set); "
             f"training loss {log['first_loss']:.3g} at the first step, {log['last_loss']:.3g} at the last"
             + (f"; the loss was not finite at {len(log['nonfinite_steps'])} step(s), from step "
                f"{log['nonfinite_steps'][0]}: the fine-tune diverged" if diverged else "")
             + ". Nothing is chosen on dev (no checkpoints, as released): dev and test are evaluated once."]
    result = MethodResult(
        method="finetune", config={k: getattr(config, k) for k in ("optimizer", "lr", "batch_size", "epochs", "seed",
                                                                    "answer_tokens")} | {"steps": log["steps"]},
        dev=dev, test=test, dev_evaluations=0, wall_s=time.perf_counter() - t0, changed_params=changed,
        save=_saver(weights, meta), extra={**log, "train_s": train_s, "diverged": diverged,
                                           "changed_tensors": len(weights)},
        modules=sorted({n.rpartition(".")[0] for n in weights}), notes=notes,
    )
    return Stage(result=result, weights=weights)


def apply_saved_finetune(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put a saved fine-tune's weights into a freshly loaded base model (which must match), in place; a
    `finetune+X` or `released-recipe` directory (stage/ + edit/) also gets its edit applied."""
    directory = Path(directory)
    combined = (directory / "stage").is_dir() and (directory / "edit").is_dir()
    stage = directory / "stage" if combined else directory
    meta = read_meta(stage / FINETUNE_JSON, FINETUNE_FORMAT, (FINETUNE_VERSION,), "a saved fine-tune")
    check_fingerprint(model, meta["base_fingerprint"], "fine-tune")
    with torch.no_grad():
        for name, value in load_file(stage / "weights.safetensors").items():
            model.get_parameter(name).copy_(value)
    if combined:
        apply_saved_edit(model, directory / "edit")
    return model
