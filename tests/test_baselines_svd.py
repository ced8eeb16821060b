"""Baselines that cut singular components (LASER, SVD clipping, the random and smallest controls) and
eigenprune as a method: identities, exact truncation, seeding, dev-only choices, saved edits that reload."""


import pytest
import torch
from helpers import sensitive, write_task

from eigenprune.core.batching import Example
from eigenprune.core.errors import UsageError
from eigenprune.edits.artifact import apply_saved_edit
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import FreezeConfig, applied, remove_edit
from eigenprune.edits.scoring import ScoreConfig
from eigenprune.edits.targets import find_targets, target_weight, weight_view
from eigenprune.evaluation.splits import split_task
from eigenprune.evaluation.tasks import load_task
from eigenprune.methods.base import best_on_dev
from eigenprune.methods.controls import random_components, random_edit, run_random, run_smallest, smallest_edit
from eigenprune.methods.eigenprune import run_eigenprune
from eigenprune.methods.laser import LaserConfig, kept_rank, run_laser, search_layers, truncation_edit
from eigenprune.methods.svd_clip import (
    ClipConfig,
    draw_demonstrations,
    icl_harness,
    run_svd_clip,
    with_demonstrations,
)
from eigenprune.protocol.config import RunConfig
from eigenprune.protocol.harness import Harness

IDS = torch.tensor([[0, 17, 40, 99, 5, 230, 12, 7]])  # (1, pos)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    task = write_task(tmp_path_factory.mktemp("task") / "sums.jsonl")
    model, tok = sensitive()
    cfg = RunConfig(task=str(task), model="tiny-gpt2", targets="all", p=[0.1, 0.3, 0.5], split_seed=2,
                    score=ScoreConfig(partners=2), n_boot=50,
                    select="accuracy")  # eigenprune chooses p = 0.5 on dev, not the base (1se would keep it)
    return Harness(model, tok, split_task(load_task(str(task)), 0.2, 2, 12), "choice", cfg, quiet=True)


@pytest.fixture(scope="module")
def results(harness):
    """Each method once, with small grids; random with frozen components even if eigenprune chose p = 0."""
    eigen = run_eigenprune(harness)
    run = eigen.score_run
    return {
        "eigenprune": eigen,
        "random": run_random(harness, run, n_frozen=6, seeds=1),
        "smallest": run_smallest(harness, run, [0.1, 0.3]),
        "laser": run_laser(harness, LaserConfig(kinds=("mlp-in", "mlp-out"), keep=(0.5, 0.1))),
        "svd-clip": run_svd_clip(harness, ClipConfig(demos=2, keep=(1.0, 0.5, 0.1), groups=("mlp",))),
    }


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def effective_weight(module, in_features: int) -> torch.Tensor:
    """(out, in) weight a (wrapped) linear layer applies, read off from identity inputs."""
    with torch.no_grad():
        eye = torch.eye(in_features)  # (in, in)
        return (module(eye) - module(torch.zeros(1, in_features))).t()  # (out, in)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_keeping_every_component_is_the_identity(arch):
    model, _ = sensitive(arch)
    targets = find_targets(model, "all")
    comps = decompose_targets(model, targets)
    edit = truncation_edit(targets, comps, 1.0)
    want = logits(model)
    with applied(model, edit):
        assert edit.n_frozen == 0
        torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)


TRUNCATIONS = [("gpt2", "key", 0.5), ("gpt2", "mlp-in", 0.25), ("gpt2", "attn-out", 0.01),
               ("llama", "mlp-out", 0.1), ("llama", "query", 0.9), ("llama", "value", 0.5)]


