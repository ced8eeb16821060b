"""Feature-space projection and LoRA baselines on tiny in-code models: the projection's maths and its
identity cases, the greedy dev search, save/reload round trips, training that lowers the loss and is
seeded, and a harness model left bit-identical after every method."""

import pytest
import torch
from conftest import build
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from eigenprune.core.batching import encode
from eigenprune.core.errors import UsageError
from eigenprune.core.hooks import capture_io
from eigenprune.edits.artifact import apply_saved_edit, load_edit
from eigenprune.edits.freeze import FrozenLinear, applied
from eigenprune.edits.targets import find_targets
from eigenprune.evaluation import tasks
from eigenprune.evaluation.splits import split_task
from eigenprune.methods import feature_space as fs
from eigenprune.methods import lora
from eigenprune.protocol.config import RunConfig
from eigenprune.protocol.harness import Harness

SPLITS = split_task(tasks.load_task("int-mult"), limit=8)
TEXTS = ["3 x 4 = 12", "19 x 7 = 133 and more", "0 x 0 ="]


def make_harness(arch: str, seed: int = 0) -> Harness:
    model, tok = build(arch, seed)
    cfg = RunConfig(task="int-mult", model=f"tiny-{arch}", p=[0.1, 0.3], n_boot=20)
    return Harness(model, tok, SPLITS, "next-token", cfg, quiet=True)


def logits(model, tok) -> torch.Tensor:
    inputs = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits  # (batch, pos, vocab)


def snapshot(model) -> dict:
    """Everything a method must give back: parameter values, requires_grad flags, module types, mode."""
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "types": [(n, type(m)) for n, m in model.named_modules()],
            "training": model.training, "attributes": set(vars(model))}


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    for key in ("flags", "types", "training", "attributes"):
        assert after[key] == before[key], key


