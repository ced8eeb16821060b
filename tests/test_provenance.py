"""A run records what its numbers depend on (data, weights, library versions); `run --config` refuses a
rerun on changed data or weights unless allowed, and says which versions changed."""

import json

import pytest
from helpers import sensitive, write_task

from eigenprune.cli import main
from eigenprune.experiments import provenance

ARGS = ["--limit", "12", "--split-seed", "2", "--p", "0.3", "--partners", "2", "--n-boot", "50", "--quiet"]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prov")
    model, tok = sensitive()
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    task = write_task(folder / "sums.jsonl")
    assert main(["run", "--model", str(folder / "model"), "--task", str(task), *ARGS, "--out", str(folder / "r")]) == 0
    return folder


def rerun(folder, out, *extra):
    return main(["run", "--config", str(folder / "r" / "config.json"), "--out", str(out), *extra])


def test_config_records_data_weights_and_versions(first):
    recorded = json.loads((first / "r" / "config.json").read_text())["recorded"]
    assert len(recorded["data_sha256"]) == len(recorded["model_sha256"]) == 64
    assert set(recorded["versions"]) >= {"python", "torch", "transformers", "tokenizers", "numpy", "safetensors",
                                         "peft", "device"}
    report = json.loads((first / "r" / "report.json").read_text())
    assert report["versions"] == recorded["versions"] and "transformers" in (first / "r" / "report.md").read_text()


def test_a_changed_task_file_is_refused_unless_allowed(first, tmp_path, capsys):
    task = first / "sums.jsonl"
    original = task.read_text()
    try:
        lines = original.splitlines()
        row = json.loads(lines[0])
        row["label"] = 1 - row["label"]
        task.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
        assert rerun(first, tmp_path / "a") == 2
        err = capsys.readouterr().err
        assert "task data changed" in err and "--allow-changed" in err and err.count("\n") == 1
        assert not (tmp_path / "a").exists()
        assert rerun(first, tmp_path / "b", "--allow-changed") == 0
        assert "changed inputs" in capsys.readouterr().err
    finally:
        task.write_text(original)


def test_changed_weights_are_refused(first, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = first / "model" / "model.safetensors"
    original = path.read_bytes()
    try:
        weights = load_file(path)
        name = next(k for k in weights if k.endswith("mlp.c_fc.weight"))
        weights[name] = weights[name] * -1
        save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})
        assert rerun(first, tmp_path / "a") == 2
        assert "model weights changed" in capsys.readouterr().err
    finally:
        path.write_bytes(original)


def test_other_versions_are_said(first, tmp_path, capsys, monkeypatch):
    plain = provenance.versions
    monkeypatch.setattr(provenance, "versions", lambda device: plain(device) | {"transformers": "99.0"})
    assert rerun(first, tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "other versions than the recorded run: transformers" in err and "-> 99.0" in err
    assert "other versions" in json.dumps(json.loads((tmp_path / "a" / "report.json").read_text())["warnings"])
