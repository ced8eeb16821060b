"""Select the lowest-scoring components and freeze them: A′ = A − Σ E_i, plus the bias Σ E_i x̄_t.

x̄_t is the mean training input at offset t from the last prompt token (offsets never seen use the
overall mean); with `bias="constant"` the overall mean serves every position. The edit wraps each
touched layer (`FrozenLinear.base_layer` keeps the original, untouched until `merge_edit`), so the
same scores and SVDs serve any p: `make_edit` is cheap and does no SVD or scoring.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.core.errors import UsageError
from eigenprune.core.positions import OffsetTracker, tracker_of
from eigenprune.edits.config import AGGREGATES, BIASES, SCOPES, FreezeConfig  # noqa: F401  (torch-free, for the CLI)
from eigenprune.edits.decompose import Components
from eigenprune.edits.scoring import InputMeans
from eigenprune.edits.targets import Target, weight_view


@dataclass
class Edit:
    """The removed components per target and the bias table per module: all an edit needs."""

    targets: list[Target]  # the scored targets, frozen or not
    removed: dict[str, torch.Tensor]  # target name -> indices of frozen components (ascending)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # name -> U_F, S_F, Vh_F
    bias_tables: dict[str, torch.Tensor]  # module -> (n_rows, d_out); last row: overall mean
    offset_min: int
    config: FreezeConfig

    @property
    def n_frozen(self) -> int:
        return sum(len(i) for i in self.removed.values())

    @property
    def modules(self) -> list[str]:
        return sorted({t.module_name for t in self.targets if len(self.removed[t.name])})


def lowest_fraction(scores: dict[str, torch.Tensor], p: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """Indices of the lowest fraction p of components, globally or per target (ties: first wins)."""
    if scope == "per-target":
        return {name: torch.sort(torch.argsort(s, stable=True)[: int(p * len(s))]).values
                for name, s in scores.items()}
    names = list(scores)
    flat = torch.cat([scores[n].float() for n in names])
    owner = torch.cat([torch.full((len(scores[n]),), i) for i, n in enumerate(names)])
    local = torch.cat([torch.arange(len(scores[n])) for n in names])
    chosen = torch.argsort(flat, stable=True)[: int(p * len(flat))]
    return {n: torch.sort(local[chosen][owner[chosen] == i]).values for i, n in enumerate(names)}


def make_edit(targets: list[Target], components: dict[str, Components], scores: dict[str, torch.Tensor],
              means: InputMeans, config: FreezeConfig) -> Edit:
    """Choose components by score and compute the bias tables; no SVD, no forward pass."""
    removed = lowest_fraction({t.name: scores[t.name] for t in targets}, config.p, config.scope)
    return build_edit(targets, components, removed, means, config)


def build_edit(targets: list[Target], components: dict[str, Components], removed: dict[str, torch.Tensor],
               means: InputMeans | None, config: FreezeConfig) -> Edit:
    """Freeze the given component indices per target (however they were chosen)."""
    removed = {t.name: torch.as_tensor(removed.get(t.name, []), dtype=torch.long) for t in targets}
    factors = {}
    bias_tables: dict[str, torch.Tensor] = {}
    for t in targets:
        idx = removed[t.name]
        c = components[t.name]
        factors[t.name] = (c.U[:, idx].cpu(), c.S[idx].cpu(), c.Vh[idx].cpu())
        if len(idx) == 0:
            continue
        U, S, Vh = factors[t.name]
        if config.bias == "none":  # plain truncation needs no input means
            mean = torch.zeros(1, t.in_features)
        else:
            mean = means.table(t.module_name)  # (n_offsets + 1, d_in)
            mean = mean if config.bias == "position" else mean[-1:]
        table = bias_tables.setdefault(t.module_name, None)
        if table is None:
            table = bias_tables[t.module_name] = torch.zeros(len(mean), t.module_out)
        table[:, t.rows[0] : t.rows[1]] += ((mean @ Vh.t()) * S) @ U.t()  # (rows, d_out slice)
    return Edit(targets, removed, factors, bias_tables, means.offset_min if means else 0, config)


class FrozenLinear(nn.Module):
    """A linear layer minus a low-rank part, plus a bias looked up by token offset.

    y = base_layer(x) − (x Vhᵀ diag(S)) Uᵀ + bias_table[offset]. Factors and table are float32
    buffers; the correction is computed in float32 and cast to the layer's output dtype.
    """

    def __init__(self, base_layer: nn.Module, up: torch.Tensor, down: torch.Tensor, bias_table: torch.Tensor,
                 offset_min: int, tracker: OffsetTracker | None) -> None:
        super().__init__()
        self.base_layer = base_layer
        device = weight_view(base_layer).device
        self.register_buffer("up", up.float().to(device))  # (d_out, r) = U_F diag(S_F) in the right rows
        self.register_buffer("down", down.float().to(device))  # (r, d_in) = Vh_F
        self.register_buffer("bias_table", bias_table.float().to(device))  # (n_rows, d_out)
        self.offset_min = offset_min
        self._tracker = tracker  # plain attribute: not a submodule, not in state_dict

    def _bias(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.bias_table.shape[0]
        if rows == 1:
            return self.bias_table[0]
        offsets = self._tracker.offsets if self._tracker is not None else None
        if offsets is None or offsets.shape != x.shape[:-1]:
            raise RuntimeError("a position-dependent eigenprune layer was called outside its model's forward")
        slot = offsets.to(self.bias_table.device) - self.offset_min  # (batch, pos)
        slot = torch.where((slot >= 0) & (slot < rows - 1), slot, rows - 1)
        return self.bias_table[slot]  # (batch, pos, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        correction = (x.float() @ self.down.t()) @ self.up.t()  # (batch, pos, d_out)
        return y + (self._bias(x) - correction).to(y.dtype)


def _module_factors(edit: Edit, module: str, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    ups, downs = [], []
    for t in edit.targets:
        if t.module_name != module or len(edit.removed[t.name]) == 0:
            continue
        U, S, Vh = edit.factors[t.name]
        up = torch.zeros(out_features, len(S))
        up[t.rows[0] : t.rows[1]] = U * S
        ups.append(up)
        downs.append(Vh)
    return torch.cat(ups, 1), torch.cat(downs, 0)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _check_fits(model: nn.Module, edit: Edit) -> None:
    """Every module the edit changes exists here as a linear layer of the edit's shape (checked before any change)."""
    for t in edit.targets:
        if t.module_name not in edit.modules:
            continue
        try:
            shape = tuple(weight_view(model.get_submodule(t.module_name)).shape)
        except (AttributeError, TypeError):
            raise UsageError(f"this edit changes {t.module_name}, which this model has no linear layer for "
                             "(an edit made for another architecture?)") from None
        if shape != (t.module_out, t.in_features):
            raise UsageError(f"this edit changes {t.module_name} as a {t.module_out}x{t.in_features} weight; "
                             f"this model's is {shape[0]}x{shape[1]} (another architecture or size?)")


