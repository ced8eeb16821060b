"""Tests for side_effects.py: the packaged text sample and its exclusions, perplexity / KL / accuracy numbers
against direct computations written here (log-softmax by hand, per-document sums, KL by hand, resampled
documents), the identity cases (p = 0, the same model), the position convention, and the report fragment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build
from helpers import EXAMPLES, sensitive, write_task

from eigenprune.core.batching import Example
from eigenprune.core.errors import UsageError
from eigenprune.core.positions import prompt_lengths
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import FreezeConfig, applied, make_edit
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.evaluation import side_effects as se
from eigenprune.evaluation import token_scores
from eigenprune.evaluation.evaluate import evaluate
from eigenprune.evaluation.stats import paired_diff_ci
from eigenprune.evaluation.tasks import load_task
from eigenprune.reports import side_effects_report

MAX_TOKENS = 24  # the tiny tokenizers split English into many pieces; keep the tiny passes short


@pytest.fixture(scope="module")
def documents() -> list[se.Document]:
    """Four RTE and three CB documents (cut to MAX_TOKENS) and two short ones, so that batches are padded."""
    docs = se.load_documents()
    short = [se.Document("short/0", "short", "The cat sat on the mat."),
             se.Document("short/1", "short", "What happened as a result?")]
    return [d for d in docs if d.source == "rte"][:4] + short + [d for d in docs if d.source == "cb"][:3]


def edited(arch: str, p: float, targets: str = "all"):
    """A sensitive tiny model and an eigenprune edit (position-dependent bias) of its `targets` matrices."""
    model, tok = sensitive(arch)
    from eigenprune.core.batching import encode
    from eigenprune.edits.targets import find_targets

    targets = find_targets(model, targets)
    comps = decompose_targets(model, targets)
    scores = score(model, targets, comps, encode(tok, EXAMPLES), tok.pad_token_id, ScoreConfig(partners="all"),
                   progress=False)
    return model, tok, make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=p))


def log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    top = z.max(-1, keepdim=True).values
    return z - top - (z - top).exp().sum(-1, keepdim=True).log()


def direct_log_probs(model, tok, doc: se.Document) -> tuple[list[int], torch.Tensor]:
    """One document alone, unpadded, first token as the prompt: (ids, (len - 1, vocab) float64 log-probs)."""
    ids = tok(doc.text)["input_ids"][:MAX_TOKENS]
    with torch.no_grad(), prompt_lengths(model, torch.tensor([1])):
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]  # (len - 1, vocab) predicting ids[1:]
    return ids, log_softmax_by_hand(logits)


def direct(base, edit, tok, docs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-document NLL sums of `edit`, KL(base ‖ edit) sums and token counts, one document at a time."""
    nll, kl, tokens = [], [], []
    for doc in docs:
        ids, logp = direct_log_probs(base, tok, doc)
        _, logq = direct_log_probs(edit, tok, doc)
        nll.append(-float(sum(logq[t, ids[t + 1]] for t in range(len(ids) - 1))))
        kl.append(float((logp.exp() * (logp - logq)).sum()))
        tokens.append(len(ids) - 1)
    return np.array(nll), np.array(kl), np.array(tokens)


# -- the sample ------------------------------------------------------------------------------------------

def test_the_packaged_sample_is_tagged_deduplicated_and_of_reasonable_length():
    docs = se.load_documents()
    assert {d.source for d in docs} == {"rte", "cb"}
    assert len({d.id for d in docs}) == len(docs) == len({d.text for d in docs})
    assert all(d.id.startswith(f"{d.source}/") for d in docs)
    assert all(30 <= len(d.text.split()) <= 100 for d in docs)
    assert sum(d.source == "rte" for d in docs) == sum(d.source == "cb" for d in docs) == 80


@pytest.mark.parametrize("task, left", [("rte", {"cb"}), ("cb", {"rte"}), ("copa", {"rte", "cb"}),
                                        ("int-sum", {"rte", "cb"})])
def test_the_pruned_tasks_text_is_left_out(task, left):
    kept = se.sample_for_task(load_task(task))
    assert {d.source for d in kept} == left
    if left == {"rte", "cb"}:
        assert len(kept) == len(se.load_documents())


