"""SVD of each target matrix, in float32 whatever the model's dtype, computed once per matrix in a process.

A = U diag(S) Vh with singular values descending (torch.linalg.svd's order); component i is
E_i = S[i] U[:, i] Vh[i]. The sign ambiguity of singular vectors does not matter anywhere:
every use multiplies u_i and v_i together.

A study decomposes the same matrices again and again: every fold of a cell scores from the same base
weights, LASER decomposes the matrix it chose a second time, and cells of one model with other tasks
share them too. So `decompose` keeps its results (`SVDs`) keyed by what they depend on: the matrix's bytes,
dtype, shape and device, and torch's thread count (LAPACK may sum in another order with another count).
Names play no part: the same bytes have the same SVD, whichever target they are, and a changed weight, dtype
or device is another key, so a hit returns exactly the tensors a fresh SVD would. Hashing a matrix costs
far less than decomposing it (SmolLM2's 30 key matrices: ~15 ms against ~1 s). The cache holds at most
`MAX_BYTES` of factors, dropping the least recently used first. Callers must not change the returned
tensors in place (nothing in eigenprune does: edits index them into new tensors).
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.edits.targets import Target, target_weight

MAX_BYTES = 1 << 30  # factors kept in memory; SmolLM2-135M's every block matrix needs about 0.6 GiB


@dataclass
class Components:
    """The SVD of one target: U (out, k), S (k,), Vh (k, in), all float32 on the weight's device."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    def reconstruct(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_i E_i over `keep` (a bool mask over components; all by default): (out, in)."""
        if keep is None:
            return (self.U * self.S) @ self.Vh
        return (self.U[:, keep] * self.S[keep]) @ self.Vh[keep]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))


class SVDs:
    """The process's SVDs by `key`, least recently used dropped beyond `max_bytes`; `counts` says how many
    were computed and how many reused (tests and bench/study.py read it)."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Components] = OrderedDict()
        self.counts: Counter = Counter()

    @staticmethod
    def key(weight: torch.Tensor) -> str:
        """What an SVD of `weight` depends on: its bytes, dtype, shape and device, and torch's thread count."""
        w = weight.detach().contiguous()
        digest = hashlib.sha256(f"{w.dtype}|{tuple(w.shape)}|{w.device}|{torch.get_num_threads()}".encode())
        digest.update(w.reshape(-1).view(torch.uint8).cpu().numpy().data if w.numel() else b"")
        return digest.hexdigest()

    def get(self, weight: torch.Tensor) -> Components:
        key = self.key(weight)
        found = self.entries.get(key)
        if found is not None:
            self.entries.move_to_end(key)
            self.counts["reused"] += 1
            return found
        found = svd(weight)
        self.counts["computed"] += 1
        if found.nbytes <= self.max_bytes:
            self.entries[key] = found
            while sum(c.nbytes for c in self.entries.values()) > self.max_bytes:
                self.entries.popitem(last=False)
        return found

    def clear(self) -> None:
        self.entries.clear()
        self.counts.clear()


SHARED = SVDs()


def svd(weight: torch.Tensor) -> Components:
    """The SVD itself, always computed (no cache)."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return Components(U, S, Vh)


@torch.no_grad()
def decompose(weight: torch.Tensor) -> Components:
    """The SVD of `weight`, computed once per process for the same matrix (`SHARED`)."""
    return SHARED.get(weight)


@torch.no_grad()
def decompose_targets(model: nn.Module, targets: list[Target]) -> dict[str, Components]:
    return {t.name: decompose(target_weight(model, t)) for t in targets}
