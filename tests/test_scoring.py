"""Scores against a direct autograd computation of the formula, and their invariances."""

import pytest
import torch
from conftest import build
from helpers import EXAMPLES
from transformers.pytorch_utils import Conv1D

from eigenprune.core.batching import answer_nll, batch_nll, collate, encode
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets, target_weight


def reference_scores(model, targets, encoded, pad_id):
    """Per example alone (no batching, no padding): x, g by autograd; ΔL by explicit E_i; every pair."""
    per_example = []
    for i in range(len(encoded)):
        batch = collate(encoded, [i], pad_id)
        store = {}

        def keep(name, store=store):
            return lambda module, args, output: store.__setitem__(name, (args[0], output))

        handles = [model.get_submodule(t.module_name).register_forward_hook(keep(t.module_name)) for t in targets]
        logits = model(**batch.model_inputs()).logits
        for h in handles:
            h.remove()
        loss = answer_nll(logits, batch.labels).sum()
        outs = {name: out for name, (_, out) in store.items()}
        grads = dict(zip(outs, torch.autograd.grad(loss, list(outs.values())), strict=True))
        offsets = batch.offsets[0].tolist()
        per_example.append({name: (store[name][0][0].detach(), grads[name][0], offsets) for name in outs})
    result = {}
    for t in targets:
        W = target_weight(model, t).detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        effects = []
        for e, ex in enumerate(per_example):
            for f, fx in enumerate(per_example):
                if e == f:
                    continue
                x_e, g_e, off_e = ex[t.module_name]
                x_f, _, off_f = fx[t.module_name]
                g_e = g_e[:, t.rows[0]:t.rows[1]]
                common = sorted(set(off_e) & set(off_f))
                row = []
                for i in range(len(S)):
                    E = S[i] * torch.outer(U[:, i], Vh[i])
                    row.append(sum(g_e[off_e.index(o)] @ (E @ (x_f[off_f.index(o)] - x_e[off_e.index(o)]))
                                   for o in common))
                effects.append(torch.stack(row))
        effects = torch.stack(effects)
        result[t.name] = (effects.max(0).values, effects.mean(0))
    return result


@pytest.mark.parametrize("per_head", [False, True])
def test_scores_equal_direct_autograd_formula(arch, per_head):
    model, tok = build(arch)
    targets = find_targets(model, "key", per_head=per_head)
    encoded = encode(tok, EXAMPLES)
    comps = decompose_targets(model, targets)
    got = score(model, targets, comps, encoded, tok.pad_token_id,
                ScoreConfig(partners="all", batch_size=4), progress=False)
    want = reference_scores(model, targets, encoded, tok.pad_token_id)
    n = len(EXAMPLES)
    assert got.n_pairs == n * (n - 1)
    for t in targets:
        torch.testing.assert_close(got.max[t.name], want[t.name][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.mean[t.name], want[t.name][1], atol=1e-5, rtol=1e-4)


def test_batch_nll_runs_the_lm_head_from_the_shortest_prompt_on_and_matches_full_logits(arch):
    """Only the answer-predicting positions reach the LM head, as one contiguous tensor."""
    model, tok = build(arch)
    encoded = encode(tok, EXAMPLES)
    batch = collate(encoded, range(len(EXAMPLES)), tok.pad_token_id)
    rows = []
    head = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: rows.append((args[0].shape[1], args[0].is_contiguous())))
    try:
        got = batch_nll(model, batch)
        want = answer_nll(model(**batch.model_inputs()).logits, batch.labels)
    finally:
        head.remove()
    width, shortest = batch.input_ids.shape[1], int(batch.prompt_lengths.min())
    assert rows == [(width - shortest + 1, True), (width, True)] and rows[0][0] < width  # strided: slow matmul
    torch.testing.assert_close(got, want)
    assert (got > 0).all()


