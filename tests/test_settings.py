"""Settings defined once: a config dataclass gives its flags, its typed JSON and `--set` conversion, and an
old flat config.json still loads."""

import argparse
import json

import pytest

from eigenprune.cli import main
from eigenprune.core import settings
from eigenprune.core.errors import UsageError
from eigenprune.edits.freeze import FreezeConfig
from eigenprune.edits.scoring import ScoreConfig
from eigenprune.protocol.config import RunConfig, add_run_options, config_from_args, config_from_file


def parse(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    return config_from_args(parser.parse_args(["--task", "int-mult", *argv]))


def test_flags_come_from_the_fields_nested_ones_included():
    cfg = parse("--p", "0.3,0.1", "--partners", "all", "--score-seed", "3", "--batch-size", "2", "--scope",
                "per-target", "--bias", "constant", "--per-head", "--no-sweep-test", "--answers", "a,b")
    assert cfg.p == [0.1, 0.3] and cfg.per_head is True and cfg.sweep_test is False and cfg.answers == ["a", "b"]
    assert cfg.score == ScoreConfig(partners="all", window=32, seed=3, batch_size=2)
    assert cfg.freeze == FreezeConfig(p=0.0, scope="per-target", aggregate="max", bias="constant")
    assert cfg.freeze_at(0.2).p == 0.2 and parse().score == ScoreConfig()


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "-1"], "batch_size must be at least 1"),
    (["--window", "-1"], "window must be at least 1"),
    (["--limit", "-3"], "limit must be at least 2"),
    (["--bias", "sideways"], "bias must be one of"),
    (["--eval-mode", "guess"], "eval_mode must be one of"),
])
def test_bad_values_are_one_line(argv, message):
    with pytest.raises(UsageError, match=message):
        parse(*argv)


def test_a_value_of_the_wrong_type_is_refused_by_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--task", "int-mult", "--limit", "ten"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "limit must be an integer" in err and err.count("\n") == 1


def test_duplicate_p_values_are_tried_once_and_said(capsys):
    assert parse("--p", "0.1,0.1,0.3").p == [0.1, 0.3]
    assert "tried once" in capsys.readouterr().err


@pytest.mark.parametrize("data, message", [
    ({"per_head": "no"}, "per_head must be true or false"),
    ({"sweep_test": "false"}, "sweep_test must be true or false"),
    ({"p": "0.1"}, "p must be fractions or .auto."),
    ({"p": [True]}, "p must be a list of float or a string"),
    ({"limit": 2.5}, "limit must be an integer"),
    ({"score": {"seed": "x"}}, "seed must be an integer"),
    ({"score": {"colour": 1}}, "unknown setting 'colour'"),
    ({"colour": 1}, "unknown setting 'colour'"),
])
def test_config_json_is_type_checked_field_by_field(tmp_path, data, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"task": "int-mult", **data}))
    with pytest.raises(UsageError, match=message):
        config_from_file(path)


def test_config_json_round_trips_and_the_flat_layout_still_loads(tmp_path):
    cfg = parse("--partners", "2", "--score-seed", "5", "--scope", "per-target", "--limit", "20")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings.to_dict(cfg)))
    assert config_from_file(path) == cfg
    flat = {"task": "int-mult", "limit": 20, "partners": "2", "score_seed": 5, "scope": "per-target", "window": 32,
            "batch_size": 8, "aggregate": "max", "bias": "position"}  # a config.json written before nesting
    path.write_text(json.dumps(flat))
    assert config_from_file(path) == cfg


def test_conversion_from_text():
    assert settings.convert(list[float], "0.5, 0.1", from_text=True) == [0.5, 0.1]
    assert settings.convert(tuple[float, ...], "[1, 0.5]", from_text=True) == (1.0, 0.5)
    assert settings.convert(int | str, "4", from_text=True) == 4
    assert settings.convert(int | str, "all", from_text=True) == "all"
    assert settings.convert(int | None, "none", from_text=True) is None
    assert settings.convert(str | None, "{premise} Q: {question}", from_text=True) == "{premise} Q: {question}"
    for tp, value in ((int, "1.5"), (bool, "maybe"), (float, "x")):
        with pytest.raises((TypeError, ValueError)):
            settings.convert(tp, value, from_text=True)
