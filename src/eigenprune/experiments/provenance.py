"""What a run's numbers depend on beyond its settings: the data, the model's weights, the libraries.

config.json records it under "recorded"; `run --config` compares it with what it finds now. Changed
data or weights would make the rerun answer another question, so the rerun refuses them unless told
`--allow-changed`; changed library versions can move an answer (one SmolLM2 int-mult dev item
flipped between transformers 5.23 and 5.24, and with it the chosen p), so the rerun says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from importlib import metadata

import torch

PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "safetensors", "peft", "eigenprune")


def versions(device: str) -> dict[str, str]:
    """Python, the libraries a run's numbers go through, and the device (with its name on a GPU)."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    found["device"] = device
    if device.startswith("cuda") and torch.cuda.is_available():
        found["device"] += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return found


def data_sha256(task) -> str:
    """A digest of the task's examples as loaded (prompt, answer, choices, label of train and test, in order):
    a built-in task and a JSONL file alike, and an edit of one character in either changes it."""
    digest = hashlib.sha256()
    for split in (task.train, task.test):
        for example in split:
            digest.update(json.dumps(dataclasses.asdict(example), sort_keys=True).encode())
        digest.update(b"|")
    return digest.hexdigest()


def record(task, model, device: str) -> dict:
    from eigenprune.edits.fingerprint import fingerprint

    return {"versions": versions(device), "data_sha256": data_sha256(task),
            "model_sha256": fingerprint(model)["sha256"]}


def compare(expected: dict, now: dict) -> tuple[list[str], list[str]]:
    """(what changed in the inputs, which versions changed), each as readable phrases."""
    inputs = [f"the {what} changed since the recorded run" for what, key in (("task data", "data_sha256"),
                                                                            ("model weights", "model_sha256"))
              if key in expected and expected[key] != now[key]]
    old, new = expected.get("versions") or {}, now["versions"]
    changed = [f"{k} {old[k]} -> {new.get(k, 'not installed')}" for k in sorted(old) if old[k] != new.get(k)]
    return inputs, changed