def test_documents_overlapping_a_custom_tasks_prompts_are_left_out(tmp_path):
    docs = se.load_documents()
    quoted = docs[5].text.split()[3:13]  # ten words of one document inside a custom task's prompt
    path = tmp_path / "custom.jsonl"
    path.write_text(json.dumps({"prompt": "Read: " + " ".join(quoted) + " ... so?", "answer": " yes"}) + "\n"
                    + json.dumps({"prompt": "Nothing from the sample here", "answer": " no"}) + "\n")
    kept = se.sample_for_task(load_task(str(path)))
    assert [d.id for d in kept] == [d.id for d in docs if d.id != docs[5].id]


@pytest.mark.parametrize("call, message", [
    (lambda: se.sample(["wiki"]), "unknown text source(s) wiki; the sample's sources are cb, rte"),
    (lambda: se.sample(["rte", "cb"]), "no side-effect documents are left"),
    (lambda: se.SideEffectProbe(*build("gpt2"), []), "the side-effect sample is empty"),
    (lambda: se.SideEffectProbe(*build("gpt2"), [se.Document("x/1", "x", "a")]), "fewer than 2 tokens"),
    (lambda: se.SideEffectProbe(*build("gpt2"), se.load_documents()[:2], batch_size=0), "at least 1"),
])
def test_bad_input_is_one_usage_error_line(call, message):
    with pytest.raises(UsageError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


# -- the numbers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama", "phi"])
def test_numbers_equal_a_direct_computation(arch, documents):
    model, tok, edit = edited(arch, 0.4)
    probe = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)  # padded batches
    base_nll, _, tokens = direct(model, model, tok, documents)
    assert len(set(tokens)) > 2
    np.testing.assert_allclose(probe.base.nll, base_nll, rtol=1e-5)
    np.testing.assert_array_equal(probe.base.tokens, tokens)
    np.testing.assert_array_equal(probe.base.kl, 0.0)
    base_copy, _ = sensitive(arch)  # the same weights, never edited: the direct computation's base
    with applied(model, edit):
        measured = probe.measure(model)
        nll, kl, _ = direct(base_copy, model, tok, documents)
    np.testing.assert_allclose(measured.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(measured.kl, kl, rtol=1e-4)
    assert (measured.kl > 1e-3).all() and not np.allclose(measured.nll, base_nll)  # the edit does something


def test_another_model_of_the_same_tokenizer_is_measured_against_the_stored_base(documents):
    base, tok = build("llama", seed=0)
    other, _ = build("llama", seed=3)  # different weights everywhere, its LM head included
    probe = se.SideEffectProbe(base, tok, documents, batch_size=4, max_tokens=MAX_TOKENS)
    measured = probe.measure(other)
    nll, kl, _ = direct(base, other, tok, documents)
    np.testing.assert_allclose(measured.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(measured.kl, kl, rtol=1e-4)


def test_weights_changed_in_place_head_included_are_measured_against_the_stored_base(documents):
    model, tok = build("gpt2")  # tied embeddings: the LM head is the input embedding
    base_copy, _ = build("gpt2")
    probe = se.SideEffectProbe(model, tok, documents, batch_size=4, max_tokens=MAX_TOKENS)
    with torch.no_grad():  # as merging an edit into the weights, or loading fine-tuned ones, would
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    measured = probe.measure(model)
    nll, kl, _ = direct(base_copy, model, tok, documents)
    np.testing.assert_allclose(measured.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(measured.kl, kl, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_p_zero_and_the_same_model_change_nothing_exactly(arch, documents):
    model, tok, edit = edited(arch, 0.0)
    assert edit.n_frozen == 0
    effects = se.SideEffects(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)
    with applied(model, edit):
        effects.measure("p=0", model)
    effects.measure("unedited", model)
    section = effects.section(n_boot=200)
    for name in ("p=0", "unedited"):
        scores = effects.edits[name][0]
        assert np.array_equal(scores.nll, effects.text.base.nll) and np.array_equal(scores.kl, np.zeros(len(documents)))
        assert section["models"][name]["delta_perplexity"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
        assert section["models"][name]["kl"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}


def test_scoring_convention_is_what_generate_computes(documents):
    """Offsets 0, 1, 2, ... from the first token: the same log-probs as feeding the first token alone and then
    extending the KV cache one token at a time (generate's path), with no prompt lengths given."""
    model, tok, edit = edited("llama", 0.4)
    probe = se.SideEffectProbe(model, tok, documents[:3], batch_size=3, max_tokens=MAX_TOKENS)
    with applied(model, edit):
        measured = probe.measure(model)
        for i, doc in enumerate(documents[:3]):
            ids = tok(doc.text)["input_ids"][:MAX_TOKENS]
            total, cache = 0.0, None
            with torch.no_grad():
                for t in range(len(ids) - 1):
                    out = model(input_ids=torch.tensor([ids[t:t + 1]]), past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    total -= float(log_softmax_by_hand(out.logits[0, -1])[ids[t + 1]])
            assert measured.nll[i] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e-2, 1.0, 60.0])  # from nearly equal to e^(-d) overflowing float32
def test_kl_per_token_equals_float64_by_hand(scale):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 50, generator=g) * 4
    other = base + torch.randn(6, 50, generator=g) * scale
    logp, logq = log_softmax_by_hand(base), log_softmax_by_hand(other)
    by_hand = (logp.exp() * (logp - logq)).sum(-1)
    got = token_scores.kl_per_token(base, other)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), by_hand, rtol=1e-4, atol=1e-12)  # atol: KL ~ 1e-13 at scale 1e-6
    assert torch.equal(token_scores.kl_per_token(base, base.clone()), torch.zeros(6))


def test_bootstrap_intervals_equal_resampling_documents_by_hand():
    rng = np.random.default_rng(7)
    tokens = rng.integers(5, 60, size=40).astype(float)
    base = se.TextScores(tokens * rng.uniform(2, 4, 40), np.zeros(40), tokens, 0.0)
    edit = se.TextScores(base.nll + tokens * rng.uniform(-0.1, 0.3, 40), tokens * rng.uniform(0, 0.1, 40), tokens, 0.0)
    index = np.random.default_rng(3).integers(0, 40, size=(500, 40))  # what stats.bootstrap_means draws, seed 3
    by_hand = {
        "ppl": np.exp(base.nll[index].sum(1) / tokens[index].sum(1)),
        "delta": np.exp(edit.nll[index].sum(1) / tokens[index].sum(1)) - np.exp(base.nll[index].sum(1)
                                                                               / tokens[index].sum(1)),
        "kl": edit.kl[index].sum(1) / tokens[index].sum(1),
    }
    got = {"ppl": se.perplexity_ci(base, 500, 3, 0.9), "delta": se.delta_perplexity_ci(base, edit, 500, 3, 0.9),
           "kl": se.kl_ci(edit, 500, 3, 0.9)}
    for key, draws in by_hand.items():
        lo, hi = np.quantile(draws, [0.05, 0.95])
        assert (got[key]["lo"], got[key]["hi"]) == pytest.approx((lo, hi), rel=1e-12)
    assert got["ppl"]["value"] == pytest.approx(np.exp(base.nll.sum() / tokens.sum()))
    assert got["kl"]["value"] == pytest.approx(edit.kl.sum() / tokens.sum())


def test_other_tasks_are_paired_base_vs_edit(tmp_path):
    model, tok, edit = edited("gpt2", 0.5)
    task = str(write_task(tmp_path / "sums.jsonl"))
    probe = se.TaskProbe(model, tok, [task, task], limit=10, batch_size=4)
    assert list(probe.tasks) == [task]
    examples = probe.tasks[task][2]
    assert len(examples) == 10 and all(isinstance(e, Example) for e in examples)
    np.testing.assert_array_equal(probe.base[task], evaluate(model, tok, examples, "choice").correct.numpy())
    with applied(model, edit):
        after = probe.measure(model)
        np.testing.assert_array_equal(after[task], evaluate(model, tok, examples, "choice").correct.numpy())
    assert paired_diff_ci(probe.base[task], after[task], 100, 0)[0] == after[task].mean() - probe.base[task].mean()


# -- the report fragment ---------------------------------------------------------------------------------

def test_section_is_json_ready_and_renders_a_table_and_a_plot(tmp_path, documents):
    model, tok, edit = edited("gpt2", 0.4)
    task = str(write_task(tmp_path / "sums.jsonl"))
    effects = se.SideEffects(model, tok, documents, also=[task], also_limit=8, batch_size=4, max_tokens=MAX_TOKENS)
    with applied(model, edit):
        effects.measure("eigenprune", model)
    with pytest.raises(UsageError, match="already measured"):
        effects.measure("eigenprune", model)
    section = json.loads(json.dumps(effects.section(n_boot=100)))
    assert section["model_order"] == ["base", "eigenprune"]
    assert section["sample"] == {"documents": 9, "tokens": int(effects.text.base.tokens.sum()),
                                 "sources": {"rte": 4, "short": 2, "cb": 3}}
    row = section["models"]["eigenprune"]
    assert row["delta_perplexity"]["diff"] == pytest.approx(row["perplexity"]["value"]
                                                            - section["models"]["base"]["perplexity"]["value"])
    assert set(row["also"][task]) == {"acc", "lo", "hi", "n", "diff_vs_base"}
    text = side_effects_report.render_markdown(section)
    assert "## Side effects" in text and "| eigenprune |" in text and "sums (choice, 8)" in text
    cells = side_effects_report.columns(section, "eigenprune")
    assert cells["KL"] in text and cells["Δ perplexity"] in text
    side_effects_report.plot(section, tmp_path / "side_effects.png")
    assert (tmp_path / "side_effects.png").stat().st_size > 1000


def test_logits_changed_after_the_head_are_refused(documents):
    model, tok = build("gpt2")
    def scale_logits(module, args, out) -> None:  # as a logit scale or soft-cap after the head would
        out.logits.mul_(2.0)

    handle = model.register_forward_hook(scale_logits)
    try:
        with pytest.raises(UsageError, match="not its LM head's output"):
            se.SideEffectProbe(model, tok, documents, max_tokens=MAX_TOKENS)
    finally:
        handle.remove()


CAP = 0.2  # below the tiny Gemma-2's largest raw logits, so the cap changes its distributions


def tiny_gemma2(cap: float | None, seed: int = 0):
    """A 2-layer random Gemma-2 whose final logits are soft-capped at `cap`, with the tests' tokenizer."""
    from conftest import VOCAB, make_tokenizer
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=256,
                          final_logit_softcapping=cap, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return Gemma2ForCausalLM(config).eval(), make_tokenizer("llama")


@pytest.mark.parametrize("kl", ["exact", "linear"])
def test_soft_capped_logits_are_measured_as_the_model_computes_them(kl, documents):
    """Gemma-2, Gemma-3n and Gemma-4 cap their final logits (cap · tanh(z / cap)); the probe applies the cap to
    every chunk, so its numbers equal the model's own forward, and the linear path (which needs z linear in the
    head's input) falls back to the exact one."""
    model, tok = tiny_gemma2(CAP)
    other, _ = tiny_gemma2(CAP)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in other.named_parameters():
            if "proj" in name:  # another model with the same tokenizer, as an edit would be
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        ids = torch.tensor([[0, 5, 6, 7, 8]])
        capped, raw = model(input_ids=ids).logits, model.lm_head(model.model(ids)[0])
    assert capped.abs().max() < CAP < raw.abs().max()  # the cap changes the logits the model returns
    probe = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False, kl=kl)
    got = probe.measure(other)
    nll, kl_want, tokens = direct(model, other, tok, documents)
    base_nll, _, _ = direct(model, model, tok, documents)
    assert got.kl_path == "exact" and (kl_want > 1e-6).all()
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(probe.base.nll, base_nll, rtol=1e-5)
    np.testing.assert_allclose(got.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(got.kl, kl_want, rtol=1e-3, atol=1e-9)
    section = se.summarize(probe, {"other": got}, n_boot=20)
    said = "KL of other by the exact path although the linear one was asked for"
    assert section.get("kl_requested") == (None if kl == "exact" else "linear")
    assert "path" not in section["models"]["other"]["kl"]
    assert (said in side_effects_report.render_markdown(section, None)) == (kl == "linear")


def test_a_bfloat16_soft_capped_model_is_capped_in_its_own_dtype(documents):
    """The model caps its bfloat16 logits in bfloat16; capping their float32 copy instead differs by bfloat16's
    rounding (about 4e-3), which the probe's first-batch check would refuse."""
    model, tok = tiny_gemma2(CAP)
    model.to(torch.bfloat16)
    probe = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False)
    np.testing.assert_allclose(probe.base.nll, direct(model, model, tok, documents)[0], rtol=1e-2)


