"""Examples as token ids, and padded teacher-forcing batches aligned on the last prompt token.

Every per-position quantity in eigenprune (scores' pairing, the frozen bias table) is indexed by a
token's *offset* from the last prompt token: the last prompt token is offset 0, the first answer
token offset 1, earlier prompt tokens are negative. A batch holds prompt + answer[:-1] (the last
answer token predicts nothing), right-padded, with labels at the positions that predict an answer
token. This module is the single place that builds such batches.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eigenprune.core.errors import UsageError
from eigenprune.core.positions import prompt_lengths


@dataclass(frozen=True)
class Example:
    """One task item: a prompt and its correct answer (a continuation, usually with a leading space).

    `choices`/`label` are set for classification tasks: `answer == choices[label]`.
    """

    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    label: int | None = None


@dataclass(frozen=True)
class Encoded:
    """An example's prompt and answer token ids (answer tokenized without special tokens)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    def __len__(self) -> int:  # tokens fed to the model under teacher forcing
        return len(self.prompt_ids) + len(self.answer_ids) - 1


@dataclass
class Batch:
    """A right-padded teacher-forcing batch. Offsets: `position - (prompt_lengths - 1)`."""

    input_ids: torch.Tensor  # (batch, pos)
    attention_mask: torch.Tensor  # (batch, pos)
    labels: torch.Tensor  # (batch, pos) next-token ids at answer-predicting positions, else -100
    prompt_lengths: torch.Tensor  # (batch,)
    index: torch.Tensor  # (batch,) positions of the examples in the encoded list

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels,
                                               self.prompt_lengths, self.index)))

    @property
    def position_ids(self) -> torch.Tensor:  # (batch, pos)
        return (self.attention_mask.long().cumsum(1) - 1).clamp(min=0)

    @property
    def offsets(self) -> torch.Tensor:  # (batch, pos) offset from the last prompt token
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return pos[None, :] - (self.prompt_lengths[:, None] - 1)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def encode(tokenizer, examples: Sequence[Example], answers: Sequence[str] | None = None) -> list[Encoded]:
    """Tokenize prompts (with the tokenizer's usual special tokens) and answers (without any)."""
    answers = [ex.answer for ex in examples] if answers is None else answers
    out = []
    for ex, answer in zip(examples, answers, strict=True):
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise UsageError(f"an example's prompt tokenizes to nothing: {ex.prompt!r}")
        if not answer_ids:
            raise UsageError(f"an example's answer tokenizes to nothing: {answer!r} (prompt {ex.prompt[:40]!r})")
        out.append(Encoded(tuple(prompt_ids), tuple(answer_ids)))
    return out


def check_fits(model, encoded: Sequence[Encoded]) -> None:
    """A prompt + answer longer than the model's context is a UsageError, not an index error deep inside."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    longest = max((len(e.prompt_ids) + len(e.answer_ids) for e in encoded), default=0)
    if limit and longest > limit:
        raise UsageError(f"an example is {longest} tokens long but the model takes at most {limit}; "
                         "shorten the prompts (--template) or use a model with a longer context")


def collate(encoded: Sequence[Encoded], index: Sequence[int], pad_id: int) -> Batch:
    """Right-pad prompt + answer[:-1] for the given examples into one batch."""
    rows = [encoded[i] for i in index]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, r in enumerate(rows):
        seq = r.prompt_ids + r.answer_ids[:-1]
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        p = len(r.prompt_ids)
        labels[b, p - 1 : p - 1 + len(r.answer_ids)] = torch.tensor(r.answer_ids)
    lengths = torch.tensor([len(r.prompt_ids) for r in rows])
    return Batch(ids, mask, labels, lengths, torch.tensor(list(index), dtype=torch.long))


def batches(
    encoded: Sequence[Encoded], batch_size: int, pad_id: int, order: Sequence[int] | None = None
) -> Iterator[Batch]:
    """Batches in `order` (default: by length, which keeps padding low)."""
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if order is None:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        yield collate(encoded, order[start : start + batch_size], pad_id)


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over each example's answer tokens: (batch, pos, vocab) -> (batch,)."""
    flat = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    )
    return flat.view(labels.shape).sum(1)


def last_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], last: int) -> torch.Tensor:
    """Logits of the `last` final positions only, (batch, last, vocab), where the model can trim
    (`logits_to_keep`); else of every position. The LM head gets its sliced input contiguous: on
    the strided slice torch falls back to a batched matmul several times slower than computing
    every position's logits (SmolLM2-135M on CPU: 80 ms a batch)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return model(**inputs, use_cache=False).logits
    handle = head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        return model(**inputs, use_cache=False, logits_to_keep=last).logits
    finally:
        handle.remove()


def teacher_forced(model: torch.nn.Module, batch: Batch, last: int | None = None) -> torch.Tensor:
    """The one teacher-forced forward of a `Batch`: logits of its `last` final positions (default: from
    the shortest prompt's last token on), with autograd as the caller has it.

    An edited model learns here where each row's prompt ends (`positions.prompt_lengths`), so no
    caller can forget to tell it: scoring, choice evaluation and fine-tuning all come through this.
    """
    if last is None:
        last = batch.input_ids.shape[1] - int(batch.prompt_lengths.min()) + 1
    with prompt_lengths(model, batch.prompt_lengths):
        return last_logits(model, batch.model_inputs(), last)


def batch_nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Each example's summed answer NLL under teacher forcing, (batch,), with autograd as the caller has it.

    Right padding puts every answer-predicting position at or after the shortest prompt's last token,
    so the LM head only runs from there on: a vocabulary-wide logit row per position is most of a
    small model's forward+backward memory.
    """
    logits = teacher_forced(model, batch)  # (batch, last, vocab)
    return answer_nll(logits, batch.labels[:, batch.labels.shape[1] - logits.shape[1]:])


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """Parse a JSONL file into (line number, object) pairs; a bad line is a UsageError naming both."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"file not found: {path}")
    rows = []
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading byte-order mark is fine
            except UnicodeDecodeError as err:
                raise UsageError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                                 f"{err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise UsageError(f"{path} holds no examples")
    return rows


def load_prompt_answer_jsonl(path: str | Path) -> list[Example]:
    """A JSONL file of {"prompt": ..., "answer": ...} lines."""
    examples = []
    for n, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
            raise UsageError(f"{path}:{n}: each line needs string fields 'prompt' and 'answer'")
        examples.append(Example(row["prompt"], row["answer"]))
    return examples
