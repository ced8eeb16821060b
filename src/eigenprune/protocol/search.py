"""Choosing an edit's strength on dev by search instead of a fixed grid (`--p auto`), and the dev loss that
breaks accuracy ties.

A dev split of a few dozen examples moves accuracy in coarse steps: on CB every p from 0.01 to 0.3
left dev accuracy exactly where the base model had it. So every candidate carries two dev numbers,
its accuracy and the summed NLL of the correct answers (`dev_nll`), and the choice is

- `select="accuracy+loss"`: the highest dev accuracy; ties go to the lower dev NLL, then the weaker edit;
- `select="loss"`: the lowest dev NLL outright; ties go to the weaker edit;
- `select="accuracy"`: the highest dev accuracy; ties go to the weaker edit (the NLL is only reported:
  eigenprune's choice before the search existed, kept so a fixed-grid run reports what it always did);
- `select="1se"`: the one-standard-error rule (Breiman et al. 1984; Hastie et al., ESL 7.10): the weakest
  candidate whose dev accuracy is within one paired standard error of the best candidate's, the base
  included (`significance.one_se_choice`, on each candidate's per-example dev correctness,
  `Candidate.correct`). Dev NLL falls steadily with p while dev accuracy stays flat, so a loss tie-break
  leans to strong edits whose dev lead is noise; 1se leans the other way, to the weakest edit dev cannot
  tell from the best. A search under 1se explores as `accuracy` does (it looks for the best; the rule
  needs it) and applies the rule to every candidate tried.

The base model (p = 0) always competes. The search (`search_p`, or `search_strength` for any knob):

1. evaluate the grid, weakest first (default the paper's p = 0.01, 0.05, 0.1, 0.3);
2. while the best candidate is the strongest one tried, extend: the next `extend` value (0.5, 0.7,
   0.9), and past those the log-scale midpoint between the strongest value and `limit`;
3. otherwise refine: the log-scale midpoint between the best value and its weaker or its stronger
   neighbour (below the weakest value the base, where the midpoint halves), the side with the wider
   gap first, and back to 2 or 3 with the new best,
until `budget` evaluations are spent or every gap next to the best is closed at 3 significant digits
(or would go weaker than `min_strength`; for p, `min_p`, e.g. 1 / the number of components: when
nothing beats the base the search otherwise spends its budget halving p toward 0).

`budget` counts calls to `evaluate` (the grid included; the base's evaluation is the caller's). A
budget smaller than the grid is an error rather than a silently shortened grid; `budget=len(grid)`
is exactly today's fixed sweep. No value is evaluated twice. Each call is one dev evaluation of an
edit made from the scores and SVDs the caller already has.

A knob other than p: `search_strength` takes the knob's unedited value `none` and its strongest
allowed value `limit`; strength is the distance from `none`. LASER's keep fraction is
`none=1.0, limit=0.001, grid=(0.5, 0.25, 0.1), extend=(0.05, 0.01)`: the search extends toward
smaller keep fractions and bisects on a log scale of the fraction kept. Knob values must be positive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from eigenprune.evaluation.significance import one_se_choice
from eigenprune.evaluation.stats import accuracy
from eigenprune.protocol.defaults import DEFAULT_BUDGET, DEFAULT_GRID, DEFAULT_SELECT, SELECTS

DEFAULT_EXTEND = (0.5, 0.7, 0.9)
MAX_P = 0.999
PHASES = ("base", "grid", "extend", "refine")
SIGNIFICANT_DIGITS = 3  # refined values are rounded: readable in a report, and a gap rounding closes is done


@dataclass(frozen=True)
class Candidate:
    """One edit's dev numbers: accuracy, the summed NLL of the correct answers, and what the caller attaches."""

    accuracy: float = field(metadata={"help": "dev accuracy in [0, 1]"})
    nll: float = field(metadata={"help": "dev NLL of the correct answers, summed over tokens and examples"})
    data: Any = field(default=None, compare=False, metadata={"help": "the caller's (edit, per-example results)"})
    correct: torch.Tensor | None = field(default=None, compare=False, repr=False, metadata={
        "help": "(n_dev,) per-example correctness, for the one-standard-error rule (`select='1se'`)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {self.accuracy}")
        if not math.isfinite(self.nll):
            raise ValueError(f"nll must be finite, got {self.nll}")

    @classmethod
    def from_examples(cls, correct: torch.Tensor, nll: torch.Tensor, data: Any = None) -> Candidate:
        """From per-example (n,) correctness and (n,) answer NLL; computed one way for every candidate, so that
        equal results tie exactly."""
        return cls(accuracy(correct), float(nll.double().sum()), data, correct)


@dataclass(frozen=True)
class Step:
    """One candidate of a search: the knob's value, its dev numbers, and the phase that proposed it."""

    value: float
    candidate: Candidate
    phase: str


@dataclass(frozen=True)
class SearchResult:
    """Every candidate in the order tried (the base first) and the chosen one."""

    steps: tuple[Step, ...]
    chosen: Step
    select: str
    budget: int
    stopped: str  # 'budget': every evaluation spent; 'resolution': no untried value left next to the best

    @property
    def evaluations(self) -> int:
        return len(self.steps) - 1


def rank_key(step: Step, select: str, none: float = 0.0) -> tuple:
    """Sort key, best first: see the module docstring. `none`: the knob's unedited value. For "1se" (not a
    sort: `choose` applies the rule) the key is accuracy's, which is how a 1se search explores."""
    c, strength = step.candidate, abs(step.value - none)
    if select == "accuracy+loss":
        return (-c.accuracy, c.nll, strength)
    if select in ("accuracy", "1se"):
        return (-c.accuracy, strength)
    return (c.nll, strength)


def choose(steps: Sequence[Step], select: str = DEFAULT_SELECT, none: float = 0.0) -> Step:
    """The best step by `select` (also for a fixed grid: include the base as a step with value `none`)."""
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if select == "1se":
        return one_se_step(steps, none)
    return min(steps, key=lambda s: rank_key(s, select, none))


def one_se_step(steps: Sequence[Step], none: float = 0.0) -> Step:
    """The one-standard-error rule over `steps` (the base among them): the weakest step whose dev accuracy is
    within one paired SE of the best's; equal strengths keep their given order."""
    if any(s.candidate.correct is None for s in steps):
        raise ValueError("select='1se' needs each candidate's per-example dev correctness (Candidate.from_examples)")
    order = sorted(range(len(steps)), key=lambda i: (abs(steps[i].value - none), i))  # weakest first
    return steps[order[one_se_choice([steps[i].candidate.correct.float().numpy() for i in order])]]


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def _midpoint(a: float, b: float) -> float:
    """The log-scale midpoint of two knob values; toward 0 (the base's p), half the other one."""
    return math.sqrt(a * b) if a > 0 and b > 0 else max(a, b) / 2


def _check(grid: Sequence[float], extend: Sequence[float], none: float, limit: float, budget: int,
           select: str) -> None:
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive integer, got {budget!r}")
    if not grid:
        raise ValueError("grid needs at least one value")
    if none < 0 or limit <= 0 or limit == none:
        raise ValueError(f"limit must be positive and differ from none, got none={none}, limit={limit}")
    low, high = sorted((none, limit))
    for name, values in (("grid", grid), ("extend", extend)):
        for v in values:
            if not (low < v <= high if limit > none else low <= v < high):
                raise ValueError(f"{name} values must lie between {none} (no edit, excluded) and {limit}, got {v}")
    if budget < len(set(grid)):
        raise ValueError(f"budget ({budget}) is smaller than the grid ({len(set(grid))} values); raise the "
                         "budget or shorten the grid")


def search_strength(evaluate: Callable[[float], Candidate], base: Candidate, grid: Sequence[float], *,
                    none: float, limit: float, extend: Sequence[float] = (), budget: int = DEFAULT_BUDGET,
                    select: str = DEFAULT_SELECT, min_strength: float = 0.0) -> SearchResult:
    """Search a strength knob on dev (see the module docstring): grid, extend at the edge, refine."""
    _check(grid, extend, none, limit, budget, select)

    def strength(value: float) -> float:
        return abs(value - none)

    steps = [Step(none, base, "base")]
    tried = {none}

    def run(value: float, phase: str) -> None:
        candidate = evaluate(value)
        if not isinstance(candidate, Candidate):
            raise TypeError(f"evaluate({value}) must return a Candidate, got {type(candidate).__name__}")
        steps.append(Step(value, candidate, phase))
        tried.add(value)

    guide = "accuracy" if select == "1se" else select  # where to look next: toward the best (1se needs it)

    def best() -> Step:
        return choose(steps, guide, none)

    for value in sorted(set(grid), key=strength):
        run(value, "grid")
    ahead = sorted(set(extend), key=strength)
    stopped = "budget"
    while len(steps) - 1 < budget:
        edge = max(tried, key=strength)
        if best().value == edge:
            value = next((v for v in ahead if strength(v) > strength(edge)), None)
            if value is None:
                value = _between(edge, limit, tried)
            if value is not None:
                run(value, "extend")
                continue
        value = _refinement(best(), sorted(tried, key=strength), steps, none, guide, min_strength)
        if value is None:
            stopped = "resolution"
            break
        run(value, "refine")
    return SearchResult(tuple(steps), choose(steps, select, none), select, budget, stopped)


def _between(a: float, b: float, tried: set[float]) -> float | None:
    """The rounded log-scale midpoint of a and b, or None when rounding leaves no untried value between them."""
    value = _round(_midpoint(a, b))
    lo, hi = sorted((a, b))
    return value if lo < value < hi and value not in tried else None


def _refinement(best: Step, tried: list[float], steps: list[Step], none: float, select: str,
                min_strength: float) -> float | None:
    """The next value to try next to the best one (`tried`: sorted weakest first), or None when both gaps
    are closed."""
    i = tried.index(best.value)
    by_value = {s.value: s for s in steps}
    options = []
    for neighbour in (tried[i - 1] if i > 0 else None, tried[i + 1] if i + 1 < len(tried) else None):
        value = None if neighbour is None else _between(best.value, neighbour, set(tried))
        if value is None or abs(value - none) < min_strength:
            continue
        width = abs(math.log(value) - math.log(best.value)) if best.value > 0 else math.inf
        options.append((-width, rank_key(by_value[neighbour], select, none), value))  # wider gap, better neighbour
    return min(options)[2] if options else None


def search_p(evaluate: Callable[[float], Candidate], base: Candidate, grid: Sequence[float] = DEFAULT_GRID,
             budget: int = DEFAULT_BUDGET, select: str = DEFAULT_SELECT, extend: Sequence[float] = DEFAULT_EXTEND,
             max_p: float = MAX_P, min_p: float = 0.0) -> SearchResult:
    """Search the fraction p of components to freeze: `search_strength` with p = 0 as the base; refinement
    never goes below `min_p`."""
    return search_strength(evaluate, base, grid, none=0.0, limit=max_p, extend=extend, budget=budget, select=select,
                           min_strength=min_p)


def dev_nll(model: torch.nn.Module, tokenizer, examples: Sequence, batch_size: int = 16) -> torch.Tensor:
    """Each example's NLL of its correct answer (summed over answer tokens, teacher forced, as scoring and
    `choice` evaluation compute it): (n,) float32 in the given order. Runs under inference mode; `batch_nll`
    tells an edited model where each prompt ends; the model's mode comes back."""
    from eigenprune.core.batching import batch_nll, batches, check_fits, encode

    out = torch.empty(len(examples))  # (n,)
    if not examples:
        return out
    encoded = encode(tokenizer, examples)
    check_fits(model, encoded)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches(encoded, batch_size, tokenizer.pad_token_id):
                batch = batch.to(device)
                out[batch.index.cpu()] = batch_nll(model, batch).float().cpu()  # (batch,) prompt ends: batch_nll
    finally:
        model.train(was_training)
    return out
