"""Exact match from one teacher-forced pass (`evaluate.exact_match`) against greedy generation, the path it
replaced (`greedy_continuations`, kept as the reference): the same verdict on every example.

Random tiny models get arithmetic wrong, so "correct" is made to happen: for some examples the gold answer
*is* the model's greedy output (as ids, or as decoded text, which may tokenize another way), for others that
output with one token changed (wrong at the first, middle or last position). Near ties and generation
configs that move the argmax must fall back to generation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build
from helpers import EXAMPLES, sensitive

from eigenprune.core.batching import Encoded, Example, encode
from eigenprune.edits.engine import score_run
from eigenprune.edits.freeze import FreezeConfig, applied
from eigenprune.edits.scoring import ScoreConfig
from eigenprune.evaluation import evaluate as ev
from eigenprune.evaluation.exact import CORRECT, UNSURE, WRONG, plain_greedy, position_verdicts
from eigenprune.evaluation.tasks import load_task


def reference(model, encoded, pad_id, batch_size=16) -> torch.Tensor:
    generated = ev.greedy_continuations(model, encoded, pad_id, batch_size)
    return torch.tensor([g == e.answer_ids for g, e in zip(generated, encoded, strict=True)])


def mixed(model, prompts: list[tuple[int, ...]], pad_id: int, vocab: int, seed: int = 0) -> list[Encoded]:
    """Per prompt: answers of 1-4 tokens, half of them greedy's own output, half that output with one token
    changed (first, middle or last position)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1 + int(torch.randint(4, (1,), generator=g)) for _ in prompts]
    probe = [Encoded(p, (0,) * k) for p, k in zip(prompts, lengths, strict=True)]
    greedy = ev.greedy_continuations(model, probe, pad_id)
    out = []
    for i, (p, ids) in enumerate(zip(prompts, greedy, strict=True)):
        ids = list(ids)
        if i % 2:
            at = [0, len(ids) // 2, len(ids) - 1][i % 3]
            ids[at] = (ids[at] + 1 + int(torch.randint(vocab - 1, (1,), generator=g))) % vocab
        out.append(Encoded(p, tuple(ids)))
    return out


def prompts_of(tok, examples) -> list[tuple[int, ...]]:
    return [tuple(tok(ex.prompt)["input_ids"]) for ex in examples]


TASK_EXAMPLES = [*load_task("int-sum").train[:20], *load_task("int-mult").train[:20], *EXAMPLES]


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_same_verdict_as_generation(arch, batch_size):
    model, tok = build(arch)
    encoded = mixed(model, prompts_of(tok, TASK_EXAMPLES), tok.pad_token_id, model.config.vocab_size)
    want = reference(model, encoded, tok.pad_token_id, batch_size)
    got = ev.exact_match(model, encoded, tok.pad_token_id, batch_size)
    assert got.tolist() == want.tolist()
    assert 0 < int(want.sum()) < len(want)  # both verdicts occur


def test_same_verdict_under_a_real_edit(arch):
    model, tok = sensitive(arch)
    run = score_run(model, tok, EXAMPLES, targets="all", config=ScoreConfig(partners="all"), progress=False)
    prompts = prompts_of(tok, TASK_EXAMPLES)
    with applied(model, run.edit(FreezeConfig(p=0.3))):
        encoded = mixed(model, prompts, tok.pad_token_id, model.config.vocab_size, seed=1)
        want = reference(model, encoded, tok.pad_token_id)
        got = ev.exact_match(model, encoded, tok.pad_token_id)
        edited = model(torch.tensor([prompts[0]])).logits
    assert got.tolist() == want.tolist()
    assert 0 < int(want.sum()) < len(want)
    assert (model(torch.tensor([prompts[0]])).logits - edited).abs().max() > 1e-2  # the edit matters


def test_text_answers_through_evaluate(arch):
    """Answers given as text (greedy output decoded, which may re-tokenize into other ids, as a JSONL task
    gives them): evaluate's verdict equals generation's on the answers' own ids."""
    model, tok = build(arch)
    encoded = mixed(model, prompts_of(tok, TASK_EXAMPLES), tok.pad_token_id, model.config.vocab_size)
    pairs = [(dataclasses.replace(ex, answer=tok.decode(e.answer_ids), choices=None, label=None), e)
             for ex, e in zip(TASK_EXAMPLES, encoded, strict=True) if tok.decode(e.answer_ids).strip()]
    examples = [ex for ex, _ in pairs]
    retokenized = encode(tok, examples)
    want = reference(model, retokenized, tok.pad_token_id)
    assert ev.evaluate(model, tok, examples, "exact").correct.tolist() == want.tolist()
    other_ids = [r.answer_ids != e.answer_ids for r, (_, e) in zip(retokenized, pairs, strict=True)]
    assert int(want.sum()) > 0 or any(other_ids)  # right answers, or text that greedy writes with other ids


def test_position_verdicts_rules():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [0.0, 0.0, 3.0]],  # gold 1 sure, gold 2 sure: correct
                           [[0.0, 5.0, 1.0], [4.0, 0.0, 3.0]],  # second position surely not gold: wrong
                           [[0.0, 5.0, 5.0], [4.0, 0.0, 3.0]],  # a tie first, then surely wrong: wrong
                           [[0.0, 5.0, 5.0], [0.0, 0.0, 3.0]],  # a tie, then right: unsure
                           [[0.0, 5.0, 1.0], [0.0, 0.0, 3.0]]])  # one-token answer, padding after: correct
    labels = torch.tensor([[1, 2], [1, 2], [1, 2], [1, 2], [1, -100]])
    assert position_verdicts(logits, labels, 1e-4).tolist() == [CORRECT, WRONG, WRONG, UNSURE, CORRECT]
    nan = logits.clone()
    nan[0, 1, 0] = float("nan")
    assert position_verdicts(nan, labels, 1e-4).tolist()[0] == UNSURE


