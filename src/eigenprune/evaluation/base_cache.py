"""The base model's side-effect pass, cached on disk so that a study's cells, its folds and later runs share it.

An entry holds what `SideEffectProbe` keeps of the base pass: per-document NLL and scored-token counts, and
per batch the final hidden states (the LM head's input). It sits beside the de-quantized models
(`models.cache_root()`, `$EIGENPRUNE_CACHE`; off there means off here), written whole or not at all and
checked against its manifest's sha256s before use, exactly like a model entry (`models.fill_entry`).

The key is a sha256 over everything the pass's numbers depend on, so a hit gives the bits a fresh pass
would: the model's class, config and every tensor of its state dict (weights and buffers, so an edited
model never hits the base's entry), the dtype and device type, the encoded documents and the batch size,
and the torch build, its thread count and the transformers version (float32 sums differ across these).
Hashing the weights reads them once (about 1 s for SmolLM2-135M's 540 MB); the pass costs about 10×.

The process also keeps the last `MEMORY_ENTRIES` entries in memory, cache on or off: a study's cells share
the pass without reading it back (or, with `$EIGENPRUNE_CACHE=off`, without making it again).

The key also holds the rows a chunk of the pass's vocabulary-wide work has (`token_scores.chunk_rows`): a
matmul's bits may depend on the rows a call gets, and an edit's NLL is compared with the base's.

The linear KL path's base quantities (`token_scores.LinearBase`: g = Wᵀp_b and lse(z_b) per scored row, made
from the stored hidden states with one more pass of the base's head) sit in an entry of their own, named by
`linear_name`: the base entry's name, the device type they were made on and their chunk rows (the edit's lse
must come from chunks of the same rows, or an unedited row would not get KL 0). Made the first time some probe
asks for them (`load_linear`, `save_linear`); the process keeps CPU copies of the last `MEMORY_ENTRIES`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from eigenprune.core.batching import Encoded
from eigenprune.core.models import cache_root, fill_entry, intact
from eigenprune.evaluation.token_scores import chunk_rows

LAYOUT = "side-effects-v1"  # bump when an entry's contents change
_FILE = "base.safetensors"
_LINEAR_FILE = "linear.safetensors"
MEMORY_ENTRIES = 2  # SmolLM2-135M's entry for the packaged sample: about 25 MiB of hidden states
_MEMORY: OrderedDict[str, tuple] = OrderedDict()
_LINEAR_MEMORY: OrderedDict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()  # on the CPU


def key(model: torch.nn.Module, encoded: Sequence[Encoded], batch_size: int) -> str:
    """The entry name for this model and sample."""
    import transformers

    digest = hashlib.sha256()
    params = next(model.parameters())
    head = getattr(model.get_output_embeddings(), "weight", None) if hasattr(model, "get_output_embeddings") else None
    rows = chunk_rows(*head.shape) if head is not None and head.dim() == 2 else None  # (vocab, d_model)
    setup = {"layout": LAYOUT, "class": type(model).__qualname__, "dtype": str(params.dtype), "chunk_rows": rows,
             "device": params.device.type, "batch_size": batch_size, "torch": torch.__version__,
             "threads": torch.get_num_threads(), "transformers": transformers.__version__,
             "config": model.config.to_json_string(use_diff=False) if hasattr(model, "config") else ""}
    digest.update(json.dumps(setup, sort_keys=True).encode())
    digest.update(json.dumps([[e.prompt_ids, e.answer_ids] for e in encoded]).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _entry(name: str) -> Path:
    return cache_root() / LAYOUT / name


def _put(memory: OrderedDict, name: str, found: tuple) -> None:
    """Remember `found` as the most recent of `memory`'s last `MEMORY_ENTRIES` entries."""
    memory[name] = found
    memory.move_to_end(name)
    while len(memory) > MEMORY_ENTRIES:
        memory.popitem(last=False)


def _read(name: str, file: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """An intact entry's manifest and tensors, or None (cache off, missing, incomplete or corrupt)."""
    from safetensors.torch import load_file

    if cache_root() is None or not intact(_entry(name), file):
        return None
    return json.loads((_entry(name) / "manifest.json").read_text()), load_file(_entry(name) / file)


def _remember(name: str, found: tuple) -> tuple:
    _put(_MEMORY, name, found)
    nll, tokens, hidden, vocab, wall_s = found
    return nll.copy(), tokens.copy(), list(hidden), vocab, wall_s  # the caller's own arrays and list


def load(name: str) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor], int, float] | None:
    """(nll, tokens, hidden per batch, vocab, wall seconds of the pass that made it), or None on a miss."""
    if name in _MEMORY:
        return _remember(name, _MEMORY[name])
    read = _read(name, _FILE)
    if read is None:
        return None
    about, tensors = read
    hidden = [tensors[f"hidden.{i}"] for i in range(about["batches"])]
    return _remember(name, (tensors["nll"].numpy(), tensors["tokens"].numpy(), hidden, about["vocab"],
                            about["wall_s"]))


def save(name: str, nll: np.ndarray, tokens: np.ndarray, hidden: list[torch.Tensor], vocab: int,
         wall_s: float) -> bool:
    """Remember the entry in memory and, when the cache is on, write it to disk (False if that failed)."""
    from safetensors.torch import save_file

    _remember(name, (nll.copy(), tokens.copy(), list(hidden), vocab, wall_s))
    if cache_root() is None:
        return False

    def write(folder: Path) -> None:
        tensors = {"nll": torch.from_numpy(nll), "tokens": torch.from_numpy(tokens),
                   **{f"hidden.{i}": h.contiguous() for i, h in enumerate(hidden)}}
        save_file(tensors, folder / _FILE)

    return fill_entry(_entry(name), write, {"layout": LAYOUT, "batches": len(hidden), "vocab": vocab,
                                            "wall_s": wall_s}, "side-effect cache", _FILE)


def linear_name(name: str, device_type: str, step: int) -> str:
    """The entry of the linear path's base quantities for base entry `name`, made on `device_type` in chunks of
    `step` rows."""
    return f"{name}-linear-{device_type}-{step}"


def load_linear(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """The linear path's (g per batch, lse per batch), on the CPU, for entry `name` (`linear_name`), or None."""
    found = _LINEAR_MEMORY.get(name)
    if found is None:
        read = _read(name, _LINEAR_FILE)
        if read is None:
            return None
        about, tensors = read
        found = ([tensors[f"g.{i}"] for i in range(about["batches"])],
                 [tensors[f"lse.{i}"] for i in range(about["batches"])])
    _put(_LINEAR_MEMORY, name, found)
    return list(found[0]), list(found[1])


def save_linear(name: str, g: list[torch.Tensor], lse: list[torch.Tensor]) -> bool:
    """Remember CPU copies of the linear path's base quantities and, with the cache on, write them to entry
    `name` (`linear_name`); False if not written."""
    from safetensors.torch import save_file

    g, lse = [t.cpu().contiguous() for t in g], [t.cpu().contiguous() for t in lse]
    _put(_LINEAR_MEMORY, name, (g, lse))
    if cache_root() is None:
        return False

    def write(folder: Path) -> None:
        save_file({**{f"g.{i}": t for i, t in enumerate(g)}, **{f"lse.{i}": t for i, t in enumerate(lse)}},
                  folder / _LINEAR_FILE)

    return fill_entry(_entry(name), write, {"layout": LAYOUT, "batches": len(g)}, "side-effect cache", _LINEAR_FILE)
