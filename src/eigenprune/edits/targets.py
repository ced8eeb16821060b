"""Which weight matrices to eigenprune (the paper's set M), found by name patterns alone.

A target is a block of rows of one linear module's weight in the (out_features, in_features) view:
the whole matrix, one slice of a fused projection (GPT-2's `c_attn` holds q, k and v), or one
attention head. Presets are only lists of regular expressions over candidate names, so no
architecture needs code of its own. Linear vs transformers' Conv1D is decided here and only here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.core.errors import UsageError

# Fused q/k/v projections: module name suffix -> how its output rows split.
_FUSED = ("c_attn", "qkv_proj", "Wqkv")

PRESETS: dict[str, tuple[str, ...]] = {
    "key": (r"\.(k_proj|key|k|c_attn:k|qkv_proj:k|Wqkv:k)$",),
    "query": (r"\.(q_proj|query|q|c_attn:q|qkv_proj:q|Wqkv:q)$",),
    "value": (r"\.(v_proj|value|v|c_attn:v|qkv_proj:v|Wqkv:v)$",),
    "attn-out": (r"\.(attn|self_attn|attention)\.(o_proj|out_proj|dense|c_proj)$",),
    "mlp-in": (r"\.mlp\.(gate_proj|up_proj|fc1|c_fc|fc_in|dense_h_to_4h|w1|w3|gate_up_proj)$",),
    "mlp-out": (r"\.mlp\.(down_proj|fc2|c_proj|fc_out|dense_4h_to_h|w2)$",),
}
PRESETS["all"] = tuple(p for name in ("query", "key", "value", "attn-out", "mlp-in", "mlp-out")
                       for p in PRESETS[name])
_HEAD_KINDS = ("query", "key", "value")


@dataclass(frozen=True)
class Target:
    """Rows [rows[0], rows[1]) of module `module_name`'s (out, in) weight, scored as one matrix."""

    name: str  # key in score and edit files: module, +":k" for a fused slice, +":h3" for a head
    module_name: str
    rows: tuple[int, int]
    in_features: int
    layer: int | None
    module_out: int  # out_features of the whole module (fused projections hold several targets)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.in_features)

    @property
    def n_components(self) -> int:
        return min(self.shape)


def is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer stores (a view, not a copy)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return module.weight.t()  # Conv1D stores (in, out)
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_linear(m)]


def _layer_of(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", f".{name}.")
    return int(found.group(1)) if found else None


def _attention_sizes(config) -> tuple[int, int, int]:
    """(head_dim, n_heads, n_kv_heads) from a transformers config, architecture-agnostic."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.n_embd
    n_heads = getattr(text, "num_attention_heads", None) or text.n_head
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text, "head_dim", None) or hidden // n_heads
    return head_dim, n_heads, n_kv


def _slices(name: str, out_features: int, config) -> dict[str, tuple[int, int]]:
    """Row ranges of q/k/v inside a fused projection, or {"": all rows} for an ordinary one."""
    if not name.endswith(_FUSED):
        return {"": (0, out_features)}
    head_dim, n_heads, n_kv = _attention_sizes(config)
    q, kv = n_heads * head_dim, n_kv * head_dim
    if q + 2 * kv != out_features:  # e.g. GPT-2: three equal thirds
        q = kv = out_features // 3
    return {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}


def parse_layers(text: str | None) -> range | None:
    """'3' -> layer 3, '2-5' -> 2..5, '20-' -> 20 and above, '-4' -> 0..4. None: every layer."""
    if text is None or text == "":
        return None
    found = re.fullmatch(r"\s*(\d*)\s*(-?)\s*(\d*)\s*", text)
    if not found or not (found.group(1) or found.group(3)):
        raise UsageError(f"--layers takes N, A-B, A- or -B (got '{text}')")
    lo = int(found.group(1)) if found.group(1) else 0
    if not found.group(2):
        return range(lo, lo + 1)
    hi = int(found.group(3)) if found.group(3) else 1 << 30
    if hi < lo:
        raise UsageError(f"--layers range is empty: '{text}'")
    return range(lo, hi + 1)


def find_targets(
    model: nn.Module, spec: str = "key", layers: str | range | None = None, per_head: bool = False
) -> list[Target]:
    """Targets matching a preset name or a regular expression over module (and `module:slice`) names."""
    patterns = PRESETS.get(spec)
    if patterns is None:
        try:
            patterns = (re.compile(spec).pattern,)
        except re.error as err:
            raise UsageError(f"--targets '{spec}' is neither a preset ({', '.join(PRESETS)}) "
                             f"nor a valid regular expression ({err})") from None
    layer_range = parse_layers(layers) if isinstance(layers, str) or layers is None else layers
    config = getattr(model, "config", None)
    found: list[Target] = []
    for module_name, module in linear_modules(model):
        out_features, in_features = weight_view(module).shape
        layer = _layer_of(module_name)
        if layer_range is not None and (layer is None or layer not in layer_range):
            continue
        for part, rows in _slices(module_name, out_features, config).items():
            name = f"{module_name}:{part}" if part else module_name
            if not any(re.search(p, name) for p in patterns):
                continue
            whole = Target(name, module_name, rows, in_features, layer, out_features)
            found.extend(_split_heads(whole, config, spec) if per_head else [whole])
    if not found:
        listing = ", ".join(f"{n} {tuple(weight_view(m).shape)}" for n, m in linear_modules(model)[:40])
        raise UsageError(f"--targets '{spec}' (layers {layers or 'all'}) matches no linear module; "
                         f"the model has: {listing}")
    return found


def _split_heads(whole: Target, config, spec: str) -> list[Target]:
    if spec in PRESETS and spec not in _HEAD_KINDS:
        raise UsageError(f"per-head granularity applies to query, key and value projections, not '{spec}'")
    head_dim = _attention_sizes(config)[0]
    start, stop = whole.rows
    if (stop - start) % head_dim:
        raise UsageError(f"{whole.name} has {stop - start} output rows, not a whole number of heads of {head_dim}")
    return [dataclasses.replace(whole, name=f"{whole.name}:h{h}", rows=(r, r + head_dim))
            for h, r in enumerate(range(start, stop, head_dim))]


def target_weight(model: nn.Module, target: Target) -> torch.Tensor:
    """The target's block of the (out, in) weight: (rows, in_features)."""
    module = model.get_submodule(target.module_name)
    return weight_view(module)[target.rows[0] : target.rows[1]]


def describe(targets: list[Target]) -> str:
    """A table of what matched: name, shape, number of components."""
    width = max(len(t.name) for t in targets)
    lines = [f"{'target':<{width}}  {'shape':>12}  components"]
    lines += [f"{t.name:<{width}}  {str(t.shape):>12}  {t.n_components}" for t in targets]
    total = sum(t.n_components for t in targets)
    lines.append(f"{len(targets)} targets, {total} components")
    return "\n".join(lines)
