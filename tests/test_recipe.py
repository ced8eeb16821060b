"""The released recipe as baselines (`finetune`, `released-recipe`, `first-layers`, roll pairing) on tiny in-code
models: the fine-tune gives the model back bit for bit, is seeded and trains once for every method that shares
its settings; roll-pairing scores are exactly 0 at batch size 1 and equal a direct computation otherwise; at
batch size 1 the recipe freezes every key component of the first fifth of the layers, as `first-layers` does;
bad settings are one line."""

import json

import pytest
import torch
from conftest import _randomize_biases, make_tokenizer
from helpers import EXAMPLES, SCALE, sensitive, write_task
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from eigenprune.cli import main
from eigenprune.core.batching import batch_nll, collate, encode
from eigenprune.core.hooks import capture_io
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import lowest_fraction
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets
from eigenprune.evaluation import tasks
from eigenprune.evaluation.splits import split_task
from eigenprune.methods import training as ft
from eigenprune.methods.roll_pairing import roll_scores
from eigenprune.protocol.config import RunConfig
from eigenprune.protocol.harness import Harness


def five_layers(arch: str):
    """A tiny model with 5 layers, so that a fifth of them is one layer; block weights scaled as `sensitive`."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=5, n_embd=32, n_head=2, vocab_size=320, n_positions=256,
                                           bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=5, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                             max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                                             pad_token_id=1))
    _randomize_biases(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(k in name for k in ("attn", "mlp")):
                param.mul_(SCALE)
    return model.eval(), make_tokenizer("llama" if arch == "llama" else "gpt2")


def harness_for(model, tok) -> Harness:
    splits = split_task(tasks.load_task("int-mult"), limit=8)
    cfg = RunConfig(task="int-mult", model="tiny", n_boot=20)
    return Harness(model, tok, splits, "next-token", cfg, quiet=True)


def snapshot(model) -> dict:
    params = dict(model.named_parameters())
    return {"values": {n: p.detach().clone() for n, p in params.items()},
            "flags": {n: p.requires_grad for n, p in params.items()},
            "grads": {n: p.grad for n, p in params.items()}, "training": model.training}


# ------------------------------------------------------------------ finetune
def test_finetune_gives_the_model_back_bit_for_bit():
    model, tok = sensitive("llama")
    params = dict(model.named_parameters())
    params["model.norm.weight"].requires_grad_(False)
    params["lm_head.weight"].grad = torch.ones_like(params["lm_head.weight"])  # a gradient the caller left there
    model.train()
    before = snapshot(model)
    stage = ft.finetune_stage(harness_for(model, tok), ft.FinetuneConfig())
    after = snapshot(model)
    assert all(torch.equal(after["values"][n], v) for n, v in before["values"].items())
    assert after["flags"] == before["flags"] and after["training"] and before["training"]
    assert all(after["grads"][n] is g for n, g in before["grads"].items())
    # it did train, every parameter it changed is in the stage, and the count is of changed entries
    assert "model.norm.weight" in stage.weights  # frozen by the caller, trained all the same: a full fine-tune
    assert all(not torch.equal(w, before["values"][n]) for n, w in stage.weights.items())
    assert stage.result.changed_params == sum(int((w != before["values"][n]).sum()) for n, w in stage.weights.items())


def test_finetune_is_seeded_and_its_save_reloads(tmp_path):
    model, tok = sensitive("gpt2")
    harness = harness_for(model, tok)
    first, again = (ft.finetune_stage(harness, ft.FinetuneConfig(lr=1e-3)) for _ in range(2))
    other = ft.finetune_stage(harness, ft.FinetuneConfig(lr=1e-3, seed=7))
    assert first.weights.keys() == again.weights.keys()
    assert all(torch.equal(first.weights[n], again.weights[n]) for n in first.weights)
    assert any(not torch.equal(first.weights[n], other.weights[n]) for n in first.weights)
    first.result.save(tmp_path / "ft")
    fresh, _ = sensitive("gpt2")
    ft.apply_saved_finetune(fresh, tmp_path / "ft")
    assert all(torch.equal(fresh.get_parameter(n), w) for n, w in first.weights.items())


def test_first_token_loss_is_the_released_loss():
    """`answer_tokens="first"`: the cross-entropy of the first answer token at the last prompt position."""
    model, tok = sensitive("llama")  # splits numbers into digits: multi-token answers
    encoded = encode(tok, EXAMPLES)
    assert any(len(e.answer_ids) > 1 for e in encoded)
    batch = collate(encoded, range(len(encoded)), tok.pad_token_id)
    with torch.no_grad():
        ours = batch_nll(model, ft.first_token_only(batch))  # (batch,)
        logits = model(**batch.model_inputs()).logits  # (batch, pos, vocab)
    last = batch.prompt_lengths - 1
    released = torch.nn.functional.cross_entropy(logits[torch.arange(len(encoded)), last],
                                                 torch.tensor([e.answer_ids[0] for e in encoded]), reduction="none")
    torch.testing.assert_close(ours, released)


# ------------------------------------------------------------------ roll pairing
def _setup(arch: str, per_head: bool = True):
    model, tok = sensitive(arch)
    targets = find_targets(model, "key", per_head=per_head)
    return model, tok, targets, decompose_targets(model, targets), encode(tok, EXAMPLES)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_roll_scores_are_exactly_zero_at_batch_size_one(arch):
    model, tok, targets, components, encoded = _setup(arch)
    scores = roll_scores(model, targets, components, encoded, tok.pad_token_id, batch_size=1)
    assert scores.n_pairs == len(encoded)
    for t in targets:
        assert torch.equal(scores.max[t.name], torch.zeros(t.n_components))
        assert torch.equal(scores.mean[t.name], torch.zeros(t.n_components))
    # the means it sums on the way are eigenprune's: x̄ per offset over every example
    reference = score(model, targets, components, encoded, tok.pad_token_id, ScoreConfig(batch_size=4), progress=False)
    assert scores.means.offset_min == reference.means.offset_min
    torch.testing.assert_close(scores.means.counts, reference.means.counts)
    for m, s in reference.means.sums.items():
        torch.testing.assert_close(scores.means.sums[m], s, rtol=1e-5, atol=1e-5)


def direct_roll_scores(model, targets, components, encoded, pad_id, batch_size):
    """ΔL_i(r) = Σ_t g_{r,t} · E_i (x_{r−1,t} − x_{r,t}), E_i = s_i u_i v_iᵀ built whole, positions matched by
    offset from the last prompt token one by one; max and mean over every pair of every batch."""
    effects = {t.name: [] for t in targets}
    modules = sorted({t.module_name for t in targets})
    for start in range(0, len(encoded), batch_size):
        index = list(range(start, min(start + batch_size, len(encoded))))
        batch = collate(encoded, index, pad_id)
        for p in model.parameters():
            p.requires_grad_(True)
        with capture_io(model, modules) as cap:
            batch_nll(model, batch).sum().backward()
        model.zero_grad()
        n = len(index)
        for t in targets:
            c = components[t.name]
            x, g = cap.inputs[t.module_name], cap.grads[t.module_name][..., t.rows[0]:t.rows[1]]
            for r in range(n):
                q = (r - 1) % n  # torch.roll(x, 1, dim=0): row r holds row r − 1
                row = torch.zeros(len(c.S))
                for pos in range(int(batch.attention_mask[r].sum())):
                    offset = pos - int(batch.prompt_lengths[r]) + 1
                    partner = offset + int(batch.prompt_lengths[q]) - 1
                    if not 0 <= partner < int(batch.attention_mask[q].sum()):
                        continue
                    dx = x[q, partner] - x[r, pos]
                    for i in range(len(c.S)):
                        E = c.S[i] * torch.outer(c.U[:, i], c.Vh[i])
                        row[i] += g[r, pos] @ (E @ dx)
                effects[t.name].append(row)
    stacked = {k: torch.stack(v) for k, v in effects.items()}
    return {k: v.max(0).values for k, v in stacked.items()}, {k: v.mean(0) for k, v in stacked.items()}


def test_roll_scores_equal_a_direct_computation_at_batch_size_three():
    model, tok, targets, components, encoded = _setup("gpt2")
    scores = roll_scores(model, targets, components, encoded, tok.pad_token_id, batch_size=3)
    best, mean = direct_roll_scores(model, targets, components, encoded, tok.pad_token_id, 3)
    assert scores.n_pairs == len(encoded)
    for t in targets:
        assert scores.max[t.name].abs().max() > 0
        torch.testing.assert_close(scores.max[t.name], best[t.name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(scores.mean[t.name], mean[t.name], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the tie order
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("per_head", [True, False])
def test_all_zero_scores_freeze_every_key_component_of_the_first_fifth_of_the_layers(arch, per_head):
    model, _ = five_layers(arch)
    targets = find_targets(model, "key", per_head=per_head)
    removed = lowest_fraction({t.name: torch.zeros(t.n_components) for t in targets}, 0.2)
    for t in targets:
        expected = torch.arange(t.n_components) if t.layer == 0 else torch.arange(0)
        assert torch.equal(removed[t.name], expected), t.name


@pytest.fixture(scope="module")
def five_layer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    model, tok = five_layers("gpt2")
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", write_task(folder / "sums.jsonl")


ARGS = ["--limit", "12", "--split-seed", "2", "--p", "0.1,0.5", "--partners", "2", "--n-boot", "50", "--quiet"]


def test_the_recipe_freezes_the_first_fifth_of_the_layers_and_shares_one_fine_tune(five_layer_dir, tmp_path,
                                                                                   monkeypatch):
    model, task = five_layer_dir
    trainings = []
    plain = ft.train_full
    monkeypatch.setattr(ft, "train_full", lambda *a, **k: trainings.append(1) or plain(*a, **k))
    out = tmp_path / "c"
    code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, "--methods",
                 "finetune,finetune+eigenprune,released-recipe,first-layers,finetune+first-layers", "--out", str(out)])
    assert code == 0 and len(trainings) == 1
    rows = json.loads((out / "comparison.json").read_text())["methods"]
    layer0 = {"0": [32, 32], **{str(layer): [0, 32] for layer in range(1, 5)}}  # 2 heads x 16 components a layer
    for name in ("released-recipe", "first-layers", "finetune+first-layers"):
        assert rows[name]["extra"]["frozen_by_layer"] == layer0, name
        assert rows[name]["dev_evaluations"] == 0
    assert rows["released-recipe"]["extra"]["all_scores_zero"]
    for name in ("finetune+eigenprune", "released-recipe", "finetune+first-layers"):
        assert rows[name]["extra"]["stage"]["test_acc"] == rows["finetune"]["test"]["acc"], name
    # at batch size 1 the recipe is the fine-tune followed by first-layers
    assert rows["released-recipe"]["test"] == rows["finetune+first-layers"]["test"]
    saved = out / "edits" / "released-recipe"
    assert (saved / "stage" / ft.FINETUNE_JSON).is_file() and (saved / "edit").is_dir()
    fresh, _ = five_layers("gpt2")
    ft.apply_saved_finetune(fresh, saved)  # the fine-tuned weights, then the edit made for them
    assert sum("FrozenLinear" in type(m).__name__ for m in fresh.modules()) == 1  # layer 0's c_attn


def test_different_fine_tune_settings_train_twice(five_layer_dir, tmp_path, monkeypatch):
    model, task = five_layer_dir
    trainings = []
    plain = ft.train_full
    monkeypatch.setattr(ft, "train_full", lambda *a, **k: trainings.append(1) or plain(*a, **k))
    code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, "--methods", "finetune,released-recipe",
                 "--set", "released-recipe.lr=0.02", "--out", str(tmp_path / "c")])
    assert code == 0 and len(trainings) == 2


@pytest.mark.parametrize("args, message", [
    (["--methods", "finetune", "--set", "finetune.lr=abc"], "lr must be a number"),
    (["--methods", "finetune", "--set", "finetune.optimizer=rmsprop"], "optimizer must be one of"),
    (["--methods", "finetune", "--set", "finetune.colour=red"], "unknown setting 'colour'"),
    (["--methods", "released-recipe", "--set", "released-recipe.pairing=neighbour"], "pairing must be one of"),
    (["--methods", "released-recipe", "--set", "released-recipe.score_batch_size=one"], "must be an integer"),
    (["--methods", "first-layers", "--set", "first-layers.p=1.5"], "p must be in [0, 1)"),
    (["--methods", "finetune+nothing"], "unknown method 'nothing'"),
    (["--methods", "released-recipe+eigenprune"], "not a learned stage"),
    (["--methods", "eigenprune+finetune"], "not a learned stage"),
])
def test_bad_input_is_one_line_and_writes_nothing(five_layer_dir, tmp_path, capsys, args, message):
    model, task = five_layer_dir
    code = main(["compare", "--model", str(model), "--task", str(task), *ARGS, *args, "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_last_position_loss_is_the_released_setting_and_differs_from_all_tokens():
    """`answer_tokens="last"` (the released `logits[:, -1, :]` of the prompt) trains exactly as "first" did, and
    not as "all" does where answers have several tokens."""
    model, tok = sensitive("llama")
    harness = harness_for(model, tok)
    assert any(len(e.answer_ids) > 1 for e in encode(tok, harness.splits.train))
    last, first, every = (ft.finetune_stage(harness, ft.FinetuneConfig(lr=1e-3, answer_tokens=a)).weights
                          for a in ("last", "first", "all"))
    assert all(torch.equal(last[n], first[n]) for n in last)
    assert any(not torch.equal(last[n], every[n]) for n in last)
    with pytest.raises(ValueError, match="answer_tokens must be one of all, last, first"):
        ft.FinetuneConfig(answer_tokens="middle")