# ------------------------------------------------------------------ feature-space projection
@pytest.mark.parametrize("arch, spec, keep, wraps", [
    ("llama", "mlp-out", lambda t: t.shape[0], False),  # every direction kept: nothing to wrap
    ("gpt2", "mlp-in", lambda t: t.in_features, True),  # outputs span at most d_in directions: exact
    ("llama", "mlp-in", lambda t: t.in_features, True),
])
def test_projection_keeping_every_used_direction_is_the_identity(arch, spec, keep, wraps):
    model, tok = build(arch)
    found = find_targets(model, spec)
    bases = fs.output_bases(model, tok, SPLITS.train, found)
    edit = fs.projection_edit(model, found, bases, {t.name: keep(t) for t in found})
    assert (edit.n_frozen > 0) == wraps
    before = logits(model, tok)
    with applied(model, edit):
        assert sum(isinstance(m, FrozenLinear) for m in model.modules()) == len(edit.modules)
        torch.testing.assert_close(logits(model, tok), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, spec", [("gpt2", "key"), ("phi", "mlp-out"), ("llama", "mlp-out"), ("llama", "key")])
def test_edit_is_the_explicit_projection(arch, spec):
    """y′ = P y + (I − P) ȳ on the target's rows; a fused module's other rows are untouched."""
    model, tok = build(arch)
    found = find_targets(model, spec)
    bases = fs.output_bases(model, tok, SPLITS.train, found)
    ranks = {t.name: bases[t.name].rank(0.5) for t in found}
    modules = sorted({t.module_name for t in found})
    with applied(model, fs.projection_edit(model, found, bases, ranks)), \
            capture_io(model, modules, grads=False) as captured:
        model(**tok(TEXTS, padding=True, return_tensors="pt"))
        for t in found:
            layer = model.get_submodule(t.module_name)
            x = captured.inputs[t.module_name]  # (batch, pos, d_in)
            with torch.no_grad():
                y, edited = layer.base_layer(x).double(), layer(x).double()  # (batch, pos, module_out)
            Q = bases[t.name].vectors[:, : ranks[t.name]]  # (d_out, r)
            P = Q @ Q.t()  # (d_out, d_out), symmetric
            mean = bases[t.name].mean  # (d_out,)
            expected = y[..., t.rows[0] : t.rows[1]] @ P + mean @ (torch.eye(len(mean), dtype=P.dtype) - P)
            torch.testing.assert_close(edited[..., t.rows[0] : t.rows[1]], expected, atol=1e-5, rtol=0)
            other = torch.ones(y.shape[-1], dtype=torch.bool)
            other[t.rows[0] : t.rows[1]] = False
            assert torch.equal(edited[..., other], y[..., other])


def test_output_statistics_skip_padding():
    model, tok = build("llama")
    found = find_targets(model, "key")
    padded = fs.output_bases(model, tok, SPLITS.train, found, batch_size=8)
    single = fs.output_bases(model, tok, SPLITS.train, found, batch_size=1)  # no padding at all
    assert padded[found[0].name].n_tokens == sum(len(e) for e in encode(tok, SPLITS.train))
    for t in found:  # the outputs are float32 (a batch's shape changes the matmul's rounding): 1e-6 relative;
        # a padding row counted in would move the mean by far more
        torch.testing.assert_close(padded[t.name].mean, single[t.name].mean, atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(padded[t.name].values, single[t.name].values, atol=1e-8, rtol=1e-5)


class Scripted(Harness):
    """Dev accuracies read from a script (k of 10 correct); records whether test saw an edited model."""

    def __init__(self, parent: Harness, dev_correct: list[int]) -> None:
        super().__init__(parent.model, parent.tokenizer, parent.splits, parent.mode, parent.config, True)
        self.script, self.tests = list(dev_correct), []

    def evaluate(self, split: str) -> torch.Tensor:
        if split == "test":
            self.tests.append(any(isinstance(m, FrozenLinear) for m in self.model.modules()))
            return torch.ones(4, dtype=torch.bool)
        self.dev_evaluations += 1
        return torch.arange(10) < self.script.pop(0)


@pytest.mark.parametrize("script, max_layers, given_base, chosen, accepted", [
    ([5, 5, 4, 6, 6], None, False, [(1, 0.5), (0, 0.25)], [True, False, True, True]),  # a drop ends the layer
    ([5, 6, 7, 5], None, False, [(1, 0.25)], [True, True, False]),  # below the best so far: rejected
    ([5, 4, 3], None, False, [], [False, False]),  # nothing holds dev: the base model, tested unedited
    ([4, 3], None, True, [], [False, False]),  # the caller's base numbers are used, not re-evaluated
    ([5, 5, 5], 1, False, [(1, 0.25)], [True, True]),  # budget: the last layer only
])
def test_greedy_search_keeps_only_changes_that_hold_dev(script, max_layers, given_base, chosen, accepted):
    harness = Scripted(make_harness("llama"), script)
    base = {"dev": torch.arange(10) < 5, "test": torch.zeros(4, dtype=torch.bool)} if given_base else None
    result = fs.run_feature_space(harness, "mlp-out", ranks=(0.25, 0.5), max_layers=max_layers, base=base)
    assert harness.script == []  # exactly the scripted evaluations, no more
    assert [tuple(c) for c in result.config["chosen"]] == chosen
    assert [r["accepted"] for r in result.runs] == accepted
    assert result.dev_evaluations == 1 + len(accepted)
    assert harness.tests == ([] if given_base else [bool(chosen)])
    assert (result.changed_params > 0) == bool(chosen)
    assert not any(isinstance(m, FrozenLinear) for m in harness.model.modules())


def test_feature_space_result_saves_and_reloads(tmp_path):
    harness = make_harness("gpt2")  # fused c_attn: the key slices, Conv1D, biases
    model, tok = harness.model, harness.tokenizer
    before = snapshot(model)
    result = fs.run_feature_space(harness, "key", ranks=(0.5,))
    assert_unchanged(model, before)
    assert result.dev_evaluations == 1 + len(result.runs)
    assert result.dev.shape == (len(SPLITS.dev),) and result.test.shape == (len(SPLITS.test),)
    result.save(tmp_path / "fs")
    edit, meta = load_edit(tmp_path / "fs")
    assert meta["method"] == "feature-space" and edit.config.bias == "constant"
    found = find_targets(model, "key")
    ranks = {name: r for c in result.extra["chosen_ranks"] for name, r in c["ranks"].items()}
    assert ranks and result.changed_params == sum(32 * 32 + 32 for name in ranks)  # rows × d_in + bias rows
    with applied(model, fs.projection_edit(model, found, fs.output_bases(model, tok, SPLITS.train, found), ranks)):
        expected = logits(model, tok)
    fresh, _ = build("gpt2")
    apply_saved_edit(fresh, tmp_path / "fs")
    torch.testing.assert_close(logits(fresh, tok), expected, atol=1e-6, rtol=0)
    other, _ = build("gpt2", seed=1)
    with pytest.raises(UsageError, match="other base weights"):
        apply_saved_edit(other, tmp_path / "fs")


def test_feature_space_rejects_bad_settings():
    harness = make_harness("llama")
    for kwargs in ({"ranks": (0.5, 1.5)}, {"ranks": ()}, {"max_layers": 0}):
        with pytest.raises(ValueError):
            fs.run_feature_space(harness, **kwargs)


# ------------------------------------------------------------------ LoRA
@pytest.mark.parametrize("kwargs, name", [
    ({"rank": 0}, "rank"), ({"steps": 0}, "steps"), ({"lr": 0.0}, "lr"), ({"dropout": 1.0}, "dropout"),
    ({"steps": 2, "checkpoints": 3}, "checkpoints"), ({"weight_decay": -1.0}, "weight_decay"),
])
def test_tune_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        lora.TuneConfig(**kwargs)


def test_checkpoints_are_evenly_spaced_and_unknown_settings_are_refused():
    assert lora.TuneConfig(steps=300).checkpoint_steps == [100, 200, 300]
    assert lora.TuneConfig(steps=10, checkpoints=1).checkpoint_steps == [10]
    with pytest.raises(UsageError, match="stepz"):
        lora.run_lora(make_harness("llama"), stepz=3)


@pytest.mark.parametrize("arch, whole, lora_params", [
    ("gpt2", ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"], 2 * 8 * (32 + 96)),
    ("llama", [], 2 * 8 * (32 + 16)),  # k_proj: 2 kv heads of 8
])
def test_lora_trains_is_evaluated_adapted_and_gives_the_model_back(arch, whole, lora_params):
    harness = make_harness(arch)
    before = snapshot(harness.model)
    seen, evaluate = [], harness.evaluate

    def spy(split):
        seen.append((split, any(isinstance(m, BaseTunerLayer) for m in harness.model.modules())))
        return evaluate(split)

    harness.evaluate = spy
    result = lora.run_lora(harness, steps=30, lr=1e-2, checkpoints=3)
    curve = result.extra["loss_curve"]
    assert [row["step"] for row in curve] == [10, 20, 30]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert seen == [("dev", True)] * 3 + [("test", True)]  # every evaluation saw the adapters
    assert result.dev_evaluations == 3 and result.config["chosen_step"] in (10, 20, 30)
    assert result.dev.shape == (len(SPLITS.dev),) and result.test.shape == (len(SPLITS.test),)
    assert result.extra["whole_modules"] == whole and result.extra["lora_params"] == lora_params
    assert_unchanged(harness.model, before)


def test_lora_is_seeded(tmp_path):
    results = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        results[name] = lora.run_lora(make_harness("llama"), steps=10, checkpoints=1, seed=seed)
        results[name].save(tmp_path / name)
    adapters = {n: load_file(tmp_path / n / "adapter_model.safetensors") for n in results}
    assert results["a"].extra["loss_curve"] == results["b"].extra["loss_curve"]
    assert adapters["a"].keys() == adapters["b"].keys()
    assert all(torch.equal(adapters["a"][k], adapters["b"][k]) for k in adapters["a"])
    assert results["a"].extra["loss_curve"] != results["c"].extra["loss_curve"]
    assert not all(torch.equal(adapters["a"][k], adapters["c"][k]) for k in adapters["a"])


def test_saved_lora_reloads_onto_a_fresh_model(tmp_path):
    result = lora.run_lora(make_harness("llama"), steps=10, checkpoints=1)
    result.save(tmp_path / "lora")
    model, tok = build("llama")
    config = lora.TuneConfig(targets="key", steps=10, checkpoints=1)
    modules, _ = lora.lora_modules(model, "key")
    with lora.lora_attached(model, modules, config):
        lora.train_lora(model, tok, SPLITS.train, config)
        trained = logits(model, tok)
    assert not torch.allclose(trained, logits(model, tok))
    for merge, atol in ((False, 1e-6), (True, 1e-5)):
        fresh, _ = build("llama")
        lora.apply_saved_lora(fresh, tmp_path / "lora", merge=merge)
        torch.testing.assert_close(logits(fresh, tok), trained, atol=atol, rtol=0)
    other, _ = build("llama", seed=1)
    with pytest.raises(UsageError, match="other base weights"):
        lora.apply_saved_lora(other, tmp_path / "lora")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_then_eigenprune_gives_the_model_back_and_reloads(arch, tmp_path):
    harness = make_harness(arch)
    before = snapshot(harness.model)
    tuned, pruned = lora.run_lora_and_eigenprune(harness, steps=20, lr=1e-2, checkpoints=2)
    assert_unchanged(harness.model, before)
    assert (tuned.method, pruned.method) == ("lora", "lora+eigenprune")
    stage = pruned.extra["stage"]
    assert stage["method"] == "lora" and stage["wall_s"] == tuned.wall_s
    assert stage["dev_acc"] == float(tuned.dev.double().mean())
    assert stage["test_acc"] == float(tuned.test.double().mean())
    assert pruned.dev_evaluations == 2 + 1 + len(harness.config.p)  # checkpoints, fine-tuned model, each p
    assert pruned.config["p"] in (0.0, *harness.config.p) and pruned.config["chosen_step"] in (10, 20)
    pruned.save(tmp_path / "lp")
    assert {p.name for p in (tmp_path / "lp").iterdir()} == {"adapter", "edit", "eigenprune_lora.json"}
    fresh, tok = build(arch)
    fresh = lora.apply_saved_lora(fresh, tmp_path / "lp")  # merges, then checks the edit's fingerprint
    again = Harness(fresh, tok, SPLITS, "next-token", harness.config, quiet=True)
    assert torch.equal(again.evaluate("dev"), pruned.dev) and torch.equal(again.evaluate("test"), pruned.test)
