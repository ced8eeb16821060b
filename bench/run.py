"""One `eigenprune run`, phase by phase, against its floor: what the same experiment cannot avoid.

The run is `eigenprune.experiments.run.execute(RunConfig(task, model, limit, p, eval_mode), out, quiet=True)`,
timed as a whole; its report's `timings` split it into load, base_eval, scoring, sweep and test_eval,
and the rest of the wall time (loading the task, statistics, report, plots, saving) is `other`.

The floor is built from library pieces and does nothing else:
- load: `models.load_model` (the GGUF cache warm, as for every run after the first);
- base_eval: `evaluate.evaluate` of the unedited model on dev and on test;
- scoring: one forward+backward pass over the scoring (train) set with `data.batch_nll`, in scoring's
  batches and order, computing activation gradients only (`hooks.activation_grads_only`: all scoring
  needs); no SVD, no captured activations, no pair maths;
- sweep: the evaluations the sweep makes (dev and test for every p), on the unedited model;
- test_eval: nothing (the sweep has already evaluated every p on test).

`--choice-check` (choice tasks) also compares choice scoring on the prompt's KV cache with teacher
forcing every (prompt, choice) pair, the path it replaced, on dev + test, unedited and with the
largest p's edit: the largest relative difference of the summed log-likelihoods, and both times.
`--load-check` times a load without the cache, one that fills a fresh cache, and a cached one.

    python bench/run.py --task int-mult --json run-int-mult.json
    python bench/run.py --task cb --limit 120 --choice-check --load-check --json run-cb.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/run.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cli_main, machine, set_threads  # noqa: E402
from eigenprune.core.batching import batch_nll, batches, encode  # noqa: E402
from eigenprune.core.hooks import activation_grads_only  # noqa: E402
from eigenprune.core.models import CACHE_ENV, load_model  # noqa: E402
from eigenprune.core.positions import prompt_lengths  # noqa: E402
from eigenprune.edits.engine import score_run  # noqa: E402
from eigenprune.edits.freeze import FreezeConfig, applied  # noqa: E402
from eigenprune.evaluation.evaluate import choice_nll, evaluate  # noqa: E402
from eigenprune.evaluation.splits import split_task  # noqa: E402
from eigenprune.evaluation.tasks import load_task  # noqa: E402
from eigenprune.experiments.run import RunConfig, execute  # noqa: E402

PHASES = ("load", "base_eval", "scoring", "sweep", "test_eval")


def settings(cfg: RunConfig) -> tuple[int, int, int]:
    """(scoring batch size, evaluation batch size, scoring seed): the run's defaults, read off its config."""
    return getattr(cfg, "batch_size", 8), getattr(cfg, "eval_batch_size", 16), getattr(cfg, "score_seed", 0)


def run_once(cfg: RunConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        report = execute(cfg, Path(tmp) / "run", quiet=True)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    phases = {k: float(report["timings"][k]) for k in PHASES}
    return {"wall": wall, **phases, "other": wall - sum(phases.values()), "cpu": cpu}


def floor_once(cfg: RunConfig, task_name: str, limit: int | None, eval_mode: str | None, n_p: int) -> dict:
    score_batch, eval_batch, seed = settings(cfg)
    start, cpu = time.perf_counter(), time.process_time()
    model, tok = load_model(cfg.model)
    out = {"load": time.perf_counter() - start}
    task = load_task(task_name)
    splits = split_task(task, limit=limit)
    mode = eval_mode or task.eval_mode

    def evaluations(times: int) -> float:
        begin = time.perf_counter()
        for _ in range(times):
            for split in (splits.dev, splits.test):
                evaluate(model, tok, split, mode, eval_batch)
        return time.perf_counter() - begin

    out["base_eval"] = evaluations(1)
    begin = time.perf_counter()
    encoded = encode(tok, splits.train)
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()  # scoring's
    with activation_grads_only(model):
        for batch in batches(encoded, score_batch, tok.pad_token_id, order):
            with prompt_lengths(model, batch.prompt_lengths):
                batch_nll(model, batch).sum().backward()
    out["scoring"] = time.perf_counter() - begin
    out["sweep"] = evaluations(n_p)
    out["test_eval"] = 0.0
    out["wall"] = sum(out.values())
    out["cpu"] = time.process_time() - cpu
    return out


def teacher_forced_nll(model, tok, examples, batch_size: int) -> list[torch.Tensor]:
    """The path choice scoring replaced: every (prompt, choice) pair as one right-padded teacher-forced row."""
    flat = [ex for ex in examples for _ in ex.choices]
    encoded = encode(tok, flat, [c for ex in examples for c in ex.choices])
    nll = torch.empty(len(encoded))
    with torch.inference_mode():
        for batch in batches(encoded, batch_size, tok.pad_token_id):
            with prompt_lengths(model, batch.prompt_lengths):
                nll[batch.index] = batch_nll(model, batch)
    return list(nll.split([len(ex.choices) for ex in examples]))


def choice_check(cfg: RunConfig, task_name: str, limit: int | None) -> dict:
    """KV-cache choice scoring against teacher forcing, unedited and with the largest p's edit."""
    score_batch, eval_batch, seed = settings(cfg)
    model, tok = load_model(cfg.model)
    splits = split_task(load_task(task_name), limit=limit)
    examples = list(splits.dev) + list(splits.test)
    run = score_run(model, tok, splits.train, progress=False)
    out = {"examples": len(examples), "pairs": sum(len(ex.choices) for ex in examples)}
    for name, edit in (("base", None), (f"p={max(cfg.p)}", run.edit(FreezeConfig(p=max(cfg.p))))):
        with applied(model, edit) if edit is not None else contextlib.nullcontext():
            start = time.perf_counter()
            kv = choice_nll(model, tok, examples, eval_batch)
            kv_s = time.perf_counter() - start
            start = time.perf_counter()
            tf = teacher_forced_nll(model, tok, examples, eval_batch)
            tf_s = time.perf_counter() - start
        rel = max(float(((a - b).abs() / b.abs().clamp(min=1e-12)).max()) for a, b in zip(kv, tf, strict=True))
        same_pick = sum(int(a.argmin()) == int(b.argmin()) for a, b in zip(kv, tf, strict=True))
        out[name] = {"max_rel_diff": rel, "same_argmin": same_pick, "kv_cache_s": kv_s, "teacher_forced_s": tf_s,
                     "speedup": tf_s / kv_s}
    return out


@contextlib.contextmanager
def cache_env(value: str) -> Iterator[None]:
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV)
        else:
            os.environ[CACHE_ENV] = before