@pytest.mark.parametrize("arch,kind,keep", TRUNCATIONS)
def test_laser_weight_is_the_truncated_svd(arch, kind, keep):
    model, _ = sensitive(arch)
    target = [t for t in find_targets(model, kind) if t.layer == 1][0]
    original = weight_view(model.get_submodule(target.module_name)).detach().clone()  # (out, in)
    U, S, Vh = torch.linalg.svd(target_weight(model, target).float(), full_matrices=False)
    k = kept_rank(len(S), keep)
    edit = truncation_edit([target], decompose_targets(model, [target]), keep)
    with applied(model, edit):
        got = effective_weight(model.get_submodule(target.module_name), target.in_features)
    lo, hi = target.rows
    torch.testing.assert_close(got[lo:hi], (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([got[:lo], got[hi:]]), torch.cat([original[:lo], original[hi:]]),
                               atol=1e-5, rtol=1e-4)  # a fused projection's other slices are untouched
    assert edit.n_frozen == len(S) - k


def test_zero_components_is_the_identity(harness, results):
    run, model = results["eigenprune"].score_run, harness.model
    want = logits(model)
    for edit in (random_edit(run, 0, 3, FreezeConfig(bias="position")),
                 smallest_edit(run, FreezeConfig(p=0.0, bias="constant"))):
        with applied(model, edit):
            assert edit.n_frozen == 0
            assert torch.equal(logits(model), want)


@pytest.mark.parametrize("n,seed,other", [(1, 0, 1), (6, 0, 1), (20, 7, 8)])
def test_random_control_is_seeded(results, n, seed, other):
    run = results["eigenprune"].score_run
    first, again, different = (random_components(run, n, s) for s in (seed, seed, other))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], different[k]) for k in first)
    assert sum(len(v) for v in first.values()) == n
    for t in run.targets:
        idx = first[t.name]
        assert len(set(idx.tolist())) == len(idx) and all(0 <= i < t.n_components for i in idx.tolist())


def test_random_control_with_nothing_frozen_is_the_base(harness, results):
    result = run_random(harness, results["eigenprune"].score_run, n_frozen=0, seeds=3)
    assert "identity" in result.extra and result.changed_params == 0
    assert torch.equal(result.dev, harness.evaluate("dev").float())
    assert [r["seed"] for r in result.runs] == [0, 1, 2]


@pytest.mark.parametrize("scope", ["global", "per-target"])
def test_smallest_freezes_the_smallest_singular_values(results, scope):
    run = results["eigenprune"].score_run
    edit = smallest_edit(run, FreezeConfig(p=0.25, scope=scope, bias="none"))
    assert edit.n_frozen > 0
    if scope == "per-target":  # S is descending, so the smallest are the last indices
        for t in run.targets:
            n = t.n_components
            assert torch.equal(edit.removed[t.name], torch.arange(n - int(0.25 * n), n))
    else:
        frozen = torch.cat([run.components[n].S[i] for n, i in edit.removed.items()])
        kept = torch.cat([run.components[n].S[[j for j in range(len(run.components[n].S)) if j not in i.tolist()]]
                          for n, i in edit.removed.items()])
        assert frozen.max() <= kept.min()


def test_demonstrations_are_prepended_the_same_way_to_every_prompt():
    train = [Example(f"{i} + 1 =", f" {i + 1}") for i in range(10)]
    demos = draw_demonstrations(train, 2, seed=3)
    assert demos == draw_demonstrations(train, 2, seed=3) != draw_demonstrations(train, 2, seed=4)
    shown = with_demonstrations([Example("7 + 2 =", " 9", None, None)], demos)
    assert shown == [Example(f"{demos[0].prompt}{demos[0].answer}\n\n{demos[1].prompt}{demos[1].answer}\n\n7 + 2 =",
                             " 9")]
    with pytest.raises(UsageError, match="needs 11 demonstrations"):
        draw_demonstrations(train, 11, seed=0)


def test_svd_clip_keeping_everything_is_icl_only(harness, results):
    clip = results["svd-clip"]
    icl = icl_harness(harness, draw_demonstrations(harness.splits.train, 2, 0))
    icl_dev = icl.evaluate("dev")
    targets = find_targets(harness.model, r"mlp\.c_fc$")
    with applied(harness.model, truncation_edit(targets, decompose_targets(harness.model, targets), 1.0)):
        assert torch.equal(icl.evaluate("dev"), icl_dev)
    assert clip.extra["icl_only"]["dev"]["acc"] == pytest.approx(float(icl_dev.float().mean()))
    only = run_svd_clip(harness, ClipConfig(demos=2, keep=(1.0,)))
    assert only.config["icl_only_chosen"] and torch.equal(only.dev, icl_dev) and only.dev_evaluations == 1


class InvertedTest(Harness):
    """The same harness, except that every test answer is judged the opposite way."""

    def evaluate(self, split):
        correct = super().evaluate(split)
        return ~correct if split == "test" else correct


