"""On-disk formats: a scoring run (scores, SVDs, input means) and an edit (the delta only).

Both are directories holding one JSON file (with a format name and version that loading checks)
and safetensors files. An edit stores the removed components and bias tables, never the model:
loading re-applies it to a freshly loaded base model and refuses one whose weights differ (any of
them, in any dtype: `fingerprint.py`). Loading checks that every file is whole, that the files come
from one save (a run id in each file's metadata) and that their tensors fit the targets the JSON
lists; a damaged folder is one line naming the file, never a KeyError.
Directories are claimed before the work and written under a temporary name that is renamed when
complete (`outdir.py`), so a failure leaves nothing half-written and two runs never share one.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from eigenprune.core.errors import UsageError
from eigenprune.core.outdir import atomic_dir, check_new_dir  # noqa: F401  (callers import them from here)
from eigenprune.core.version import __version__
from eigenprune.edits.decompose import Components
from eigenprune.edits.fingerprint import check_fingerprint, fingerprint  # noqa: F401  (re-exported)
from eigenprune.edits.freeze import Edit, FreezeConfig, apply_edit, make_edit
from eigenprune.edits.scoring import InputMeans, Scores
from eigenprune.edits.targets import Target

EDIT_FORMAT, EDIT_VERSION, EDIT_JSON = "eigenprune-edit", 2, "eigenprune_edit.json"
SCORES_FORMAT, SCORES_VERSION, SCORES_JSON = "eigenprune-scores", 2, "score_config.json"
READABLE = (1, 2)  # version 2: whole-model, dtype-proof base fingerprints and a run id in every file
RUN_KEY = "eigenprune_run"  # safetensors metadata: which save wrote the file


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_meta(path: Path, fmt: str, versions: tuple[int, ...] = READABLE, what: str | None = None) -> dict:
    """A saved directory's JSON metadata file, checked: one line (UsageError) when it is missing, not UTF-8,
    not JSON, not an object, another format, or a version this eigenprune does not read. `what` names the
    directory in the missing-file message (default "an FMT directory")."""
    if not path.is_file():
        raise UsageError(f"{path.parent} is not {what or f'an {fmt} directory'} (no {path.name})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; it is damaged or not an eigenprune file") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} should hold a JSON object, not {type(meta).__name__}")
    if meta.get("format") != fmt:
        raise UsageError(f"{path} holds format '{meta.get('format')}', expected '{fmt}'")
    if meta.get("format_version") not in versions:
        raise UsageError(f"{path} has {fmt} version {meta.get('format_version')}; this eigenprune reads versions "
                         f"{', '.join(map(str, versions))} (a newer version needs a newer eigenprune)")
    return meta


def _field(meta: dict, key: str, kind: type, path: Path):
    """meta[key], which must exist and be a `kind`; else one line naming the file and the key."""
    if key not in meta:
        raise UsageError(f"{path} lacks '{key}'; it is damaged or was not written by eigenprune")
    value = meta[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UsageError(f"{path}: '{key}' should be {kind.__name__}, got {json.dumps(value)[:60]}")
    return value


def _targets_from(meta: dict, path: Path) -> list[Target]:
    targets = []
    for raw in _field(meta, "targets", list, path):
        try:
            t = Target(**{**raw, "rows": tuple(raw["rows"])})
            ints = (*t.rows, t.in_features, t.module_out)
            if not (isinstance(t.name, str) and isinstance(t.module_name, str) and len(t.rows) == 2
                    and all(isinstance(v, int) and v >= 0 for v in ints) and t.rows[0] < t.rows[1] <= t.module_out):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise UsageError(f"{path}: a target is malformed ({json.dumps(raw)[:80]})") from None
        targets.append(t)
    if not targets:
        raise UsageError(f"{path} lists no targets")
    return targets


def _load_tensors(path: Path, run_id: str | None) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; missing, truncated, corrupt or another run's file is one line."""
    if not path.is_file():
        raise UsageError(f"{path.parent} is incomplete: {path.name} is missing")
    try:
        with safe_open(path, framework="pt") as fh:
            written_by = (fh.metadata() or {}).get(RUN_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path} cannot be read ({reason}): the file is truncated or corrupt") from None
    if run_id is not None and written_by is not None and written_by != run_id:
        raise UsageError(f"{path.parent} mixes files of different runs: {path.name} was not written with "
                         f"{path.parent / (EDIT_JSON if path.name == 'edit.safetensors' else SCORES_JSON)}")
    return tensors


