"""The dev-choice defaults that flags and configs show (`search.py` uses them), importable without torch.

The command line builds `run`'s flags from `RunConfig` before importing torch, so the values its
fields default to live here rather than in `search.py`, which holds the search itself.
"""

from __future__ import annotations

DEFAULT_GRID = (0.01, 0.05, 0.1, 0.3)  # the paper's
DEFAULT_BUDGET = 10
SELECTS = ("accuracy", "accuracy+loss", "loss", "1se")
DEFAULT_SELECT = "1se"  # the weakest p within one paired SE of the best dev accuracy (issue 21)
# how side effects compute KL(base ‖ edit) (evaluation.side_effects.KL_PATHS, spelled here torch-free for --help;
# tests/test_side_effects.py checks the two agree): exact, or linear (the edit's own head only: token_scores.py)
KL_PATHS = ("exact", "linear")
