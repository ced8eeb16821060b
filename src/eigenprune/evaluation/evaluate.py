"""Accuracy of a (possibly edited) causal LM on a list of Examples, in one of three modes.

- `next-token` (the paper's metric): the argmax over the whole vocabulary at the last prompt token
  is the answer's first token. Meaningless when choices share their first token (a tokenizer that
  splits " 1" into " " + "1"); `next_token_warnings` says when.
- `choice`: the example's choice with the highest summed log-likelihood (teacher forcing) is its
  label. Needs classification examples. The prompt runs once per example; its choices are scored on
  its KV cache.
- `exact`: greedy generation of as many tokens as the answer has reproduces the answer's token ids.
  Decided by one teacher-forced pass over prompt + answer (`exact_match`; `exact.py` says why that is
  the same verdict); only examples with a near tie at an answer position are generated.

In `choice` mode the label each example's evaluation picked is kept — the choice's text when every example
offers the same choices (CB's entailment/contradiction/neutral), else its position ("choice 2": COPA) —
as `EvalResult.predicted`, and
`predicted_choices(correct)` for the correctness tensor `evaluate` returned (the same object, as it travels
through a method's result), so reports can show which labels a model answers. With a `Calibration`
(`calibration.py`), `choice` mode scores each choice by its log-probability minus the one the same model gives it
after the task's content-free prompts, computed in that very call (so each model state gets its own); the
content-free distribution travels the same way (`EvalResult.content_free`, `content_free_prior(correct)`).

Every function here runs under `torch.inference_mode()`, batches examples of similar length together
and leaves the model in the train/eval mode it found. Choice forwards (the prompts, then the choices
on their cache) run inside `prompt_lengths(...)` so an edited model knows where each prompt ends;
next-token and generation forwards are left padded prompts, where an edited model's own bookkeeping
already counts every real token as prompt.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from eigenprune.core.batching import (
    Encoded,
    Example,
    answer_nll,
    batches,
    check_fits,
    encode,
    last_logits,
    teacher_forced,
)
from eigenprune.core.errors import UsageError
from eigenprune.core.positions import prompt_lengths
from eigenprune.core.progress import bar as progress_bar
from eigenprune.evaluation.calibration import Calibration, calibrated_nll, content_free_logprobs, prior_by_choice
from eigenprune.evaluation.exact import UNSURE, plain_greedy, position_verdicts, tolerance
from eigenprune.evaluation.stats import accuracy
from eigenprune.evaluation.tasks import EVAL_MODES


@dataclass(frozen=True)
class EvalResult:
    """Per-example correctness in the order the examples were given, and the mode that judged it."""

    correct: torch.Tensor  # (n,) bool
    mode: str
    predicted: tuple[str, ...] | None = None  # `choice` mode: the label picked for each example (see below)
    content_free: dict[str, float] | None = None  # calibrated `choice` mode: p_cf of each label word
    nll: torch.Tensor | None = None  # (n,) each answer's summed NLL, when asked for and the judging pass gave it

    @property
    def n(self) -> int:
        return int(self.correct.numel())

    @property
    def accuracy(self) -> float:
        return accuracy(self.correct) if self.n else float("nan")


# id(correct) -> (its weak ref, the choices picked, the content-free distribution when calibrated)
_PREDICTED: dict[int, tuple[weakref.ref, tuple[str, ...], dict[str, float] | None]] = {}


def _remember(correct: torch.Tensor, predicted: tuple[str, ...], content_free: dict[str, float] | None) -> None:
    key = id(correct)
    _PREDICTED[key] = (weakref.ref(correct, lambda _, key=key: _PREDICTED.pop(key, None)), predicted, content_free)


def _entry(correct: torch.Tensor) -> tuple | None:
    entry = _PREDICTED.get(id(correct))
    return entry if entry is not None and entry[0]() is correct else None


def predicted_choices(correct: torch.Tensor) -> tuple[str, ...] | None:
    """The choice picked for each example, for a correctness tensor that `evaluate` returned in `choice` mode
    (that very object); None for any other tensor (another mode, or values a method computed itself)."""
    entry = _entry(correct)
    return entry[1] if entry is not None else None


def content_free_prior(correct: torch.Tensor) -> dict[str, float] | None:
    """The content-free distribution over the label words that calibrated `evaluate` used for that correctness
    tensor (that very object); None when it was not calibrated."""
    entry = _entry(correct)
    return entry[2] if entry is not None else None


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and inference mode for the duration; the model's previous mode comes back."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(items, total: int, show: bool | str, what: str):
    """A bar over batches; `show` is False, True, or the step it belongs to (`core.progress`)."""
    return progress_bar(items, total=total, progress=show, what=what, unit="batch")


def _n_batches(n: int, batch_size: int) -> int:
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    return -(-n // batch_size)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad token id lists so every row's last prompt token sits in the last column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (batch, pos)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (batch, pos)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _prompt_batches(encoded: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Example indices in batches of similar prompt (then answer) length."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].prompt_ids), len(encoded[i].answer_ids)))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def next_token_predictions(model: torch.nn.Module, encoded: Sequence[Encoded], pad_id: int,
                           batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """The argmax token after each prompt, as (n,) token ids in input order."""
    out = torch.empty(len(encoded), dtype=torch.long)
    device = _device(model)
    groups = _prompt_batches(encoded, batch_size)
    with _evaluating(model):
        for index in _progress(groups, _n_batches(len(encoded), batch_size), progress, "next-token"):
            inputs = left_padded([encoded[i].prompt_ids for i in index], pad_id)
            mask = inputs["attention_mask"]  # (batch, pos)
            inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)  # (batch, pos)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            logits = last_logits(model, inputs, 1)  # (batch, 1 or pos, vocab)
            out[torch.tensor(index)] = logits[:, -1].argmax(-1).cpu()  # (batch,)
    return out


def _prompt_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, object]:
    """Logits at the last column, (batch, vocab), and the KV cache of a left-padded prompt batch. Like
    `batching.last_logits`, the LM head runs on the last position only, with its input made contiguous."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:])) if head else None
    try:
        out = model(**inputs, use_cache=True, **keep)
    finally:
        if handle is not None:
            handle.remove()
    if out.past_key_values is None:
        raise UsageError("eval mode 'choice' needs a model that returns a KV cache (use_cache=True)")
    return out.logits[:, -1], out.past_key_values


