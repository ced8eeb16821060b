"""Token offsets from the last prompt token, tracked for an edited model during every forward.

Frozen layers add a bias that depends on a token's offset from the last prompt token (DEVELOPERS.md
step 4). A layer cannot see that on its own, so an edited model carries one `OffsetTracker`: a forward
pre-hook on the whole model computes the offsets of the tokens in each call from its attention mask
(or the KV cache length) and the prompt lengths, and the frozen layers read them.

Where the prompt ends:
- inside `prompt_lengths(model, lengths)`: as given (teacher forcing: prompt + answer in one call).
  `batching.teacher_forced`, the one function every teacher-forced forward of a `Batch` goes through
  (losses, scoring, choice evaluation, fine-tuning), opens this context itself;
- inside `model.generate(...)`: the real tokens of the input, for every step, cached or not;
- otherwise: a call without a KV cache is all prompt (its last real token is offset 0), and a call
  that extends a cache continues the prompt of the call that started that cache.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

_ATTR = "_eigenprune_offsets"


class OffsetTracker:
    """Holds the offsets (batch, pos) of the tokens in the model call under way."""

    def __init__(self) -> None:
        self.prompt_lengths: torch.Tensor | None = None  # (batch,) set by a context
        self.offsets: torch.Tensor | None = None  # (batch, pos) of the current call
        self._handle = None
        self._cached_prompt: torch.Tensor | None = None  # prompt lengths of the cache being extended

    def _pre_hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        batch, width = ids.shape[:2]
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            real = mask.long().cumsum(1)[:, -width:] - 1  # (batch, pos) index among real tokens
            total = mask.long().sum(1)
        else:
            real = (past + torch.arange(width, device=ids.device)).expand(batch, width)
            total = torch.full((batch,), past + width, device=ids.device)
        if self.prompt_lengths is not None:
            lengths = self.prompt_lengths
        elif past > 0 and self._cached_prompt is not None and len(self._cached_prompt) == batch:
            lengths = self._cached_prompt
        else:
            lengths = total
        if past == 0:
            self._cached_prompt = lengths
        self.offsets = real - (lengths.to(real.device)[:, None] - 1)

    def attach(self, model: torch.nn.Module) -> None:
        self._handle = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        setattr(model, _ATTR, self)
        original = type(model).generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            lengths = mask.long().sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
            with self.prompt(lengths):
                return original(model, *args, **kwargs)

        model.generate = generate  # instance attribute; removed by detach

    def detach(self, model: torch.nn.Module) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        model.__dict__.pop("generate", None)
        if getattr(model, _ATTR, None) is self:
            delattr(model, _ATTR)

    @contextlib.contextmanager
    def prompt(self, lengths: torch.Tensor) -> Iterator[None]:
        previous, self.prompt_lengths = self.prompt_lengths, lengths
        try:
            yield
        finally:
            self.prompt_lengths = previous


def tracker_of(model: torch.nn.Module) -> OffsetTracker | None:
    return getattr(model, _ATTR, None)


@contextlib.contextmanager
def prompt_lengths(model: torch.nn.Module, lengths: torch.Tensor) -> Iterator[None]:
    """Tell an edited model where each row's prompt ends (a no-op for a model without an edit).

    `batching.teacher_forced` does this for every `Batch`; call it yourself only around a teacher-forced
    forward of prompt + answer that is not built from a `Batch`.
    """
    tracker = tracker_of(model)
    if tracker is None:
        yield
        return
    with tracker.prompt(lengths):
        yield
