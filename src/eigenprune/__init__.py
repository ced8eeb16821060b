"""eigenprune: remove singular components of a causal LM's weights to help one task, and measure it.

The package is its layers, each a folder that imports only the ones below it (import-linter checks
this in `make test`; the contract is in pyproject.toml):

    cli           the `eigenprune` command
    experiments   run, compare (one pipeline), study, provenance
    reports       words, tables and plots from an experiment's numbers
    methods       the registry and one file per method, eigenprune included
    protocol      the harness every method gets, dev-choice rules, the run settings
    edits | evaluation   targets, SVD, scores, freezing, saved edits | tasks, splits, evaluation, statistics
    core          errors, settings, model loading, token batches, hooks

The public API is importable from here, each step one call:

    model, tok = eigenprune.load_model("smollm2-135m")
    splits = eigenprune.split_task(eigenprune.load_task("int-mult"))
    run = eigenprune.score_run(model, tok, splits.train)            # SVD + scores, once
    edit = eigenprune.prune(run, p=0.05)                             # any p, no rescoring
    with eigenprune.applied(model, edit):                            # or apply_edit / remove_edit
        print(eigenprune.evaluate(model, tok, splits.dev, "exact").accuracy)

Names resolve lazily, so `import eigenprune` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from eigenprune import _compat
from eigenprune.core.version import __version__

_compat.install()

# public name -> the module that defines it
_API = {
    "load_model": "core.models",
    "UsageError": "core.errors",
    "Task": "evaluation.tasks", "load_task": "evaluation.tasks",
    "Splits": "evaluation.splits", "split_task": "evaluation.splits", "fold_splits": "evaluation.splits",
    "EvalResult": "evaluation.evaluate", "evaluate": "evaluation.evaluate",
    "ScoreConfig": "edits.scoring",
    "ScoreRun": "edits.engine", "score_run": "edits.engine", "prune": "edits.engine",
    "FreezeConfig": "edits.freeze", "Edit": "edits.freeze", "applied": "edits.freeze",
    "apply_edit": "edits.freeze", "remove_edit": "edits.freeze",
    "save_edit": "edits.artifact", "load_edit": "edits.artifact", "apply_saved_edit": "edits.artifact",
    "Accuracy": "evaluation.stats", "Difference": "evaluation.stats",
    "RunConfig": "protocol.config", "Harness": "protocol.harness",
    "MethodResult": "methods.base", "register": "methods.registry",
    "CompareConfig": "experiments.compare", "compare": "experiments.compare",
    "run": "experiments.run",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'eigenprune' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"eigenprune.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from eigenprune.core.errors import UsageError
    from eigenprune.core.models import load_model
    from eigenprune.edits.artifact import apply_saved_edit, load_edit, save_edit
    from eigenprune.edits.engine import ScoreRun, prune, score_run
    from eigenprune.edits.freeze import Edit, FreezeConfig, applied, apply_edit, remove_edit
    from eigenprune.edits.scoring import ScoreConfig
    from eigenprune.evaluation.evaluate import EvalResult, evaluate
    from eigenprune.evaluation.splits import Splits, fold_splits, split_task
    from eigenprune.evaluation.stats import Accuracy, Difference
    from eigenprune.evaluation.tasks import Task, load_task
    from eigenprune.experiments.compare import CompareConfig, compare
    from eigenprune.experiments.run import run
    from eigenprune.methods.base import MethodResult
    from eigenprune.methods.registry import register
    from eigenprune.protocol.config import RunConfig
    from eigenprune.protocol.harness import Harness
