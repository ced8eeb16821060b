"""The released code's pairing (each example against its neighbour in the batch), and input means alone.

The authors' released scoring pairs example b of a batch with example b − 1 (`torch.roll(x, 1, dim=0)`):

    ΔL_i(b) = s_i Σ_t (g_{b,t}·u_i) (v_i·(x_{b−1,t} − x_{b,t}))

over the offsets t (from the last prompt token) present in both, the same attribution-patching estimate
`scoring.py` computes for its own pairs; scores keep the max over every pair of every batch, and the
mean. At batch size 1, the released default, every example is its own partner, x_{b−1} − x_b = 0 and
every score is exactly 0: which components are frozen is then decided by the sort's tie order alone.
(The released code keeps the max over positions of per-position effects; here a pair's effect is
summed over positions, as everywhere in eigenprune. At batch size 1 both are 0.)

The input means x̄_t a freeze needs are summed in the same pass, over every scoring example (the
released code takes them from its last batch only; see `released_recipe.py`). `input_means` computes
them without scoring (a forward pass per batch), for an edit chosen without scores.

This lives here, not in `scoring.py`, because it is a baseline's pairing: `scoring.py` streams seeded
partners across batches; this keeps nothing between batches but running sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from eigenprune.core.batching import Encoded, batch_nll, batches, check_fits, collate
from eigenprune.core.errors import UsageError
from eigenprune.core.hooks import activation_grads_only, capture_io
from eigenprune.edits.decompose import Components
from eigenprune.edits.scoring import InputMeans, Scores, aligned, pair_effects
from eigenprune.edits.targets import Target


def offset_grid(encoded: Sequence[Encoded]) -> tuple[int, int]:
    """(lowest offset, number of offsets) covering every example, as `scoring.score` lays them out."""
    offset_min = 1 - max(len(e.prompt_ids) for e in encoded)
    return offset_min, max(len(e.answer_ids) for e in encoded) - offset_min


class _Means:
    """Running sums of each module's input per offset over real tokens, and the token counts."""

    def __init__(self, modules: dict[str, int], encoded: Sequence[Encoded], device: torch.device) -> None:
        self.offset_min, self.n_offsets = offset_grid(encoded)
        self.sums = {m: torch.zeros(self.n_offsets, d_in, dtype=torch.float64, device=device)
                     for m, d_in in modules.items()}
        self.counts = torch.zeros(self.n_offsets, dtype=torch.float64, device=device)

    def add(self, batch, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add one batch's (batch, pos, d_in) inputs; returns its (batch, offsets) mask of real tokens."""
        mask = aligned(batch.attention_mask[..., None].float(), batch, self.offset_min, self.n_offsets)[..., 0]
        self.counts += mask.sum(0, dtype=torch.float64)
        for m, x in inputs.items():
            self.sums[m] += aligned(x, batch, self.offset_min, self.n_offsets).sum(0, dtype=torch.float64)
        return mask

    def result(self) -> InputMeans:
        return InputMeans(self.offset_min, {m: s.cpu() for m, s in self.sums.items()}, self.counts.cpu())


def _in_features(targets: Sequence[Target]) -> dict[str, int]:
    return {t.module_name: t.in_features for t in targets}


def roll_scores(model: nn.Module, targets: list[Target], components: dict[str, Components],
                encoded: Sequence[Encoded], pad_id: int, batch_size: int = 1,
                order: Sequence[int] | None = None) -> Scores:
    """Max and mean ΔL over the roll pairs of every batch (batches of `batch_size` in `order`, default as
    given), and the input means over every example. One forward+backward per batch."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if not encoded:
        raise UsageError("scoring needs at least one example")
    check_fits(model, encoded)
    order = list(range(len(encoded))) if order is None else list(order)
    device = next(model.parameters()).device
    means = _Means(_in_features(targets), encoded, device)
    basis = {t.name: (components[t.name].U.to(device), components[t.name].S.to(device),
                      components[t.name].Vh.t().to(device)) for t in targets}
    best = {t.name: torch.full((t.n_components,), -torch.inf, device=device) for t in targets}
    total = {t.name: torch.zeros(t.n_components, dtype=torch.float64, device=device) for t in targets}
    n_pairs, was_training = 0, model.training
    model.eval()
    try:
        with activation_grads_only(model), capture_io(model, sorted(means.sums)) as cap:
            for start in range(0, len(order), batch_size):
                batch = collate(encoded, order[start : start + batch_size], pad_id).to(device)
                cap.clear()
                batch_nll(model, batch).sum().backward()
                inputs = {m: cap.inputs[m].to(device).float() for m in means.sums}  # (batch, pos, d_in)
                mask = means.add(batch, inputs)  # (batch, offsets)
                for t in targets:
                    U, S, V = basis[t.name]
                    grads = cap.grads[t.module_name][..., t.rows[0] : t.rows[1]].to(device).float()
                    a = aligned(grads @ U, batch, means.offset_min, means.n_offsets)  # (batch, offsets, k)
                    b = aligned(inputs[t.module_name] @ V, batch, means.offset_min, means.n_offsets)
                    effects = pair_effects(a, b, b.roll(1, 0), mask.roll(1, 0), S)  # (batch, k): b's partner b − 1
                    best[t.name] = torch.maximum(best[t.name], effects.max(0).values)
                    total[t.name] += effects.sum(0, dtype=torch.float64)
                n_pairs += batch.input_ids.shape[0]
    finally:
        model.train(was_training)
    # + 0.0 turns a -0.0 (a product with a negative projection) into 0.0, so all-zero scores are equal bits
    return Scores({k: (v + 0.0).cpu() for k, v in best.items()},
                  {k: (v / n_pairs).float().cpu() + 0.0 for k, v in total.items()}, n_pairs, means.result())


@torch.no_grad()
def input_means(model: nn.Module, targets: list[Target], encoded: Sequence[Encoded], pad_id: int,
                batch_size: int = 16) -> InputMeans:
    """The targets' modules' mean input per offset over every example (forward passes only)."""
    check_fits(model, encoded)
    device = next(model.parameters()).device
    means = _Means(_in_features(targets), encoded, device)
    was_training = model.training
    model.eval()
    try:
        with capture_io(model, sorted(means.sums), grads=False) as cap:
            for batch in batches(encoded, batch_size, pad_id):
                batch = batch.to(device)
                cap.clear()
                model(**batch.model_inputs(), use_cache=False)
                means.add(batch, {m: cap.inputs[m].to(device).float() for m in means.sums})
    finally:
        model.train(was_training)
    return means.result()
