"""The settings of a run (`RunConfig`), defined once: flags, config.json and `--config` all come from it.

The scoring settings are `scoring.ScoreConfig` and the freezing rule `freeze.FreezeConfig`, nested here
as `score` and `freeze` (so `score` and `run` spell each setting the same way: `--score-seed`,
`--partners`, `--scope`, ...). `freeze.p` is unused in a run: the run tries every fraction of `p`, each
through `freeze_at(p)`, so config.json (`to_json`: the dataclass as sorted JSON) leaves it out and says
what dev chose in a `chosen` block of its own. `config_from_file` reads config.json back (also the flat
layout of files written before nesting, and the `freeze.p: 0.0` of files written before `chosen`),
type-checking every field.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eigenprune.core import settings
from eigenprune.core.errors import UsageError
from eigenprune.edits.config import AGGREGATES, BIASES, SCOPES, FreezeConfig, ScoreConfig
from eigenprune.protocol.defaults import DEFAULT_BUDGET, DEFAULT_GRID, DEFAULT_SELECT, KL_PATHS, SELECTS

DEFAULT_PS = DEFAULT_GRID  # the paper's grid: what `--p` tries, and where `--p auto` starts
EVAL_MODES = ("next-token", "choice", "exact")
COMPARE_EXCLUDES = ("seeds", "sweep_test")  # run settings compare does not use: one split seed, test only once
SCORE_FLAGS = {"seed": "score-seed"}  # `--seed` alone would be ambiguous next to --split-seed and --seeds
LM_EVAL_PREFIX = "lm-eval:"  # an `also` entry naming an lm-evaluation-harness task: lm-eval:arc_easy
# settings added after studies were run: a comparison records them only where they differ from their default, so
# the identity (settings hash) of a study cell finished before they existed stays the same (`compare_settings`)
QUIET_AT_DEFAULT = ("lm_eval_include_path", "lm_eval_limit", "side_effect_kl")
RESULTS = ("recorded", "chosen")  # what a run's config.json says beside its settings: inputs' digests, dev's choice
# config.json files from before nesting kept these at the top level
LEGACY = {"partners": "score.partners", "window": "score.window", "score_seed": "score.seed",
          "batch_size": "score.batch_size", "scope": "freeze.scope", "aggregate": "freeze.aggregate",
          "bias": "freeze.bias"}


@dataclass
class RunConfig:
    """Everything that determines a run; saved as config.json and accepted back by --config."""

    task: str = field(metadata={"help": "built-in task (int-sum, int-mult, cb, copa, rte) or a task JSONL file",
                                "metavar": "TASK"})
    model: str = field(default="smollm2-135m", metadata={"help": "model: HF folder or cached id, a .gguf file, or "
                                                                 "the alias smollm2-135m", "metavar": "MODEL"})
    targets: str = field(default="key", metadata={"help": "target preset (key, query, value, attn-out, mlp-in, "
                                                          "mlp-out, all) or a regex over module names",
                                                          "metavar": "TARGETS"})
    layers: str | None = field(default=None, metadata={"help": "restrict to layers: N, A-B, A- or -B",
                                                                      "metavar": "LAYERS"})
    per_head: bool = field(default=False, metadata={"help": "one component set per attention head"})
    p: list[float] | str = field(default_factory=lambda: list(DEFAULT_PS),
                                 metadata={"help": "fractions of components to freeze, each tried on dev, or 'auto': "
                                                   "a search from the paper's grid (--p-budget)",
                                                   "metavar": "P,P,...|auto"})
    p_budget: int = field(default=DEFAULT_BUDGET, metadata={
        "help": "--p auto: dev evaluations to spend, the grid's four included"})
    select: str = field(default=DEFAULT_SELECT, metadata={
        "help": "how dev chooses: 'accuracy' (ties: smaller p), 'accuracy+loss' (ties: lower dev NLL), 'loss' or "
                "'1se' (the smallest p within one paired SE of the best dev accuracy)",
        "choices": SELECTS, "metavar": "RULE"})
    folds: int = field(default=1, metadata={"help": "cross-fitted folds: every example tested once, by a run that "
                                                    "chose on the other folds (1: the fixed train/dev/test split)"})
    eval_mode: str | None = field(default=None, metadata={"help": "next-token, choice or exact (default: the "
                                                                  "task's)", "choices": EVAL_MODES,
                                                                  "metavar": "MODE"})
    calibrate: bool = field(default=False, metadata={
        "help": "choice mode: contextual calibration of choice scores (Zhao et al. 2021), base and edits alike"})
    dev_fraction: float = field(default=0.2, metadata={"help": "dev share carved from train"})
    split_seed: int = field(default=0, metadata={"help": "seed of the (first) dev split"})
    seeds: int = field(default=1, metadata={"help": "repeat over N split seeds, report mean ± sd"})
    limit: int | None = field(default=None, metadata={"help": "cap each split at N examples (seeded)"})
    score: ScoreConfig = field(default_factory=ScoreConfig, metadata={"help": "how to score components",
                                                                      "rename": SCORE_FLAGS})
    freeze: FreezeConfig = field(default_factory=lambda: FreezeConfig(p=0.0),
                                 metadata={"help": "how to freeze them (p comes from the run's p list)",
                                           "exclude": ("p",)})
    eval_batch_size: int = field(default=16, metadata={"help": "evaluation batch size"})
    side_effects: bool = field(default=True, metadata={
        "help": "measure what the edit costs elsewhere: perplexity and KL(base ‖ edit) on packaged general text"})
    side_effect_kl: str = field(default="exact", metadata={
        "help": "side effects' KL: exact, or linear (skips the base's LM head: faster on a big vocabulary; "
                "≲ 3e-5 nats a token off)", "choices": KL_PATHS, "metavar": "KL"})
    also: list[str] | None = field(default=None, metadata={
        "help": "other tasks to evaluate base and edit on, with paired CIs: built-in, JSONL or lm-eval:NAME "
                "(the lm-eval extra)", "metavar": "TASK,..."})
    lm_eval_include_path: list[str] | None = field(default=None, metadata={
        "help": "folders of local lm-eval YAML tasks for --also lm-eval:NAME", "metavar": "DIR,..."})
    lm_eval_limit: int | None = field(default=None, metadata={
        "help": "--also lm-eval:NAME tasks: their first N examples", "metavar": "N"})
    sweep_test: bool = field(default=True, metadata={"help": "also evaluate every p on test (shown, never used)"})
    template: str | None = field(default=None, metadata={"help": "prompt template with {field} placeholders",
                                                                     "metavar": "TEMPLATE"})
    answers: list[str] | None = field(default=None, metadata={"help": "comma-separated answer words",
                                                                          "metavar": "WORD,..."})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32, bfloat16 or float16",
                                                               "metavar": "DTYPE"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda",
                                                           "metavar": "DEVICE"})
    device_map: str | None = field(default=None, metadata={"help": "'auto' spreads a large model over devices "
                                                                   "(accelerate)", "metavar": "auto"})
    n_boot: int = field(default=1000, metadata={"help": "bootstrap resamples"})

    def __post_init__(self) -> None:
        if isinstance(self.p, str):
            if self.p != "auto":
                raise ValueError(f"p must be fractions or 'auto', got '{self.p}'")
        else:
            if not self.p:
                raise ValueError("p needs at least one fraction")
            for value in self.p:
                if not 0 < value < 1:
                    raise ValueError(f"p values must be in (0, 1), got {value}")
            self.p = sorted({float(v) for v in self.p})  # a fraction given twice is tried once
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {', '.join(SELECTS)}, got '{self.select}'")
        if self.p_budget < len(DEFAULT_PS):
            raise ValueError(f"p_budget must be at least {len(DEFAULT_PS)} (the starting grid), got {self.p_budget}")
        if self.folds < 1:
            raise ValueError(f"folds must be at least 1, got {self.folds}")
        if self.folds > 1 and self.seeds > 1:
            raise ValueError("folds and seeds: choose one way to repeat (folds test every example once)")
        if self.side_effect_kl not in KL_PATHS:
            raise ValueError(f"side_effect_kl must be one of {', '.join(KL_PATHS)}, got '{self.side_effect_kl}'")
        if self.eval_mode is not None and self.eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {', '.join(EVAL_MODES)}, got '{self.eval_mode}'")
        if not 0 < self.dev_fraction < 1:
            raise ValueError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")
        for name in ("seeds", "n_boot", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 2:
            raise ValueError(f"limit must be at least 2, got {self.limit}")
        self._check_lm_eval()
        self.freeze = dataclasses.replace(self.freeze, p=0.0)

    def _check_lm_eval(self) -> None:
        """`lm-eval:NAME` entries of `also` and their settings; a missing lm-eval is said here, before any work."""
        _, lm_tasks = split_also(self.also)
        if any(not name for name in lm_tasks):
            raise ValueError(f"also: {LM_EVAL_PREFIX} needs a task name, e.g. {LM_EVAL_PREFIX}eigenprune_copa")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            raise ValueError(f"lm_eval_limit must be at least 1, got {self.lm_eval_limit}")
        given = [n for n in ("lm_eval_include_path", "lm_eval_limit") if getattr(self, n) is not None]
        if given and not lm_tasks:
            raise ValueError(f"{given[0]} is set but also names no {LM_EVAL_PREFIX}TASK for it to apply to")
        if lm_tasks and not lm_eval_installed():
            raise ValueError(f"also: {LM_EVAL_PREFIX}{lm_tasks[0]} needs lm-evaluation-harness: "
                             "pip install 'eigenprune[lm-eval]'")

    @property
    def grid(self) -> list[float]:
        """The fractions tried first: the given list, or the paper's grid that `--p auto` starts from."""
        return list(DEFAULT_PS) if self.p == "auto" else list(self.p)

    def freeze_at(self, p: float) -> FreezeConfig:
        """The run's freezing rule at fraction p."""
        return dataclasses.replace(self.freeze, p=p)