def _expect(tensors: dict[str, torch.Tensor], key: str, shape: tuple, path: Path) -> torch.Tensor:
    """tensors[key] with the given shape (None: any size) and finite values; else one line naming what is wrong."""
    if key not in tensors:
        raise UsageError(f"{path} lacks tensor '{key}': it does not belong with the targets its folder's JSON "
                         "lists (files of different models or runs?)")
    got = tuple(tensors[key].shape)
    if len(got) != len(shape) or any(want is not None and g != want for g, want in zip(got, shape, strict=True)):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
        raise UsageError(f"{path}: '{key}' has shape {got}, but its folder's JSON implies {want} "
                         "(files of different models or runs?)")
    if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
        bad = int((~torch.isfinite(tensors[key])).sum())
        raise UsageError(f"{path}: '{key}' holds {bad} NaN or infinite value(s); the file is damaged "
                         "(write it again)")
    return tensors[key]


# ---------------------------------------------------------------- scoring runs
def save_scores(out: str | Path, scores: Scores, targets: list[Target], components: dict[str, Components],
                meta: dict, overwrite: bool = False) -> Path:
    """Write scores.safetensors (max per target), scores_mean.safetensors, svd.safetensors, means.safetensors
    and score_config.json (meta + targets + format)."""
    run = {RUN_KEY: uuid.uuid4().hex}
    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in scores.max.items()}, tmp / "scores.safetensors", run)
        save_file({k: v.contiguous() for k, v in scores.mean.items()}, tmp / "scores_mean.safetensors", run)
        svd = {}
        for name, c in components.items():
            svd |= {f"{name}.U": c.U.cpu().contiguous(), f"{name}.S": c.S.cpu().contiguous(),
                    f"{name}.Vh": c.Vh.cpu().contiguous()}
        save_file(svd, tmp / "svd.safetensors", run)
        means = {f"sum.{m}": s.contiguous() for m, s in scores.means.sums.items()}
        save_file(means | {"counts": scores.means.counts.contiguous()}, tmp / "means.safetensors", run)
        _write_json(tmp / SCORES_JSON, {
            **meta, **run, "format": SCORES_FORMAT, "format_version": SCORES_VERSION, "eigenprune_version": __version__,
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
        ranking = self.scores.ranking(config.aggregate)
        return make_edit(self.targets, self.components, ranking, self.scores.means, config)

    def edit_meta(self) -> dict:
        """What an edit made from this run records about its base model and origin."""
        keys = ("model", "base_fingerprint", "data", "targets_spec", "layers", "per_head", "score_config")
        return {"base_model": self.meta["model"], **{k: self.meta[k] for k in keys[1:] if k in self.meta}}


def load_scores(directory: str | Path) -> ScoreRun:
    """Read a scoring run, checking that its files are whole, belong together and fit its targets."""
    directory = Path(directory)
    path = directory / SCORES_JSON
    meta = read_meta(path, SCORES_FORMAT)
    targets = _targets_from(meta, path)
    offset_min, n_pairs = _field(meta, "offset_min", int, path), _field(meta, "n_pairs", int, path)
    _field(meta, "model", str, path)
    run_id = meta.get(RUN_KEY)
    svd, raw = (_load_tensors(directory / f, run_id) for f in ("svd.safetensors", "means.safetensors"))
    ranked = [_load_tensors(directory / f, run_id) for f in ("scores.safetensors", "scores_mean.safetensors")]
    svd_path, means_path = directory / "svd.safetensors", directory / "means.safetensors"
    counts = _expect(raw, "counts", (None,), means_path)
    components, sums = {}, {}
    for t in targets:
        r, rows = t.n_components, t.rows[1] - t.rows[0]
        components[t.name] = Components(_expect(svd, f"{t.name}.U", (rows, r), svd_path),
                                        _expect(svd, f"{t.name}.S", (r,), svd_path),
                                        _expect(svd, f"{t.name}.Vh", (r, t.in_features), svd_path))
        for tensors, f in zip(ranked, ("scores.safetensors", "scores_mean.safetensors"), strict=True):
            _expect(tensors, t.name, (r,), directory / f)
        sums[t.module_name] = _expect(raw, f"sum.{t.module_name}", (len(counts), t.in_features), means_path)
    scores = Scores(*ranked, n_pairs, InputMeans(offset_min, sums, counts))
    return ScoreRun(meta, targets, components, scores)


# ---------------------------------------------------------------- edits
def save_edit(out: str | Path, edit: Edit, meta: dict, overwrite: bool = False) -> Path:
    """Write the edit: eigenprune_edit.json and edit.safetensors (removed components, bias tables)."""
    tensors = {}
    for t in edit.targets:
        U, S, Vh = edit.factors[t.name]
        tensors |= {f"{t.name}.U": U, f"{t.name}.S": S, f"{t.name}.Vh": Vh, f"{t.name}.removed": edit.removed[t.name]}
    tensors |= {f"bias.{m}": table for m, table in edit.bias_tables.items()}
    run = {RUN_KEY: uuid.uuid4().hex}
    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "edit.safetensors", run)
        _write_json(tmp / EDIT_JSON, {
            **meta, **run, "format": EDIT_FORMAT, "format_version": EDIT_VERSION, "eigenprune_version": __version__,
            "targets": [dataclasses.asdict(t) for t in edit.targets], "freeze": dataclasses.asdict(edit.config),
            "offset_min": edit.offset_min, "n_frozen": edit.n_frozen,
            "n_components": sum(t.n_components for t in edit.targets),
            "components": {name: idx.tolist() for name, idx in edit.removed.items() if len(idx)},
        })
    return Path(out)


def load_edit(directory: str | Path) -> tuple[Edit, dict]:
    """Read an edit, checking that its files are whole, belong together and fit its targets."""
    directory = Path(directory)
    path = directory / EDIT_JSON
    meta = read_meta(path, EDIT_FORMAT)
    targets = _targets_from(meta, path)
    offset_min = _field(meta, "offset_min", int, path)
    _field(meta, "base_model", str, path)
    base = _field(meta, "base_fingerprint", dict, path)
    if not isinstance(base.get("sha256"), str) or not isinstance(base.get("dtype"), str) or not (
            isinstance(base.get("tensors"), dict) or isinstance(base.get("norms"), dict)):
        raise UsageError(f"{path}: 'base_fingerprint' is malformed; the file is damaged")
    try:
        config = FreezeConfig(**_field(meta, "freeze", dict, path))
    except (TypeError, ValueError) as err:
        raise UsageError(f"{path}: 'freeze' is invalid ({err})") from None
    tensor_path = directory / "edit.safetensors"
    tensors = _load_tensors(tensor_path, meta.get(RUN_KEY))
    factors, removed = {}, {}
    for t in targets:
        idx = _expect(tensors, f"{t.name}.removed", (None,), tensor_path)
        r, rows = len(idx), t.rows[1] - t.rows[0]
        if idx.dtype != torch.long or (r and not (0 <= int(idx.min()) and int(idx.max()) < t.n_components)):
            raise UsageError(f"{tensor_path}: '{t.name}.removed' holds no valid component indices")
        factors[t.name] = (_expect(tensors, f"{t.name}.U", (rows, r), tensor_path),
                           _expect(tensors, f"{t.name}.S", (r,), tensor_path),
                           _expect(tensors, f"{t.name}.Vh", (r, t.in_features), tensor_path))
        removed[t.name] = idx
    edit = Edit(targets, removed, factors, {}, offset_min, config)
    width = {t.module_name: t.module_out for t in targets}
    edit.bias_tables = {m: _expect(tensors, f"bias.{m}", (None, width[m]), tensor_path) for m in edit.modules}
    return edit, meta


def apply_saved_edit(model: nn.Module, directory: str | Path) -> tuple[Edit, dict]:
    """Load an edit, check it was made for this model's weights, and apply it."""
    edit, meta = load_edit(directory)
    check_fingerprint(model, meta["base_fingerprint"], "edit")
    apply_edit(model, edit)
    return edit, meta