@pytest.mark.parametrize("method", ["eigenprune", "smallest", "laser", "svd-clip"])
def test_choices_do_not_depend_on_test(harness, results, method):
    flipped = InvertedTest(harness.model, harness.tokenizer, harness.splits, harness.mode, harness.config, True)
    run = results["eigenprune"].score_run
    again = {"eigenprune": lambda: run_eigenprune(flipped),
             "smallest": lambda: run_smallest(flipped, run, [0.1, 0.3]),
             "laser": lambda: run_laser(flipped, LaserConfig(kinds=("mlp-in", "mlp-out"), keep=(0.5, 0.1))),
             "svd-clip": lambda: run_svd_clip(flipped, ClipConfig(demos=2, keep=(1.0, 0.5, 0.1), groups=("mlp",)))}
    other = again[method]()
    assert other.config == results[method].config and torch.equal(other.dev, results[method].dev)
    assert torch.equal(other.test, ~results[method].test)


def test_methods_count_their_dev_evaluations(harness, results):
    assert results["eigenprune"].dev_evaluations == 1 + len(harness.config.p)
    assert results["eigenprune"].config["p"] == 0.5 and results["eigenprune"].changed_params > 0
    assert results["smallest"].dev_evaluations == 3
    assert results["laser"].dev_evaluations == 1 + 2 * 2 * 2  # base + layers x kinds x fractions
    assert results["svd-clip"].dev_evaluations == 1 + 2 * 2  # ICL only + layers x fractions
    assert results["random"].dev_evaluations == 0
    assert any(row["dev_acc"] != results["laser"].extra["sweep"][0]["dev_acc"]
               for row in results["laser"].extra["sweep"])  # the grid really moves the tiny model


@pytest.mark.parametrize("method", ["eigenprune", "random", "smallest", "laser", "svd-clip"])
def test_saved_edit_reloads_with_the_same_dev_answers(harness, results, method, tmp_path):
    result = results[method]
    result.save(tmp_path / "edit")
    fresh, tok = sensitive()
    _, meta = apply_saved_edit(fresh, tmp_path / "edit")
    assert meta["method"] == method
    splits = harness.splits
    if method == "svd-clip":
        splits = icl_harness(harness, draw_demonstrations(splits.train, 2, 0)).splits
    dev = Harness(fresh, tok, splits, harness.mode, harness.config, True).evaluate("dev")
    assert torch.equal(dev.float(), result.dev.float())
    remove_edit(fresh)


def test_layer_budget_and_validation():
    assert search_layers(list(range(30)), LaserConfig()) == [0, 8, 16, 24, 26, 27, 28, 29]
    assert search_layers(list(range(30)), LaserConfig(last=2, stride=0)) == [28, 29]
    assert search_layers(list(range(4)), LaserConfig(layers=(3, 1))) == [1, 3]
    with pytest.raises(UsageError, match="do not exist"):
        search_layers(list(range(4)), LaserConfig(layers=(7,)))
    assert best_on_dev(0.5, [0.5, 0.6, 0.6]) == 1 and best_on_dev(0.7, [0.5]) == -1
    for make, field in ((lambda: LaserConfig(kinds=("all",)), "kinds"), (lambda: LaserConfig(keep=(0.0,)), "keep"),
                        (lambda: LaserConfig(last=0, stride=0), "last"), (lambda: ClipConfig(groups=("x",)), "groups"),
                        (lambda: ClipConfig(demos=-1), "demos"), (lambda: ClipConfig(layers=(-1,)), "layers")):
        with pytest.raises(ValueError, match=field):
            make()


@pytest.mark.parametrize("dev_seeds", [1, 2])
def test_random_control_evaluates_test_for_every_seed_and_dev_for_the_first(harness, results, monkeypatch, dev_seeds):
    """Nothing is chosen on dev, so only the first `dev_seeds` draws are evaluated there; test gets every draw, and
    each draw's dev correctness is its own edit's (the mean over those draws)."""
    import eigenprune.methods.controls as controls

    calls, real = [], controls.evaluate_edit
    monkeypatch.setattr(controls, "evaluate_edit", lambda h, e, split: calls.append(split) or real(h, e, split))
    result = run_random(harness, results["eigenprune"].score_run, n_frozen=6, seeds=3, dev_seeds=dev_seeds)
    assert calls.count("test") == 3 and calls.count("dev") == dev_seeds
    assert [r["dev_acc"] is None for r in result.runs] == [False] * dev_seeds + [True] * (3 - dev_seeds)
    run = results["eigenprune"].score_run
    each = []
    for s in range(dev_seeds):
        with applied(harness.model, random_edit(run, 6, s, harness.config.freeze_at(0.0))):
            each.append(harness.evaluate("dev").float())
    assert torch.allclose(result.dev, torch.stack(each).mean(0))
    assert result.extra["_test_seeds"].shape[0] == 3
