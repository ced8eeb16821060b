"""Choosing a truncation method's kept fraction on dev: LASER and SVD clipping share it (`choose_truncation`,
which also holds the truncation itself: `kept_rank`, `truncation_edit`).

Both methods try a grid of *cells* (LASER: one matrix type at one layer; SVD clipping: one weight group
at one layer) × *kept fractions* (keep 1.0 is the unedited candidate: the base model for LASER, the
demonstrations alone for SVD clipping). `choose_keep` evaluates that grid, mildest fraction first in
each cell, and chooses:

- `extra = 0`: the fixed grid, chosen by dev accuracy; the unedited candidate wins ties, then the
  earliest (mildest) cell and fraction. What both methods always did; no dev NLL is computed. With the
  run's `select="1se"`: the weakest candidate (strength 1 − keep; equal strengths in grid order, the
  unedited one first) whose dev accuracy is within one paired standard error of the best.
- `extra > 0`: every candidate also carries the dev NLL of the correct answers, the choice follows the
  run's `select` (as eigenprune's p: `search.rank_key`, strength = 1 − keep), and then the winning
  cell's fraction is searched with `search.search_strength` (keep 1.0 as the unedited value, rank 1 as
  the strongest): extended past the grid's smallest fraction while the best sits on it, else refined
  between the best and its neighbours on a log scale, for `extra` more dev evaluations. The other cells
  stay at their grid. The winning cell is the one holding the best edited candidate, so the search runs
  even when the unedited candidate leads (it then refines toward keep 1.0).

Two fractions that keep the same ranks are the same edit: the second is not evaluated again (the search
sees the first one's numbers), so `extra` bounds the evaluations and may leave some unspent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.edits.artifact import fingerprint
from eigenprune.edits.decompose import Components, decompose_targets
from eigenprune.edits.freeze import Edit, FreezeConfig, applied, build_edit
from eigenprune.edits.targets import Target
from eigenprune.evaluation.significance import one_se_choice
from eigenprune.protocol.harness import Harness, accuracy, best_on_dev
from eigenprune.protocol.search import DEFAULT_SELECT, Candidate, Step, rank_key, search_strength

NONE = 1.0  # the kept fraction of an unedited matrix

# evaluate(cell, keep, with_nll) -> ((n_dev,) correctness, (n_dev,) answer NLL or None), the edit on the model
Evaluate = Callable[[int, float, bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class Tried:
    """One evaluated candidate: a cell and a kept fraction, the phase that proposed it, its dev numbers."""

    cell: int
    keep: float
    phase: str  # 'grid', 'extend' or 'refine'
    dev: torch.Tensor  # (n_dev,) correctness
    nll: torch.Tensor | None  # (n_dev,) answer NLL; None on the fixed grid

    @property
    def candidate(self) -> Candidate:
        return Candidate.from_examples(self.dev, self.nll)

    def row(self) -> dict:
        """The report's numbers for this candidate."""
        out = {"keep": self.keep, "dev_acc": accuracy(self.dev)}
        if self.nll is not None:
            out |= {"dev_nll": float(self.nll.double().sum()), "phase": self.phase}
        return out


@dataclass
class KeepChoice:
    """Every candidate evaluated, in the order tried, and the chosen one (-1: the unedited candidate)."""

    tried: list[Tried]
    chosen: int
    search: dict | None  # with extra > 0: the searched cell, budget, select, why it stopped

    @property
    def best(self) -> Tried | None:
        return self.tried[self.chosen] if self.chosen >= 0 else None


def _step(t: Tried) -> Step:
    return Step(t.keep, t.candidate, t.phase)


def _best_edit(tried: Sequence[Tried], select: str) -> int:
    """Index of the best edited candidate by `select`; ties go to the weaker edit, then the earlier one."""
    return min(range(len(tried)), key=lambda i: (rank_key(_step(tried[i]), select, NONE), i))


def _one_se(base_dev: torch.Tensor, tried: Sequence[Tried]) -> int:
    """The one-SE rule over the unedited candidate and `tried`: index into `tried`, -1 for the unedited one."""
    order = sorted(range(len(tried)), key=lambda i: (NONE - tried[i].keep, i))  # weakest first, then grid order
    table = [base_dev.float().numpy(), *(tried[i].dev.float().numpy() for i in order)]
    pick = one_se_choice(table)
    return -1 if pick == 0 else order[pick - 1]


def _ranked(base: Candidate, tried: Sequence[Tried], select: str) -> int:
    """Index of the best candidate by `select`, -1 for the unedited one (it wins ties: it is the weakest)."""
    if select == "1se":
        return _one_se(base.correct, tried)
    i = _best_edit(tried, select)
    return -1 if rank_key(Step(NONE, base, "base"), select, NONE) <= rank_key(_step(tried[i]), select, NONE) else i


