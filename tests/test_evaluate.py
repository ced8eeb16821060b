"""Tests for evaluate.py: every mode on tiny GPT-2 / Llama / Phi models against plain per-example loops.

Random tiny models rarely get anything right, so the checks compare what the batched code predicts
(argmax tokens, greedy tokens, per-choice NLLs) with unbatched, unpadded loops, and then build
examples whose answers are the model's own predictions so that "correct" is exercised too. A fake
offset-dependent edit checks that each mode tells an edited model where its prompts end; a real edit
(`freeze.applied`) checks that choice scoring on the prompt's KV cache equals teacher forcing every
(prompt, choice) pair, the path it replaced.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import build, make_tokenizer
from helpers import EXAMPLES, sensitive

from eigenprune.core.batching import Example, batch_nll, batches, encode
from eigenprune.core.errors import UsageError
from eigenprune.core.positions import OffsetTracker, prompt_lengths
from eigenprune.edits.engine import score_run
from eigenprune.edits.freeze import FreezeConfig, applied
from eigenprune.edits.scoring import ScoreConfig
from eigenprune.evaluation.evaluate import (
    choice_nll,
    evaluate,
    greedy_continuations,
    left_padded,
    multi_token_answers,
    next_token_predictions,
    next_token_warnings,
)
from eigenprune.evaluation.tasks import load_task

NLI = (" entails", " contradicts", " is neutral")
DIGITS = (" 1", " 2")
CHOICE_CASES = [  # prompts of very different lengths, two choice sets, multi-token choices
    ("Premise: the cat sat on the mat. Hypothesis: a cat sat. The premise", NLI, 0),
    ("The premise", NLI, 2),
    ("Does the premise entail, contradict or is neutral to the hypothesis? Answer (entails, contradicts, "
     "is neutral): The premise", NLI, 1),
    ("Alternative 1: Alternative 2: The correct alternative is alternative", DIGITS, 1),
    ("What was the cause of this?", DIGITS, 0),
    ("12 + 34 =", DIGITS, 1),
]
CHOICE_EXAMPLES = [Example(p, c[label], c, label) for p, c, label in CHOICE_CASES]
GENERATION_EXAMPLES = [
    Example("7 x 8 =", " 56"),
    Example("Premise: the cat sat on the mat. What happened as a result? The correct alternative is", " 1"),
    Example("0 1 2 3 4 5 6 7 8 9 +", " 12 34"),
    Example("What is the correct alternative?", " is neutral"),
    Example("1 +", " 2"),
]


@contextlib.contextmanager
def fake_edit(model, vocab: int, seed: int = 0):
    """An offset-dependent logit bias (offsets -1..3, clamped), driven by the model's OffsetTracker."""
    table = torch.randn(5, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0  # (offset, vocab)
    tracker = OffsetTracker()
    tracker.attach(model)

    def add_bias(module, args, out):  # out: (batch, kept, vocab)
        offsets = tracker.offsets[:, -out.shape[1]:].clamp(-1, 3) + 1  # (batch, kept)
        return out + table[offsets]

    handle = model.lm_head.register_forward_hook(add_bias)
    try:
        yield table
    finally:
        handle.remove()
        tracker.detach(model)


def ref_logits(model, prompt_ids, answer_ids=(), table=None) -> torch.Tensor:
    """Unpadded logits of prompt + answer for one example, with the fake edit's bias added by hand."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)])  # (1, pos)
    with torch.inference_mode():
        logits = model(ids).logits[0]  # (pos, vocab)
    if table is not None:
        offsets = torch.arange(ids.shape[1]) - (len(prompt_ids) - 1)  # (pos,)
        logits = logits + table[offsets.clamp(-1, 3) + 1]
    return logits


def ref_next_token(model, encoded, table=None) -> torch.Tensor:
    return torch.tensor([int(ref_logits(model, e.prompt_ids, (), table)[-1].argmax()) for e in encoded])


def ref_greedy(model, encoded, table=None) -> list[tuple[int, ...]]:
    """Greedy decoding without padding or KV cache: one full forward per new token."""
    out = []
    for e in encoded:
        new: list[int] = []
        for _ in e.answer_ids:
            logits = ref_logits(model, e.prompt_ids, new, table)  # offsets of new tokens are 1, 2, ...
            new.append(int(logits[-1].argmax()))
        out.append(tuple(new))
    return out


def ref_choice_nll(model, tokenizer, examples, table=None) -> list[torch.Tensor]:
    out = []
    for ex in examples:
        prompt = tokenizer(ex.prompt)["input_ids"]
        nll = []
        for choice in ex.choices:
            answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
            logits = ref_logits(model, prompt, answer[:-1], table)[len(prompt) - 1:]  # (len(answer), vocab)
            nll.append(-logits.log_softmax(-1)[torch.arange(len(answer)), torch.tensor(answer)].sum())
        out.append(torch.stack(nll))
    return out


@contextlib.contextmanager
def forced_answer(model, answer_ids: list[int]):
    """Make the model 'know' one answer: a large logit on answer token j at offset j from the prompt end."""
    boost = torch.zeros(len(answer_ids), model.config.vocab_size)  # (offset, vocab)
    boost[torch.arange(len(answer_ids)), torch.tensor(answer_ids)] = 50.0
    tracker = OffsetTracker()
    tracker.attach(model)

    def add_boost(module, args, out):  # out: (batch, kept, vocab)
        offsets = tracker.offsets[:, -out.shape[1]:]  # (batch, kept)
        inside = (offsets >= 0) & (offsets < len(answer_ids))  # (batch, kept)
        return out + boost[offsets.clamp(0, len(answer_ids) - 1)] * inside[..., None]

    handle = model.lm_head.register_forward_hook(add_boost)
    try:
        yield
    finally:
        handle.remove()
        tracker.detach(model)


FORCED = " 12 34"
OTHERS = [" 56", " 12 35", " 12", " 1", " contradicts"]  # none longer (in tokens) than FORCED
PROMPTS = [ex.prompt for ex in GENERATION_EXAMPLES] + [p for p, _, _ in CHOICE_CASES]


def test_left_padded_puts_last_prompt_token_last():
    inputs = left_padded([(5, 6, 7), (8,)], pad_id=1)
    assert inputs["input_ids"].tolist() == [[5, 6, 7], [1, 1, 8]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("edited", [False, True])
def test_next_token_matches_unpadded_argmax(model_and_tokenizer, edited):
    model, tok = model_and_tokenizer
    encoded = encode(tok, GENERATION_EXAMPLES + CHOICE_EXAMPLES)
    with fake_edit(model, model.config.vocab_size) if edited else contextlib.nullcontext() as table:
        got = [next_token_predictions(model, encoded, tok.pad_token_id, batch_size=b) for b in (1, 4, 16)]
    # the reference runs on the bare model and adds the bias itself
    want = ref_next_token(model, encoded, table)
    for predicted in got:
        assert torch.equal(predicted, want)


@pytest.mark.parametrize("mode", ["next-token", "exact"])
def test_accuracy_when_the_model_knows_the_answer(model_and_tokenizer, mode):
    model, tok = model_and_tokenizer
    forced = tok(FORCED, add_special_tokens=False)["input_ids"]
    assert len(forced) > 1
    examples = [Example(p, a) for a in [FORCED, *OTHERS] for p in PROMPTS]
    want = []
    for ex in examples:
        ids = tok(ex.answer, add_special_tokens=False)["input_ids"]
        assert len(ids) <= len(forced)
        # next-token looks at the first token only; exact generates as many tokens as the answer has
        want.append(ids[0] == forced[0] if mode == "next-token" else ids == forced[: len(ids)])
    with forced_answer(model, forced):
        result = evaluate(model, tok, examples, mode, batch_size=4)
    assert result.correct.tolist() == want
    assert result.accuracy == pytest.approx(sum(want) / len(want))
    assert result.n == len(examples) and result.mode == mode


@pytest.mark.parametrize("edited", [False, True])
def test_exact_generation_matches_unpadded_greedy_loop(model_and_tokenizer, edited):
    model, tok = model_and_tokenizer
    examples = GENERATION_EXAMPLES + load_task("int-mult").test[:8]
    encoded = encode(tok, examples)
    assert len({len(e.answer_ids) for e in encoded}) > 1, "want answers of several token lengths"
    with fake_edit(model, model.config.vocab_size) if edited else contextlib.nullcontext() as table:
        got = [greedy_continuations(model, encoded, tok.pad_token_id, batch_size=b) for b in (1, 5, 16)]
    want = ref_greedy(model, encoded, table)
    assert got[0] == got[1] == got[2] == want


def test_choice_accuracy_when_the_model_knows_the_answer(model_and_tokenizer):
    model, tok = model_and_tokenizer
    choices = (" 56", FORCED, " 12 35")
    examples = [Example(p, choices[i % 3], choices, i % 3) for i, p in enumerate(PROMPTS)]
    with forced_answer(model, tok(FORCED, add_special_tokens=False)["input_ids"]):
        result = evaluate(model, tok, examples, "choice", batch_size=3)
    assert result.correct.tolist() == [i % 3 == 1 for i in range(len(PROMPTS))]


@pytest.mark.parametrize("edited", [False, True])
def test_choice_nll_matches_per_example_loop(model_and_tokenizer, edited):
    model, tok = model_and_tokenizer
    with fake_edit(model, model.config.vocab_size) if edited else contextlib.nullcontext() as table:
        got = [choice_nll(model, tok, CHOICE_EXAMPLES, batch_size=b) for b in (1, 4, 32)]
    want = ref_choice_nll(model, tok, CHOICE_EXAMPLES, table)
    for nll in got:
        for g, w in zip(nll, want, strict=True):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_choice_accuracy_matches_argmin_and_batch_size(model_and_tokenizer):
    model, tok = model_and_tokenizer
    want = [int(n.argmin()) == ex.label for n, ex in
            zip(ref_choice_nll(model, tok, CHOICE_EXAMPLES), CHOICE_EXAMPLES, strict=True)]
    for batch_size in (1, 7):
        assert evaluate(model, tok, CHOICE_EXAMPLES, "choice", batch_size=batch_size).correct.tolist() == want
    # relabel every example with the model's own pick: all correct
    picks = [Example(ex.prompt, ex.choices[i], ex.choices, i) for ex, i in
             zip(CHOICE_EXAMPLES, [int(n.argmin()) for n in ref_choice_nll(model, tok, CHOICE_EXAMPLES)],
                 strict=True)]
    assert evaluate(model, tok, picks, "choice").accuracy == 1.0


@pytest.mark.parametrize("mode", ["next-token", "choice", "exact"])
def test_restores_train_mode_and_keeps_input_order(mode):
    model, tok = build("gpt2")
    model.train()
    examples = CHOICE_EXAMPLES[::-1]
    result = evaluate(model, tok, examples, mode, batch_size=2, progress=True)
    assert model.training
    assert result.correct.dtype == torch.bool and result.correct.shape == (len(examples),)
    per_example = [bool(evaluate(model, tok, [ex], mode).correct[0]) for ex in examples]
    assert result.correct.tolist() == per_example
    model.eval()
    assert evaluate(model, tok, examples, mode).correct.tolist() == per_example
    assert not model.training


def test_choice_mode_needs_choices_and_modes_are_checked():
    model, tok = build("gpt2")
    with pytest.raises(UsageError, match="needs classification examples"):
        evaluate(model, tok, GENERATION_EXAMPLES, "choice")
    with pytest.raises(UsageError, match="unknown eval mode"):
        evaluate(model, tok, GENERATION_EXAMPLES, "greedy")
    with pytest.raises(UsageError, match="batch size"):
        evaluate(model, tok, GENERATION_EXAMPLES, "exact", batch_size=0)
    empty = evaluate(model, tok, [], "exact")
    assert empty.n == 0


@pytest.mark.parametrize("style, task, multi, shared_first", [
    ("gpt2", "copa", False, False),
    ("llama", "copa", True, True),  # " 1" -> " " + "1": both choices start with " "
    ("gpt2", "cb", True, False),
    ("llama", "int-mult", True, False),
])
def test_next_token_warnings(style, task, multi, shared_first):
    tok = make_tokenizer(style)
    examples = load_task(task).test
    assert multi_token_answers(tok, examples) == multi
    warnings = next_token_warnings(tok, examples)
    assert any("span several tokens" in w for w in warnings) == multi
    assert any("share a first token" in w for w in warnings) == shared_first



def teacher_forced_nll(model, tok, examples, batch_size: int = 4) -> list[torch.Tensor]:
    """The path choice scoring replaced: every (prompt, choice) pair as one right-padded teacher-forced row."""
    flat = [ex for ex in examples for _ in ex.choices]
    encoded = encode(tok, flat, [c for ex in examples for c in ex.choices])
    nll = torch.empty(len(encoded))
    with torch.inference_mode():
        for batch in batches(encoded, batch_size, tok.pad_token_id):
            with prompt_lengths(model, batch.prompt_lengths):
                nll[batch.index] = batch_nll(model, batch)
    return list(nll.split([len(ex.choices) for ex in examples]))


MIXED = CHOICE_EXAMPLES + [  # a varying number of choices, and an example whose choices are all one token
    Example("Premise: the cat sat. The premise", " is neutral", (" entails", " is neutral"), 1),
    Example("12 + 34 = 46. The alternative is", " 2", (" 1", " 2", " 3", " 4"), 1),
]


def close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=0)  # relative, as the issue asks


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_choice_nll_on_the_kv_cache_equals_teacher_forcing_under_a_real_edit(arch, batch_size):
    model, tok = sensitive(arch)
    run = score_run(model, tok, EXAMPLES, targets="all", config=ScoreConfig(partners="all"), progress=False)
    base = choice_nll(model, tok, MIXED, batch_size=batch_size)
    close(base, teacher_forced_nll(model, tok, MIXED))
    with applied(model, run.edit(FreezeConfig(p=0.3))):
        edited = choice_nll(model, tok, MIXED, batch_size=batch_size)
        want = teacher_forced_nll(model, tok, MIXED)
    close(edited, want)
    assert max(float((e - b).abs().max()) for e, b in zip(edited, base, strict=True)) > 1e-2  # the edit matters


def test_each_prompt_runs_once():
    model, tok = build("llama")
    calls = []
    def record(module, args, kwargs):  # (input shape, whether the call continues a cache)
        calls.append((kwargs["input_ids"].shape, kwargs.get("past_key_values") is not None))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        choice_nll(model, tok, MIXED, batch_size=16)
    finally:
        handle.remove()
    prompts = [c for c in calls if not c[1]]
    assert sum(shape[0] for shape, _ in prompts) == len(MIXED)  # one row per example, not per choice
    assert len(prompts) == 2 and len(calls) <= 4  # 16 // 4 choices = 4 prompts a batch, at most one continuation each
    multi = sum(len(tok(c, add_special_tokens=False)["input_ids"]) > 1 for ex in MIXED for c in ex.choices)
    assert sum(shape[0] for shape, cached in calls if cached) == multi  # only longer choices continue
