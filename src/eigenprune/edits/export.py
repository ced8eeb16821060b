"""Export an edited model as a plain Hugging Face folder that loads without eigenprune.

The removed components are subtracted from the weights and the (position-independent) bias is added
to the layers' bias parameters. Where a layer has none (Llama's projections by default), the export
switches on the architecture's own bias option (e.g. `attention_bias`, `mlp_bias`), found by trying
the known flag names on an empty copy of the model: no per-model code. The other layers that the flag
gives a bias get zeros, so the exported model computes exactly what the edited one did.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from eigenprune.core.errors import UsageError
from eigenprune.edits.artifact import atomic_dir
from eigenprune.edits.freeze import merge_edit

BIAS_FLAGS = ("attention_bias", "mlp_bias", "bias", "use_bias", "qkv_bias", "add_bias_linear")


def _has_bias(model: nn.Module, name: str) -> bool:
    return getattr(model.get_submodule(name), "bias", None) is not None


def _config_with_biases(model: nn.Module, needed: list[str]):
    """A copy of the model's config whose architecture gives every `needed` module a bias."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    missing = set(needed)
    for flag in BIAS_FLAGS:
        if not missing:
            break
        if getattr(config, flag, None) is not False:
            continue
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(trial)
        covered = {m for m in missing if _has_bias(probe, m)}
        if covered:
            config, missing = trial, missing - covered
    if missing:
        raise UsageError(f"cannot export a merged model: {sorted(missing)[0]} has no bias and the architecture "
                         "offers no option for one; keep the edit (eigenprune apply) instead")
    return config


@torch.no_grad()
def export_merged(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Fold the model's applied edit into its weights and save a plain Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    with atomic_dir(out, overwrite) as tmp:  # claimed before the model changes; nothing left on failure
        added = merge_edit(model)
        config = _config_with_biases(model, added) if added else copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):  # a GGUF source is de-quantized already
            delattr(config, "quantization_config")
        # Always a fresh model from the config: one loaded from GGUF stays marked as quantized, and
        # transformers refuses to save it ("not serializable").
        fresh = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
        missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(not k.endswith("bias") for k in missing):
            raise UsageError(f"cannot export a merged model: weights do not line up ({(unexpected or missing)[0]})")
        for key in missing:
            fresh.get_parameter(key).zero_()
        fresh.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)