def _rows_of(cache, rows: torch.Tensor):
    """The cache with its batch rows taken in `rows` order (repeats allowed): one row per continuation."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(rows)
        return cache
    return tuple(tuple(t.index_select(0, rows) for t in layer) for layer in cache)  # legacy tuple caches


def choice_nll(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 16,
               progress: bool = False) -> list[torch.Tensor]:
    """Summed negative log-likelihood of every choice of every example: a (n_choices,) tensor each.

    Each prompt is computed once. One forward of a batch of left-padded prompts gives every choice's
    first token and a KV cache; the choices that have more tokens then continue on their example's
    cache rows in a second forward, with positions and edit offsets counted from the last prompt token
    (the same values as teacher-forcing prompt + choice in one sequence). `batch_size` counts (prompt,
    choice) sequences, as teacher forcing every pair did: a batch holds batch_size // choices prompts,
    which keeps its memory and its padding (prompts of similar length) what they were. CB on
    SmolLM2-135M, 32 examples, 1 thread: 8.2 s CPU with 5 prompts a batch, 12.4 s with 16; teacher
    forcing every pair took 25 s.
    """
    flat, answers = [], []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise UsageError(f"eval mode 'choice' needs classification examples; example {i} has no choices "
                             f"(prompt {ex.prompt[:40]!r}); use 'exact' or 'next-token'")
        flat += [ex] * len(ex.choices)
        answers += list(ex.choices)
    encoded = encode(tokenizer, flat, answers)  # (example, choice) pairs in example order
    check_fits(model, encoded)
    first = torch.tensor([0, *(len(ex.choices) for ex in examples)]).cumsum(0).tolist()  # example -> first pair
    nll = torch.empty(len(encoded))
    device = _device(model)
    prompts = [encoded[first[i]] for i in range(len(examples))]
    _n_batches(len(examples), batch_size)  # a batch size below 1 is a UsageError
    per_batch = max(1, batch_size // max(len(ex.choices) for ex in examples))
    groups = _prompt_batches(prompts, per_batch)
    with _evaluating(model):
        for index in _progress(groups, _n_batches(len(examples), per_batch), progress, "choice"):
            inputs = left_padded([prompts[i].prompt_ids for i in index], tokenizer.pad_token_id)
            mask = inputs["attention_mask"]  # (batch, pos)
            lengths = mask.sum(1)  # (batch,)
            inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)  # (batch, pos)
            with prompt_lengths(model, lengths.to(device)):
                logits, cache = _prompt_forward(model, {k: v.to(device) for k, v in inputs.items()})
            first_logp = logits.float().log_softmax(-1).cpu()  # (batch, vocab)
            pairs = [(row, j) for row, i in enumerate(index) for j in range(first[i], first[i + 1])]
            for row, j in pairs:
                nll[j] = -first_logp[row, encoded[j].answer_ids[0]]
            longer = [(row, j) for row, j in pairs if len(encoded[j].answer_ids) > 1]
            if longer:
                nll[torch.tensor([j for _, j in longer])] += _continuation_nll(
                    model, cache, mask, lengths, longer, encoded, tokenizer.pad_token_id, device)
    return list(nll.split([len(ex.choices) for ex in examples]))


def _continuation_nll(model: torch.nn.Module, cache, prompt_mask: torch.Tensor, lengths: torch.Tensor,
                      longer: list[tuple[int, int]], encoded: Sequence[Encoded], pad_id: int,
                      device: torch.device) -> torch.Tensor:
    """NLL of answer tokens 2.. of each (cache row, pair), fed right-padded after the cached prompts: (rows,)."""
    answers = [encoded[j].answer_ids for _, j in longer]
    width = max(len(a) for a in answers) - 1
    ids = torch.full((len(longer), width), pad_id, dtype=torch.long)  # (rows, width)
    mask = torch.zeros((len(longer), width), dtype=torch.long)  # (rows, width)
    labels = torch.full((len(longer), width), -100, dtype=torch.long)  # (rows, width)
    for r, a in enumerate(answers):
        ids[r, : len(a) - 1] = torch.tensor(a[:-1])
        mask[r, : len(a) - 1] = 1
        labels[r, : len(a) - 1] = torch.tensor(a[1:])
    rows = torch.tensor([row for row, _ in longer])
    cache = _rows_of(cache, rows.to(device))
    row_lengths = lengths[rows]  # (rows,)
    inputs = {"input_ids": ids, "attention_mask": torch.cat([prompt_mask[rows], mask], 1),  # (rows, pos + width)
              "position_ids": row_lengths[:, None] + torch.arange(width)[None, :]}  # (rows, width)
    with prompt_lengths(model, row_lengths.to(device)):
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, past_key_values=cache, use_cache=True).logits
    return answer_nll(logits, labels.to(device)).cpu()  # (rows,)


def greedy_continuations(model: torch.nn.Module, encoded: Sequence[Encoded], pad_id: int,
                         batch_size: int = 16, progress: bool = False) -> list[tuple[int, ...]]:
    """The first greedy tokens after each prompt, as many as its answer has.

    Generation ignores EOS (an EOS before the answer's end is a mismatch either way, and rows that
    stopped early would otherwise be padded with a pad id that may equal EOS). The neutral sampling
    values keep transformers from warning about a model's sampling defaults; decoding is greedy.
    """
    out: list[tuple[int, ...]] = [()] * len(encoded)
    device = _device(model)
    groups = _prompt_batches(encoded, batch_size)
    with _evaluating(model):
        for index in _progress(groups, _n_batches(len(encoded), batch_size), progress, "generate"):
            inputs = {k: v.to(device) for k, v in left_padded([encoded[i].prompt_ids for i in index],
                                                               pad_id).items()}
            width = inputs["input_ids"].shape[1]
            new = max(len(encoded[i].answer_ids) for i in index)
            generated = model.generate(
                **inputs, do_sample=False, num_beams=1, max_new_tokens=new, use_cache=True,
                pad_token_id=pad_id, eos_token_id=None, temperature=1.0, top_p=1.0, top_k=50,
            )[:, width:].cpu()  # (batch, new)
            for row, i in enumerate(index):
                out[i] = tuple(generated[row, : len(encoded[i].answer_ids)].tolist())
    return out


def exact_match(model: torch.nn.Module, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 16,
                progress: bool = False, nll: torch.Tensor | None = None) -> torch.Tensor:
    """Whether greedy decoding reproduces each answer's token ids, (n,) bool in input order: the verdict of
    `greedy_continuations(...) == answer_ids`, decided by one teacher-forced pass (`exact.py` proves it the
    same). Examples with a near tie at an answer position are generated, each in the very batch
    `greedy_continuations` would have put it in, so even their floating point is what generation gives.
    `nll`, an (n,) tensor, is filled with each answer's summed NLL from that pass's logits: the forward and the
    sum `protocol.search.dev_nll` makes (`batching.batch_nll`), so the same bits without a second pass; it is
    left as it was when there is no teacher-forced pass (`plain_greedy` false)."""
    verdict = torch.full((len(encoded),), UNSURE, dtype=torch.int8)
    device = _device(model)
    if plain_greedy(model):
        with _evaluating(model):
            for batch in _progress(batches(encoded, batch_size, pad_id), _n_batches(len(encoded), batch_size),
                                   progress, "exact"):
                logits = teacher_forced(model, batch.to(device))  # (batch, last, vocab)
                labels = batch.labels[:, batch.labels.shape[1] - logits.shape[1]:].to(device)  # (batch, last)
                verdict[batch.index] = position_verdicts(logits, labels, tolerance(logits.dtype))
                if nll is not None:
                    nll[batch.index.cpu()] = answer_nll(logits, labels).float().cpu()  # (batch,) as batch_nll
    correct = verdict == 1
    for group in _prompt_batches(encoded, batch_size):
        if (verdict[group] == UNSURE).any():
            rows = [encoded[i] for i in group]
            generated = greedy_continuations(model, rows, pad_id, batch_size)
            correct[group] = torch.tensor([g == e.answer_ids for g, e in zip(generated, rows, strict=True)])
    return correct


def choice_scores(model: torch.nn.Module, tokenizer, examples: Sequence[Example], batch_size: int = 16,
                  progress: bool | str = False,
                  calibration: Calibration | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """What `choice` mode takes the argmin of: each example's summed choice NLLs, (n_choices,) each, and None;
    with a `calibration`, the calibrated NLLs −(log p(c | x) − log p_cf(c)) and log p_cf, (n_choices,), computed
    here from this model as it is now (`calibration.py`)."""
    nll = choice_nll(model, tokenizer, examples, batch_size, progress)
    if calibration is None:
        return nll, None
    if any(tuple(ex.choices) != calibration.choices for ex in examples):
        raise UsageError(f"calibration of task {calibration.task!r}: an example offers other choices than the "
                         f"task's {calibration.choices}")
    log_prior = content_free_logprobs(choice_nll(model, tokenizer, calibration.examples(), batch_size))
    return [calibrated_nll(v, log_prior) for v in nll], log_prior


def evaluate(model: torch.nn.Module, tokenizer, examples: Sequence[Example], mode: str,
             batch_size: int = 16, progress: bool | str = False,
             calibration: Calibration | None = None, with_nll: bool = False) -> EvalResult:
    """Judge every example in `mode` ('next-token', 'choice' or 'exact'); see the module docstring. A
    `calibration` (choice mode only) calibrates the choice scores by this model's content-free distribution.
    `with_nll`: also each answer's summed NLL where the judging pass computes it (`exact` mode with plain greedy
    decoding, `exact_match`), else `nll` stays None."""
    if mode not in EVAL_MODES:
        raise UsageError(f"unknown eval mode {mode!r}; choose one of {', '.join(EVAL_MODES)}")
    if calibration is not None and mode != "choice":
        raise UsageError(f"calibration applies to eval mode 'choice', not {mode!r}")
    if not examples:
        return EvalResult(torch.zeros(0, dtype=torch.bool), mode)
    pad_id = tokenizer.pad_token_id
    if mode == "choice":
        nll, log_prior = choice_scores(model, tokenizer, examples, batch_size, progress, calibration)
        prior = prior_by_choice(calibration.choices, log_prior) if calibration is not None else None
        picked = [int(v.argmin()) for v in nll]
        correct = torch.tensor([i == ex.label for i, ex in zip(picked, examples, strict=True)])
        shared = len({tuple(ex.choices) for ex in examples}) == 1  # label words (CB, RTE), else positions (COPA)
        predicted = tuple(ex.choices[i].strip() if shared else f"choice {i + 1}"
                          for i, ex in zip(picked, examples, strict=True))
        _remember(correct, predicted, prior)
        return EvalResult(correct, mode, predicted, prior)
    encoded = encode(tokenizer, examples)
    check_fits(model, encoded)
    if mode == "next-token":
        predicted = next_token_predictions(model, encoded, pad_id, batch_size, progress)  # (n,)
        first = torch.tensor([e.answer_ids[0] for e in encoded])  # (n,)
        return EvalResult(predicted == first, mode)
    nll = torch.full((len(encoded),), float("nan")) if with_nll and plain_greedy(model) else None  # (n,)
    return EvalResult(exact_match(model, encoded, pad_id, batch_size, progress, nll), mode, nll=nll)


def multi_token_answers(tokenizer, examples: Sequence[Example]) -> bool:
    """Whether any answer (or any choice) tokenizes to more than one token."""
    texts = {t for ex in examples for t in (ex.answer, *(ex.choices or ()))}
    return any(len(tokenizer(t, add_special_tokens=False)["input_ids"]) > 1 for t in texts)


def next_token_warnings(tokenizer, examples: Sequence[Example]) -> list[str]:
    """One line per reason why `next-token` accuracy may not measure what it claims on these examples."""
    texts = sorted({t for ex in examples for t in (ex.answer, *(ex.choices or ()))})
    ids = {t: tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}
    warnings = []
    multi = [t for t in texts if len(ids[t]) > 1]
    if multi:
        shown = ", ".join(repr(t) for t in multi[:3]) + (", ..." if len(multi) > 3 else "")
        warnings.append(f"{len(multi)} answer(s) span several tokens ({shown}); next-token accuracy "
                        "checks only the first token")
    shared = set()
    for ex in examples:
        firsts = [ids[c][:1] for c in ex.choices or ()]
        if len(set(firsts)) < len(firsts):
            shared.add(tuple(ex.choices))
    for choices in sorted(shared):
        warnings.append(f"choices {', '.join(map(repr, choices))} share a first token, so next-token "
                        "accuracy cannot tell them apart; use --eval-mode choice")
    return warnings