def apply_edit(model: nn.Module, edit: Edit) -> nn.Module:
    """Wrap every layer the edit touches (in place); returns the model. p = 0 wraps nothing."""
    if tracker_of(model) is not None:
        raise UsageError("this model already carries an eigenprune edit; remove it first")
    _check_fits(model, edit)
    tracker = OffsetTracker()
    for module in edit.modules:
        base = model.get_submodule(module)
        out_features = weight_view(base).shape[0]
        up, down = _module_factors(edit, module, out_features)
        _set_submodule(model, module, FrozenLinear(base, up, down, edit.bias_tables[module],
                                                   edit.offset_min, tracker))
    tracker.attach(model)
    return model


@contextlib.contextmanager
def applied(model: nn.Module, edit: Edit) -> Iterator[nn.Module]:
    """The model with the edit applied for the duration of the block, and restored after it."""
    apply_edit(model, edit)
    try:
        yield model
    finally:
        remove_edit(model)


def remove_edit(model: nn.Module) -> nn.Module:
    """Undo `apply_edit`: put the original layers back."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FrozenLinear):
            _set_submodule(model, name, module.base_layer)
    tracker = tracker_of(model)
    if tracker is not None:
        tracker.detach(model)
    return model


@torch.no_grad()
def merge_edit(model: nn.Module) -> list[str]:
    """Fold an applied, position-independent edit into the weights and biases; returns the modules
    that needed a bias they did not have (the caller must make the architecture carry one)."""
    added = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, FrozenLinear):
            continue
        if module.bias_table.shape[0] != 1:
            raise UsageError("the edit's bias depends on token position, which no plain weight can hold: "
                             "prune again with --bias constant to export a merged model")
        base = module.base_layer
        weight = weight_view(base)  # (out, in) view of the stored weight
        weight.sub_((module.up @ module.down).to(weight.dtype))
        if base.bias is None and not module.bias_table.any():
            _set_submodule(model, name, base)
            continue
        if base.bias is None:
            base.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
            added.append(name)
        base.bias.add_(module.bias_table[0].to(base.bias.dtype))
        _set_submodule(model, name, base)
    tracker = tracker_of(model)
    if tracker is not None:
        tracker.detach(model)
    return added
