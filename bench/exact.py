"""Exact-match evaluation: one teacher-forced pass (`evaluate(mode="exact")` today) against greedy generation
(`greedy_continuations`, the path it replaced), on the same examples, alternated in one process.

    python bench/exact.py --model smollm2-135m --task int-mult --n 144 --repeats 3 --threads 2

For each model (the base, and with `--edit-p` an eigenprune edit scored on `--score-n` other examples) and
each repeat, both paths run back to back in alternating order; the figures are per-repeat ratios (median and
range), so a loaded machine slows both sides alike. Every run checks that the two verdicts are the same
example by example, on the task's answers and on "self" answers (half the examples' answers replaced by the
decoded greedy output, so some are right and some re-tokenize into other ids); the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import add_common_options, cli_main, load, machine, set_threads, shuffled_examples, timed  # noqa: E402
from eigenprune.core.batching import encode  # noqa: E402
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


def _compare(model, tok, examples, args, device, label: str) -> dict:
    olds, news, ratios = [], [], []
    same = True
    for r in range(args.repeats):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        t = {}
        for which in order:
            if which == "old":
                t["old"], _, (want, generated) = timed(lambda: _old(model, tok, examples, args.batch_size), device)
            else:
                t["new"], _, got = timed(lambda: ev.evaluate(model, tok, examples, "exact", args.batch_size), device)
        same &= got.correct.tolist() == want.tolist()
        olds.append(t["old"])
        news.append(t["new"])
        ratios.append(t["new"] / t["old"])
        print(f"{label} repeat {r + 1}: generation {t['old']:.2f} s, teacher-forced {t['new']:.2f} s, "
              f"same verdicts {got.correct.tolist() == want.tolist()}", file=sys.stderr, flush=True)
    # "self" answers: greedy's own output (decoded) for even examples, the task's answer for odd ones
    selfish = [dataclasses.replace(ex, answer=tok.decode(g) if i % 2 == 0 and tok.decode(g).strip() else ex.answer)
               for i, (ex, g) in enumerate(zip(examples, generated, strict=True))]
    want_self, _ = _old(model, tok, selfish, args.batch_size)
    got_self = ev.evaluate(model, tok, selfish, "exact", args.batch_size).correct
    retokenized = sum(tuple(tok(s.answer, add_special_tokens=False)["input_ids"]) != g
                      for s, g in list(zip(selfish, generated, strict=True))[::2])
    return {"model": label, "old_s": olds, "new_s": news, "ratios": ratios,
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "accuracy": float(want.float().mean()), "same_verdicts": same,
            "self_accuracy": float(want_self.float().mean()),
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
    lines = [f"exact-mode evaluation, {r['model']} on {r['task']}, {r['n']} examples, {r['repeats']} repeats",
             "model | generation s (median) | teacher-forced s (median) | ratio median [min, max] | accuracy | "
             "same verdicts | self: accuracy, same verdicts, answers re-tokenized"]
    for row in r["rows"]:
        old, new = statistics.median(row["old_s"]), statistics.median(row["new_s"])
        lines.append(f"{row['model']} | {old:.2f} | {new:.2f} | "
                     f"{row['ratio_median']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}] | "
                     f"{row['accuracy']:.3f} | {row['same_verdicts']} | {row['self_accuracy']:.3f}, "
                     f"{row['self_same_verdicts']}, {row['self_retokenized']}")
    return "\n".join(lines)


def passed(r: dict) -> bool:
    return all(row["same_verdicts"] and row["self_same_verdicts"] for row in r["rows"])


def main(argv=None) -> int:
    return cli_main(argv, measure, report, parser, passed)


if __name__ == "__main__":
    sys.exit(main())
