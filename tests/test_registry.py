"""The method contract: a method added in its own module (here, this test file) runs through `compare` with
its settings validated and its report words rendered, composes with a learned stage, and compare's own code
names no method."""

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import eigenprune
from eigenprune.cli import main
from eigenprune.methods import registry
from eigenprune.methods.base import MethodResult
from eigenprune.protocol.harness import Harness


@dataclass
class FlipSettings:
    """A toy edit: negate one MLP matrix's weight, or do nothing."""

    strength: float = field(default=1.0, metadata={"help": "how much of the weight to subtract twice"})
    layer: int = field(default=0, metadata={"help": "which layer's mlp-out to flip"})

    def __post_init__(self) -> None:
        if not 0 <= self.strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")


def flip(harness: Harness, config: FlipSettings, ctx: registry.Context) -> MethodResult:
    """Tries the base and one flipped model on dev; keeps the better (base wins ties); tests it once."""
    from eigenprune.edits.targets import find_targets, weight_view

    target = [t for t in find_targets(harness.model, "mlp-out") if t.layer == config.layer][0]
    weight = weight_view(harness.model.get_submodule(target.module_name))
    base = ctx.base if ctx.base is not None else {s: harness.evaluate(s) for s in ("dev", "test")}
    original = weight.detach().clone()
    with torch.no_grad():
        weight.sub_(2 * config.strength * original)
    try:
        dev, test = harness.evaluate("dev"), harness.evaluate("test")
    finally:
        with torch.no_grad():
            weight.copy_(original)
    chosen = dev.double().mean() > base["dev"].double().mean()
    return MethodResult("flip", {"flipped": bool(chosen), "strength": config.strength},
                        dev if chosen else base["dev"], test if chosen else base["test"], 2, 0.0,
                        original.numel() if chosen else 0, modules=[target.module_name] if chosen else [],
                        notes=["flip: a toy method registered by the tests"], verdict="Flip has spoken.",
                        markers=[{"acc": 0.25, "marker": "s", "label": "flip's marker"}])


@pytest.fixture
def flip_registered(monkeypatch):
    registry.methods()
    monkeypatch.setitem(registry._METHODS, "flip", registry.Method("flip", FlipSettings, flip, "a toy edit"))


@pytest.fixture(scope="session")
def setup(sums_setup):
    return sums_setup


ARGS = ["--limit", "12", "--split-seed", "2", "--targets", "all", "--p", "0.1,0.5", "--partners", "2",
        "--n-boot", "50", "--quiet"]


def test_a_new_method_runs_through_compare_alone_and_on_a_stage(setup, tmp_path, flip_registered):
    model, task = setup
    out = tmp_path / "c"
    code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, "--methods", "flip,lora,lora+flip",
                 "--set", "flip.strength=0.5", "--set", "lora.steps=4", "--set", "lora.checkpoints=2",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "comparison.json").read_text())
    assert report["methods_run"] == ["flip", "lora", "lora+flip"]
    rows = report["methods"]
    assert rows["flip"]["config"]["strength"] == 0.5 and rows["lora+flip"]["config"]["strength"] == 0.5
    assert rows["lora+flip"]["config"]["steps"] == 4  # the stage's settings, from --set lora.*
    assert rows["lora+flip"]["extra"]["stage"]["dev_acc"] == rows["lora"]["dev"]["acc"]
    assert rows["lora+flip"]["dev_evaluations"] == rows["lora"]["dev_evaluations"] + 2
    md = (out / "comparison.md").read_text()
    assert "Flip has spoken." in report["verdict"] and "flip: a toy method registered by the tests" in md


def test_a_composite_shares_its_stage_and_runs_what_its_edit_needs(setup, tmp_path, monkeypatch):
    import eigenprune.methods.lora as lora

    model, task = setup
    tunes = []
    plain = lora._fine_tune
    monkeypatch.setattr(lora, "_fine_tune", lambda *a, **k: tunes.append(1) or plain(*a, **k))
    out = tmp_path / "c"
    code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, "--methods", "lora+random,lora",
                 "--set", "lora.steps=4", "--set", "lora.checkpoints=2", "--set", "random.seeds=2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "comparison.json").read_text())
    assert report["methods_run"] == ["lora+eigenprune", "lora+random", "lora"]
    assert report["implicit"] == ["lora+eigenprune"] and len(tunes) == 1
    rows = report["methods"]
    assert rows["lora+random"]["config"]["n_frozen"] == rows["lora+eigenprune"]["config"]["n_frozen"]


def test_stage_settings_that_differ_train_twice(setup, tmp_path, monkeypatch):
    import eigenprune.methods.lora as lora

    model, task = setup
    tunes = []
    plain = lora._fine_tune
    monkeypatch.setattr(lora, "_fine_tune", lambda *a, **k: tunes.append(1) or plain(*a, **k))
    code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, "--methods", "lora,lora+eigenprune",
                 "--set", "lora.steps=4", "--set", "lora.checkpoints=2", "--set", "lora+eigenprune.steps=2",
                 "--out", str(tmp_path / "c")])
    assert code == 0 and len(tunes) == 2


def test_bad_settings_of_a_new_method_are_one_line(setup, tmp_path, flip_registered, capsys):
    model, task = setup
    for setting, message in (("flip.strength=2", "strength must be in [0, 1]"),
                             ("flip.strength=lots", "strength must be a number"),
                             ("flip.colour=red", "unknown setting 'colour'")):
        code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, "--methods", "flip",
                     "--set", setting, "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_compare_and_its_report_name_no_method():
    """Adding a method touches only its own module: the code that runs and renders them all names none (the
    study's control is found by its role, not by its name)."""
    names = [n for n in registry.methods() if n != "eigenprune"]  # the package's own name is everywhere
    source = Path(eigenprune.__file__).parent
    for module in ("experiments/compare.py", "experiments/pipeline.py", "experiments/study.py",
                   "reports/compare_report.py", "reports/study_report.py"):
        text = (source / module).read_text()
        code = re.sub(r'"""[\s\S]*?"""', "", text)  # docstrings may explain by example
        # a name used as a value the code acts on: compared with, looked up, a key (help texts may cite examples)
        used = lambda n: rf"(==|!=|\bin|\.get\(|\[|\{{|,)\s*[\"']{n}[\"']|[\"']{n}[\"']\s*(:|==|in\b)"
        found = [n for n in names if re.search(used(re.escape(n)), code)]
        assert not found, (module, found)


def test_registration_is_checked():
    with pytest.raises(ValueError, match="may not"):
        registry.register("a+b", summary="")
    with pytest.raises(TypeError, match="dataclass"):
        registry.register("plain", dict, summary="")
    assert dataclasses.is_dataclass(registry.NoSettings)
