"""The house's shape: a third-party method is one file found through the entry point (and runs in compare
and study), old module paths still import (with a warning), and the public API is one call per step from
the package root without importing torch."""

import importlib
import json
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata

import pytest
import torch
from helpers import sensitive, write_task

from eigenprune.cli import main
from eigenprune.methods import registry

PLUGIN = '''
"""A method shipped by someone else: one module, registered through the `eigenprune.methods` entry point."""
from dataclasses import dataclass, field

from eigenprune.methods.base import MethodResult
from eigenprune.methods.registry import register


@dataclass
class KeepSettings:
    note: str = field(default="kept", metadata={"help": "a word for the report"})


@register("keep-base", KeepSettings, summary="keeps the base model (a plug-in from outside the package)")
def keep_base(harness, config, ctx):
    return MethodResult("keep-base", {"note": config.note}, ctx.base["dev"], ctx.base["test"], 0, 0.0, 0,
                        verdict=f"keep-base says {config.note}.")
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module and its distribution metadata (entry point group `eigenprune.methods`) on sys.path, and a
    registry that discovers again."""
    site = tmp_path / "site"
    (site / "keep_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "keep_plugin.py").write_text(PLUGIN)
    (site / "keep_plugin-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: keep-plugin\n"
                                                                 "Version: 1.0\n")
    (site / "keep_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\nkeep-base = keep_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_METHODS", dict(registry.methods()))  # the package's own, already imported
    monkeypatch.setattr(registry, "_DISCOVERED", False)  # so that the entry points are read again
    yield
    sys.modules.pop("keep_plugin", None)


def test_a_method_from_an_entry_point_runs_in_compare_and_study(plugin, tmp_path):
    assert any(e.value == "keep_plugin" for e in metadata.entry_points(group=registry.ENTRY_POINT_GROUP))
    assert "keep-base" in registry.methods()
    model, task = sensitive(), write_task(tmp_path / "sums.jsonl")
    folder = tmp_path / "model"
    model[0].save_pretrained(folder)
    model[1].save_pretrained(folder)
    common = ["--model", str(folder), "--targets", "all", "--p", "0.3", "--n-boot", "50", "--no-side-effects",
              "--quiet"]
    assert main(["compare", "--task", str(task), *common, "--methods", "eigenprune,keep-base",
                 "--set", "keep-base.note=hello", "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert report["methods"]["keep-base"]["config"] == {"note": "hello"}
    assert "keep-base says hello." in (tmp_path / "c" / "comparison.md").read_text()
    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent(f"""\
        [study]
        models = ["{folder}"]
        tasks = ["{task}"]
        targets = ["all"]
        methods = ["keep-base"]

        [settings]
        p = [0.3]
        n_boot = 50
        side_effects = false
        """))
    assert main(["study", str(spec), "--out", str(tmp_path / "study"), "--quiet"]) == 0
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert list(study["cells"][0]["methods"]) == ["keep-base"]


@pytest.mark.parametrize("old, new, name", [
    ("eigenprune.experiment", "eigenprune.experiments.run", "execute"),
    ("eigenprune.freeze", "eigenprune.edits.freeze", "applied"),
    ("eigenprune.baselines.laser", "eigenprune.methods.laser", "run_laser"),
    ("eigenprune.baselines.eigenprune_method", "eigenprune.methods.eigenprune", "run_eigenprune"),
    ("eigenprune.baselines.registry", "eigenprune.methods.registry", "register"),
    ("eigenprune.data", "eigenprune.core.batching", "Example"),
])
def test_old_module_paths_import_the_same_objects_with_a_warning(old, new, name):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), caught


def test_an_unknown_old_path_still_fails():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("eigenprune.no_such_module")


def test_the_public_api_is_one_call_per_step(tmp_path):
    import eigenprune

    model, tok = sensitive()
    splits = eigenprune.split_task(eigenprune.load_task(str(write_task(tmp_path / "sums.jsonl"))), limit=12)
    run = eigenprune.score_run(model, tok, splits.train, targets="all")
    edit = eigenprune.prune(run, p=0.3)
    assert isinstance(edit, eigenprune.Edit) and edit.n_frozen > 0
    before = eigenprune.evaluate(model, tok, splits.dev, "choice").correct
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with eigenprune.applied(model, edit):
        during = eigenprune.evaluate(model, tok, splits.dev, "choice")
    assert isinstance(during, eigenprune.EvalResult) and during.n == len(splits.dev)
    eigenprune.apply_edit(model, edit)
    eigenprune.remove_edit(model)
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())  # restored exactly
    assert torch.equal(eigenprune.evaluate(model, tok, splits.dev, "choice").correct, before)
    assert set(eigenprune.__all__) <= set(dir(eigenprune))
    for name in eigenprune.__all__:
        getattr(eigenprune, name)  # every advertised name resolves


def test_importing_the_package_does_not_import_torch():
    code = "import sys, eigenprune; assert 'torch' not in sys.modules, 'torch imported'; print(eigenprune.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
