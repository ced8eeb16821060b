"""Hostile input, round two: `study --out` that cannot be written, a spec that is not UTF-8, targets that
match nothing (found before --out exists, naming the spec's line), a damaged finished cell, a config.json
whose old flat keys contradict its nested blocks, an empty `--methods`, a scores file holding NaN. Each is
one line (exit 2), never a traceback nor a silently different run."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from test_reliability import make_scores

from eigenprune.cli import main
from eigenprune.core.errors import UsageError
from eigenprune.experiments.compare import CompareConfig
from eigenprune.protocol.config import RunConfig, config_from_file

SPEC = """[study]
models = ["{model}"]
tasks = ["{task}"]
targets = [{targets}]
methods = ["eigenprune"]

[settings]
limit = 12
p = [0.1, 0.3]
n_boot = 20
side_effects = false
"""


def write_spec(path: Path, sums_setup, targets: str = '"key"') -> Path:
    model, task = sums_setup
    path.write_text(SPEC.format(model=model, task=task, targets=targets))
    return path


def one_line_error(capsys, argv, code: int = 2) -> str:
    assert main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- study: where it writes, what the spec holds
def test_study_out_below_a_file_is_one_line(capsys, tmp_path, sums_setup):
    spec = write_spec(tmp_path / "s.toml", sums_setup)
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, ["study", spec, "--out", tmp_path / "file" / "out"])
    assert "is a file, not a folder" in err and str(tmp_path / "file") in err


def test_study_out_in_a_read_only_folder_is_one_line(capsys, tmp_path, sums_setup, monkeypatch):
    spec = write_spec(tmp_path / "s.toml", sums_setup)
    ro = tmp_path / "ro"
    ro.mkdir()
    mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):  # what a read-only folder does to a user who is not root
        if ro in (self, *self.parents) and self != ro:
            raise PermissionError(13, "Permission denied", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    err = one_line_error(capsys, ["study", spec, "--out", ro / "out"])
    assert "cannot write" in err and "Permission denied" in err
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_study_out_in_a_really_read_only_folder_is_one_line(capsys, tmp_path, sums_setup):
    spec = write_spec(tmp_path / "s.toml", sums_setup)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = one_line_error(capsys, ["study", spec, "--out", ro / "out"])
    finally:
        ro.chmod(0o755)
    assert "cannot write" in err


def test_a_spec_that_is_not_utf8_is_one_line_naming_the_file_and_line(capsys, tmp_path, sums_setup):
    spec = write_spec(tmp_path / "s.toml", sums_setup)
    spec.write_bytes(spec.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    line = spec.read_bytes().count(b"\n")
    err = one_line_error(capsys, ["study", spec, "--out", tmp_path / "out"])
    assert f"{spec}: line {line}: not UTF-8" in err and "0xe9" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("targets, bad", [('"keyz"', "keyz"), ('"key", "nothing_here"', "nothing_here")])
def test_targets_that_match_nothing_are_found_before_out_is_created(capsys, tmp_path, sums_setup, targets, bad):
    spec = write_spec(tmp_path / "s.toml", sums_setup, targets)
    err = one_line_error(capsys, ["study", spec, "--out", tmp_path / "out"])
    assert f"{spec}: line 4: target '{bad}'" in err and "matches no linear module" in err
    assert not (tmp_path / "out").exists()  # no lock, no skeleton
    assert one_line_error(capsys, ["study", spec, "--out", tmp_path / "out", "--plan"]) == err


def test_targets_are_checked_with_the_cells_layers(capsys, tmp_path, sums_setup):
    spec = write_spec(tmp_path / "s.toml", sums_setup)
    spec.write_text(spec.read_text() + "layers = \"5-9\"\n")  # the tiny model has layers 0 and 1
    err = one_line_error(capsys, ["study", spec, "--out", tmp_path / "out"])
    assert "line 4: target 'key'" in err and "layers 5-9" in err
    assert not (tmp_path / "out").exists()


def test_a_model_whose_config_cannot_be_read_is_found_before_out_is_created(capsys, tmp_path, sums_setup):
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    spec = write_spec(tmp_path / "s.toml", (model, sums_setup[1]))
    err = one_line_error(capsys, ["study", spec, "--out", tmp_path / "out"])
    assert f"{spec}: line 2: model '{model}'" in err
    assert not (tmp_path / "out").exists()


def test_a_damaged_finished_cell_is_named_with_how_to_redo_it(capsys, tmp_path, sums_setup):
    spec = write_spec(tmp_path / "s.toml", sums_setup)
    out = tmp_path / "out"
    assert main(["study", str(spec), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    (cell,) = (out / "cells").iterdir()
    path = cell / "comparison.json"
    report = json.loads(path.read_text())
    del report["base"]
    path.write_text(json.dumps(report))
    err = one_line_error(capsys, ["study", spec, "--out", out, "--quiet"])
    assert f"cells/{cell.name}" in err and "comparison.json is damaged: no 'base'" in err
    assert "--rerun-changed" in err
    assert main(["study", str(spec), "--out", str(out), "--plan"]) == 0
    assert f"changed since it ran: {cell.name} (its comparison.json is damaged" in capsys.readouterr().out
    assert main(["study", str(spec), "--out", str(out), "--quiet", "--rerun-changed"]) == 0
    assert "base" in json.loads(path.read_text())
    assert [p.name.split(".")[0] for p in (out / "stale").iterdir()] == [cell.name]  # the damaged one, kept


def test_a_cell_damaged_after_the_plan_is_named_when_the_report_is_rendered(tmp_path, sums_setup):
    from eigenprune.experiments import study as study_module
    from eigenprune.experiments.study_spec import load_spec

    spec = write_spec(tmp_path / "s.toml", sums_setup)
    out = tmp_path / "out"
    study = load_spec(spec)
    study_module.run_study(study, out, quiet=True)
    (cell,) = (out / "cells").iterdir()
    (cell / "comparison.json").write_text("{}")
    with pytest.raises(UsageError, match=rf"cells/{cell.name} in .*comparison.json is damaged: no 'methods'"):
        study_module.render(study, out, {})


# ---------------------------------------------------------------- silently wrong: settings
def config_json(path: Path, **flat) -> Path:
    data = dataclasses.asdict(RunConfig(task="int-sum"))  # nested score/freeze blocks: window 32, bias position
    path.write_text(json.dumps(data | flat))
    return path


@pytest.mark.parametrize("flat, named", [
    ({"window": 5}, "window = 5 and score.window = 32"),
    ({"bias": "none"}, 'bias = "none" and freeze.bias = "position"'),
    ({"partners": "abc"}, 'partners = "abc" and score.partners = 4'),
    ({"score_seed": 7}, "score_seed = 7 and score.seed = 0"),
])
def test_flat_keys_that_contradict_the_nested_blocks_are_refused(tmp_path, capsys, flat, named):
    path = config_json(tmp_path / "config.json", **flat)
    with pytest.raises(UsageError, match="disagree"):
        config_from_file(path)
    err = one_line_error(capsys, ["run", "--config", path, "--out", tmp_path / "out"])
    assert named in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_ill_typed_flat_keys_are_refused_even_beside_nested_blocks(tmp_path):
    with pytest.raises(UsageError, match="window must be an integer"):
        config_from_file(config_json(tmp_path / "config.json", window="wide"))


def test_flat_keys_that_agree_with_the_nested_blocks_or_stand_alone_are_read(tmp_path):
    assert config_from_file(config_json(tmp_path / "a.json", window=32, bias="position")).score.window == 32
    data = dataclasses.asdict(RunConfig(task="int-sum"))
    del data["score"]
    (tmp_path / "b.json").write_text(json.dumps(data | {"window": 5, "partners": 3}))  # the old layout
    cfg = config_from_file(tmp_path / "b.json")
    assert (cfg.score.window, cfg.score.partners) == (5, 3)


@pytest.mark.parametrize("methods", ["", ",", " , "])
def test_an_empty_methods_list_is_an_error_not_the_defaults(capsys, methods):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--task", "int-sum", "--methods", methods])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "method names" in err


@pytest.mark.parametrize("methods", [("",), (" ", "")])
def test_an_empty_methods_tuple_is_refused_by_the_config(methods):
    with pytest.raises(ValueError, match="methods is empty"):
        CompareConfig(methods=methods)
    assert CompareConfig().methods  # not given: the defaults


# ---------------------------------------------------------------- silently wrong: NaN in saved files
@pytest.mark.parametrize("file, value", [("scores.safetensors", float("nan")),
                                         ("scores_mean.safetensors", float("nan")), ("svd.safetensors", float("inf"))])
def test_prune_refuses_a_scores_file_holding_nan_naming_the_matrix(capsys, tmp_path, file, value):
    scores = make_scores(tmp_path / "scores")
    path = scores / file
    with safe_open(path, framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[1] = value
    save_file(tensors, path, meta)
    err = one_line_error(capsys, ["prune", "--scores", scores, "--p", "0.1", "--out", tmp_path / "edit"])
    assert f"{path}: '{name}' holds 1 NaN or infinite value(s)" in err
    assert not (tmp_path / "edit").exists()


def test_prune_still_reads_finite_scores(tmp_path):
    scores = make_scores(tmp_path / "scores")
    assert main(["prune", "--scores", str(scores), "--p", "0.1", "--out", str(tmp_path / "edit")]) == 0
    assert (tmp_path / "edit" / "edit.safetensors").is_file()
