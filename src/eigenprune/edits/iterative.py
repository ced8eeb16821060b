"""Iterative eigenpruning: reach a total fraction p in several steps, re-scoring the edited model.

One-shot eigenpruning scores every component of A once and freezes the lowest fraction p. Here the
freezing happens in `steps` rounds. Round k:

1. takes the current weights A′ = A − Σ (components frozen in rounds < k) and SVDs them;
2. scores A′'s components on the model *with the earlier rounds' edit applied*: the inputs x, the
   gradients g and the mean inputs x̄_t are the edited model's (the edited model knows where each
   prompt ends because every teacher-forced forward goes through `batching.teacher_forced`);
3. freezes the lowest-scoring of them, each replaced by its mean contribution E_i x̄_t with that
   round's x̄_t (the edited model's inputs), exactly as `freeze.build_edit` does for one shot.

Counts: with N components in all (per target under `scope="per-target"`), the total is
int(p · N), the number one-shot `freeze.lowest_fraction` freezes, and after round k of S the cumulative count
is (k · total) // S. So S = 1 is the one-shot edit, and rounds differ by at most one component.

Frozen components stay frozen. A′ has rank (at most) k_t − r_t for a target with k_t components of
which r_t are frozen: its SVD returns the unfrozen components of A (up to sign, and up to rotation
within repeated singular values) followed by r_t components with singular value ~0 whose vectors
span the frozen directions. Those last r_t are not candidates: freezing one would remove nothing
and add no bias, so it would only use up the count. A frozen component's bias is never recomputed
with a later round's inputs: it was replaced by a constant table when it was frozen, and later
rounds only add their own.

The rounds compose into one ordinary `freeze.Edit` (`IterativeEdit.merged`): per target the frozen
factors of all rounds side by side (they are mutually orthogonal), per module the sum of the
rounds' bias tables. It applies, removes, saves (`artifact.save_edit`) and merges like any edit. Its
`removed` indices point into the SVD of the original A (round 1's), matched by singular vector.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.core.batching import Example, encode
from eigenprune.core.errors import UsageError
from eigenprune.core.positions import tracker_of
from eigenprune.edits.decompose import Components, decompose
from eigenprune.edits.freeze import Edit, FreezeConfig, applied, build_edit
from eigenprune.edits.scoring import ScoreConfig, Scores, score
from eigenprune.edits.targets import Target, find_targets, target_weight


@dataclass
class IterativeEdit:
    """The rounds of an iterative edit, each an `Edit` whose factors are components of the weights
    left by the rounds before it; `merged()` is the whole edit as one `Edit`."""

    targets: list[Target]
    original: dict[str, Components]  # the SVD of the unedited weights (round 1's components)
    rounds: list[Edit]  # rounds that froze something, in order
    scores: list[Scores]  # each round's scores (of that round's components)
    config: FreezeConfig  # p is the total fraction
    steps: int

    @property
    def n_frozen(self) -> int:
        return sum(r.n_frozen for r in self.rounds)

    @property
    def n_components(self) -> int:
        return sum(t.n_components for t in self.targets)

    def merged(self) -> Edit:
        """One `Edit` equal to applying every round: factors side by side, bias tables summed."""
        return merge_rounds(self.targets, self.original, self.rounds, self.config)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with every round applied for the duration of the block, restored after it."""
        with applied(model, self.merged()):
            yield model


def schedule(total: int, steps: int) -> list[int]:
    """How many components round k = 1..steps freezes: cumulative counts (k · total) // steps."""
    cumulative = [k * total // steps for k in range(steps + 1)]
    return [b - a for a, b in zip(cumulative, cumulative[1:], strict=False)]


def pick(scores: dict[str, torch.Tensor], candidates: dict[str, int], count: dict[str, int] | int
         ) -> dict[str, torch.Tensor]:
    """The lowest-scoring components among each target's first `candidates[name]` (ascending indices).

    `count` an int: that many across all targets (ties: first wins, as in `freeze.lowest_fraction`); a dict:
    that many per target.
    """
    if isinstance(count, dict):
        return {name: torch.sort(torch.argsort(s[: candidates[name]].float(), stable=True)[: count[name]]).values
                for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n][: candidates[n]].float() for n in names])
    owner = torch.cat([torch.full((candidates[n],), i) for i, n in enumerate(names)])
    local = torch.cat([torch.arange(candidates[n]) for n in names])
    chosen = torch.argsort(flat, stable=True)[:count]
    return {n: torch.sort(local[chosen][owner[chosen] == i]).values for i, n in enumerate(names)}


