"""LASER (Sharma et al. 2023, "The Truth is in There"): one matrix, one layer, best rank-k approximation.

A candidate replaces ONE weight matrix (one target: a matrix type such as the MLP input projection,
at one layer) by its truncated SVD U[:, :k] diag(S[:k]) Vh[:k], keeping the largest singular values
and no bias. The grid is layer × matrix type × kept fraction; the best dev accuracy wins and the
unmodified model competes as a candidate (it wins ties). With `search` > 0 the winning cell's kept
fraction is then searched on dev (`strength.choose_truncation`: extend at the edge, refine; chosen by the
run's `select`). The SVD is exact (`torch.linalg.svd`, via
`decompose`); the LASER code used a randomized SVD, which is not reproducible.

Truncation is expressed as an eigenprune `Edit` that freezes the smallest components with bias
"none", so it is applied, saved and reloaded exactly like an eigenprune edit. The full grid is large
(30 layers × 3 types × 6 fractions = 540 dev evaluations), so by default only the last `last`
layers plus every `stride`-th layer are searched; the number of dev evaluations spent is reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from eigenprune.core.errors import UsageError
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.targets import PRESETS, find_targets
from eigenprune.methods.base import (
    MethodResult,
    edit_applier,
    edit_changed_params,
    edit_saver,
    evaluate_edit,
)
from eigenprune.methods.registry import Context, register
from eigenprune.methods.strength import choose_truncation, edit_meta, kept_rank, truncation_edit  # noqa: F401
from eigenprune.protocol.harness import Harness, base_correct

DEFAULT_KEEP = (0.9, 0.5, 0.25, 0.1, 0.05, 0.01)


@dataclass
class LaserConfig:
    """The LASER search grid and its budget."""

    kinds: tuple[str, ...] = field(default=("mlp-in", "mlp-out", "key"),
                                   metadata={"help": "matrix types (target presets) to try"})
    keep: tuple[float, ...] = field(default=DEFAULT_KEEP, metadata={"help": "fractions of the rank to keep"})
    layers: tuple[int, ...] | None = field(default=None, metadata={"help": "layers to try; None: last + stride"})
    last: int = field(default=4, metadata={"help": "by default try the last N layers ..."})
    stride: int = field(default=8, metadata={"help": "... plus every N-th layer from 0 (0: none)"})
    search: int = field(default=0, metadata={
        "help": "dev evaluations beyond the grid that extend the winning cell's kept fraction past the grid's "
                "smallest (toward rank 1) or refine it, chosen by the run's --select (0: the fixed grid)"})

    def __post_init__(self) -> None:
        self.kinds, self.keep = tuple(self.kinds), tuple(float(k) for k in self.keep)
        if not self.kinds:
            raise ValueError("kinds needs at least one matrix type")
        for kind in self.kinds:
            if kind not in PRESETS or kind == "all":
                raise ValueError(f"kinds: '{kind}' is not a matrix type; choose from "
                                 f"{', '.join(k for k in PRESETS if k != 'all')}")
        if not self.keep or not all(0 < k <= 1 for k in self.keep):
            raise ValueError(f"keep fractions must be in (0, 1], got {self.keep}")
        if self.layers is not None:
            self.layers = tuple(int(v) for v in self.layers)
            if not self.layers or min(self.layers) < 0:
                raise ValueError(f"layers must be non-negative layer indices, got {self.layers}")
        if self.search < 0:
            raise ValueError(f"search must be non-negative, got {self.search}")
        if self.last < 0 or self.stride < 0:
            raise ValueError(f"last and stride must be non-negative, got {self.last} and {self.stride}")
        if self.layers is None and self.last == 0 and self.stride == 0:
            raise ValueError("last and stride are both 0: no layer would be tried")


def search_layers(available: list[int], config: LaserConfig) -> list[int]:
    """The layers in the grid: the configured list, or the last `last` layers plus every `stride`-th."""
    if config.layers is not None:
        missing = sorted(set(config.layers) - set(available))
        if missing:
            raise UsageError(f"LASER layers {missing} do not exist; the model has layers "
                             f"{available[0]}-{available[-1]}")
        return sorted(set(config.layers))
    chosen = set(available[-config.last:]) if config.last else set()
    if config.stride:
        chosen |= {layer for layer in available if (layer - available[0]) % config.stride == 0}
    return sorted(chosen)


def run_laser(harness: Harness, config: LaserConfig | None = None,
              base: dict[str, torch.Tensor] | None = None) -> MethodResult:
    """Search layer × matrix type × kept fraction on dev; evaluate the winner on test once."""
    t0 = time.perf_counter()
    config = config or LaserConfig()
    model = harness.model
    by_kind = {kind: find_targets(model, kind) for kind in config.kinds}
    available = sorted({t.layer for ts in by_kind.values() for t in ts if t.layer is not None})
    if not available:
        raise UsageError("LASER needs numbered layers; no matrix of the chosen types sits in one")
    layers = search_layers(available, config)
    grid = [(layer, kind, t) for layer in layers for kind in config.kinds for t in by_kind[kind] if t.layer == layer]
    base_dev = base_correct(harness, base, "dev")
    choice = choose_truncation(harness, [[t] for _, _, t in grid], config.keep, base_dev, config.search)
    sweep = [{"layer": grid[t.cell][0], "kind": grid[t.cell][1], "target": grid[t.cell][2].name, "keep": t.keep,
              "rank": kept_rank(grid[t.cell][2].n_components, t.keep), "n_components": grid[t.cell][2].n_components,
              **t.row()} for t in choice.tried]
    best = choice.chosen
    target, keep = (grid[choice.best.cell][2], choice.best.keep) if best >= 0 else (grid[0][2], 1.0)
    edit = truncation_edit([target], decompose_targets(model, [target]), keep)  # the same SVD again, exactly
    if best >= 0:
        chosen = {k: v for k, v in sweep[best].items() if k not in ("dev_acc", "dev_nll", "phase")}
        dev, test = choice.best.dev, evaluate_edit(harness, edit, "test")
    else:
        chosen = {"target": None, "keep": 1.0}
        dev, test = base_dev, base_correct(harness, base, "test")
    meta = edit_meta(harness, model, [target], "laser")
    return MethodResult(
        method="laser", config={**chosen, "base_chosen": best < 0}, dev=dev, test=test,
        dev_evaluations=1 + len(sweep), wall_s=time.perf_counter() - t0,
        changed_params=edit_changed_params(edit), save=edit_saver(edit, meta | {"laser": chosen}),
        applied=edit_applier(edit),
        extra={"layers": layers, "kinds": list(config.kinds), "keep": sorted(config.keep, reverse=True),
               "sweep": sweep, **({"search": choice.search} if choice.search else {})},
        modules=edit.modules if best >= 0 else [],
    )


@register("laser", LaserConfig, default=4,
          flags={"--laser-kinds": "kinds", "--laser-keep": "keep", "--laser-layers": "layers", "--laser-last": "last",
                 "--laser-stride": "stride"},
          summary="one matrix at one layer replaced by its best rank-k approximation (chosen on dev)")
def laser(harness: Harness, config: LaserConfig, ctx: Context) -> MethodResult:
    return run_laser(harness, config, base=ctx.base)
