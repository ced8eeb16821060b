"""What every method returns, so that `compare` can put them in one table, and the helpers every
method that expresses itself as an `Edit` (eigenprune, random, smallest, LASER, SVD clipping, feature
space) uses, so that all of them evaluate, count, choose and save the same way."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eigenprune.edits.artifact import ScoreRun, save_edit
from eigenprune.edits.freeze import Edit, applied
from eigenprune.protocol.harness import Harness, accuracy, best_on_dev  # noqa: F401  (re-exported for the methods)


@dataclass
class MethodResult:
    """A method's chosen configuration and its per-example correctness on dev and test."""

    method: str
    config: dict  # the configuration chosen on dev (JSON-serialisable)
    dev: torch.Tensor  # (n_dev,) correctness of the chosen configuration: bool, or float means over seeds
    test: torch.Tensor  # (n_test,) likewise, evaluated once, after the choice
    dev_evaluations: int  # how many configurations were evaluated on dev to choose
    wall_s: float  # wall time of the whole method, choice and test included
    changed_params: int  # parameters whose value differs from the base model's (0 for the base itself)
    save: Callable[[Path], None] | None = None  # writes the chosen edit to a directory (must not exist)
    runs: list[dict] = field(default_factory=list)  # extra per-run rows (e.g. the random control's seeds)
    extra: dict = field(default_factory=dict)  # method-specific details for the report
    modules: list[str] = field(default_factory=list)  # modules whose weights the chosen configuration changes
    # what the method wants said in the report (compare_report renders these without knowing the method):
    notes: list[str] = field(default_factory=list)  # one bullet each under "Notes"
    sections: list[str] = field(default_factory=list)  # markdown sections of its own (a per-seed table, ...)
    markers: list[dict] = field(default_factory=list)  # extra points on its plot row: {"acc", "label", "marker"}
    verdict: str = ""  # a sentence for the verdict (e.g. "the prompt change, not the clipping, carries it")
    # the chosen configuration put on a model for a block (`with result.applied(model): ...`), so that compare
    # can measure what it costs elsewhere (side effects); None: the method cannot be applied to a model alone
    applied: Callable[[torch.nn.Module], contextlib.AbstractContextManager] | None = None
    # live objects a method hands to the methods that build on it (the controls reuse eigenprune's scores and
    # its chosen edit); never written to the report, and dropped with `release()` once a fold is done
    score_run: ScoreRun | None = None
    edit: Edit | None = None

    def release(self) -> None:
        """Drop the live objects (SVDs, scores) once no other method needs them."""
        self.score_run = self.edit = None


def evaluate_edit(harness: Harness, edit: Edit, split: str) -> torch.Tensor:
    """(n,) bool correctness on `split` with the edit applied; the model is restored afterwards."""
    with applied(harness.model, edit):
        return harness.evaluate(split)


def edit_changed_params(edit: Edit) -> int:
    """Entries of the merged model that differ from the base: every weight entry of a touched target
    block (a rank-r change moves all of them) plus, when the edit adds a bias, one bias entry per
    touched output row (a position-dependent bias is still one entry per row per offset: counted once)."""
    total = 0
    for t in edit.targets:
        if len(edit.removed[t.name]) == 0:
            continue
        rows = t.rows[1] - t.rows[0]
        total += rows * t.in_features + (rows if edit.config.bias != "none" else 0)
    return total


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs for the block and give the caller's RNG state back afterwards (training stages)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(seed)
        yield


def edit_applier(edit: Edit) -> Callable[[torch.nn.Module], contextlib.AbstractContextManager]:
    """`applied(model)` for an edit-based method's chosen edit."""
    return lambda model: applied(model, edit)


def edit_saver(edit: Edit, meta: dict) -> Callable[[Path], None]:
    """A `save(out)` callable that writes `edit` with `save_edit` (it reloads with `apply_saved_edit`)."""

    def save(out: Path) -> None:
        save_edit(out, edit, meta)

    return save
