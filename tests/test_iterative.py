"""Iterative eigenpruning (`iterative.py`), and scoring an edited model (which iterative rounds rely on)."""

import copy

import pytest
import torch
from conftest import build
from helpers import EXAMPLES

from eigenprune.core.batching import collate, encode, teacher_forced
from eigenprune.core.positions import tracker_of
from eigenprune.edits.artifact import apply_saved_edit, fingerprint, save_edit
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.engine import score_run
from eigenprune.edits.freeze import FreezeConfig, FrozenLinear, applied, apply_edit, merge_edit
from eigenprune.edits.iterative import current_components, iterative_edits, schedule
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets, target_weight, weight_view

EXACT = ScoreConfig(partners="all", batch_size=4)


def logits(model, tok):
    encoded = encode(tok, EXAMPLES)
    batch = collate(encoded, range(len(encoded)), tok.pad_token_id)
    with torch.no_grad():
        return teacher_forced(model, batch, batch.input_ids.shape[1])  # (batch, pos, vocab)


def assert_scores_equal(got, want, targets):
    """Max and mean per component to ~1e-5 of the largest score (some targets' scores are all ~1e-18: GPT-2's
    queries), and the same mean inputs."""
    for kind in ("max", "mean"):
        scale = max(float(getattr(want, kind)[t.name].abs().max()) for t in targets)
        for t in targets:
            a, b = getattr(got, kind)[t.name], getattr(want, kind)[t.name]
            torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-5,
                                       msg=lambda m, t=t, k=kind: f"{k} scores of {t.name}: {m}")
    for module, sums in want.means.sums.items():
        torch.testing.assert_close(got.means.sums[module], sums, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- scoring an edited model
def edited_and_merged(arch, bias):
    """An edit of every linear layer in the blocks, and a plain copy of the model holding the same weights
    minus the frozen components (whose bias, for `bias='position'`, a hook looks up from each row's own
    tokens)."""
    model, tok = build(arch)
    targets = find_targets(model, "all")
    encoded = encode(tok, EXAMPLES)
    run = score_run(model, tok, EXAMPLES, "all", config=EXACT, progress=False)
    edit = run.edit(FreezeConfig(p=0.4, bias=bias))
    plain = copy.deepcopy(model)
    weights = {t.name: target_weight(model, t).detach().float().clone() for t in targets}
    if bias == "constant":
        apply_edit_and_merge(plain, edit)
        return model, tok, targets, encoded, edit, plain, weights, []
    prompt_of = {e.prompt_ids + e.answer_ids[:-1]: len(e.prompt_ids) for e in encoded}
    offsets = {}

    def find_offsets(module, args, kwargs):  # (batch, pos): from each row's real tokens, not from the batch
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        lengths = torch.tensor([prompt_of[tuple(row[m.bool()].tolist())] for row, m in zip(ids, mask, strict=True)])
        offsets["now"] = torch.arange(ids.shape[1])[None] - (lengths[:, None] - 1)

    def add_bias(table):
        def hook(module, args, y):
            slot = offsets["now"] - edit.offset_min
            slot = torch.where((slot >= 0) & (slot < len(table) - 1), slot, len(table) - 1)
            return y + table[slot]  # (batch, pos, d_out)

        return hook

    hooks = [plain.register_forward_pre_hook(find_offsets, with_kwargs=True)]
    with torch.no_grad():
        for module_name in edit.modules:
            layer = plain.get_submodule(module_name)
            for t in targets:
                if t.module_name == module_name:
                    U, S, Vh = edit.factors[t.name]
                    weight_view(layer)[t.rows[0] : t.rows[1]] -= (U * S) @ Vh
            hooks.append(layer.register_forward_hook(add_bias(edit.bias_tables[module_name])))
    return model, tok, targets, encoded, edit, plain, weights, hooks


def apply_edit_and_merge(model, edit):
    with torch.no_grad():
        apply_edit(model, edit)
        merge_edit(model)


@pytest.mark.parametrize("bias", ["constant", "position"])
def test_scoring_an_edited_model_equals_scoring_its_weights_in_a_plain_model(arch, bias):
    """'position': only right if the edited model knows where each prompt ends during scoring's forwards."""
    model, tok, targets, encoded, edit, plain, weights, hooks = edited_and_merged(arch, bias)
    try:
        want = score(plain, targets, decompose_targets(plain, targets), encoded, tok.pad_token_id, EXACT,
                     progress=False)
    finally:
        for h in hooks:
            h.remove()
    with applied(model, edit):
        got = score(model, targets, current_components(weights, [edit]), encoded, tok.pad_token_id, EXACT,
                    progress=False)
    assert_scores_equal(got, want, targets)


# ---------------------------------------------------------------- iterative edits
def test_one_step_is_the_one_shot_edit(arch):
    model, tok = build(arch)
    config = FreezeConfig(p=0.4)
    one_shot = score_run(model, tok, EXAMPLES, "key", config=EXACT, progress=False).edit(config)
    iterative = iterative_edits(model, tok, EXAMPLES, "key", score_config=EXACT, freeze_config=config, steps=1)
    merged = iterative.merged()
    assert len(iterative.rounds) == 1 and merged.n_frozen == one_shot.n_frozen > 0
    for t in one_shot.targets:
        assert torch.equal(merged.removed[t.name], one_shot.removed[t.name])
    with applied(model, one_shot):
        want = logits(model, tok)
    with iterative.applied(model):
        assert torch.equal(logits(model, tok), want)


def test_apply_and_remove_restore_the_model_bit_for_bit():
    model, tok = build("phi")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, tok)
    iterative = iterative_edits(model, tok, EXAMPLES, "all", score_config=EXACT, freeze_config=FreezeConfig(p=0.3),
                                steps=2)
    assert tracker_of(model) is None and torch.equal(logits(model, tok), base)  # scoring left it as it was
    with iterative.applied(model):
        assert not torch.allclose(logits(model, tok), base)
    assert tracker_of(model) is None and not any(isinstance(m, FrozenLinear) for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(logits(model, tok), base)


@pytest.mark.parametrize("scope", ["global", "per-target"])
@pytest.mark.parametrize("steps", [2, 3, 5])
def test_the_total_frozen_count_is_the_one_shot_count(scope, steps):
    model, tok = build("llama")
    p = 0.45
    iterative = iterative_edits(model, tok, EXAMPLES, "key", per_head=True, score_config=ScoreConfig(partners=2),
                                freeze_config=FreezeConfig(p=p, scope=scope), steps=steps)
    targets = iterative.targets
    if scope == "global":
        want = int(p * sum(t.n_components for t in targets))
        assert [r.n_frozen for r in iterative.rounds] == [n for n in schedule(want, steps) if n]
    else:
        want = sum(int(p * t.n_components) for t in targets)
    merged = iterative.merged()
    assert iterative.n_frozen == merged.n_frozen == want
    for t in targets:
        index = merged.removed[t.name]
        assert len(set(index.tolist())) == len(index)  # no component frozen twice
        if scope == "per-target":
            assert len(index) == int(p * t.n_components)


def test_later_rounds_take_the_edited_weights_components_and_never_refreeze():
    model, tok = build("gpt2")
    iterative = iterative_edits(model, tok, EXAMPLES, "key", score_config=EXACT, freeze_config=FreezeConfig(p=0.6),
                                steps=3)
    assert len(iterative.rounds) == 3
    first = iterative.rounds[0]
    weights = {t.name: target_weight(model, t).detach().float() for t in iterative.targets}
    second = current_components(weights, [first])
    for t in iterative.targets:
        frozen = first.removed[t.name]
        kept = torch.ones(t.n_components, dtype=torch.bool)
        kept[frozen] = False
        S0, S1 = iterative.original[t.name].S, second[t.name].S
        torch.testing.assert_close(S1[: int(kept.sum())], S0[kept], atol=1e-5, rtol=1e-5)  # the unfrozen ones
        assert (S1[int(kept.sum()) :] < 1e-5 * S0[0]).all()  # the frozen directions: gone from A′
        # every frozen direction across rounds is distinct: the stacked Vh rows are orthonormal
        Vh = iterative.merged().factors[t.name][2]
        torch.testing.assert_close(Vh @ Vh.t(), torch.eye(len(Vh)), atol=1e-4, rtol=0)


def test_round_two_scores_the_model_with_round_one_applied():
    """Round 2's scores are those of a plain model holding round 1's edit merged into its weights, and
    not the unedited model's scores of the same components."""
    model, tok = build("gpt2")
    config = FreezeConfig(p=0.5, bias="constant")
    iterative = iterative_edits(model, tok, EXAMPLES, "all", score_config=EXACT, freeze_config=config, steps=2)
    first, targets = iterative.rounds[0], iterative.targets
    plain = copy.deepcopy(model)
    apply_edit_and_merge(plain, first)
    want = score(plain, targets, decompose_targets(plain, targets), encode(tok, EXAMPLES), tok.pad_token_id, EXACT,
                 progress=False)
    assert_scores_equal(iterative.scores[1], want, targets)
    unedited = score(model, targets, current_components({t.name: target_weight(model, t).detach().float()
                                                         for t in targets}, [first]),
                     encode(tok, EXAMPLES), tok.pad_token_id, EXACT, progress=False)
    assert any(not torch.allclose(unedited.max[t.name], want.max[t.name], rtol=1e-3, atol=0) for t in targets)


def test_merged_edit_saves_loads_and_merges(tmp_path):
    model, tok = build("llama")
    iterative = iterative_edits(model, tok, EXAMPLES, "key", score_config=EXACT,
                                freeze_config=FreezeConfig(p=0.4, bias="constant"), steps=2)
    modules = sorted({t.module_name for t in iterative.targets})
    with iterative.applied(model):
        want = logits(model, tok)
    meta = {"base_model": "tiny", "base_fingerprint": fingerprint(model, modules)}
    save_edit(tmp_path / "edit", iterative.merged(), meta)
    fresh, _ = build("llama")
    apply_saved_edit(fresh, tmp_path / "edit")
    assert torch.equal(logits(fresh, tok), want)
    merge_edit(fresh)
    assert tracker_of(fresh) is None
    torch.testing.assert_close(logits(fresh, tok), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [0, -1, 1.5])
def test_steps_must_be_a_positive_integer(steps):
    model, tok = build("gpt2")
    with pytest.raises(ValueError, match="steps"):
        iterative_edits(model, tok, EXAMPLES, steps=steps)

