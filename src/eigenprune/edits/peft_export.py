"""Export an applied edit as a standard peft LoRA adapter (adapter_config.json + adapter_model.safetensors).

A frozen set of components is a low-rank change, W′ = W − U_F S_F V_Fᵀ (+ a bias), which is exactly what
LoRA adds to a layer: y = W x + B A x (+ lora_B's bias), with A = V_Fᵀ (rank, d_in) and B = −U_F S_F
(d_out, rank). Every adapted module gets the same rank (the largest number of components frozen in one
module), zero-padded where a module froze fewer, and lora_alpha = rank so peft's scaling is 1: multi-LoRA
serving stacks expect one rank per adapter. A fused projection (GPT-2's `c_attn`) gets one LoRA whose B is
zero in the rows of slices that froze nothing; heads and grouped-query projections are rows of B the same way.
Everything is read from the `FrozenLinear` layers `apply_edit` put in the model, so the adapter is what the
edited model computes, in float32 (the precision of the edit's own correction).

Bias: a `--bias none` edit is exact with plain LoRA. A constant bias goes into peft's `lora_bias` (lora_B's
bias term, peft >= 0.14); peft computes with it, but `merge_and_unload` needs the base layer to have a bias
(GPT-2 and Phi do, Llama does not), and multi-LoRA servers mostly ignore or refuse it (vLLM's
`--enable-lora-bias` is deprecated). A position-dependent bias has no LoRA form and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eigenprune.core.errors import UsageError
from eigenprune.core.outdir import atomic_dir
from eigenprune.edits.freeze import FrozenLinear

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # how PeftModelForCausalLM names the wrapped model's modules in its files


@dataclass
class PeftExport:
    """What was written: the adapter's rank, its modules, whether it carries a bias, and its size."""

    path: Path
    rank: int
    modules: list[str]
    lora_bias: bool
    adapter_bytes: int
    model_bytes: int  # the full model's parameters, what a merged export would weigh
    unmergeable: list[str]  # modules whose lora_bias peft cannot merge (the base layer has no bias)

    def summary(self) -> str:
        bias = (" with lora_bias (peft computes it; multi-LoRA servers mostly drop it)" if self.lora_bias
                else "")
        if self.unmergeable:
            bias += f"; merge_and_unload() refuses it ({self.unmergeable[0]} has no bias: use export --merge)"
        return (f"peft LoRA adapter -> {self.path}: rank {self.rank} on {len(self.modules)} modules{bias}; "
                f"{self.adapter_bytes / 1e3:.1f} KB against {self.model_bytes / 1e6:.1f} MB for the merged model "
                "(loads with PeftModel.from_pretrained(base, path))")


def require_peft():
    try:
        import peft
    except ImportError:
        raise UsageError("--format peft needs peft: pip install 'eigenprune[peft]'") from None
    return peft


def lora_weights(model: nn.Module) -> tuple[int, dict[str, dict[str, torch.Tensor]], bool]:
    """(rank, {module: {"A": (rank, d_in), "B": (d_out, rank), "bias": (d_out,)}}, has_bias) from the model's
    applied edit; A and B zero-padded to the common rank, "bias" only where the edit adds one."""
    frozen = {name: m for name, m in model.named_modules() if isinstance(m, FrozenLinear)}
    if not frozen:
        raise UsageError("the model carries no eigenprune edit (p = 0 froze nothing?); there is no adapter to write")
    for name, m in frozen.items():
        if m.bias_table.shape[0] != 1:
            raise UsageError(f"the edit's bias depends on token position ({name}), which no LoRA adapter can hold: "
                             "prune again with --bias constant or --bias none to export a peft adapter")
    rank = max(m.down.shape[0] for m in frozen.values())
    has_bias = any(bool(m.bias_table.any()) for m in frozen.values())
    out = {}
    for name, m in frozen.items():
        r, d_in = m.down.shape
        A = torch.zeros(rank, d_in)  # (rank, d_in) = V_Fᵀ as rows, then zeros
        B = torch.zeros(m.up.shape[0], rank)  # (d_out, rank) = −U_F S_F, then zeros
        A[:r] = m.down.detach().float().cpu()
        B[:, :r] = -m.up.detach().float().cpu()
        out[name] = {"A": A, "B": B}
        if has_bias:
            out[name]["bias"] = m.bias_table[0].detach().float().cpu().clone()  # (d_out,)
    return rank, out, has_bias


def _fan_in_fan_out(model: nn.Module, modules: list[str]) -> bool:
    """True when the adapted layers are transformers' Conv1D (weight stored (in, out)), as peft wants it."""
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(model.get_submodule(n).base_layer, Conv1D) for n in modules)


@torch.no_grad()
def export_peft(model: nn.Module, out: str | Path, base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> PeftExport:
    """Write the model's applied edit as a peft LoRA adapter folder; the model is left as it was."""
    peft = require_peft()
    from safetensors.torch import save_file

    rank, weights, has_bias = lora_weights(model)
    if has_bias and "lora_bias" not in getattr(peft.LoraConfig, "__dataclass_fields__", {}):
        raise UsageError(f"this edit adds a bias, which needs peft >= 0.14 (lora_bias); peft {peft.__version__} "
                         "is installed")
    modules = sorted(weights)
    config = peft.LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=modules, bias="none",
        fan_in_fan_out=_fan_in_fan_out(model, modules), task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path, **({"lora_bias": True} if has_bias else {}))
    tensors = {}
    for name in modules:
        w = weights[name]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = w["A"].contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = w["B"].contiguous()
        if "bias" in w:
            tensors[f"{PREFIX}{name}.lora_B.bias"] = w["bias"].contiguous()
    with atomic_dir(out, overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        adapter_bytes = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    unmergeable = [n for n in modules if has_bias and model.get_submodule(n).base_layer.bias is None]
    return PeftExport(Path(out), rank, modules, has_bias, adapter_bytes, model_bytes, unmergeable)
