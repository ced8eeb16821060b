"""One side-effect pass against a bare forward pass over the same sample, and its peak memory.

    python bench/side_effects.py --model smollm2-135m --repeats 3 --threads 2
    python bench/side_effects.py --model wide-vocab --repeats 3 --threads 2

`wide-vocab` is a 2-layer random Llama with a 151,936-token vocabulary (Qwen2.5's) and SmolLM2's tokenizer
(so `smollm2-135m` must be loadable): a model whose LM head is most of its forward. In one process, per
repeat and in rotating order: the **bare forward loop** (the model over the probe's batches, full logits,
nothing else), the **old edited pass** (the pre-chunking algorithm, kept here as `old_measure`: full logits,
the base head over whole batches, KL on batch × positions × vocab), the **new edited pass**
(`SideEffectProbe.measure`, the exact path) and the **linear** pass (`kl="linear"`, token_scores.py; its
base quantities are made once, before the repeats, timed apart, then timed read back from the cache). The
edit is eigenprune's, p = 0.1 on the key matrices, scored on 16 int-sum examples. Ratios are per repeat
(median and range), in wall time and in the process's CPU time (with --threads 1 the work done, which other
processes on the machine disturb far less than the wall clock).

Peak memory is the process's resident peak (VmHWM, reset through /proc/self/clear_refs before each pass),
so it includes Python, torch and the model; the bound the issue sets is 1.5 × the weights + 1 GiB.
The base pass, uncached and then read from the cache (`base_cache.py`), is timed too, and a linear probe's
uncached base pass (which makes the linear base as it goes; checked bit-equal to the separate build); the new pass's
numbers must match the old one's (per document, relative 1e-5; the script exits 1 otherwise); the linear
pass's KL is compared with the exact pass's (per token and per document) and reported, not required.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import load, machine, set_threads, shuffled_examples  # noqa: E402
from eigenprune.core.batching import batches  # noqa: E402
from eigenprune.core.positions import prompt_lengths  # noqa: E402
from eigenprune.evaluation import side_effects as se  # noqa: E402
from eigenprune.evaluation import token_scores  # noqa: E402

WIDE = "wide-vocab"
GIB = 1 << 30


def wide_vocab() -> tuple[torch.nn.Module, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = load("smollm2-135m")
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config).eval(), tokenizer


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def bare(model, probe) -> None:
    with torch.inference_mode():
        for batch in batches(probe.encoded, probe.batch_size, probe.pad_id):
            with prompt_lengths(model, batch.prompt_lengths):
                model(**batch.model_inputs(), use_cache=False)


def nll_floor(model, probe) -> None:
    """The bare forward plus what perplexity alone needs of its logits: a log-sum-exp over the vocabulary and
    the gold token's logit, per token. Any side-effect pass does at least this much (no KL at all)."""
    with torch.inference_mode():
        for batch in batches(probe.encoded, probe.batch_size, probe.pad_id):
            with prompt_lengths(model, batch.prompt_lengths):
                logits = model(**batch.model_inputs(), use_cache=False).logits  # (batch, pos, vocab)
            z = logits.flatten(0, 1).float()
            torch.logsumexp(z, -1) - z.gather(1, batch.labels.flatten().clamp(min=0)[:, None])[:, 0]


