"""What each extra p of a sweep costs: one dev evaluation, with no SVD and no scoring.

SVD and scoring run once. Then, for every p: `make_edit` (timed on its own), `apply_edit`, a dev
evaluation and `remove_edit`. While the p loop runs, `torch.linalg.svd`, `torch.svd` and
`eigenprune.scoring.score` are wrapped in call counters (the same counters see the SVD and scoring
phases, so they are known to count), and a forward pre-hook counts model calls: the run fails unless
the loop made no SVD and no scoring call and each p made exactly as many model calls as one
unedited dev evaluation.

    python bench/sweep.py --model smollm2-135m --task int-sum --p 0.01,0.05,0.1,0.3 --json sweep.json
    python bench/sweep.py --model tiny-llama --n 16 --dev-n 16 --p 0.1,0.3   # CI smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python bench/sweep.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eigenprune.scoring  # noqa: E402
from bench import add_common_options, cli_main, load, machine, set_threads, shuffled_examples, timed  # noqa: E402
from eigenprune.data import Example, batch_nll, batches, encode  # noqa: E402
from eigenprune.decompose import decompose_targets  # noqa: E402
from eigenprune.errors import UsageError  # noqa: E402
from eigenprune.freeze import FreezeConfig, apply_edit, make_edit, remove_edit  # noqa: E402
from eigenprune.positions import prompt_lengths  # noqa: E402
from eigenprune.scoring import ScoreConfig  # noqa: E402
from eigenprune.targets import find_targets  # noqa: E402


@contextlib.contextmanager
def counting(model: nn.Module) -> Iterator[dict[str, mock.Mock]]:
    """Count SVD calls, scoring calls and model forwards (the wrapped functions still run)."""
    calls = {"forward": mock.Mock()}
    with contextlib.ExitStack() as stack:
        calls["linalg.svd"] = stack.enter_context(mock.patch.object(torch.linalg, "svd", wraps=torch.linalg.svd))
        calls["torch.svd"] = stack.enter_context(mock.patch.object(torch, "svd", wraps=torch.svd))
        calls["score"] = stack.enter_context(
            mock.patch.object(eigenprune.scoring, "score", wraps=eigenprune.scoring.score))

        def count_forward(module: nn.Module, args: tuple) -> None:
            calls["forward"]()  # returns None: a pre-hook's return value would replace the inputs

        handle = model.register_forward_pre_hook(count_forward)
        stack.callback(handle.remove)
        yield calls


def svd_calls(calls: dict[str, mock.Mock]) -> int:
    return calls["linalg.svd"].call_count + calls["torch.svd"].call_count


def dev_evaluation(model: nn.Module, tokenizer, examples: list[Example], mode: str, batch_size: int) -> float:
    """Dev accuracy by `eigenprune.evaluate` when it exists; else minus the mean teacher-forced answer NLL."""
    try:
        from eigenprune.evaluate import evaluate
    except ImportError:
        pass
    else:
        return evaluate(model, tokenizer, examples, mode, batch_size).accuracy
    total = 0.0
    with torch.inference_mode():
        for batch in batches(encode(tokenizer, examples), batch_size, tokenizer.pad_token_id):
            batch = batch.to(next(model.parameters()).device)
            with prompt_lengths(model, batch.prompt_lengths):
                total += float(batch_nll(model, batch).sum())
    return -total / len(examples)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python bench/sweep.py --model smollm2-135m --task int-sum "
                                       "--p 0.01,0.05,0.1,0.3 --json sweep.json")
    add_common_options(p)
    p.add_argument("--p", default="0.01,0.05,0.1,0.3", help="comma-separated fractions to freeze")
    p.add_argument("--n", type=int, default=256, help="examples to score")
    p.add_argument("--dev-n", type=int, default=128, help="dev examples evaluated per p (disjoint from --n)")
    p.add_argument("--eval-mode", default=None, help="next-token, choice or exact (default: the task's)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8, help="scoring batch size")
    p.add_argument("--partners", type=int, default=4)
    return p


def _eval_mode(args: argparse.Namespace) -> str:
    if args.eval_mode:
        return args.eval_mode
    try:
        from eigenprune.tasks import load_task
    except ImportError:
        return "exact"
    return load_task(args.task).eval_mode


def measure(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    try:
        ps = [float(p) for p in args.p.split(",")]
        for p in ps:
            FreezeConfig(p=p)
    except ValueError as err:
        raise UsageError(f"--p takes comma-separated fractions in [0, 1), got '{args.p}' ({err})") from None
    set_threads(args.threads)
    model, tokenizer = load(args.model, args.dtype, args.device)
    device = next(model.parameters()).device
    examples = shuffled_examples(args.task, args.seed)
    if args.n + args.dev_n > len(examples):
        raise UsageError(f"--n + --dev-n is more than the {len(examples)} train examples of {args.task}")
    train, dev = examples[: args.n], examples[args.n : args.n + args.dev_n]
    mode = _eval_mode(args)
    config = ScoreConfig(partners=args.partners, batch_size=args.batch_size, seed=args.seed)
    with counting(model) as calls:
        targets = find_targets(model, args.targets, args.layers)
        svd_s, _, components = timed(lambda: decompose_targets(model, targets), device)
        svd_in_decompose = svd_calls(calls)
        encoded = encode(tokenizer, train)
        scoring_s, _, scores = timed(lambda: eigenprune.scoring.score(
            model, targets, components, encoded, tokenizer.pad_token_id, config, progress=False), device)
        score_in_scoring = calls["score"].call_count
        dev_evaluation(model, tokenizer, dev[: args.eval_batch_size], mode, args.eval_batch_size)  # warm-up
        forwards = calls["forward"].call_count
        base_s, _, base = timed(lambda: dev_evaluation(model, tokenizer, dev, mode, args.eval_batch_size), device)
        forwards_per_eval = calls["forward"].call_count - forwards
        svd_before, score_before = svd_calls(calls), calls["score"].call_count
        rows = []
        for p in ps:
            row: dict = {"p": p}
            row["make_edit_s"], _, edit = timed(
                lambda p=p: make_edit(targets, components, scores.max, scores.means, FreezeConfig(p=p)), device)
            row["apply_edit_s"], _, _ = timed(lambda edit=edit: apply_edit(model, edit), device)
            forwards = calls["forward"].call_count
            try:
                row["eval_s"], _, row["dev_metric"] = timed(
                    lambda: dev_evaluation(model, tokenizer, dev, mode, args.eval_batch_size), device)
            finally:
                row["remove_edit_s"], _, _ = timed(lambda: remove_edit(model), device)
            row["forwards"] = calls["forward"].call_count - forwards
            row["n_frozen"] = edit.n_frozen
            row["total_s"] = row["make_edit_s"] + row["apply_edit_s"] + row["eval_s"] + row["remove_edit_s"]
            rows.append(row)
            print(f"p={p:<6} frozen {edit.n_frozen:>5}  make_edit {row['make_edit_s']:.4f} s  "
                  f"eval {row['eval_s']:.3f} s  total {row['total_s']:.3f} s", flush=True)
        svd_in_loop, score_in_loop = svd_calls(calls) - svd_before, calls["score"].call_count - score_before
    extra = statistics.median(r["total_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["total_s"]
    return {
        "model": args.model, "task": args.task, "targets": args.targets, "n_targets": len(targets),
        "n_components": sum(t.n_components for t in targets), "n": args.n, "dev_n": len(dev), "eval_mode": mode,
        "p": ps, "device": str(device), "dtype": args.dtype, "machine": machine(),
        "svd_s": svd_s, "scoring_s": scoring_s, "base_eval_s": base_s, "base_dev_metric": base,
        "rows": rows, "first_p_s": svd_s + scoring_s + rows[0]["total_s"], "extra_p_s": extra,
        "extra_p_over_eval": extra / base_s,
        "make_edit_s_max": max(r["make_edit_s"] for r in rows),
        "svd_calls_in_decompose": svd_in_decompose, "score_calls_in_scoring": score_in_scoring,
        "svd_calls_in_loop": svd_in_loop, "score_calls_in_loop": score_in_loop,
        "forwards_per_eval": forwards_per_eval,
        "one_eval_per_p": all(r["forwards"] == forwards_per_eval for r in rows),
    }


def report(r: dict) -> str:
    lines = [f"{r['model']} {r['task']} targets={r['targets']} ({r['n_targets']} matrices, {r['n_components']} "
             f"components), scored on {r['n']}, dev {r['dev_n']} ({r['eval_mode']}), torch {r['machine']['torch']}",
             f"once:  SVD {r['svd_s']:.3f} s ({r['svd_calls_in_decompose']} svd calls), scoring {r['scoring_s']:.3f} s "
             f"({r['score_calls_in_scoring']} call), unedited dev eval {r['base_eval_s']:.3f} s "
             f"({r['forwards_per_eval']} model calls, metric {r['base_dev_metric']:.4f})",
             f"{'p':>6} {'frozen':>7} {'make_edit s':>11} {'apply s':>8} {'eval s':>8} {'remove s':>8} "
             f"{'total s':>8} {'calls':>6} {'dev':>7}"]
    for row in r["rows"]:
        lines.append(f"{row['p']:>6} {row['n_frozen']:>7} {row['make_edit_s']:>11.4f} {row['apply_edit_s']:>8.4f} "
                     f"{row['eval_s']:>8.3f} {row['remove_edit_s']:>8.4f} {row['total_s']:>8.3f} "
                     f"{row['forwards']:>6} {row['dev_metric']:>7.4f}")
    lines += [f"first p: {r['first_p_s']:.3f} s (SVD + scoring + one p); each extra p: {r['extra_p_s']:.3f} s "
              f"= {r['extra_p_over_eval']:.2f} x one unedited dev evaluation",
              f"during the p loop: {r['svd_calls_in_loop']} SVD calls, {r['score_calls_in_loop']} scoring calls, "
              f"{'one dev evaluation' if r['one_eval_per_p'] else 'NOT one dev evaluation'} of model calls per p"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, measure, report, parser, passed)


def passed(r: dict) -> bool:
    """No SVD and no scoring in the p loop, and exactly one dev evaluation's model calls per p."""
    return r["svd_calls_in_loop"] == 0 and r["score_calls_in_loop"] == 0 and r["one_eval_per_p"]


if __name__ == "__main__":
    sys.exit(main())
