"""Exact match decided from one teacher-forced pass, without generating: why it is exact, and when it is not.

`evaluate(mode="exact")` calls an example correct when the first `len(answer_ids)` tokens of greedy decoding
after its prompt are the answer's token ids (`Encoded.answer_ids`): ids, not decoded text, with EOS ignored.
Greedy decoding emits, at step t, the argmax of the model's logits given prompt + what it emitted before.
So, by induction over t, greedy reproduces answer_ids exactly when for every t the argmax given prompt +
answer_ids[:t] is answer_ids[t]: as long as the previous tokens were the answer's, greedy's context at step t
*is* the teacher-forced context. One teacher-forced forward of prompt + answer[:-1] gives all those logits,
so it decides every example, right ones and wrong ones.

This holds whatever the tokenization: an answer whose ids are not how the model would write the same text
(a space as its own token, digits merged differently) is judged by ids both ways, so it is wrong both ways;
a greedy output that decodes to the answer's text through other ids is wrong today too. The verdict is the
one generation gives, example by example, not an approximation of it.

What can make the two differ is floating point alone: the teacher-forced forward (right padding, one call)
and generation (left padding, KV cache, one token per call) compute the same logits in another order, which
moves them by about 1e-6 relative in float32 (more in half precision). Two rules keep the verdict exact:
- A position counts only when its margin is clear: the gold logit minus the best other logit must be above
  `tolerance` (gold is surely greedy's argmax there) or below −`tolerance` (it surely is not). `tolerance` is
  `TOLERANCE[dtype] × max(1, |largest logit|)`, 100× the largest difference measured (module tests and
  bench/exact.py). A near tie is "unsure".
- An example is **correct** when every answer position is surely argmax (induction above), **wrong** when any
  position is surely not argmax (if greedy left the answer before that position it is wrong already; if not,
  its logits there are the teacher-forced ones and gold loses), and **unsure** otherwise: those few, and
  every example when the model's generation config adds a logits processor that can move the argmax
  (`plain_greedy`), are generated as before. NaN or infinite logits are unsure too.
"""

from __future__ import annotations

import torch

CORRECT, WRONG, UNSURE = 1, -1, 0
# relative to max(1, |largest logit|): measured teacher-forced vs generated differences are below 1e-6 in float32
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 6e-2, torch.float16: 1e-2}
_NEUTRAL = {  # generation-config fields whose non-neutral values add a logits processor to greedy decoding
    "guidance_scale": (None, 1, 1.0), "sequence_bias": (None,), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "remove_invalid_values": (None, False), "exponential_decay_length_penalty": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "watermarking_config": (None,),
}


def plain_greedy(model: torch.nn.Module) -> bool:
    """Whether `model.generate(do_sample=False)` emits the plain argmax of the logits (no repetition penalty,
    no forced or suppressed tokens...); otherwise teacher forcing cannot stand in for it."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return True
    return all(getattr(config, field, None) in neutral for field, neutral in _NEUTRAL.items())


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


def position_verdicts(logits: torch.Tensor, labels: torch.Tensor, rel_tol: float) -> torch.Tensor:
    """Per example: CORRECT, WRONG or UNSURE from teacher-forced logits (batch, pos, vocab) and the gold ids
    (batch, pos), -100 where a position predicts no answer token. Returns (batch,) int8."""
    scored = labels != -100  # (batch, pos)
    z = logits.float()
    gold = z.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (batch, pos)
    top2 = z.topk(2, dim=-1)  # values, indices: (batch, pos, 2)
    best_other = torch.where(top2.indices[..., 0] == labels, top2.values[..., 1], top2.values[..., 0])  # (batch, pos)
    margin = gold - best_other  # > 0: gold is the argmax (ties go to the lower id, as in argmax; unsure anyway)
    tol = rel_tol * top2.values[..., 0].abs().clamp(min=1.0)  # (batch, pos)
    finite = torch.isfinite(z).all(-1)  # (batch, pos)
    sure_in = (margin > tol) & finite
    sure_out = (margin < -tol) & finite
    correct = (sure_in | ~scored).all(1)  # (batch,)
    wrong = (sure_out & scored).any(1)  # (batch,)
    out = torch.full(labels.shape[:1], UNSURE, dtype=torch.int8)
    out[correct.cpu()] = CORRECT
    out[wrong.cpu()] = WRONG
    return out
