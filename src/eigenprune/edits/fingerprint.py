"""The identity of a base model's weights: recorded by every artifact, checked before it is reused.

An edit depends on the whole model, not only on the matrices it changes: its scores and stored input
means come from every layer. So a fingerprint covers every parameter, and it must survive a change of
dtype (an edit made in float32 applies to the same model loaded in bfloat16). It holds:
- `sha256` of the exact bytes, in the dtype the model was loaded in: identical weights match at once;
- per tensor, its shape, norm and `N_PROJ` projections on fixed pseudo-random ±1 patterns, divided by
  the norm. Rounding the same weights to another dtype moves each projection by about that dtype's
  unit roundoff; a negated, retrained or different tensor moves it by order one (negation flips every
  sign, which norms alone cannot see).

The ±1 patterns come from `random.Random(seed).random()`, whose sequence Python guarantees across
versions, so a fingerprint saved today is checked the same way by later versions.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import random
from collections import OrderedDict

import torch
from torch import nn

from eigenprune.core.errors import UsageError
from eigenprune.edits.targets import weight_view

VERSION = 2
N_PROJ = 8
BLOCK = 4096  # a flattened tensor is cut into rows of BLOCK; pattern = row sign x column sign
UNIT = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
SLACK = 1e-5  # float32 accumulation of the projections


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.lru_cache(maxsize=8)
def _signs(seed: int, n: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.tensor([1.0 if rng.random() < 0.5 else -1.0 for _ in range(n * N_PROJ)]).view(n, N_PROJ)


def _row_signs(n_rows: int) -> torch.Tensor:
    size = 1 << max(12, (n_rows - 1).bit_length())  # a few cached lengths serve every tensor
    return _signs(2, size)[:n_rows]


@torch.no_grad()
def tensor_stats(w: torch.Tensor) -> dict:
    """Norm and N_PROJ normalised projections of one tensor, computed in float32 on the CPU (the same
    arithmetic wherever the model lives; a GPU's TF32 matmuls would add their own rounding)."""
    flat = w.detach().reshape(-1).cpu().float()
    n_rows = -(-flat.numel() // BLOCK)
    if flat.numel() % BLOCK:  # zeros add nothing; one matmul per tensor (a vector @ matrix is slow on CPU)
        flat = torch.nn.functional.pad(flat, (0, n_rows * BLOCK - flat.numel()))
    norm = float(torch.linalg.vector_norm(flat))
    cols, rows = _signs(1, BLOCK), _row_signs(n_rows)  # (BLOCK, N_PROJ), (n_rows, N_PROJ)
    proj = ((flat.view(n_rows, BLOCK) @ cols) * rows).sum(0)  # (N_PROJ,)
    z = (proj / norm).tolist() if norm > 0 else [0.0] * N_PROJ
    return {"shape": list(w.shape), "norm": float(f"{norm:.8g}"), "proj": [round(v, 7) for v in z]}


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _digest(params: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, p in params.items():
        data = p.detach().contiguous().reshape(-1)
        digest.update(f"{name}:{_name(p.dtype)}:{list(p.shape)}".encode())
        digest.update(data.view(torch.uint8).cpu().numpy().data if data.numel() else b"")
    return digest.hexdigest()


_SEEN: OrderedDict[str, dict] = OrderedDict()  # sha256 -> fingerprint: the statistics of bytes already seen
_SEEN_MAX = 8


def fingerprint(model: nn.Module, modules: list[str] | None = None) -> dict:
    """Identify the model's weights: every parameter, not only `modules` (kept for callers' sake).

    The statistics are a function of the bytes the sha256 covers (names, dtypes, shapes, values), so weights
    fingerprinted before in this process (every fold of a study scores from the same base) cost only the hash:
    about a third of the whole (SmolLM2-135M: 0.4 s of 1.4 s)."""
    params = _parameters(model)
    sha = _digest(params)
    if sha in _SEEN:
        _SEEN.move_to_end(sha)
        return copy.deepcopy(_SEEN[sha])
    dtypes = {name: _name(p.dtype) for name, p in params.items()}
    main = max(set(dtypes.values()), key=list(dtypes.values()).count) if dtypes else "float32"
    tensors = {name: tensor_stats(p) | ({"dtype": dtypes[name]} if dtypes[name] != main else {})
               for name, p in params.items()}
    found = {"version": VERSION, "sha256": sha, "dtype": main, "tensors": tensors}
    _SEEN[sha] = copy.deepcopy(found)
    while len(_SEEN) > _SEEN_MAX:
        _SEEN.popitem(last=False)
    return found


def _legacy_sha(model: nn.Module, modules: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(modules):
        w = weight_view(model.get_submodule(name)).detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(w.numpy().tobytes())
    return digest.hexdigest()


def _check_legacy(model: nn.Module, expected: dict, what: str) -> None:
    """Fingerprints of eigenprune 0.1 cover the targeted modules only and have no dtype-proof part."""
    modules = list(expected["norms"])
    names = {n for n, _ in model.named_modules()}
    missing = [m for m in modules if m not in names]
    if missing:
        raise UsageError(f"this {what} was made for another architecture: the loaded model has no {missing[0]}")
    dtype = _name(next(model.parameters()).dtype)
    if _legacy_sha(model, modules) == expected["sha256"]:
        return
    if dtype != expected["dtype"]:
        raise UsageError(f"this {what} was saved by an older eigenprune whose fingerprint cannot tell the same "
                         f"weights in {dtype} from other ones: load the model in {expected['dtype']} "
                         f"(--dtype {expected['dtype']}) or make the {what} again")
    raise UsageError(f"this {what} was made for other base weights (sha256 {expected['sha256'][:12]}…); "
                     "load the model it was made from")


def _tolerance(a: str, b: str) -> float:
    """How far the same weights' statistics may move between dtypes a and b (rounding of each)."""
    if a == b:
        return SLACK
    return 2 * (UNIT.get(a, 2.0**-8) + UNIT.get(b, 2.0**-8)) + SLACK


def _well_formed(stats) -> bool:
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    return (isinstance(stats, dict) and isinstance(stats.get("shape"), list) and number(stats.get("norm"))
            and isinstance(stats.get("proj"), list) and len(stats["proj"]) == N_PROJ
            and all(number(v) for v in stats["proj"]) and isinstance(stats.get("dtype", ""), str))


def check_fingerprint(model: nn.Module, expected: dict, what: str) -> None:
    """Refuse, in one line that says what differs, a model whose weights are not the artifact's base."""
    if "tensors" not in expected:
        return _check_legacy(model, expected, what)
    version, want = expected.get("version"), expected["tensors"]
    if not isinstance(version, int) or not all(_well_formed(stats) for stats in want.values()):
        raise UsageError(f"this {what}'s base fingerprint is malformed; the file is damaged")
    if version > VERSION:
        raise UsageError(f"this {what} has a base fingerprint of version {version}; upgrade eigenprune to use it")
    params = _parameters(model)
    if _digest(params) == expected["sha256"]:  # the same bytes: no statistics needed
        return
    missing = [n for n in want if n not in params]
    extra = [n for n in params if n not in want]
    if missing or extra:
        what_is = (f"the loaded model has no {missing[0]}" if missing else f"the loaded model has {extra[0]}, "
                   "which its base did not")
        raise UsageError(f"this {what} was made for another architecture: {what_is} "
                         f"({len(missing)} missing, {len(extra)} extra of {len(want)} tensors)")
    found = fingerprint(model)
    differ = []
    for name, stats in want.items():
        got = found["tensors"][name]
        if got["shape"] != stats["shape"]:
            raise UsageError(f"this {what} was made for another architecture: {name} is {tuple(got['shape'])} in "
                             f"the loaded model, {tuple(stats['shape'])} in its base")
        tol = _tolerance(stats.get("dtype", expected["dtype"]), got.get("dtype", found["dtype"]))
        rms = math.sqrt(sum((a - b) ** 2 for a, b in zip(got["proj"], stats["proj"], strict=True)) / N_PROJ)
        off = max(rms, abs(got["norm"] - stats["norm"]) / max(stats["norm"], 1e-30))
        if off > tol:
            differ.append((off / tol, name))
    if differ:
        _, worst = max(differ)
        raise UsageError(f"this {what} was made for other base weights: {worst} differs "
                         f"({len(differ)} of {len(want)} tensors differ beyond {expected['dtype']}/{found['dtype']} "
                         "rounding); load the model it was made from")