@pytest.mark.parametrize("batch_size", [1, 3, 6])
def test_exact_mode_does_not_depend_on_batch_size(batch_size):
    model, tok = build("llama")
    targets = find_targets(model, "key")
    encoded = encode(tok, EXAMPLES)
    comps = decompose_targets(model, targets)
    ref = score(model, targets, comps, encoded, tok.pad_token_id, ScoreConfig(partners="all", batch_size=2),
                progress=False)
    got = score(model, targets, comps, encoded, tok.pad_token_id,
                ScoreConfig(partners="all", batch_size=batch_size), progress=False)
    for name in ref.max:
        torch.testing.assert_close(got.max[name], ref.max[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.mean[name], ref.mean[name], atol=1e-5, rtol=1e-4)


def test_sampled_partners_are_a_subset_of_all_pairs_and_seeded():
    model, tok = build("gpt2")
    targets = find_targets(model, "key")
    encoded = encode(tok, EXAMPLES * 3)
    comps = decompose_targets(model, targets)
    run = lambda cfg: score(model, targets, comps, encoded, tok.pad_token_id, cfg, progress=False)
    exact = run(ScoreConfig(partners="all"))
    a = run(ScoreConfig(partners=2, window=5, seed=7, batch_size=1))
    b = run(ScoreConfig(partners=2, window=5, seed=7, batch_size=1))
    c = run(ScoreConfig(partners=2, window=5, seed=8, batch_size=1))
    assert a.n_pairs == 2 * len(encoded)
    for name in exact.max:
        assert torch.equal(a.max[name], b.max[name]) and torch.equal(a.mean[name], b.mean[name])
        assert (a.max[name] <= exact.max[name] + 1e-6).all()
    assert any(not torch.equal(a.max[k], c.max[k]) for k in a.max)


def test_exact_mode_matmuls_equal_gathered_pairs(arch):
    """Exact mode reduces (batch × ring) matmuls; K = n - 1 sampled partners gather the same pairs."""
    model, tok = build(arch)
    targets = find_targets(model, "key")
    encoded = encode(tok, EXAMPLES * 2)
    comps = decompose_targets(model, targets)
    run = lambda cfg: score(model, targets, comps, encoded, tok.pad_token_id, cfg, progress=False)
    n = len(encoded)
    exact = run(ScoreConfig(partners="all", batch_size=5))
    gathered = run(ScoreConfig(partners=n - 1, window=n - 1, batch_size=5))
    assert exact.n_pairs == gathered.n_pairs == n * (n - 1)
    for name in exact.max:
        torch.testing.assert_close(exact.max[name], gathered.max[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(exact.mean[name], gathered.mean[name], atol=1e-6, rtol=1e-5)


def test_batch_size_one_gives_nonzero_scores():
    model, tok = build("llama")
    targets = find_targets(model, "key")
    scores = score(model, targets, decompose_targets(model, targets), encode(tok, EXAMPLES),
                   tok.pad_token_id, ScoreConfig(partners=2, batch_size=1), progress=False)
    assert all(v.abs().sum() > 0 for v in scores.max.values())


def test_conv1d_and_linear_with_the_same_weights_score_the_same():
    model, tok = build("gpt2")
    twin, _ = build("gpt2")
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            linear = torch.nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    encoded = encode(tok, EXAMPLES)
    for spec in ["key", "mlp-out"]:
        results = []
        for m in (model, twin):
            targets = find_targets(m, spec)
            results.append(score(m, targets, decompose_targets(m, targets), encoded, tok.pad_token_id,
                                 ScoreConfig(partners="all"), progress=False))
        for name in results[0].max:
            torch.testing.assert_close(results[0].max[name], results[1].max[name], atol=1e-5, rtol=1e-4)


def test_whole_matrix_and_per_head_agree_with_one_head():
    model, tok = build("gpt2")
    model = type(model)(type(model.config)(**{**model.config.to_dict(), "n_head": 1}))
    encoded = encode(tok, EXAMPLES)
    results = []
    for per_head in (False, True):
        targets = find_targets(model, "key", per_head=per_head)
        results.append(score(model, targets, decompose_targets(model, targets), encoded, tok.pad_token_id,
                             ScoreConfig(partners="all"), progress=False))
    whole, heads = results
    for name in whole.max:
        torch.testing.assert_close(whole.max[name], heads.max[f"{name}:h0"])


def test_same_seed_bit_identical_and_means_counted_on_real_tokens():
    model, tok = build("phi")
    targets = find_targets(model, "all")
    encoded = encode(tok, EXAMPLES)
    comps = decompose_targets(model, targets)
    a = score(model, targets, comps, encoded, tok.pad_token_id, ScoreConfig(seed=3), progress=False)
    b = score(model, targets, comps, encoded, tok.pad_token_id, ScoreConfig(seed=3), progress=False)
    for name in a.max:
        assert torch.equal(a.max[name], b.max[name])
    assert a.means.counts.sum() == sum(len(e) for e in encoded)
    assert a.means.counts[-a.means.offset_min] == len(encoded)  # offset 0: every example's last prompt token


def test_scoring_needs_two_examples():
    from eigenprune.core.errors import UsageError

    model, tok = build("llama")
    targets = find_targets(model, "key")
    with pytest.raises(UsageError, match="at least 2"):
        score(model, targets, decompose_targets(model, targets), encode(tok, EXAMPLES[:1]), 1, progress=False)