def test_an_uncapped_gemma2_and_a_cap_the_forward_does_not_apply_are_told_apart(documents):
    model, tok = tiny_gemma2(None)
    assert se.final_softcap(model) is None
    probe = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False)
    np.testing.assert_allclose(probe.base.nll, direct(model, model, tok, documents)[0], rtol=1e-5)
    model.config.final_logit_softcapping = CAP  # the config says capped, but the logits are scaled after it

    def scale_logits(module, args, out) -> None:
        out.logits.mul_(1e3)

    handle = model.register_forward_hook(scale_logits)
    try:
        with pytest.raises(UsageError, match="not its LM head's output, soft-capped at 0.2"):
            se.SideEffectProbe(model, tok, documents, max_tokens=MAX_TOKENS, cache=False)
    finally:
        handle.remove()


def test_sweep_bench_times_one_side_effect_pass_per_model(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ sits beside src/, not installed
    from bench import sweep

    out = tmp_path / "sweep.json"
    assert sweep.main(["--model", "tiny-llama", "--n", "8", "--dev-n", "4", "--p", "0.1,0.5",
                       "--side-effect-docs", "5", "--json", str(out)]) == 0
    s = json.loads(out.read_text())["side_effects"]
    assert s["documents"] == 5 and s["one_pass_per_model"] and s["forwards"] == s["batches"] == 1
    assert s["base_pass_s"] > 0 and s["floor_s"] > 0 and s["measure_s"] > 0
    assert s["perplexity"]["lo"] <= s["perplexity"]["value"] <= s["perplexity"]["hi"]


# -- chunks and the base-pass cache ----------------------------------------------------------------------

def test_chunks_over_rows_give_the_same_numbers_and_no_forward_holds_all_logits(documents, monkeypatch):
    model, tok, edit = edited("llama", 0.4)
    whole = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False)
    with applied(model, edit):
        want = whole.measure(model)
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    monkeypatch.setattr(token_scores, "CHUNK_ELEMENTS", 5 * model.config.vocab_size)  # 5 rows a chunk,
    monkeypatch.setattr(token_scores, "HEAD_SHARE", 10**9)  # whatever d_model
    try:
        chunked = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False)
        with applied(model, edit):
            got = chunked.measure(model)
    finally:
        handle.remove()
    np.testing.assert_allclose(chunked.base.nll, whole.base.nll, rtol=1e-6)
    np.testing.assert_allclose(got.nll, want.nll, rtol=1e-6)
    np.testing.assert_allclose(got.kl, want.kl, rtol=1e-5)
    assert max(s[0] for s in shapes if len(s) == 2) == 5  # the rows' logits: chunks of 5 rows
    assert {s[1] for s in shapes if len(s) == 3} == {1}  # the model's own head call: the last position only


