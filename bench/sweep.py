"""What each extra p of a sweep costs: one dev evaluation, with no SVD and no scoring.

SVD and scoring run once. Then, for every p: `make_edit` (timed on its own), `apply_edit`, a dev
evaluation and `remove_edit`. While the p loop runs, `torch.linalg.svd`, `torch.svd` and
`eigenprune.edits.scoring.score` are wrapped in call counters (the same counters see the SVD and scoring
phases, so they are known to count), and a forward pre-hook counts model calls: the run fails unless
the loop made no SVD and no scoring call and each p made exactly as many model calls as one
unedited dev evaluation.

With side effects on (the default; `--no-side-effects` skips them), the base model's pass over the
packaged text sample (`eigenprune.side_effects`, the pruned task's text left out) is timed against a
bare forward loop over the same batches, and every p adds one edited pass (perplexity, KL): the run
fails unless each pass made exactly one model call per batch (no second base pass).

With `--search`, `eigenprune.search.search_p` (what `run --p auto` calls) then runs from the same
scores: every candidate is one dev evaluation plus the dev NLL of the correct answers (what `run` does
per p), timed one by one. The fixed sweep's cost is the search's grid phase (the same p values, the same
work); the report gives the search's evaluations and time against it, and the run fails if the search
spends more than `--p-budget` evaluations or makes an SVD or scoring call.

    python bench/sweep.py --model smollm2-135m --task int-sum --p 0.01,0.05,0.1,0.3 --json sweep.json
    python bench/sweep.py --model smollm2-135m --task int-mult --n 256 --dev-n 64 --search --no-side-effects
    python bench/sweep.py --model tiny-llama --n 16 --dev-n 16 --p 0.1,0.3   # CI smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python bench/sweep.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import eigenprune.edits.scoring  # noqa: E402
from bench import TINY, add_common_options, cli_main, load, machine, set_threads, shuffled_examples, timed  # noqa: E402
from eigenprune.core.batching import Example, batch_nll, batches, encode  # noqa: E402
from eigenprune.core.errors import UsageError  # noqa: E402
from eigenprune.core.positions import prompt_lengths  # noqa: E402
from eigenprune.edits.decompose import SHARED, decompose_targets  # noqa: E402
from eigenprune.edits.freeze import FreezeConfig, apply_edit, make_edit, remove_edit  # noqa: E402
from eigenprune.edits.scoring import ScoreConfig  # noqa: E402
from eigenprune.edits.targets import find_targets  # noqa: E402
from eigenprune.evaluation import side_effects  # noqa: E402
from eigenprune.evaluation.tasks import load_task  # noqa: E402


@contextlib.contextmanager
def counting(model: nn.Module) -> Iterator[dict[str, mock.Mock]]:
    """Count SVD calls, scoring calls and model forwards (the wrapped functions still run)."""
    calls = {"forward": mock.Mock()}
    with contextlib.ExitStack() as stack:
        calls["linalg.svd"] = stack.enter_context(mock.patch.object(torch.linalg, "svd", wraps=torch.linalg.svd))
        calls["torch.svd"] = stack.enter_context(mock.patch.object(torch, "svd", wraps=torch.svd))
        calls["score"] = stack.enter_context(
            mock.patch.object(eigenprune.edits.scoring, "score", wraps=eigenprune.edits.scoring.score))

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
        from eigenprune.evaluation.evaluate import evaluate
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
    p.add_argument("--no-side-effects", action="store_true", help="skip the side-effect passes")
    p.add_argument("--side-effect-docs", type=int, default=None,
                   help=f"a seeded subset of this many documents (default: all; {TINY}: 8)")
    p.add_argument("--side-effect-max-tokens", type=int, default=None,
                   help=f"cut documents to this many tokens (default: none; {TINY}: 32, its context is 128)")
    p.add_argument("--side-effect-batch-size", type=int, default=8)
    p.add_argument("--search", action="store_true", help="also time `--p auto`'s search, starting from --p")
    p.add_argument("--p-budget", type=int, default=10, help="with --search: dev evaluations the search may spend")
    p.add_argument("--select", default="accuracy+loss", choices=("accuracy", "accuracy+loss", "loss"),
                   help="with --search: how dev chooses")
    return p


def p_search(model: nn.Module, tokenizer, dev: list[Example], mode: str, args: argparse.Namespace, ps: list[float],
             edit_at, calls: dict, device) -> dict:
    """`search_p` from the grid `ps`, each candidate timed: one dev evaluation + the dev NLL, as `run` does."""
    from eigenprune.evaluation.evaluate import evaluate
    from eigenprune.protocol.search import Candidate, dev_nll, search_p

    def numbers() -> Candidate:
        correct = evaluate(model, tokenizer, dev, mode, args.eval_batch_size).correct  # (n_dev,)
        return Candidate.from_examples(correct, dev_nll(model, tokenizer, dev, args.eval_batch_size))

    timings: dict[float, float] = {}

    def candidate(p: float) -> Candidate:
        def run() -> Candidate:
            apply_edit(model, edit_at(p))
            try:
                return numbers()
            finally:
                remove_edit(model)

        timings[p], _, result = timed(run, device)
        return result

    base_s, _, base = timed(numbers, device)
    svd_before, score_before = svd_calls(calls), calls["score"].call_count
    result = search_p(candidate, base, grid=ps, budget=args.p_budget, select=args.select,
                      min_p=1 / edit_at.n_components)
    steps = [{"p": s.value, "phase": s.phase, "dev_acc": s.candidate.accuracy, "dev_nll": s.candidate.nll,
              "s": timings.get(s.value, base_s)} for s in result.steps]
    grid_s = sum(s["s"] for s in steps if s["phase"] == "grid")
    search_s = sum(s["s"] for s in steps if s["phase"] != "base")
    return {"budget": args.p_budget, "select": args.select, "steps": steps, "chosen": result.chosen.value,
            "stopped": result.stopped, "evaluations": result.evaluations, "grid_evaluations": len(ps),
            "grid_s": grid_s, "search_s": search_s, "search_over_grid": search_s / grid_s,
            "svd_calls": svd_calls(calls) - svd_before, "score_calls": calls["score"].call_count - score_before}


class SideEffectBench:
    """The base pass (timed against a bare forward loop over the same batches), then one pass per edit."""

    def __init__(self, model: nn.Module, tokenizer, args: argparse.Namespace, calls: dict, device) -> None:
        docs = side_effects.sample_for_task(load_task(args.task))
        n_docs, max_tokens = args.side_effect_docs, args.side_effect_max_tokens
        if args.model == TINY:
            n_docs, max_tokens = n_docs or 8, max_tokens or 32
        if n_docs is not None and n_docs < len(docs):
            docs = [docs[i] for i in sorted(random.Random(args.seed).sample(range(len(docs)), n_docs))]
        self.model, self.calls, self.device = model, calls, device
        self.batch_size = args.side_effect_batch_size
        forwards = calls["forward"].call_count
        wall, cpu, self.probe = timed(lambda: side_effects.SideEffectProbe(model, tokenizer, docs, self.batch_size,
                                                                            max_tokens), device)
        self.batches = -(-len(docs) // self.batch_size)
        self.base = {"base_pass_s": wall, "base_pass_cpu_s": cpu, "forwards": calls["forward"].call_count - forwards}
        self.base["floor_s"], self.base["floor_cpu_s"], _ = timed(self._bare_forwards, device)

    def _bare_forwards(self) -> None:
        """The model alone over the same batches: what any pass over the sample must cost."""
        with torch.inference_mode():
            for batch in batches(self.probe.encoded, self.batch_size, self.probe.pad_id):
                batch = batch.to(self.device)
                self.model(**batch.model_inputs(), use_cache=False)

    def measure(self) -> dict:
        forwards = self.calls["forward"].call_count
        wall, cpu, scores = timed(lambda: self.probe.measure(self.model), self.device)
        return {"side_effects_s": wall, "side_effects_cpu_s": cpu,
                "side_effects_forwards": self.calls["forward"].call_count - forwards,
                "perplexity": side_effects.perplexity_ci(scores),
                "delta_perplexity": side_effects.delta_perplexity_ci(self.probe.base, scores),
                "kl": side_effects.kl_ci(scores)}

    def summary(self, rows: list[dict]) -> dict:
        probe = self.probe
        hidden = sum(h.numel() * h.element_size() for h in probe._hidden)
        head = sum(t.numel() * t.element_size() for t in probe._head.parameters())
        return {**self.base, "documents": len(probe.documents), "tokens": probe.n_tokens, "batches": self.batches,
                "sources": sorted({d.source for d in probe.documents}),
                "perplexity": side_effects.perplexity_ci(probe.base),
                "stored_hidden_mib": hidden / 2**20, "head_copy_mib": head / 2**20,
                "log_probs_float32_mib": probe.n_tokens * probe.vocab * 4 / 2**20,
                "measure_s": statistics.median(r["side_effects_s"] for r in rows),
                "one_pass_per_model": self.base["forwards"] == self.batches
                and all(r["side_effects_forwards"] == self.batches for r in rows)}


def _eval_mode(args: argparse.Namespace) -> str:
    if args.eval_mode:
        return args.eval_mode
    try:
        from eigenprune.evaluation.tasks import load_task
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
    SHARED.clear()  # time the SVDs themselves, not a process cache's earlier copy (`edits.decompose`)
    with counting(model) as calls:
        targets = find_targets(model, args.targets, args.layers)
        svd_s, _, components = timed(lambda: decompose_targets(model, targets), device)
        svd_in_decompose = svd_calls(calls)
        encoded = encode(tokenizer, train)
        scoring_s, _, scores = timed(lambda: eigenprune.edits.scoring.score(
            model, targets, components, encoded, tokenizer.pad_token_id, config, progress=False), device)
        score_in_scoring = calls["score"].call_count
        dev_evaluation(model, tokenizer, dev[: args.eval_batch_size], mode, args.eval_batch_size)  # warm-up
        forwards = calls["forward"].call_count
        base_s, _, base = timed(lambda: dev_evaluation(model, tokenizer, dev, mode, args.eval_batch_size), device)
        forwards_per_eval = calls["forward"].call_count - forwards
        side = None if args.no_side_effects else SideEffectBench(model, tokenizer, args, calls, device)
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
                row["forwards"] = calls["forward"].call_count - forwards
                if side is not None:
                    row.update(side.measure())
            finally:
                row["remove_edit_s"], _, _ = timed(lambda: remove_edit(model), device)
            row["n_frozen"] = edit.n_frozen
            row["total_s"] = row["make_edit_s"] + row["apply_edit_s"] + row["eval_s"] + row["remove_edit_s"]
            rows.append(row)
            print(f"p={p:<6} frozen {edit.n_frozen:>5}  make_edit {row['make_edit_s']:.4f} s  "
                  f"eval {row['eval_s']:.3f} s  total {row['total_s']:.3f} s", flush=True)
        svd_in_loop, score_in_loop = svd_calls(calls) - svd_before, calls["score"].call_count - score_before
        search = None
        if args.search:
            def edit_at(p: float):
                return make_edit(targets, components, scores.max, scores.means, FreezeConfig(p=p))

            edit_at.n_components = sum(t.n_components for t in targets)
            search = p_search(model, tokenizer, dev, mode, args, ps, edit_at, calls, device)
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
        "side_effects": side.summary(rows) if side is not None else None,
        "search": search,
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
    s = r["side_effects"]
    if s is not None:
        ci = lambda c, f: f"{c.get('value', c.get('diff')):{f}} [{c['lo']:{f}}, {c['hi']:{f}}]"
        lines += [f"side effects: {s['documents']} documents ({', '.join(s['sources'])}), {s['tokens']} tokens, "
                  f"{s['batches']} batches; base pass {s['base_pass_s']:.2f} s ({s['base_pass_cpu_s']:.1f} CPU s), "
                  f"bare forward loop {s['floor_s']:.2f} s ({s['floor_cpu_s']:.1f} CPU s); base perplexity "
                  f"{ci(s['perplexity'], '.2f')}; stores {s['stored_hidden_mib']:.1f} MiB of hidden states + "
                  f"{s['head_copy_mib']:.1f} MiB head copy (float32 log-probs: {s['log_probs_float32_mib']:.0f} MiB)"]
        for row in r["rows"]:
            lines.append(f"  p={row['p']:<6} pass {row['side_effects_s']:.2f} s "
                         f"({row['side_effects_cpu_s']:.1f} CPU s, {row['side_effects_forwards']} calls)  "
                         f"perplexity {ci(row['perplexity'], '.2f')}  "
                         f"delta {ci(row['delta_perplexity'], '+.3f')}  KL {ci(row['kl'], '.3g')}")
        lines.append(f"side-effect pass per edit: {s['measure_s']:.2f} s = {s['measure_s'] / s['floor_s']:.2f} x the "
                     f"bare forward loop; {'one' if s['one_pass_per_model'] else 'NOT one'} forward pass per model")
    search = r.get("search")
    if search is not None:
        lines.append(f"p search (select {search['select']}, budget {search['budget']}): " + ", ".join(
            f"{s['p']:g} [{s['phase']}] {s['dev_acc']:.3f}/{s['dev_nll']:.1f} {s['s']:.2f} s" for s in search["steps"]))
        lines.append(f"chose p = {search['chosen']:g} ({search['stopped']}); {search['evaluations']} evaluations "
                     f"in {search['search_s']:.2f} s against the fixed grid's {search['grid_evaluations']} in "
                     f"{search['grid_s']:.2f} s: {search['search_over_grid']:.2f} x; {search['svd_calls']} SVD and "
                     f"{search['score_calls']} scoring calls")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, measure, report, parser, passed)


def passed(r: dict) -> bool:
    """No SVD and no scoring in the p loop, exactly one dev evaluation's model calls per p, one forward
    pass over the side-effect sample per model, and a p search within its budget with no SVD or scoring."""
    side = r["side_effects"] is None or r["side_effects"]["one_pass_per_model"]
    s = r.get("search")
    search = s is None or (s["evaluations"] <= s["budget"] and s["svd_calls"] == 0 and s["score_calls"] == 0)
    return search and r["svd_calls_in_loop"] == 0 and r["score_calls_in_loop"] == 0 and r["one_eval_per_p"] and side


if __name__ == "__main__":
    sys.exit(main())