def split_also(also: list[str] | None) -> tuple[list[str], list[str]]:
    """(eigenprune tasks, lm-eval task names) of an `also` list: `lm-eval:NAME` entries go to the second."""
    own = [t for t in also or () if not t.startswith(LM_EVAL_PREFIX)]
    return own, [t[len(LM_EVAL_PREFIX):].strip() for t in also or () if t.startswith(LM_EVAL_PREFIX)]


def lm_eval_installed() -> bool:
    """Whether lm-evaluation-harness can be imported, found without importing it (it imports torch)."""
    if "lm_eval" in sys.modules:
        return sys.modules["lm_eval"] is not None
    return importlib.util.find_spec("lm_eval") is not None


def compare_settings(cfg: RunConfig) -> dict:
    """The run settings a comparison records (its config.json, a study cell's identity): all but the ones compare
    does not use, and `QUIET_AT_DEFAULT` settings only where they differ from their default."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in COMPARE_EXCLUDES and not (k in QUIET_AT_DEFAULT and v == defaults[k])}


def add_run_options(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """The run settings as flags, generated from RunConfig's fields (nested scoring and freezing settings
    flattened: --partners, --window, --score-seed, --batch-size, --scope, --aggregate, --bias)."""
    settings.add_flags(p, RunConfig, exclude=exclude)


def config_from_args(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> RunConfig:
    """The RunConfig a command line asks for; a bad value is one line (UsageError)."""
    values = settings.flag_values(args, RunConfig)
    for name in exclude:
        values.pop(name, None)
    given_p = values.get("p")
    try:
        cfg = settings.from_dict(RunConfig, values)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if isinstance(given_p, list) and len(given_p) != len(cfg.p):
        print(f"note: p values given twice are tried once: {', '.join(map(str, cfg.p))}", file=sys.stderr)
    return cfg


def to_json(cfg: RunConfig) -> dict:
    """The settings as config.json holds them: every field but `freeze.p`, which a run never applies (it tries
    each fraction of `p`; the one dev chose goes in config.json's `chosen` block). Files that still carry
    `freeze.p` load as before."""
    data = settings.to_dict(cfg)
    data["freeze"].pop("p", None)
    return data


def config_from_file(path: str | Path) -> RunConfig:
    """A RunConfig from a run's config.json: every key known, every value of its field's type."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({getattr(err, 'msg', err)})") from None
    data = {k: v for k, v in data.items() if k not in RESULTS} if isinstance(data, dict) else data
    try:
        return settings.from_dict(RunConfig, data, where=f"{path}: ", legacy=LEGACY)
    except ValueError as err:
        raise UsageError(str(err)) from None


__all__ = ["AGGREGATES", "BIASES", "DEFAULT_PS", "LM_EVAL_PREFIX", "SCOPES", "RunConfig", "ScoreConfig", "FreezeConfig",
           "add_run_options", "compare_settings", "config_from_args", "config_from_file", "split_also", "to_json"]
