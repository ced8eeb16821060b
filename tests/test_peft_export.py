"""An edit as a peft LoRA adapter: base + adapter computes what the edited model computes, on GPT-2 (Conv1D, fused
c_attn), Llama (grouped-query) and Phi; merge_and_unload() equals export --merge; position-dependent biases and a
missing peft are one line."""

import json
import sys

import pytest
import torch
from conftest import build
from helpers import EXAMPLES
from safetensors.torch import load_file
from test_artifact import logits_of
from transformers import AutoModelForCausalLM

from eigenprune.cli import main
from eigenprune.core.batching import encode
from eigenprune.core.errors import UsageError
from eigenprune.edits.artifact import fingerprint, save_edit
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.export import export_merged
from eigenprune.edits.freeze import FreezeConfig, apply_edit, build_edit, make_edit
from eigenprune.edits.peft_export import export_peft
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets

peft = pytest.importorskip("peft")  # in the test extra; a missing peft is tested below with sys.modules


def edited(arch, spec="all", per_head=False, bias="none", p=0.3):
    """(edited model, its edit, encoded examples, pad id): a scored edit of the tiny model, applied."""
    model, tok = build(arch)
    targets = find_targets(model, spec, per_head=per_head)
    comps = decompose_targets(model, targets)
    encoded = encode(tok, EXAMPLES)
    scores = score(model, targets, comps, encoded, tok.pad_token_id, ScoreConfig(partners=2), progress=False)
    edit = make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=p, bias=bias))
    return apply_edit(model, edit), edit, encoded, tok.pad_token_id


def relative_gap(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def with_adapter(arch, folder):
    base, _ = build(arch)
    return peft.PeftModel.from_pretrained(base, folder).eval()


CASES = [(arch, spec, per_head, bias)
         for arch in ("gpt2", "llama", "phi") for bias in ("none", "constant")
         for spec, per_head in (("all", False), ("key", True))]


@pytest.mark.parametrize(("arch", "spec", "per_head", "bias"), CASES)
def test_base_plus_adapter_equals_the_edited_model(arch, spec, per_head, bias, tmp_path):
    model, edit, encoded, pad = edited(arch, spec, per_head, bias)
    want = logits_of(model, encoded, pad)
    result = export_peft(model, tmp_path / "adapter", arch)
    assert relative_gap(logits_of(with_adapter(arch, tmp_path / "adapter"), encoded, pad), want) < 1e-5
    per_module = {m: sum(len(edit.removed[t.name]) for t in edit.targets if t.module_name == m) for m in edit.modules}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == result.rank == max(per_module.values())  # one rank, scaling 1
    assert sorted(config["target_modules"]) == edit.modules == result.modules
    assert config["fan_in_fan_out"] == (arch == "gpt2") and config.get("lora_bias", False) == (bias == "constant")
    assert 0 < result.adapter_bytes < 1e6 and result.model_bytes > 0 and "KB against" in result.summary()


def test_fewer_frozen_components_are_zero_padded_and_a_fused_slice_fills_its_rows(tmp_path):
    """GPT-2's c_attn:k alone, layer 0 freezing 3 components and layer 1 one: rank 3, B zero outside the k rows."""
    model, tok = build("gpt2")
    targets = find_targets(model, "c_attn:k")
    comps = decompose_targets(model, targets)
    removed = {targets[0].name: [0, 2, 5], targets[1].name: [1]}
    apply_edit(model, build_edit(targets, comps, removed, None, FreezeConfig(p=0.1, bias="none")))
    encoded = encode(tok, EXAMPLES)
    want = logits_of(model, encoded, tok.pad_token_id)
    assert export_peft(model, tmp_path / "adapter").rank == 3
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lo, hi = targets[1].rows
    A = weights["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]  # (3, d_in)
    B = weights["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]  # (3 * d, 3)
    c = comps[targets[1].name]
    torch.testing.assert_close(A[0], c.Vh[1].float())
    torch.testing.assert_close(B[lo:hi, 0], -(c.U[:, 1] * c.S[1]).float())
    assert not A[1:].any() and not B[:, 1:].any() and not B[:lo].any() and not B[hi:].any()
    got = logits_of(with_adapter("gpt2", tmp_path / "adapter"), encoded, tok.pad_token_id)
    assert relative_gap(got, want) < 1e-5


@pytest.mark.parametrize(("arch", "bias"), [("gpt2", "none"), ("llama", "none"), ("phi", "none"),
                                            ("gpt2", "constant"), ("phi", "constant")])
def test_merge_and_unload_equals_the_merged_export(arch, bias, tmp_path):
    model, edit, encoded, pad = edited(arch, bias=bias)
    export_peft(model, tmp_path / "adapter")
    export_merged(model, None, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    unloaded = with_adapter(arch, tmp_path / "adapter").merge_and_unload()
    for name, want in merged.state_dict().items():
        torch.testing.assert_close(unloaded.state_dict()[name], want, atol=1e-6, rtol=1e-5, msg=name)


def test_a_constant_bias_on_a_layer_without_one_says_merging_needs_export_merge(tmp_path):
    model, *_ = edited("llama", bias="constant")
    result = export_peft(model, tmp_path / "adapter")
    assert result.lora_bias and result.unmergeable and "use export --merge" in result.summary()


def test_a_position_dependent_bias_is_refused_in_one_line(tmp_path):
    model, *_ = edited("llama", bias="position")
    with pytest.raises(UsageError, match="--bias constant or --bias none"):
        export_peft(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_a_model_without_an_edit_is_refused(tmp_path):
    model, _ = build("phi")
    with pytest.raises(UsageError, match="no eigenprune edit"):
        export_peft(model, tmp_path / "adapter")


def test_without_peft_one_line_names_the_extra(monkeypatch, tmp_path):
    model, *_ = edited("phi")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UsageError, match=r"pip install 'eigenprune\[peft\]'"):
        export_peft(model, tmp_path / "adapter")


def test_cli_exports_an_adapter_and_refuses_a_position_edit(capsys, tmp_path, saved_model_dir):
    for bias in ("none", "position"):
        model, edit, encoded, pad = edited("llama", bias=bias)
        meta = {"base_model": str(saved_model_dir), "base_fingerprint": fingerprint(build("llama")[0], edit.modules)}
        save_edit(tmp_path / f"edit-{bias}", edit, meta)
    code = main(["export", "--edit", str(tmp_path / "edit-none"), "--format", "peft", "--out", str(tmp_path / "a")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "peft LoRA adapter" in out and "KB against" in out
    model, edit, encoded, pad = edited("llama", bias="none")
    got = logits_of(with_adapter("llama", tmp_path / "a"), encoded, pad)
    assert relative_gap(got, logits_of(model, encoded, pad)) < 1e-5
    code = main(["export", "--edit", str(tmp_path / "edit-position"), "--format", "peft", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "--bias constant or --bias none" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
