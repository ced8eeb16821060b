"""What every method returns, so that `compare` can put them in one table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class MethodResult:
    """A method's chosen configuration and its per-example correctness on dev and test."""

    method: str
    config: dict  # the configuration chosen on dev (JSON-serialisable)
    dev: torch.Tensor  # (n_dev,) bool, of the chosen configuration
    test: torch.Tensor  # (n_test,) bool, evaluated once, after the choice
    dev_evaluations: int  # how many configurations were evaluated on dev to choose
    wall_s: float  # wall time of the whole method, choice and test included
    changed_params: int  # parameters whose value differs from the base model's (0 for the base itself)
    save: Callable[[Path], None] | None = None  # writes the chosen edit to a directory (must not exist)
    runs: list[dict] = field(default_factory=list)  # extra per-run rows (e.g. the random control's seeds)
    extra: dict = field(default_factory=dict)  # method-specific details for the report
