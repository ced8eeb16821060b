"""SVD of each target matrix, in float32 whatever the model's dtype.

A = U diag(S) Vh with singular values descending (torch.linalg.svd's order); component i is
E_i = S[i] U[:, i] Vh[i]. The sign ambiguity of singular vectors does not matter anywhere:
every use multiplies u_i and v_i together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.edits.targets import Target, target_weight


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


def decompose(weight: torch.Tensor) -> Components:
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return Components(U, S, Vh)


@torch.no_grad()
def decompose_targets(model: nn.Module, targets: list[Target]) -> dict[str, Components]:
    return {t.name: decompose(target_weight(model, t)) for t in targets}
