"""Freezing: identity at p = 0, the frozen-everything limit, offsets under teacher forcing and generate()."""

import pytest
import torch
from conftest import build
from helpers import EXAMPLES

from eigenprune.core.batching import collate, encode
from eigenprune.core.positions import prompt_lengths
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import (
    FreezeConfig,
    FrozenLinear,
    applied,
    apply_edit,
    build_edit,
    lowest_fraction,
    make_edit,
    remove_edit,
)
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets


def scored(arch, spec="key", per_head=False):
    model, tok = build(arch)
    targets = find_targets(model, spec, per_head=per_head)
    comps = decompose_targets(model, targets)
    encoded = encode(tok, EXAMPLES)
    scores = score(model, targets, comps, encoded, tok.pad_token_id, ScoreConfig(partners="all"), progress=False)
    return model, tok, targets, comps, encoded, scores


def logits_of(model, batch):
    with torch.no_grad(), prompt_lengths(model, batch.prompt_lengths):
        return model(**batch.model_inputs()).logits


def test_p_zero_is_the_identity(arch):
    model, tok, targets, comps, encoded, scores = scored(arch, "all")
    batch = collate(encoded, range(len(encoded)), tok.pad_token_id)
    before = logits_of(model, batch)
    edit = make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.0))
    assert edit.n_frozen == 0
    apply_edit(model, edit)
    torch.testing.assert_close(logits_of(model, batch), before, atol=1e-5, rtol=0)
    remove_edit(model)


def test_apply_then_remove_restores_the_model(arch):
    model, tok, targets, comps, encoded, scores = scored(arch)
    batch = collate(encoded, range(len(encoded)), tok.pad_token_id)
    before = logits_of(model, batch)
    apply_edit(model, make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.3)))
    after = logits_of(model, batch)
    assert not torch.allclose(after, before)
    remove_edit(model)
    assert not any(isinstance(m, FrozenLinear) for m in model.modules())
    assert torch.equal(logits_of(model, batch), before)


@pytest.mark.parametrize("p,scope,expected", [
    (0.0, "global", [0, 0]), (0.5, "global", None), (0.5, "per-target", [2, 2]), (0.99, "per-target", [3, 3]),
])
def test_select_counts_and_picks_the_lowest(p, scope, expected):
    scores = {"a": torch.tensor([0.5, -1.0, 2.0, 0.1]), "b": torch.tensor([3.0, -2.0, 0.0, 1.0])}
    chosen = lowest_fraction(scores, p, scope)
    if expected is not None:
        assert [len(chosen["a"]), len(chosen["b"])] == expected
    if (p, scope) == (0.5, "global"):
        assert chosen["a"].tolist() == [1, 3] and chosen["b"].tolist() == [1, 2]
    if (p, scope) == (0.5, "per-target"):
        assert chosen["a"].tolist() == [1, 3] and chosen["b"].tolist() == [1, 2]


@pytest.mark.parametrize("bias", ["position", "constant"])
def test_freezing_every_component_leaves_only_the_bias_table(arch, bias):
    model, tok, targets, comps, encoded, scores = scored(arch)
    target = targets[0]
    removed = {target.name: torch.arange(target.n_components)}
    edit = build_edit(targets, comps, removed, scores.means, FreezeConfig(bias=bias))
    apply_edit(model, edit)
    layer = model.get_submodule(target.module_name)
    outputs = []
    layer.register_forward_hook(lambda m, a, out: outputs.append(out))
    batch = collate(encoded, range(len(encoded)), tok.pad_token_id)
    logits_of(model, batch)
    base = layer.base_layer
    x0 = torch.zeros(1, 1, edit.factors[target.name][2].shape[1])
    base_bias = base(x0)[0, 0]  # the layer's own bias (zero weight contribution at x = 0)
    rows = slice(*target.rows)
    table = edit.bias_tables[target.module_name]
    slot = batch.offsets - edit.offset_min
    slot = torch.where((slot >= 0) & (slot < len(table) - 1), slot, len(table) - 1) if bias == "position" \
        else torch.zeros_like(slot)
    want = base_bias[rows] + table[slot][..., rows]  # (batch, pos, rows)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(outputs[0][..., rows][real], want[real], atol=1e-5, rtol=1e-4)


def test_position_bias_differs_by_offset_and_constant_bias_does_not():
    model, tok, targets, comps, encoded, scores = scored("llama")
    pos = make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.5))
    const = make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.5, bias="constant"))
    module = pos.modules[0]
    assert pos.bias_tables[module].shape[0] == scores.means.counts.shape[0] + 1
    assert const.bias_tables[module].shape[0] == 1
    torch.testing.assert_close(const.bias_tables[module][0], pos.bias_tables[module][-1])


def test_generate_with_kv_cache_matches_without_and_teacher_forcing(arch):
    model, tok, targets, comps, encoded, scores = scored(arch)
    apply_edit(model, make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.4)))
    tok.padding_side = "left"
    prompts = ["3 + 4 =", "The premise entails that"]
    inputs = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # greedy tokens are the argmax of a teacher-forced pass over the generated text
    width = inputs["input_ids"].shape[1]
    mask = torch.cat([inputs["attention_mask"], torch.ones(len(prompts), 5, dtype=torch.long)], 1)
    lengths = inputs["attention_mask"].sum(1)
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), prompt_lengths(model, lengths):
        logits = model(input_ids=cached, attention_mask=mask, position_ids=position_ids).logits
    assert torch.equal(logits[:, width - 1 : -1].argmax(-1), cached[:, width:])


def test_edit_refuses_to_stack():
    from eigenprune.core.errors import UsageError

    model, tok, targets, comps, encoded, scores = scored("gpt2")
    edit = make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.2))
    apply_edit(model, edit)
    with pytest.raises(UsageError):
        apply_edit(model, edit)


@pytest.mark.parametrize("field,value", [("p", 1.0), ("p", -0.1), ("scope", "layer"), ("bias", "zero")])
def test_freeze_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        FreezeConfig(**{field: value})


def test_bias_none_is_plain_truncation():
    model, tok, targets, comps, encoded, scores = scored("phi")
    edit = make_edit(targets, comps, scores.max, None, FreezeConfig(p=0.5, bias="none"))
    assert all(not table.any() for table in edit.bias_tables.values())
    target = targets[0]
    keep = torch.ones(target.n_components, dtype=torch.bool)
    keep[edit.removed[target.name]] = False
    with applied(model, edit):
        layer = model.get_submodule(target.module_name)
        x = torch.randn(2, 3, target.in_features)
        want = x @ comps[target.name].reconstruct(keep).t() + layer.base_layer.bias[slice(*target.rows)]
        torch.testing.assert_close(layer(x)[..., slice(*target.rows)], want, atol=1e-5, rtol=1e-4)