def current_components(weights: dict[str, torch.Tensor], rounds: Sequence[Edit]) -> dict[str, Components]:
    """SVD of A′ = A − Σ frozen E_i per target, A given as float32 (rows, in) blocks."""
    out = {}
    for name, weight in weights.items():
        remaining = weight.clone()  # (rows, in)
        for edit in rounds:
            U, S, Vh = edit.factors[name]
            if len(S):
                remaining -= ((U * S) @ Vh).to(remaining.device)
        out[name] = decompose(remaining)
    return out


def _original_indices(original: Components, Vh: torch.Tensor) -> list[int]:
    """For each frozen row of Vh (r, in), the original component it is (largest |v · v_orig|), greedily
    and without repeats."""
    overlap = (Vh.float() @ original.Vh.t().to(Vh.device).float()).abs()  # (r, k)
    found = [-1] * len(Vh)
    for row in overlap.max(1).values.argsort(descending=True).tolist():
        j = int(overlap[row].argmax())
        found[row] = j
        overlap[:, j] = -1
    return found


def merge_rounds(targets: list[Target], original: dict[str, Components], rounds: Sequence[Edit],
                 config: FreezeConfig) -> Edit:
    """Compose rounds into one `Edit` (see the module docstring)."""
    removed, factors, tables = {}, {}, {}
    offset_min = rounds[0].offset_min if rounds else 0
    for edit in rounds:
        if edit.offset_min != offset_min:
            raise ValueError("rounds were scored on different examples (their offset grids differ)")
        for module, table in edit.bias_tables.items():
            tables[module] = tables[module] + table if module in tables else table.clone()
    for t in targets:
        parts = [edit.factors[t.name] for edit in rounds if len(edit.factors[t.name][1])]
        if not parts:
            c = original[t.name]
            factors[t.name] = (c.U[:, :0].cpu(), c.S[:0].cpu(), c.Vh[:0].cpu())
            removed[t.name] = torch.zeros(0, dtype=torch.long)
            continue
        U, S, Vh = (torch.cat(f, dim) for f, dim in zip(zip(*parts, strict=True), (1, 0, 0), strict=True))
        index = torch.tensor(_original_indices(original[t.name], Vh), dtype=torch.long)
        order = index.argsort()  # ascending original index, factors alongside
        removed[t.name], factors[t.name] = index[order], (U[:, order], S[order], Vh[order])
    return Edit(targets, removed, factors, tables, offset_min, config)


def iterative_edits(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    targets: str = "key",
    layers: str | None = None,
    per_head: bool = False,
    score_config: ScoreConfig | None = None,
    freeze_config: FreezeConfig | None = None,
    steps: int = 3,
    progress: bool | str = False,
) -> IterativeEdit:
    """Freeze a total fraction `freeze_config.p` of the targets' components in `steps` rounds, re-scoring
    the edited model on `examples` before each round. The model comes back as it went in (unedited)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if tracker_of(model) is not None:
        raise UsageError("this model already carries an eigenprune edit; remove it first")
    score_config, freeze_config = score_config or ScoreConfig(), freeze_config or FreezeConfig()
    found = find_targets(model, targets, layers, per_head)
    with torch.no_grad():
        weights = {t.name: target_weight(model, t).detach().float().clone() for t in found}  # (rows, in)
    original = current_components(weights, [])
    if freeze_config.scope == "per-target":
        totals = {t.name: int(freeze_config.p * t.n_components) for t in found}
        plans = [dict(zip(totals, counts, strict=True))
                 for counts in zip(*(schedule(n, steps) for n in totals.values()), strict=True)]
    else:
        plans = schedule(int(freeze_config.p * sum(t.n_components for t in found)), steps)
    encoded = encode(tokenizer, examples)
    rounds: list[Edit] = []
    all_scores: list[Scores] = []
    frozen = {t.name: 0 for t in found}
    for plan in plans:
        if not (sum(plan.values()) if isinstance(plan, dict) else plan):
            continue  # a round with nothing to freeze needs no scores
        components = original if not rounds else current_components(weights, rounds)
        with applied(model, merge_rounds(found, original, rounds, freeze_config)):
            scores = score(model, found, components, encoded, tokenizer.pad_token_id, score_config, progress)
        ranking = scores.ranking(freeze_config.aggregate)
        candidates = {t.name: t.n_components - frozen[t.name] for t in found}
        chosen = pick(ranking, candidates, plan)
        rounds.append(build_edit(found, components, chosen, scores.means, freeze_config))
        all_scores.append(scores)
        for name, index in chosen.items():
            frozen[name] += len(index)
    return IterativeEdit(found, original, rounds, all_scores, dataclasses.replace(freeze_config), steps)
