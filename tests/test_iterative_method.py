"""`eigenprune-iterative` through compare: one round is eigenprune itself (same choice, same answers), more
rounds run and save an edit that reloads to the same answers."""

import json

import pytest
import torch

from eigenprune.cli import main
from eigenprune.core.models import load_model
from eigenprune.edits.artifact import apply_saved_edit
from eigenprune.evaluation.splits import split_task
from eigenprune.evaluation.tasks import load_task
from eigenprune.protocol.config import RunConfig
from eigenprune.protocol.harness import Harness

ARGS = ["--limit", "12", "--split-seed", "2", "--targets", "all", "--p", "0.1,0.5", "--partners", "2",
        "--n-boot", "50", "--eval-mode", "choice", "--quiet"]


@pytest.fixture(scope="session")
def setup(sums_setup):
    return sums_setup


def compare(setup, out, *extra):
    model, task = setup
    assert main(["compare", "--model", str(model), "--task", str(task), *ARGS, *extra, "--out", str(out)]) == 0
    return json.loads((out / "comparison.json").read_text())["methods"]


def test_one_round_is_eigenprune(setup, tmp_path):
    rows = compare(setup, tmp_path / "c", "--methods", "eigenprune,eigenprune-iterative",
                   "--set", "eigenprune-iterative.steps=1")
    one, it = rows["eigenprune"], rows["eigenprune-iterative"]
    assert it["config"]["p"] == one["config"]["p"] and it["config"]["n_frozen"] == one["config"]["n_frozen"]
    assert it["dev"] == one["dev"] and it["test"] == one["test"]
    assert [r["dev_acc"] for r in it["runs"]] == [r["dev_acc"] for r in one["extra"]["sweep"]]


def test_rounds_run_and_the_saved_edit_reloads(setup, tmp_path):
    model_dir, task = setup
    rows = compare(setup, tmp_path / "c", "--methods", "eigenprune-iterative", "--set",
                   "eigenprune-iterative.steps=1,2")
    row = rows["eigenprune-iterative"]
    assert [(r["p"], r["steps"]) for r in row["runs"]] == [(0.1, 1), (0.1, 2), (0.5, 1), (0.5, 2)]
    assert row["dev_evaluations"] == 5
    if row["saved_edit"] is None:
        pytest.skip("the base model won on dev here; nothing to reload")
    model, tok = load_model(str(model_dir))
    apply_saved_edit(model, tmp_path / "c" / row["saved_edit"])
    cfg = RunConfig(task=str(task), model=str(model_dir), limit=12, split_seed=2, n_boot=50)
    harness = Harness(model, tok, split_task(load_task(str(task)), 0.2, 2, 12), "choice", cfg, quiet=True)
    assert harness.evaluate("dev").double().mean().item() == pytest.approx(row["dev"]["acc"])
    assert torch.equal(harness.evaluate("test").double().mean(), torch.tensor(row["test"]["acc"], dtype=torch.float64))
