"""Exact-match evaluation: one teacher-forced pass (`evaluate(mode="exact")` today) against greedy generation
(`greedy_continuations`, the path it replaced), on the same examples, alternated in one process.

    python bench/exact.py --model smollm2-135m --task int-mult --n 144 --repeats 3 --threads 1

For each model (the base, and with `--edit-p` an eigenprune edit scored on `--score-n` other examples) and
each repeat, three passes run back to back in a rotating order: generation (old), the teacher-forced
evaluation (new) and the prompts' forward alone (`next_token_predictions`: the prefill generation starts
with, the same batches, LM head on the last token). The figures are per-repeat ratios (median and range),
by wall time and by this process's CPU time (with one thread, CPU time is what a loaded machine disturbs
least); prefill ÷ generation is the floor of any path that must read every prompt. Also counted: the
examples the new path sent to generation (near ties, `exact.py`), and the tokens each path feeds the model.
Every run checks that the two verdicts are the same example by example, on the task's answers and on "self"
answers (half the examples' answers replaced by the decoded greedy output, so some are right and some
re-tokenize into other ids); the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import add_common_options, cli_main, load, machine, set_threads, shuffled_examples, timed  # noqa: E402
from eigenprune.core.batching import batches, encode  # noqa: E402
from eigenprune.evaluation import evaluate as ev  # noqa: E402
from eigenprune.evaluation.tasks import load_task  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(p)
    p.add_argument("--n", type=int, default=144, help="examples evaluated (the demo's int-mult dev 64 + test 80)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--edit-p", type=float, default=0.3, help="also time under this edit (0: base only)")
    p.add_argument("--score-n", type=int, default=32, help="examples the edit is scored on (disjoint)")
    return p


def _examples(task: str, n: int, seed: int):
    pool = shuffled_examples(task, seed) if "/" not in task and not task.endswith(".jsonl") else list(
        load_task(task).train + load_task(task).test)
    return pool


def _old(model, tok, examples, batch_size):
    encoded = encode(tok, examples)
    generated = ev.greedy_continuations(model, encoded, tok.pad_token_id, batch_size)
    return torch.tensor([g == e.answer_ids for g, e in zip(generated, encoded, strict=True)]), generated


@contextlib.contextmanager
def _counting_fallbacks(counts: list[int]):
    """Within the block, every call `exact_match` makes to generation appends how many examples it generates."""
    real = ev.greedy_continuations

    def counted(model, encoded, *args, **kwargs):
        counts.append(len(encoded))
        return real(model, encoded, *args, **kwargs)

    ev.greedy_continuations = counted
    try:
        yield
    finally:
        ev.greedy_continuations = real


def _new(model, tok, examples, batch_size):
    counts: list[int] = []
    with _counting_fallbacks(counts):
        correct = ev.evaluate(model, tok, examples, "exact", batch_size).correct
    return correct, sum(counts)


def _prefill(model, tok, examples, batch_size):
    return ev.next_token_predictions(model, encode(tok, examples), tok.pad_token_id, batch_size)


def _tokens(tok, examples, batch_size) -> dict:
    """Tokens fed to the model, padding included: the teacher-forced batches, the prompts (prefill), and the
    decoding steps generation adds (one token a row for each answer token after the first, batch maximum)."""
    encoded = encode(tok, examples)
    groups = list(ev._prompt_batches(encoded, batch_size))
    return {"teacher_forced": sum(b.input_ids.numel() for b in batches(encoded, batch_size, tok.pad_token_id)),
            "prefill": sum(len(g) * max(len(encoded[i].prompt_ids) for i in g) for g in groups),
            "decode": sum(len(g) * (max(len(encoded[i].answer_ids) for i in g) - 1) for g in groups)}


ORDERS = [("old", "new", "prefill"), ("new", "prefill", "old"), ("prefill", "old", "new")]


def _compare(model, tok, examples, args, device, label: str) -> dict:
    wall = {k: [] for k in ("old", "new", "prefill")}
    cpu = {k: [] for k in ("old", "new", "prefill")}
    same, fallbacks = True, []
    for r in range(args.repeats):
        for which in ORDERS[r % len(ORDERS)]:
            if which == "old":
                w, c, (want, generated) = timed(lambda: _old(model, tok, examples, args.batch_size), device)
            elif which == "new":
                w, c, (got, n_generated) = timed(lambda: _new(model, tok, examples, args.batch_size), device)
            else:
                w, c, _ = timed(lambda: _prefill(model, tok, examples, args.batch_size), device)
            wall[which].append(w)
            cpu[which].append(c)
        same &= got.tolist() == want.tolist()
        fallbacks.append(n_generated)
        print(f"{label} repeat {r + 1}: wall (cpu) s: generation {wall['old'][-1]:.2f} ({cpu['old'][-1]:.2f}), "
              f"teacher-forced {wall['new'][-1]:.2f} ({cpu['new'][-1]:.2f}), prefill {wall['prefill'][-1]:.2f} "
              f"({cpu['prefill'][-1]:.2f}); generated {n_generated}; same verdicts {got.tolist() == want.tolist()}",
              file=sys.stderr, flush=True)
    # "self" answers: greedy's own output (decoded) for even examples, the task's answer for odd ones
    selfish = [dataclasses.replace(ex, answer=tok.decode(g) if i % 2 == 0 and tok.decode(g).strip() else ex.answer)
               for i, (ex, g) in enumerate(zip(examples, generated, strict=True))]
    want_self, _ = _old(model, tok, selfish, args.batch_size)
    got_self, self_generated = _new(model, tok, selfish, args.batch_size)
    retokenized = sum(tuple(tok(s.answer, add_special_tokens=False)["input_ids"]) != g
                      for s, g in list(zip(selfish, generated, strict=True))[::2])

    def ratios(times, num, den):
        values = [a / b for a, b in zip(times[num], times[den], strict=True)]
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}

    return {"model": label, "old_s": wall["old"], "new_s": wall["new"], "prefill_s": wall["prefill"],
            "old_cpu_s": cpu["old"], "new_cpu_s": cpu["new"], "prefill_cpu_s": cpu["prefill"],
            "ratio": ratios(wall, "new", "old"), "ratio_cpu": ratios(cpu, "new", "old"),
            "floor": ratios(wall, "prefill", "old"), "floor_cpu": ratios(cpu, "prefill", "old"),
            "generated": fallbacks, "tokens": _tokens(tok, examples, args.batch_size),
            "accuracy": float(want.float().mean()), "same_verdicts": same,
            "self_accuracy": float(want_self.float().mean()), "self_generated": self_generated,
            "self_same_verdicts": got_self.tolist() == want_self.tolist(),
            "self_retokenized": int(retokenized)}


def measure(argv) -> dict:
    args = parser().parse_args(argv)
    set_threads(args.threads)
    model, tok = load(args.model, args.dtype, args.device)
    device = next(model.parameters()).device
    pool = _examples(args.task, args.n, args.seed)
    examples = pool[: args.n]
    rows = [_compare(model, tok, examples, args, device, "base")]
    if args.edit_p > 0:
        from eigenprune.edits.engine import score_run
        from eigenprune.edits.freeze import FreezeConfig, applied

        run = score_run(model, tok, pool[args.n: args.n + args.score_n], targets=args.targets, progress=False)
        with applied(model, run.edit(FreezeConfig(p=args.edit_p))):
            rows.append(_compare(model, tok, examples, args, device, f"p = {args.edit_p}"))
    return {"model": args.model, "task": args.task, "n": len(examples), "repeats": args.repeats,
            "rows": rows, "machine": machine()}


def report(r: dict) -> str:
    def span(x):
        return f"{x['median']:.3f} [{x['min']:.3f}, {x['max']:.3f}]"

    lines = [f"exact-mode evaluation, {r['model']} on {r['task']}, {r['n']} examples, {r['repeats']} repeats",
             "model | generation s | teacher-forced s | new ÷ old: wall, cpu | floor prefill ÷ old: wall, cpu | "
             "generated (near ties) | tokens fed: teacher-forced, prefill + decode | accuracy | same verdicts | "
             "self: accuracy, same verdicts, generated, answers re-tokenized"]
    for row in r["rows"]:
        old, new = statistics.median(row["old_s"]), statistics.median(row["new_s"])
        t = row["tokens"]
        lines.append(f"{row['model']} | {old:.2f} | {new:.2f} | {span(row['ratio'])}, {span(row['ratio_cpu'])} | "
                     f"{span(row['floor'])}, {span(row['floor_cpu'])} | {max(row['generated'])} | "
                     f"{t['teacher_forced']}, {t['prefill']} + {t['decode']} | {row['accuracy']:.3f} | "
                     f"{row['same_verdicts']} | {row['self_accuracy']:.3f}, {row['self_same_verdicts']}, "
                     f"{row['self_generated']}, {row['self_retokenized']}")
    return "\n".join(lines)


def passed(r: dict) -> bool:
    return all(row["same_verdicts"] and row["self_same_verdicts"] for row in r["rows"])


def main(argv=None) -> int:
    return cli_main(argv, measure, report, parser, passed)


if __name__ == "__main__":
    sys.exit(main())
