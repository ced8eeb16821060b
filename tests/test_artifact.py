"""Round trips: scores and edits saved and loaded, merged export, and refusal of another base model."""

import re

import pytest
import torch
from conftest import build
from helpers import EXAMPLES
from transformers import AutoModelForCausalLM

from eigenprune.core.batching import collate, encode
from eigenprune.core.errors import UsageError
from eigenprune.core.positions import prompt_lengths
from eigenprune.edits.artifact import (
    EDIT_VERSION,
    apply_saved_edit,
    atomic_dir,
    fingerprint,
    load_edit,
    load_scores,
    save_edit,
    save_scores,
)
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.export import export_merged
from eigenprune.edits.freeze import FreezeConfig, apply_edit, make_edit
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets


def prepare(arch, spec="key", **freeze):
    model, tok = build(arch)
    targets = find_targets(model, spec)
    comps = decompose_targets(model, targets)
    encoded = encode(tok, EXAMPLES)
    scores = score(model, targets, comps, encoded, tok.pad_token_id, ScoreConfig(partners=2), progress=False)
    edit = make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.3, **freeze))
    meta = {"base_model": arch, "base_fingerprint": fingerprint(model, edit.modules or [targets[0].module_name])}
    return model, tok, targets, comps, encoded, scores, edit, meta


def logits_of(model, encoded, pad_id):
    batch = collate(encoded, range(len(encoded)), pad_id)
    with torch.no_grad(), prompt_lengths(model, batch.prompt_lengths):
        return model(**batch.model_inputs()).logits[batch.attention_mask.bool()]


def test_save_load_edit_reproduces_logits_exactly(arch, tmp_path):
    model, tok, *_, encoded, scores, edit, meta = prepare(arch, "all")
    save_edit(tmp_path / "edit", edit, meta)
    apply_edit(model, edit)
    want = logits_of(model, encoded, tok.pad_token_id)
    fresh, _ = build(arch)
    loaded, loaded_meta = apply_saved_edit(fresh, tmp_path / "edit")
    assert loaded_meta["n_frozen"] == edit.n_frozen > 0
    assert torch.equal(logits_of(fresh, encoded, tok.pad_token_id), want)


def test_merged_export_loads_without_eigenprune(arch, tmp_path):
    model, tok, *_, encoded, scores, edit, meta = prepare(arch, "all", bias="constant")
    apply_edit(model, edit)
    want = logits_of(model, encoded, tok.pad_token_id)
    export_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("FrozenLinear" in type(m).__name__ for m in plain.modules())
    torch.testing.assert_close(logits_of(plain, encoded, tok.pad_token_id), want, atol=1e-5, rtol=1e-5)


def test_merged_export_refuses_a_position_dependent_bias(tmp_path):
    model, tok, *_, edit, meta = prepare("llama")
    apply_edit(model, edit)
    with pytest.raises(UsageError, match="--bias constant"):
        export_merged(model, tok, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_edit_refuses_another_base_model(tmp_path):
    *_, edit, meta = prepare("llama")
    save_edit(tmp_path / "edit", edit, meta)
    other, _ = build("llama", seed=5)
    with pytest.raises(UsageError, match="other base weights"):
        apply_saved_edit(other, tmp_path / "edit")


def test_edit_accepts_the_same_base_in_another_dtype(tmp_path):
    model, *_, edit, meta = prepare("llama")
    save_edit(tmp_path / "edit", edit, meta)
    half, _ = build("llama")
    apply_saved_edit(half.to(torch.bfloat16), tmp_path / "edit")


def test_scores_round_trip_gives_the_same_edit(tmp_path):
    model, tok, targets, comps, encoded, scores, edit, meta = prepare("gpt2")
    save_scores(tmp_path / "scores", scores, targets, comps, {"model": "gpt2"})
    run = load_scores(tmp_path / "scores")
    assert [t.name for t in run.targets] == [t.name for t in targets]
    for t in targets:
        assert torch.equal(run.scores.max[t.name], scores.max[t.name])
        assert torch.equal(run.components[t.name].Vh, comps[t.name].Vh)
    again = make_edit(run.targets, run.components, run.scores.max, run.scores.means, edit.config)
    for name in edit.bias_tables:
        assert torch.equal(again.bias_tables[name], edit.bias_tables[name])


def test_nothing_half_written_when_saving_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "file").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_loading_checks_the_format(tmp_path):
    *_, edit, meta = prepare("llama")
    save_edit(tmp_path / "edit", edit, meta)
    path = tmp_path / "edit" / "eigenprune_edit.json"
    path.write_text(path.read_text().replace(f'"format_version": {EDIT_VERSION}', '"format_version": 99'))
    with pytest.raises(UsageError, match="version 99"):
        load_edit(tmp_path / "edit")
    with pytest.raises(UsageError, match="no eigenprune_edit.json"):
        load_edit(tmp_path)


@pytest.mark.parametrize("case, text, match", [
    ("missing", None, "is not a saved fine-tune (no eigenprune_finetune.json)"),
    ("not json", "{oops", "is not valid JSON"),
    ("not an object", "[1]", "should hold a JSON object"),
    ("other format", '{"format": "eigenprune-edit", "format_version": 1}', "holds format 'eigenprune-edit'"),
    ("newer version", '{"format": "eigenprune-finetune", "format_version": 99}', "reads versions 1 "),
])
def test_saved_stage_metadata_is_checked_like_every_artifact(tmp_path, case, text, match):
    """A fine-tune's or LoRA's metadata goes through the same reader as scores and edits: one line each."""
    from eigenprune.methods.training import FINETUNE_FORMAT, FINETUNE_JSON, FINETUNE_VERSION, apply_saved_finetune

    assert (FINETUNE_FORMAT, FINETUNE_VERSION) == ("eigenprune-finetune", 1)
    if text is not None:
        (tmp_path / FINETUNE_JSON).write_text(text)
    with pytest.raises(UsageError, match=re.escape(match)) as err:
        apply_saved_finetune(None, tmp_path)
    assert "\n" not in str(err.value)
    lora = pytest.importorskip("eigenprune.methods.lora")
    if text is not None:
        (tmp_path / lora.LORA_JSON).write_text(text.replace("eigenprune-finetune", lora.LORA_FORMAT))
    with pytest.raises(UsageError, match=re.escape(match.replace("fine-tune (no eigenprune_finetune",
                                                                "LoRA directory (no eigenprune_lora"))):
        lora.apply_saved_lora(None, tmp_path)