def load_check(model: str) -> dict:
    """Seconds to load without the cache, to fill a fresh cache, and to load from it."""
    def seconds() -> float:
        start = time.perf_counter()
        load_model(model)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        with cache_env("off"):
            uncached = seconds()
        with cache_env(tmp):
            fill, cached = seconds(), seconds()
    return {"uncached_s": uncached, "fill_s": fill, "cached_s": cached}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model spec for load_model")
    p.add_argument("--task", default="int-mult")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--p", default="0.01,0.05,0.1,0.3", help="comma-separated fractions, as `run --p`")
    p.add_argument("--eval-mode", default=None, choices=("next-token", "choice", "exact"))
    p.add_argument("--repeats", type=int, default=1,
                   help="run and floor this many times each, alternating (0: only the checks asked for)")
    p.add_argument("--choice-check", action="store_true", help="KV-cache choice scoring vs teacher forcing")
    p.add_argument("--load-check", action="store_true", help="time loads without, into and from the cache")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the figures here")
    return p


def measure(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    set_threads(args.threads)
    cfg = RunConfig(task=args.task, model=args.model, limit=args.limit, p=[float(v) for v in args.p.split(",")],
                    eval_mode=args.eval_mode)
    start = time.perf_counter()
    load_model(cfg.model)  # fills the GGUF cache when this is the model's first load
    first_load = time.perf_counter() - start
    runs, floors = [], []
    for i in range(args.repeats):  # alternate which goes first, so drift in the machine's load hits both
        for which in (("run", "floor") if i % 2 == 0 else ("floor", "run")):
            if which == "run":
                runs.append(run_once(cfg))
            else:
                floors.append(floor_once(cfg, args.task, args.limit, args.eval_mode, len(cfg.p)))
    result = {"machine": machine(), "argv": argv, "first_load_s": first_load, "repeats": args.repeats}
    if runs:
        run = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        floor = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
        result |= {"run": run, "floor": floor, "ratio": run["wall"] / floor["wall"],
                   "cpu_ratio": run["cpu"] / floor["cpu"], "load_average": os.getloadavg()}
    if args.choice_check and (args.eval_mode or load_task(args.task).eval_mode) == "choice":
        result["choice_check"] = choice_check(cfg, args.task, args.limit)
    if args.load_check:
        result["load_check"] = load_check(args.model)
    return result


def report(r: dict) -> str:
    lines = [f"first load {r['first_load_s']:.1f} s"]
    if "run" in r:
        lines.append(f"{'phase':<10} {'run s':>8} {'floor s':>8} {'ratio':>6}")
        for k in (*PHASES, "other", "wall"):
            run, floor = r["run"][k], r["floor"].get(k, 0.0)
            ratio = f"{run / floor:6.2f}" if floor > 0 else "     -"
            lines.append(f"{'total' if k == 'wall' else k:<10} {run:8.2f} {floor:8.2f} {ratio}")
        lines.append(f"whole run / floor: {r['ratio']:.2f}x wall, {r['cpu_ratio']:.2f}x CPU time (median of "
                     f"{r['repeats']}); load average {r['load_average'][1]:.1f}")
    check = r.get("choice_check")
    if check:
        for name, c in check.items():
            if isinstance(c, dict):
                lines.append(f"choice {name}: KV cache {c['kv_cache_s']:.2f} s vs teacher forcing "
                             f"{c['teacher_forced_s']:.2f} s ({c['speedup']:.2f}x); max relative difference "
                             f"{c['max_rel_diff']:.1e}; same pick on {c['same_argmin']}/{check['examples']}")
    if "load_check" in r:
        c = r["load_check"]
        lines.append(f"load: no cache {c['uncached_s']:.1f} s, filling the cache {c['fill_s']:.1f} s, "
                     f"cached {c['cached_s']:.2f} s")
    return "\n".join(lines)


def passed(r: dict) -> bool:
    check = r.get("choice_check", {})
    return all(c["max_rel_diff"] <= 1e-4 for c in check.values() if isinstance(c, dict))


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, measure, report, parser, passed)


if __name__ == "__main__":
    sys.exit(main())