def choose_keep(n_cells: int, keeps: Sequence[float], evaluate: Evaluate, base_dev: torch.Tensor,
                base_nll: Callable[[], torch.Tensor], *, extra: int = 0, select: str = DEFAULT_SELECT,
                limit: Callable[[int], float], ranks: Callable[[int, float], Hashable]) -> KeepChoice:
    """The grid (every cell × every fraction < 1 of `keeps`, mildest first), then with `extra` > 0 the
    winning cell's fraction searched for `extra` more dev evaluations (module docstring).

    `base_nll()`: the unedited candidate's (n_dev,) answer NLL, asked for only when `extra` > 0;
    `limit(cell)`: the smallest fraction that still changes the cell's ranks (1 / its largest rank);
    `ranks(cell, keep)`: what the fraction keeps (equal values: the same edit)."""
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise ValueError(f"extra must be a non-negative integer, got {extra!r}")
    keeps = sorted({k for k in keeps if k < NONE}, reverse=True)
    searching = extra > 0
    tried = [Tried(cell, keep, "grid", *evaluate(cell, keep, searching)) for cell in range(n_cells) for keep in keeps]
    if not searching or not tried:
        chosen = (_one_se(base_dev, tried) if select == "1se" and tried else
                  best_on_dev(accuracy(base_dev), [accuracy(t.dev) for t in tried]))
        return KeepChoice(tried, chosen, None)
    base = Candidate.from_examples(base_dev, base_nll())
    cell = tried[_best_edit(tried, "accuracy" if select == "1se" else select)].cell
    seen = {ranks(cell, t.keep): t for t in tried if t.cell == cell}
    new: dict[float, Tried] = {}

    def in_cell(keep: float) -> Candidate:
        key = ranks(cell, keep)
        if key not in seen:
            seen[key] = new[keep] = Tried(cell, keep, "search", *evaluate(cell, keep, True))
        return seen[key].candidate

    result = search_strength(in_cell, base, keeps, none=NONE, limit=min(limit(cell), min(keeps)),
                             budget=len(keeps) + extra, select=select)
    for step in result.steps:
        if step.value in new:
            new[step.value].phase = step.phase
    tried += new.values()
    return KeepChoice(tried, _ranked(base, tried, select),
                      {"cell": cell, "budget": extra, "select": select, "stopped": result.stopped,
                       "evaluations": len(new)})


def kept_rank(n_components: int, keep: float) -> int:
    """How many of a matrix's components a kept fraction keeps: floor(keep · n), at least 1."""
    return max(1, math.floor(keep * n_components + 1e-9))


def truncation_edit(targets: list[Target], components: dict[str, Components], keep: float) -> Edit:
    """Each target replaced by its best rank-k approximation (largest singular values kept, no bias)."""
    removed = {t.name: torch.arange(kept_rank(t.n_components, keep), t.n_components) for t in targets}
    return build_edit(targets, components, removed, None,
                      FreezeConfig(p=min(1.0 - keep, 0.999999), scope="per-target", bias="none"))


def choose_truncation(harness: Harness, cells: Sequence[Sequence[Target]], keeps: Sequence[float],
                      base_dev: torch.Tensor, extra: int = 0) -> KeepChoice:
    """`choose_keep` for truncation: each cell a group of targets cut to their top singular values together
    (`truncation_edit`), evaluated on `harness`'s dev split; one cell's exact SVDs held at a time (a large
    model's grid would not fit at once); ties and `select` as the run's (`harness.config.select`)."""
    svd: dict[int, dict[str, Components]] = {}

    def evaluate(cell: int, keep: float, with_nll: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if cell not in svd:
            svd.clear()
            svd[cell] = decompose_targets(harness.model, list(cells[cell]))
        with applied(harness.model, truncation_edit(list(cells[cell]), svd[cell], keep)), \
                harness.step(f"cell {cell + 1}/{len(cells)} keep={keep:g}"):
            if with_nll:  # one pass in exact mode
                return harness.evaluate_with_nll("dev")  # (n_dev,), (n_dev,)
            return harness.evaluate("dev"), None

    return choose_keep(len(cells), keeps, evaluate, base_dev, lambda: harness.nll("dev"), extra=extra,
                       select=harness.config.select,
                       limit=lambda cell: 1 / max(t.n_components for t in cells[cell]),
                       ranks=lambda cell, keep: tuple(kept_rank(t.n_components, keep) for t in cells[cell]))


def edit_meta(harness: Harness, model: nn.Module, targets: list[Target], method: str) -> dict:
    """What a saved truncation edit records about its base model (call while the model is unedited)."""
    modules = sorted({t.module_name for t in targets})
    return {"base_model": harness.config.model, "base_fingerprint": fingerprint(model, modules), "method": method,
            "data": harness.config.task}