def old_measure(model, probe) -> tuple[np.ndarray, np.ndarray]:
    """The edited pass as it was before chunking: per document NLL and KL."""
    n = len(probe.encoded)
    nll, kl = np.zeros(n), np.zeros(n)
    with torch.inference_mode():
        for i, batch in enumerate(batches(probe.encoded, probe.batch_size, probe.pad_id)):
            with prompt_lengths(model, batch.prompt_lengths):
                logits = model(**batch.model_inputs(), use_cache=False).logits  # (batch, pos, vocab)
            scored = (batch.labels != -100).flatten()
            z = logits.flatten(0, 1).float()
            labels = batch.labels.flatten().clamp(min=0)[:, None]
            index = batch.index.numpy()
            nll_tok = torch.logsumexp(z, -1) - z.gather(1, labels)[:, 0]
            nll[index] = se._per_doc(torch.where(scored, nll_tok, 0.0), len(index))
            base_logits = probe._head(probe._hidden[i])
            kl_tok = token_scores.kl_per_token(base_logits.flatten(0, 1).float(), z)
            kl[index] = se._per_doc(torch.where(scored, kl_tok, 0.0), len(index))
    return nll, kl


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help=f"a model spec, or '{WIDE}'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--docs", type=int, default=None, help="the sample's first N documents (default: all)")
    p.add_argument("--max-tokens", type=int, default=None, help="cut each document to this many tokens")
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    set_threads(args.threads)
    load_before = os.getloadavg()
    model, tok = wide_vocab() if args.model == WIDE else load(args.model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    docs = se.load_documents()[: args.docs]
    before = os.environ.get("EIGENPRUNE_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["EIGENPRUNE_CACHE"] = cache  # an empty cache: the first probe computes, the second reads
        try:
            start = time.perf_counter()
            probe = se.SideEffectProbe(model, tok, docs, args.batch_size, args.max_tokens)
            base_uncached = time.perf_counter() - start
            start = time.perf_counter()
            se.SideEffectProbe(model, tok, docs, args.batch_size, args.max_tokens)
            base_cached = time.perf_counter() - start
            start = time.perf_counter()  # a linear probe's base pass, which makes the linear base as it goes
            fused = se.SideEffectProbe(model, tok, docs, args.batch_size, args.max_tokens, cache=False, kl="linear")
            base_linear_uncached = time.perf_counter() - start
            linear = se.SideEffectProbe(model, tok, docs, args.batch_size, args.max_tokens, kl="linear")
            start = time.perf_counter()
            linear._linear_base(torch.device("cpu"))  # made, then written beside the base pass
            linear_base_s = time.perf_counter() - start
            se.base_cache._LINEAR_MEMORY.clear()  # read back from disk, as another process would
            start = time.perf_counter()
            se.SideEffectProbe(model, tok, docs, args.batch_size, args.max_tokens, kl="linear")._linear_base(
                torch.device("cpu"))
            linear_base_cached_s = time.perf_counter() - start
        finally:
            if before is None:
                os.environ.pop("EIGENPRUNE_CACHE", None)
            else:
                os.environ["EIGENPRUNE_CACHE"] = before
    from eigenprune.edits.engine import score_run
    from eigenprune.edits.freeze import FreezeConfig, applied

    run = score_run(model, tok, shuffled_examples("int-sum")[:16], targets="key", progress=False)
    names = ["bare", "old", "new", "linear", "nll_floor"]
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    peaks: dict[str, int] = {}
    results = {}
    with applied(model, run.edit(FreezeConfig(p=0.1))):
        passes = {"bare": lambda: bare(model, probe), "old": lambda: old_measure(model, probe),
                  "new": lambda: probe.measure(model), "linear": lambda: linear.measure(model),
                  "nll_floor": lambda: nll_floor(model, probe)}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                _reset_peak()
                start, start_cpu = time.perf_counter(), time.process_time()
                results[name] = passes[name]()
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
                peaks[name] = max(peaks.get(name, 0), _peak())
    old_nll, old_kl = results["old"]
    new = results["new"]
    same = bool(np.allclose(new.nll, old_nll, rtol=1e-5) and np.allclose(new.kl, old_kl, rtol=1e-5, atol=1e-9))
    ratio = {k: [t / b for t, b in zip(times[k], times["bare"], strict=True)] for k in names[1:]}
    cpu_ratio = {k: [t / b for t, b in zip(cpu[k], cpu["bare"], strict=True)] for k in names[1:]}
    lin = results["linear"]
    fused_same = all(torch.equal(a, b) for a, b in zip(fused._linear.g + fused._linear.lse,
                                                        linear._linear.g + linear._linear.lse, strict=True))
    assert lin.kl_path == "linear" and new.kl_path == "exact"
    mean_kl = float(new.kl.sum() / new.tokens.sum())
    out = {"model": args.model, "vocab": probe.vocab, "documents": len(docs), "tokens": probe.n_tokens,
           "weights_bytes": weights, "repeats": args.repeats, "times_s": times,
           "base_pass_uncached_s": base_uncached, "base_pass_cached_s": base_cached,
           "base_pass_linear_uncached_s": base_linear_uncached, "linear_base_made_in_the_base_pass": fused_same,
           **{f"{k}_over_bare_median": statistics.median(v) for k, v in ratio.items()},
           **{f"{k}_over_bare_range": [min(v), max(v)] for k, v in ratio.items()},
           "cpu_s": cpu, **{f"{k}_over_bare_cpu_median": statistics.median(v) for k, v in cpu_ratio.items()},
           **{f"{k}_over_bare_cpu_range": [min(v), max(v)] for k, v in cpu_ratio.items()},
           "linear_base_s": linear_base_s, "linear_base_cached_s": linear_base_cached_s, "mean_kl_exact": mean_kl,
           "mean_kl_linear": float(lin.kl.sum() / lin.tokens.sum()),
           "linear_nll_bits_equal": bool(np.array_equal(lin.nll, new.nll)),
           "linear_max_abs_diff_kl_per_token_by_doc": float(np.max(np.abs(lin.kl - new.kl) / new.tokens)),
           "linear_max_rel_diff_kl_by_doc": float(np.max(np.abs(lin.kl - new.kl) / np.abs(new.kl))),
           "peak_rss_bytes": peaks, "peak_bound_bytes": int(1.5 * weights + GIB), "load_before": load_before,
           "load_after": os.getloadavg(),
           "new_within_bound": peaks["new"] <= 1.5 * weights + GIB,
           "same_numbers": same, "max_rel_diff_nll": float(np.max(np.abs(new.nll - old_nll) / np.abs(old_nll))),
           "max_rel_diff_kl": float(np.max(np.abs(new.kl - old_kl) / np.maximum(np.abs(old_kl), 1e-12))),
           "bits_equal": bool(np.array_equal(new.nll, old_nll) and np.array_equal(new.kl, old_kl)),
           "machine": machine()}
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
