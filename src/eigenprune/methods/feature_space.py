"""Feature-space decomposition (Chowdhury et al., "Surgical feature-space decomposition of LLMs: why,
when and how?"): keep only the top-r principal directions of a layer's OUTPUT.

For a linear layer with outputs y on real (non-pad) train tokens, mean ȳ and covariance eigenvectors
Q (descending eigenvalues), Q_r = the first r columns and P = Q_r Q_rᵀ, the edited layer computes

    y′ = P y + (I − P) ȳ,

the discarded directions replaced by their training mean. With D = the discarded eigenvectors
(d_out × m) and y = W x + b, the correction is y − y′ = D Dᵀ W x + D Dᵀ (b − ȳ), which is exactly an
eigenprune `Edit`: factors U = D, S = 1, Vh = Dᵀ W (a low-rank subtraction need not be an SVD) and
a constant bias row −D Dᵀ (b − ȳ). So the chosen projection saves, loads and applies like any
eigenprune edit (`artifact.save_edit` / `apply_saved_edit`). A target may be a row block of a
module (a fused projection's slice, a head): its outputs are that block of rows.

The search (`run_feature_space`) is greedy and layer-wise: from the last layer backwards, try the
rank fractions largest first, keep a change while dev accuracy does not drop below the best so far
(stop at the first drop), and carry accepted layers into the next layer's trials. Covariances come
from one pass over train on the base model: an edit only changes the layers after it, and layers
are visited from the last one backwards, so every accepted edit sits downstream of the layers still
to be tried. (Several targets in one layer share that layer's fraction and are tried together; they
are all measured on the base model.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from eigenprune.core.batching import Example, batches, encode
from eigenprune.core.hooks import capture_io
from eigenprune.edits.artifact import fingerprint
from eigenprune.edits.freeze import Edit, FreezeConfig
from eigenprune.edits.targets import Target, find_targets, target_weight
from eigenprune.methods.base import MethodResult, accuracy, edit_applier, edit_changed_params, edit_saver, evaluate_edit
from eigenprune.methods.registry import Context, register
from eigenprune.protocol.harness import Harness, base_correct

# Down to a quarter is the usual compression range, but on a narrow task a quarter of the directions
# can hold nearly all the output variance (99.5% for int-mult on SmolLM2-135M's mlp-out, where every
# layer at 0.25 left dev accuracy unchanged), so the grid goes on to 5%.
DEFAULT_FRACTIONS = (0.9, 0.75, 0.5, 0.25, 0.1, 0.05)


@dataclass
class OutputBasis:
    """One target's training-output statistics: mean and covariance eigenbasis, in float64 on CPU."""

    mean: torch.Tensor  # (d_out,)
    values: torch.Tensor  # (d_out,) eigenvalues, descending
    vectors: torch.Tensor  # (d_out, d_out) eigenvectors as columns, in the order of `values`
    n_tokens: int

    def rank(self, fraction: float) -> int:
        """Directions kept at this fraction of the output dimension (at least one)."""
        return min(len(self.values), max(1, round(fraction * len(self.values))))


@torch.no_grad()
def output_bases(model: nn.Module, tokenizer, examples: Sequence[Example], targets: Sequence[Target],
                 batch_size: int = 8) -> dict[str, OutputBasis]:
    """Mean and covariance eigenbasis of every target's output over the real tokens of `examples`.

    Teacher-forced batches (prompt + answer[:-1]) as everywhere else; pad positions are excluded.
    Sums and sums of outer products accumulate in float64.
    """
    modules = sorted({t.module_name for t in targets})
    device = next(model.parameters()).device
    sums = {t.name: torch.zeros(t.shape[0], dtype=torch.float64, device=device) for t in targets}
    outer = {t.name: torch.zeros(t.shape[0], t.shape[0], dtype=torch.float64, device=device) for t in targets}
    count = 0
    was_training = model.training
    model.eval()
    try:
        with capture_io(model, modules, grads=False) as captured:
            for batch in batches(encode(tokenizer, examples), batch_size, tokenizer.pad_token_id):
                batch = batch.to(device)
                model(**batch.model_inputs(), use_cache=False)
                real = batch.attention_mask.bool()  # (batch, pos)
                count += int(real.sum())
                # the layer run again on its captured real-token inputs gives its outputs (its hook fires
                # once more and stores the same tokens: harmless)
                outputs = {m: model.get_submodule(m)(captured.inputs[m][real]) for m in modules}  # (tokens, out)
                for t in targets:
                    y = outputs[t.module_name][:, t.rows[0] : t.rows[1]].double()  # (tokens, d_out)
                    sums[t.name] += y.sum(0)
                    outer[t.name] += y.t() @ y
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no real tokens to estimate output covariances from")
    bases = {}
    for t in targets:
        mean = sums[t.name] / count  # (d_out,)
        cov = outer[t.name] / count - torch.outer(mean, mean)  # (d_out, d_out)
        values, vectors = torch.linalg.eigh((cov + cov.t()) / 2)  # ascending
        bases[t.name] = OutputBasis(mean.cpu(), values.flip(0).cpu(), vectors.flip(1).cpu(), count)
    return bases