def test_the_base_pass_is_cached_across_probes(documents, tmp_path, monkeypatch):
    monkeypatch.setenv("EIGENPRUNE_CACHE", str(tmp_path))
    model, tok, edit = edited("gpt2", 0.4)
    first = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)
    assert len(list((tmp_path / "side-effects-v1").iterdir())) == 1
    calls = []
    se.base_cache._MEMORY.clear()  # read back from disk, as another process would
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        again = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)
    finally:
        handle.remove()
    assert calls == []  # read, not recomputed
    np.testing.assert_array_equal(again.base.nll, first.base.nll)
    np.testing.assert_array_equal(again.base.tokens, first.base.tokens)
    assert all(torch.equal(a, b) for a, b in zip(again._hidden, first._hidden, strict=True))
    with applied(model, edit):
        np.testing.assert_array_equal(again.measure(model).kl, first.measure(model).kl)
        se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)  # the edited model: own key
    se.SideEffectProbe(model, tok, documents[:4], batch_size=3, max_tokens=MAX_TOKENS)  # another sample
    se.SideEffectProbe(model, tok, documents, batch_size=2, max_tokens=MAX_TOKENS)  # other batches
    assert len(list((tmp_path / "side-effects-v1").iterdir())) == 4
    monkeypatch.setenv("EIGENPRUNE_CACHE", "off")
    se.SideEffectProbe(model, tok, documents, batch_size=4, max_tokens=MAX_TOKENS)
    assert len(list((tmp_path / "side-effects-v1").iterdir())) == 4


def test_the_base_pass_is_made_once_per_process_with_the_disk_cache_off(documents, monkeypatch):
    """A study's cells share the base pass in memory even where nothing may be written (`$EIGENPRUNE_CACHE=off`);
    the process's copy is the pass's own numbers, and another model (an edit) is another entry."""
    monkeypatch.setenv("EIGENPRUNE_CACHE", "off")
    se.base_cache._MEMORY.clear()
    model, tok, edit = edited("gpt2", 0.4)
    first = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        again = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)
        assert calls == []
        with applied(model, edit):
            se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS)
        assert calls  # the edited model's pass is made: its weights are another key
    finally:
        handle.remove()
    np.testing.assert_array_equal(again.base.nll, first.base.nll)
    assert all(torch.equal(a, b) for a, b in zip(again._hidden, first._hidden, strict=True))
