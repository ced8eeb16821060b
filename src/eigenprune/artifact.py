"""On-disk formats: a scoring run (scores, SVDs, input means) and an edit (the delta only).

Both are directories holding one JSON file (with a format name and version that loading checks)
and safetensors files. An edit stores the removed components and bias tables, never the model:
loading re-applies it to a freshly loaded base model and refuses one whose targeted weights differ.
Directories are claimed before the work and written under a temporary name that is renamed when
complete (`outdir.py`), so a failure leaves nothing half-written and two runs never share one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .decompose import Components
from .errors import UsageError
from .freeze import Edit, FreezeConfig, apply_edit, make_edit
from .outdir import atomic_dir, check_new_dir  # noqa: F401  (callers import them from here)
from .scoring import InputMeans, Scores
from .targets import Target, weight_view

EDIT_FORMAT, EDIT_VERSION, EDIT_JSON = "eigenprune-edit", 1, "eigenprune_edit.json"
SCORES_FORMAT, SCORES_VERSION, SCORES_JSON = "eigenprune-scores", 1, "score_config.json"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path, fmt: str, version: int) -> dict:
    if not path.is_file():
        raise UsageError(f"{path.parent} is not an {fmt} directory (no {path.name})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg})") from None
    if meta.get("format") != fmt:
        raise UsageError(f"{path} holds format '{meta.get('format')}', expected '{fmt}'")
    if meta.get("format_version") != version:
        raise UsageError(f"{path} has {fmt} version {meta.get('format_version')}; this eigenprune reads {version}")
    return meta


# ---------------------------------------------------------------- the base model's identity
def fingerprint(model: nn.Module, modules: list[str]) -> dict:
    """sha256 of the targeted weights (as float32, (out, in)), plus their norms for cross-dtype checks."""
    digest = hashlib.sha256()
    norms = {}
    for name in sorted(modules):
        w = weight_view(model.get_submodule(name)).detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(w.numpy().tobytes())
        norms[name] = float(w.double().norm())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"sha256": digest.hexdigest(), "dtype": dtype, "norms": norms}


def check_fingerprint(model: nn.Module, expected: dict, what: str) -> None:
    """Refuse a base model whose targeted weights differ from those the artifact was made from."""
    found = fingerprint(model, list(expected["norms"]))
    if found["sha256"] == expected["sha256"]:
        return
    if found["dtype"] != expected["dtype"]:  # the same weights in another precision hash differently
        close = all(abs(found["norms"][m] - n) <= 1e-2 * max(abs(n), 1e-12) for m, n in expected["norms"].items())
        if close:
            return
    raise UsageError(f"this {what} was made for other base weights (sha256 {expected['sha256'][:12]}…, "
                     f"{expected['dtype']}); the loaded model has {found['sha256'][:12]}… ({found['dtype']})")


def _targets_from(meta: dict) -> list[Target]:
    return [Target(**{**t, "rows": tuple(t["rows"])}) for t in meta["targets"]]


# ---------------------------------------------------------------- scoring runs
def save_scores(out: str | Path, scores: Scores, targets: list[Target], components: dict[str, Components],
                meta: dict, overwrite: bool = False) -> Path:
    """Write scores.safetensors (max per target), scores_mean.safetensors, svd.safetensors, means.safetensors
    and score_config.json (meta + targets + format)."""
    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in scores.max.items()}, tmp / "scores.safetensors")
        save_file({k: v.contiguous() for k, v in scores.mean.items()}, tmp / "scores_mean.safetensors")
        svd = {}
        for name, c in components.items():
            svd |= {f"{name}.U": c.U.cpu().contiguous(), f"{name}.S": c.S.cpu().contiguous(),
                    f"{name}.Vh": c.Vh.cpu().contiguous()}
        save_file(svd, tmp / "svd.safetensors")
        means = {f"sum.{m}": s.contiguous() for m, s in scores.means.sums.items()}
        save_file(means | {"counts": scores.means.counts.contiguous()}, tmp / "means.safetensors")
        _write_json(tmp / SCORES_JSON, {
            **meta, "format": SCORES_FORMAT, "format_version": SCORES_VERSION, "eigenprune_version": __version__,
            "targets": [dataclasses.asdict(t) for t in targets], "n_pairs": scores.n_pairs,
            "offset_min": scores.means.offset_min,
        })
    return Path(out)


@dataclasses.dataclass
class ScoreRun:
    """Everything scoring produced: any p can be frozen from it without new SVDs or scores."""

    meta: dict
    targets: list[Target]
    components: dict[str, Components]
    scores: Scores

    def edit(self, config: FreezeConfig) -> Edit:
        ranking = self.scores.max if config.aggregate == "max" else self.scores.mean
        return make_edit(self.targets, self.components, ranking, self.scores.means, config)

    def edit_meta(self) -> dict:
        """What an edit made from this run records about its base model and origin."""
        keys = ("model", "base_fingerprint", "data", "targets_spec", "layers", "per_head", "score_config")
        return {"base_model": self.meta["model"], **{k: self.meta[k] for k in keys[1:] if k in self.meta}}


def load_scores(directory: str | Path) -> ScoreRun:
    directory = Path(directory)
    meta = _read_json(directory / SCORES_JSON, SCORES_FORMAT, SCORES_VERSION)
    targets = _targets_from(meta)
    svd = load_file(directory / "svd.safetensors")
    components = {t.name: Components(svd[f"{t.name}.U"], svd[f"{t.name}.S"], svd[f"{t.name}.Vh"]) for t in targets}
    raw = load_file(directory / "means.safetensors")
    means = InputMeans(meta["offset_min"], {k[4:]: v for k, v in raw.items() if k.startswith("sum.")}, raw["counts"])
    scores = Scores(load_file(directory / "scores.safetensors"), load_file(directory / "scores_mean.safetensors"),
                    meta["n_pairs"], means)
    return ScoreRun(meta, targets, components, scores)


# ---------------------------------------------------------------- edits
def save_edit(out: str | Path, edit: Edit, meta: dict, overwrite: bool = False) -> Path:
    """Write the edit: eigenprune_edit.json and edit.safetensors (removed components, bias tables)."""
    tensors = {}
    for t in edit.targets:
        U, S, Vh = edit.factors[t.name]
        tensors |= {f"{t.name}.U": U, f"{t.name}.S": S, f"{t.name}.Vh": Vh, f"{t.name}.removed": edit.removed[t.name]}
    tensors |= {f"bias.{m}": table for m, table in edit.bias_tables.items()}
    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "edit.safetensors")
        _write_json(tmp / EDIT_JSON, {
            **meta, "format": EDIT_FORMAT, "format_version": EDIT_VERSION, "eigenprune_version": __version__,
            "targets": [dataclasses.asdict(t) for t in edit.targets], "freeze": dataclasses.asdict(edit.config),
            "offset_min": edit.offset_min, "n_frozen": edit.n_frozen,
            "n_components": sum(t.n_components for t in edit.targets),
            "components": {name: idx.tolist() for name, idx in edit.removed.items() if len(idx)},
        })
    return Path(out)


def load_edit(directory: str | Path) -> tuple[Edit, dict]:
    directory = Path(directory)
    meta = _read_json(directory / EDIT_JSON, EDIT_FORMAT, EDIT_VERSION)
    tensors = load_file(directory / "edit.safetensors")
    targets = _targets_from(meta)
    factors = {t.name: (tensors[f"{t.name}.U"], tensors[f"{t.name}.S"], tensors[f"{t.name}.Vh"]) for t in targets}
    removed = {t.name: tensors[f"{t.name}.removed"] for t in targets}
    tables = {k[5:]: v for k, v in tensors.items() if k.startswith("bias.")}
    edit = Edit(targets, removed, factors, tables, meta["offset_min"], FreezeConfig(**meta["freeze"]))
    return edit, meta


def apply_saved_edit(model: nn.Module, directory: str | Path) -> tuple[Edit, dict]:
    """Load an edit, check it was made for this model's weights, and apply it."""
    edit, meta = load_edit(directory)
    check_fingerprint(model, meta["base_fingerprint"], "edit")
    apply_edit(model, edit)
    return edit, meta
