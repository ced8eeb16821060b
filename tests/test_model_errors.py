"""Model loading faults are one line (exit 2), found where the input is read: an unknown device, CUDA on a
machine without it, weights that do not match their config, truncated weights, and a hub id that is not
cached while the hub cannot be reached (no 45 s of retries)."""

import json

import pytest
import torch

from eigenprune.cli import main
from eigenprune.core import models


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_bad_devices(capsys, saved_model_dir):
    code, err = run_cli(capsys, "targets", "--model", saved_model_dir, "--device", "cdua")
    assert code == 2 and "unknown device 'cdua'" in err and err.count("\n") == 1
    if not torch.cuda.is_available():
        code, err = run_cli(capsys, "targets", "--model", saved_model_dir, "--device", "cuda")
        assert code == 2 and "no CUDA device" in err and err.count("\n") == 1


@pytest.mark.parametrize("fault", ["config mismatch", "truncated weights"])
def test_broken_model_folders(capsys, tmp_path, saved_model_dir, fault):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model_dir, folder)
    if fault == "config mismatch":
        config = json.loads((folder / "config.json").read_text())
        key = next(k for k in ("n_embd", "hidden_size") if k in config)
        config[key] *= 2
        (folder / "config.json").write_text(json.dumps(config))
    else:
        weights = next(folder.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = run_cli(capsys, "targets", "--model", folder)
    assert code == 2 and "cannot load model" in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_uncached_hub_id_fails_at_once_when_the_hub_is_unreachable(capsys, monkeypatch):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code, err = run_cli(capsys, "targets", "--model", "nobody/no-such-model-xyz")
    assert code == 2 and "hub cannot be reached" in err and err.count("\n") == 1
