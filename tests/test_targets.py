"""Target selection by name patterns alone, across Conv1D/fused (GPT-2), GQA (Llama) and biased (Phi) models."""

import pytest
import torch
from conftest import build

from eigenprune.core.errors import UsageError
from eigenprune.edits.targets import describe, find_targets, parse_layers, target_weight, weight_view


@pytest.mark.parametrize("arch, spec, names, shape", [
    ("gpt2", "key", ["transformer.h.0.attn.c_attn:k", "transformer.h.1.attn.c_attn:k"], (32, 32)),
    ("gpt2", "value", ["transformer.h.0.attn.c_attn:v", "transformer.h.1.attn.c_attn:v"], (32, 32)),
    ("gpt2", "mlp-out", ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"], (32, 128)),
    ("gpt2", "attn-out", ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"], (32, 32)),
    ("llama", "key", ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"], (16, 32)),
    ("llama", "query", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"], (32, 32)),
    ("phi", "attn-out", ["model.layers.0.self_attn.dense", "model.layers.1.self_attn.dense"], (32, 32)),
    ("phi", "mlp-in", ["model.layers.0.mlp.fc1", "model.layers.1.mlp.fc1"], (64, 32)),
])
def test_presets(arch, spec, names, shape):
    model, _ = build(arch)
    found = find_targets(model, spec)
    assert [t.name for t in found] == names
    assert all(t.shape == shape for t in found)


def test_all_covers_every_block_matrix_but_not_the_lm_head():
    model, _ = build("llama")
    names = [t.name for t in find_targets(model, "all")]
    assert len(names) == 14 and not any("lm_head" in n for n in names)


def test_fused_key_slice_is_the_middle_third_of_the_conv1d_weight():
    model, _ = build("gpt2")
    target = find_targets(model, "key", layers="1")[0]
    attn = model.get_submodule(target.module_name)
    assert torch.equal(target_weight(model, target), attn.weight.t()[32:64])
    assert weight_view(attn).shape == (96, 32)


@pytest.mark.parametrize("arch, heads, rows", [("gpt2", 2, 16), ("llama", 2, 8), ("phi", 4, 8)])
def test_per_head_splits_rows(arch, heads, rows):
    model, _ = build(arch)
    found = find_targets(model, "key", layers="0", per_head=True)
    assert len(found) == heads and all(t.shape[0] == rows for t in found)
    assert found[0].name.endswith(":h0") and found[-1].rows[1] - found[0].rows[0] == heads * rows


def test_regex_and_layers():
    model, _ = build("llama")
    assert [t.name for t in find_targets(model, r"mlp\.(up|down)_proj$", layers="1-")] == [
        "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    assert "2 targets, 32 components" in describe(find_targets(model, "key"))


@pytest.mark.parametrize("text, expected", [("3", range(3, 4)), ("2-5", range(2, 6)), ("-1", range(0, 2)),
                                            (None, None)])
def test_parse_layers(text, expected):
    assert parse_layers(text) == expected


def test_open_layer_range_reaches_any_depth():
    assert parse_layers("4-")[0] == 4 and 1000 in parse_layers("4-")


@pytest.mark.parametrize("spec, kwargs, message", [
    ("nothing_matches", {}, "matches no linear module"),
    ("(", {}, "neither a preset"),
    ("mlp-out", {"per_head": True}, "per-head granularity"),
    ("key", {"layers": "7-"}, "matches no linear module"),
    ("key", {"layers": "5-2"}, "empty"),
    ("key", {"layers": "a"}, "--layers takes"),
])
def test_selection_errors(spec, kwargs, message):
    model, _ = build("llama")
    with pytest.raises(UsageError, match=message):
        find_targets(model, spec, **kwargs)