def _bias_of(module: nn.Module, rows: tuple[int, int]) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    if bias is None:
        return torch.zeros(rows[1] - rows[0], dtype=torch.float64)
    return bias.detach()[rows[0] : rows[1]].double().cpu()


def _projection(model: nn.Module, t: Target, basis: OutputBasis, keep: int) -> tuple[torch.Tensor, ...]:
    """U, S, Vh and the bias shift (float32) that keep the top `keep` output directions of target t."""
    D = basis.vectors[:, keep:]  # (d_out, m) discarded directions
    W = target_weight(model, t).detach().double().cpu()  # (d_out, d_in)
    shift = D @ (D.t() @ (basis.mean - _bias_of(model.get_submodule(t.module_name), t.rows)))  # D Dᵀ (ȳ − b)
    down = D.t() @ W  # (m, d_in)
    return D.float(), torch.ones(D.shape[1]), down.float(), shift.float()


@torch.no_grad()
def projection_edit(model: nn.Module, targets: Sequence[Target], bases: dict[str, OutputBasis],
                    ranks: dict[str, int], cache: dict | None = None) -> Edit:
    """The `Edit` that projects each ranked target's output onto its top-`ranks[name]` directions.

    Targets without a rank, or with a full rank, are left out (nothing to change). `removed` holds
    the discarded directions' indices in descending-eigenvalue order; `config.p` is the fraction of
    output directions discarded over the edited targets. `cache` (a dict the caller keeps) saves
    recomputing a target's factors at a rank it already had.
    """
    cache = {} if cache is None else cache
    edited, removed, factors, tables = [], {}, {}, {}
    for t in targets:
        size = len(bases[t.name].values)
        keep = ranks.get(t.name, size)
        if keep >= size:
            continue
        if (t.name, keep) not in cache:
            cache[t.name, keep] = _projection(model, t, bases[t.name], keep)
        U, S, Vh, shift = cache[t.name, keep]
        edited.append(t)
        removed[t.name] = torch.arange(keep, size)
        factors[t.name] = (U, S, Vh)
        table = tables.setdefault(t.module_name, torch.zeros(1, t.module_out))  # (1, module_out)
        table[0, t.rows[0] : t.rows[1]] += shift
    total = sum(len(bases[t.name].values) for t in edited)
    p = sum(len(i) for i in removed.values()) / total if total else 0.0
    return Edit(edited, removed, factors, tables, 0, FreezeConfig(p=p, bias="constant"))


def _by_layer(targets: Sequence[Target]) -> list[tuple[int | None, list[Target]]]:
    """Targets grouped by layer, last layer first (targets outside any layer count as the last)."""
    layers: dict[int | None, list[Target]] = {}
    for t in targets:
        layers.setdefault(t.layer, []).append(t)
    order = sorted(layers, key=lambda layer: float("inf") if layer is None else layer, reverse=True)
    return [(layer, layers[layer]) for layer in order]


