"""Benchmarks of eigenprune's cost, and the setup both scripts share.

`scoring.py` times scoring against its forward+backward floor and a per-component reference;
`sweep.py` shows what each extra p of a sweep costs. Both load a model (`tiny-llama`, built here in
code for CI, or anything `eigenprune.models.load_model` takes), draw a task's train examples in a
seeded order, and time with the helpers below. See README.md for the measured numbers.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from eigenprune.core.batching import Example
from eigenprune.core.errors import UsageError

TINY = "tiny-llama"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_llama(seed: int = 0) -> tuple[nn.Module, object]:
    """A 2-layer random Llama (grouped-query attention) and a digit-splitting BPE tokenizer, built in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{a} + {b} = {a + b} x" for a in range(100) for b in range(0, 100, 7)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(config).eval(), tokenizer


def load(spec: str, dtype: str = "float32", device: str = "cpu") -> tuple[nn.Module, object]:
    """`tiny-llama` (built in code, for CI) or anything `eigenprune.models.load_model` takes."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if spec == TINY:
        model, tokenizer = tiny_llama()
        return model.to(device=device, dtype=DTYPES[dtype]), tokenizer
    from eigenprune.core.models import load_model

    return load_model(spec, dtype=dtype, device=device)


def shuffled_examples(task: str, seed: int = 0) -> list[Example]:
    """The task's train examples in a seeded random order (callers take disjoint slices)."""
    try:
        from eigenprune.evaluation.tasks import load_task
    except ImportError:  # before tasks.py existed; int-sum is all the benchmark needs
        if task != "int-sum":
            raise UsageError(f"task '{task}' needs eigenprune.tasks; only int-sum is built in here") from None
        pool = [Example(f"{a} + {b} =", f" {a + b}") for a in range(100) for b in range(100)]
    else:
        pool = list(load_task(task).train)
    random.Random(seed).shuffle(pool)
    return pool


def machine() -> dict:
    """What the numbers were measured on."""
    import transformers

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float, object]:
    """(wall seconds, this process's CPU seconds over all its threads, result)."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, result


def add_common_options(p) -> None:
    """The options both benchmarks take: what to load and score, on what, and where to write the figures."""
    p.add_argument("--model", default="smollm2-135m", help=f"model spec for load_model, or '{TINY}'")
    p.add_argument("--task", default="int-sum")
    p.add_argument("--targets", default="key")
    p.add_argument("--layers", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--json", default=None, help="write the figures here")


def cli_main(argv, measure, report, parser, passed) -> int:
    """A benchmark's `main`: measure, print the report, write --json; exit 2 on bad input, 1 when
    `passed(result)` is false (a check the benchmark makes failed), else 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = measure(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(result))
    path = parser().parse_args(argv).json
    if path:
        Path(path).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0 if passed(result) else 1
