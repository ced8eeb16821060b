"""The scoring and freezing settings (`ScoreConfig`, `FreezeConfig`), importable without torch.

The command line builds its flags from these dataclasses before anything heavy is imported, so that
`--help` and a mistyped flag answer at once; `scoring.py` and `freeze.py`, which do the work, re-export
them. A field's `help` is its flag's help text (`core/settings.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCOPES = ("global", "per-target")
AGGREGATES = ("max", "mean")
BIASES = ("position", "constant", "none")  # none: plain truncation (LASER-style baselines)


@dataclass
class ScoreConfig:
    """How to pair examples and batch them."""

    partners: int | str = field(default=4, metadata={"help": "partners per example, or 'all' (exact)",
                                                                "metavar": "N|all"})
    window: int = field(default=32, metadata={"help": "partners come from this many preceding examples"})
    seed: int = field(default=0, metadata={"help": "seed of the stream order and partner draws"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward"})

    def __post_init__(self) -> None:
        if isinstance(self.partners, str):
            if self.partners != "all":
                if not self.partners.isdigit():
                    raise ValueError(f"partners must be a positive integer or 'all', got '{self.partners}'")
                self.partners = int(self.partners)
        if self.partners != "all" and self.partners < 1:
            raise ValueError(f"partners must be at least 1, got {self.partners}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass
class FreezeConfig:
    """Which components to freeze and how to replace them."""

    p: float = field(default=0.05, metadata={"help": "fraction of components to freeze, in [0, 1)"})
    scope: str = field(default="global", metadata={"help": "rank components across all targets or per target",
                                                   "choices": SCOPES, "metavar": "SCOPE"})
    aggregate: str = field(default="max", metadata={"help": "rank by the max over pairs (paper) or the mean",
                                                    "choices": AGGREGATES, "metavar": "AGG"})
    bias: str = field(default="position",
                      metadata={"help": "bias from the mean input per position, overall ('constant'), or 'none'",
                                "choices": BIASES, "metavar": "BIAS"})

    def __post_init__(self) -> None:
        if not 0 <= self.p < 1:
            raise ValueError(f"p must be in [0, 1), got {self.p}")
        for name, allowed in (("scope", SCOPES), ("aggregate", AGGREGATES), ("bias", BIASES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(self, name)}'")
