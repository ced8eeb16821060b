"""The side-effect pass's chunk rule, before and after `HEAD_SHARE`, in one process.

    python bench/side_effect_chunks.py --model gemma3-270m --docs 40 --repeats 4 --threads 2

Per repeat, in rotating order: the bare forward loop, the exact and the linear pass with today's chunks (at least
d_model / `token_scores.HEAD_SHARE` rows) and with the rule before it (`CHUNK_ELEMENTS` // vocab rows alone). Ratios
are wall time ÷ the same repeat's bare forward (median and range); `bits_equal` says whether the two rules gave the
same per-document NLL and KL (reported, not required: a matmul's bits may depend on the rows a call gets); each
rule's linear pass reads base quantities made in its own chunks. The edit is bench/side_effects.py's (p = 0.1 on
the key matrices, scored on 16 int-sum examples); the cache is off, so nothing is read from or written to the
user's. `--chunk-elements` overrides `CHUNK_ELEMENTS` (the tests use it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import load, machine, set_threads, shuffled_examples  # noqa: E402
from bench.side_effects import WIDE, bare, wide_vocab  # noqa: E402
from eigenprune.evaluation import side_effects as se  # noqa: E402
from eigenprune.evaluation import token_scores as ts  # noqa: E402

PASSES = ("bare", "exact-now", "exact-before", "linear-now", "linear-before")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma3-270m", help=f"a model spec, or '{WIDE}'")
    p.add_argument("--docs", type=int, default=40, help="the sample's first N documents")
    p.add_argument("--max-tokens", type=int, default=None, help="cut each document to this many tokens")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk-elements", type=int, default=None)
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    from eigenprune.edits.engine import score_run
    from eigenprune.edits.freeze import FreezeConfig, applied

    args = parser().parse_args(argv)
    set_threads(args.threads)
    share, elements = ts.HEAD_SHARE, ts.CHUNK_ELEMENTS
    model, tok = wide_vocab() if args.model == WIDE else load(args.model)
    docs = se.load_documents()[: args.docs]
    before = os.environ.get("EIGENPRUNE_CACHE")
    os.environ["EIGENPRUNE_CACHE"] = "off"
    try:
        ts.CHUNK_ELEMENTS = args.chunk_elements or elements
        exact = se.SideEffectProbe(model, tok, docs, 8, args.max_tokens, cache=False)
        linear = {}  # each rule's probe, its linear base made in that rule's chunks (the edit's lse must match)
        for rule, head_share in (("now", share), ("before", 10**12)):
            ts.HEAD_SHARE = head_share
            linear[rule] = se.SideEffectProbe(model, tok, docs, 8, args.max_tokens, cache=False, kl="linear")
            linear[rule]._linear_base(torch.device("cpu"))
        ts.HEAD_SHARE = share
        run = score_run(model, tok, shuffled_examples("int-sum")[:16], targets="key", progress=False)
        times: dict[str, list[float]] = {k: [] for k in PASSES}
        results = {}
        with applied(model, run.edit(FreezeConfig(p=0.1))):
            for r in range(args.repeats):
                for name in PASSES[r % len(PASSES):] + PASSES[: r % len(PASSES)]:
                    ts.HEAD_SHARE = 10**12 if name.endswith("before") else share
                    start = time.perf_counter()
                    if name == "bare":
                        bare(model, exact)
                    else:
                        probe = exact if name.startswith("exact") else linear[name.split("-")[1]]
                        results[name] = probe.measure(model)
                    times[name].append(time.perf_counter() - start)
        rows_now, rows_before = linear["now"]._linear.step, linear["before"]._linear.step
    finally:
        ts.HEAD_SHARE, ts.CHUNK_ELEMENTS = share, elements
        if before is None:
            os.environ.pop("EIGENPRUNE_CACHE", None)
        else:
            os.environ["EIGENPRUNE_CACHE"] = before
    ratio = {k: [t / b for t, b in zip(times[k], times["bare"], strict=True)] for k in PASSES[1:]}
    vocab, d_model = exact.vocab, exact._hidden[0].shape[-1]
    out = {"model": args.model, "vocab": vocab, "d_model": d_model, "documents": len(docs), "tokens": exact.n_tokens,
           "rows_now": rows_now, "rows_before": rows_before, "repeats": args.repeats, "times_s": times,
           **{f"{k}_over_bare_median": statistics.median(v) for k, v in ratio.items()},
           **{f"{k}_over_bare_range": [min(v), max(v)] for k, v in ratio.items()},
           **{f"{path}_bits_equal": bool(np.array_equal(results[f"{path}-now"].nll, results[f"{path}-before"].nll)
                                         and np.array_equal(results[f"{path}-now"].kl, results[f"{path}-before"].kl))
              for path in ("exact", "linear")},
           "load_after": os.getloadavg(), "machine": machine()}
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