def run_feature_space(harness: Harness, targets: str = "mlp-out",
                      ranks: Sequence[float] = DEFAULT_FRACTIONS, layers: str | None = None,
                      max_layers: int | None = None, batch_size: int | None = None,
                      base: dict[str, torch.Tensor] | None = None) -> MethodResult:
    """The greedy layer-wise search on dev (see the module docstring), then the chosen edit on test once.

    `ranks` are fractions of each target's output dimension in (0, 1]; `max_layers` caps how many
    layers (from the last one backwards) are tried; `base` holds the base model's dev/test
    correctness when the caller has it. `dev_evaluations` counts the base model's dev evaluation too.
    """
    fractions = sorted({float(f) for f in ranks}, reverse=True)
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f"ranks must be fractions in (0, 1], got {list(ranks)}")
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"max_layers must be at least 1, got {max_layers}")
    t0 = time.perf_counter()
    model, cfg = harness.model, harness.config
    found = find_targets(model, targets, layers)
    bases = output_bases(model, harness.tokenizer, harness.splits.train, found, batch_size or cfg.score.batch_size)
    best_dev = base_correct(harness, base, "dev")  # (n_dev,) the bar to meet
    best = base_acc = accuracy(best_dev)
    accepted: dict[str, int] = {}
    trials, chosen, cache = [], [], {}
    for layer, group in _by_layer(found)[:max_layers]:
        layer_choice = None
        for fraction in fractions:
            trial = accepted | {t.name: bases[t.name].rank(fraction) for t in group}
            dev = evaluate_edit(harness, projection_edit(model, found, bases, trial, cache), "dev")
            acc = accuracy(dev)
            trials.append({"layer": layer, "fraction": fraction, "dev_acc": acc, "accepted": acc >= best})
            if acc < best:
                break
            accepted, best, best_dev, layer_choice = trial, acc, dev, fraction
        if layer_choice is not None:
            chosen.append({"layer": layer, "fraction": layer_choice,
                           "ranks": {t.name: accepted[t.name] for t in group}})
    edit = projection_edit(model, found, bases, accepted, cache)
    if accepted:
        test = evaluate_edit(harness, edit, "test")
    else:
        test = base_correct(harness, base, "test")
    meta = {"method": "feature-space", "base_model": cfg.model, "data": cfg.task, "targets_spec": targets,
            "layers": layers, "chosen": chosen, "base_fingerprint": fingerprint(model, edit.modules)}
    return MethodResult(
        method="feature-space",
        config={"targets": targets, "layers": layers, "fractions": fractions, "max_layers": max_layers,
                "chosen": [[c["layer"], c["fraction"]] for c in chosen]},  # [layer, fraction] per accepted layer
        dev=best_dev, test=test, dev_evaluations=1 + len(trials), wall_s=time.perf_counter() - t0,
        changed_params=edit_changed_params(edit), save=edit_saver(edit, meta), runs=trials, applied=edit_applier(edit),
        extra={"chosen_ranks": chosen, "base_dev_acc": base_acc, "n_train_tokens": next(iter(bases.values())).n_tokens,
               "n_discarded": edit.n_frozen},
        modules=edit.modules,
    )


@dataclass
class FeatureSpaceConfig:
    """Where to project and the greedy search's grid."""

    targets: str = field(default="mlp-out", metadata={"help": "target preset or regex whose outputs are projected"})
    ranks: tuple[float, ...] = field(default=DEFAULT_FRACTIONS,
                                     metadata={"help": "fractions of the output directions kept, tried largest first"})
    layers: str | None = field(default=None, metadata={"help": "layer range, e.g. 20-"})
    max_layers: int | None = field(default=None, metadata={"help": "try at most this many layers, from the last"})
    batch_size: int | None = field(default=None, metadata={"help": "batch size of the covariance pass; None: run's"})

    def __post_init__(self) -> None:
        if not self.ranks or not all(0 < f <= 1 for f in self.ranks):
            raise ValueError(f"ranks must be fractions in (0, 1], got {list(self.ranks)}")
        if self.max_layers is not None and self.max_layers < 1:
            raise ValueError(f"max_layers must be at least 1, got {self.max_layers}")


@register("feature-space", FeatureSpaceConfig,
          summary="keep the top principal directions of each layer's output, greedy from the last layer on dev")
def feature_space(harness: Harness, config: FeatureSpaceConfig, ctx: Context) -> MethodResult:
    return run_feature_space(harness, config.targets, config.ranks, config.layers, config.max_layers,
                             config.batch_size, base=ctx.base)