def test_near_ties_are_generated(monkeypatch):
    """A logit bias that ties gold with another token at an answer position: that example goes to
    generation, in its own batch, and gets generation's verdict."""
    model, tok = build("gpt2")
    encoded = mixed(model, prompts_of(tok, TASK_EXAMPLES), tok.pad_token_id, model.config.vocab_size)
    want = reference(model, encoded, tok.pad_token_id, 16)
    real = ev.position_verdicts
    calls = []
    monkeypatch.setattr(ev, "position_verdicts", lambda z, y, t: real(z, y, 1e9))  # every margin "near a tie"
    original = ev.greedy_continuations
    monkeypatch.setattr(ev, "greedy_continuations",
                        lambda m, e, *a, **k: calls.append(len(e)) or original(m, e, *a, **k))
    got = ev.exact_match(model, encoded, tok.pad_token_id, 16)
    assert got.tolist() == want.tolist()
    assert sum(calls) == len(encoded) and max(calls) <= 16


def test_no_generation_when_every_margin_is_clear(monkeypatch):
    model, tok = build("llama")
    encoded = mixed(model, prompts_of(tok, TASK_EXAMPLES), tok.pad_token_id, model.config.vocab_size)
    want = reference(model, encoded, tok.pad_token_id)
    monkeypatch.setattr(ev, "greedy_continuations", lambda *a, **k: pytest.fail("generated"))
    assert ev.exact_match(model, encoded, tok.pad_token_id).tolist() == want.tolist()


def test_a_repetition_penalty_falls_back_to_generation():
    """With a logits processor in the model's generation config, greedy is not the argmax: generate."""
    model, tok = build("phi")
    encoded = mixed(model, prompts_of(tok, TASK_EXAMPLES), tok.pad_token_id, model.config.vocab_size)
    model.generation_config.repetition_penalty = 50.0
    assert not plain_greedy(model)
    want = reference(model, encoded, tok.pad_token_id)
    assert ev.exact_match(model, encoded, tok.pad_token_id).tolist() == want.tolist()
    model.generation_config.repetition_penalty = 1.0
    assert plain_greedy(model)
    assert ev.exact_match(model, encoded, tok.pad_token_id).tolist() != want.tolist()  # the penalty mattered


def test_int_tasks_through_evaluate(arch):
    model, tok = build(arch)
    examples = [Example(ex.prompt, ex.answer) for ex in TASK_EXAMPLES]
    want = reference(model, encode(tok, examples), tok.pad_token_id)
    assert ev.evaluate(model, tok, examples, "exact").correct.tolist() == want.tolist()
