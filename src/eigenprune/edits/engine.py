"""The engine in one call: targets -> SVD -> scores, packaged as a `ScoreRun` that freezes any p.

This is the library entry point the CLI, `run` and the baselines share:

    model, tok = load_model("smollm2-135m")
    run = score_run(model, tok, examples, targets="key")
    edit = prune(run, p=0.05); apply_edit(model, edit)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from eigenprune.core.batching import Example, encode
from eigenprune.edits.artifact import ScoreRun, fingerprint
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import Edit, FreezeConfig
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets


def score_run(
    model: nn.Module,
    tokenizer,
    examples: Sequence[Example],
    targets: str = "key",
    layers: str | None = None,
    per_head: bool = False,
    config: ScoreConfig | None = None,
    progress: bool | str = True,
    meta: dict | None = None,
) -> ScoreRun:
    """Find targets, decompose them once and score every component on `examples`."""
    config = config or ScoreConfig()
    found = find_targets(model, targets, layers, per_head)
    components = decompose_targets(model, found)
    encoded = encode(tokenizer, examples)
    scores = score(model, found, components, encoded, tokenizer.pad_token_id, config, progress)
    modules = sorted({t.module_name for t in found})
    info = {"model": getattr(model.config, "_name_or_path", ""), **(meta or {}),
            "targets_spec": targets, "layers": layers, "per_head": per_head,
            "score_config": dataclasses.asdict(config), "n_examples": len(examples),
            "base_fingerprint": fingerprint(model, modules)}
    return ScoreRun(info, found, components, scores)


def prune(run: ScoreRun, p: float, **freeze) -> Edit:
    """The edit that freezes the lowest-scoring fraction `p` of `run`'s components (no rescoring, no new SVD);
    `freeze` takes the other `FreezeConfig` fields (scope, aggregate, bias)."""
    return run.edit(FreezeConfig(p=p, **freeze))
