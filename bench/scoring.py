"""How much eigenprune's scoring costs over the forward+backward it cannot avoid, and over a reference.

Three methods, timed in one process and interleaved (each repeat runs them all, alternating the
order; the median over repeats is reported):

1. floor: the forward+backward loop over the same batches in the same order, with the same hooks
   (`capture_io`, `activation_grads_only`) keeping the same activations alive: scoring minus its maths;
2. eigenprune: `eigenprune.edits.scoring.score` (K partners per example, default 4);
3. reference: the formula written the straightforward way, after the authors' released code
   (`calculate_importance_by_singular_value`): a Python loop over components that rebuilds each
   rank-1 output, stores the effect of every pair at every position for every component of every
   target, and reduces by max/mean at the end. It runs on a subset (`--reference-n`) over all
   ordered pairs, against eigenprune in exact mode (`partners="all"`) on the same subset, so both
   see the same pairs and their scores must agree.

Peak memory is measured per method in a fresh child process (see README.md for how and why).

    python bench/scoring.py --model smollm2-135m --task int-sum --n 512 --reference-n 64 --json out.json
    python bench/scoring.py --model tiny-llama --n 32 --reference-n 8 --repeats 1   # CI smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing
import os
import resource
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python bench/scoring.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import add_common_options, cli_main, load, machine, set_threads, shuffled_examples, sync, timed  # noqa: E402
from eigenprune.core.batching import Encoded, batch_nll, collate, encode  # noqa: E402
from eigenprune.core.errors import UsageError  # noqa: E402
from eigenprune.core.hooks import activation_grads_only, capture_io  # noqa: E402
from eigenprune.edits.decompose import Components, decompose_targets  # noqa: E402
from eigenprune.edits.scoring import ScoreConfig, Scores, aligned, score  # noqa: E402
from eigenprune.edits.targets import Target, find_targets  # noqa: E402

PAGE = 4096


# -- the measured methods -----------------------------------------------------------------------------

@dataclass
class Setup:
    """Everything the methods share: loaded once per process, outside every measurement."""

    model: nn.Module
    tokenizer: object
    targets: list[Target]
    components: dict[str, Components]
    encoded: list[Encoded]  # the n examples of the main comparison
    subset: list[Encoded]  # the first reference_n of them

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def modules(self) -> list[str]:
        return sorted({t.module_name for t in self.targets})


def prepare(args: argparse.Namespace) -> Setup:
    model, tokenizer = load(args.model, args.dtype, args.device)
    targets = find_targets(model, args.targets, args.layers)
    examples = shuffled_examples(args.task, args.seed)
    if args.n > len(examples):
        raise UsageError(f"--n {args.n} is more than the {len(examples)} train examples of {args.task}")
    encoded = encode(tokenizer, examples[: args.n])
    return Setup(model, tokenizer, targets, decompose_targets(model, targets), encoded, encoded[: args.reference_n])


def floor(setup: Setup, encoded: list[Encoded], batch_size: int, seed: int) -> None:
    """Scoring's forward+backward passes and hooks, batch for batch, without its maths."""
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(seed)).tolist()  # score's order
    model, was_training = setup.model, setup.model.training
    model.eval()
    try:
        with activation_grads_only(model), capture_io(model, setup.modules) as cap:
            for start in range(0, len(encoded), batch_size):
                batch = collate(encoded, order[start : start + batch_size], setup.tokenizer.pad_token_id)
                batch = batch.to(setup.device)
                cap.clear()
                batch_nll(model, batch).sum().backward()
    finally:
        model.train(was_training)


def reference_scores(setup: Setup, encoded: list[Encoded], batch_size: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Max and mean ΔL over all ordered pairs, one component at a time, every per-position effect kept.

    Follows the authors' `calculate_importance_by_singular_value`: per component, project the input
    difference on v_i, scale by s_i, rebuild the rank-1 output (…, d_out) and dot it with the gradient;
    the (pairs, positions, components) effects of every target stay in memory until the reduction.
    """
    model, device, pad_id = setup.model, setup.device, setup.tokenizer.pad_token_id
    n = len(encoded)
    offset_min = 1 - max(len(e.prompt_ids) for e in encoded)
    n_offsets = max(len(e.answer_ids) for e in encoded) - offset_min
    xs: dict[str, list[torch.Tensor]] = {m: [] for m in setup.modules}
    gs: dict[str, list[torch.Tensor]] = {m: [] for m in setup.modules}
    masks = []
    was_training = model.training
    model.eval()
    try:
        with activation_grads_only(model), capture_io(model, setup.modules) as cap:
            for start in range(0, n, batch_size):
                batch = collate(encoded, range(start, min(start + batch_size, n)), pad_id).to(device)
                cap.clear()
                batch_nll(model, batch).sum().backward()
                masks.append(aligned(batch.attention_mask[..., None].float(), batch, offset_min, n_offsets)[..., 0])
                for m in setup.modules:
                    xs[m].append(aligned(cap.inputs[m].float(), batch, offset_min, n_offsets))  # (b, offsets, d_in)
                    gs[m].append(aligned(cap.grads[m].float(), batch, offset_min, n_offsets))  # (b, offsets, d_out)
    finally:
        model.train(was_training)
    mask = torch.cat(masks)  # (n, offsets)
    e, f = torch.tensor([(e, f) for e in range(n) for f in range(n) if e != f], device=device).unbind(1)  # (pairs,)
    effects = {}
    for t in setup.targets:
        c = setup.components[t.name]
        U, S, Vh = c.U.to(device), c.S.to(device), c.Vh.to(device)
        x, g = torch.cat(xs[t.module_name]), torch.cat(gs[t.module_name])[..., t.rows[0] : t.rows[1]]
        delta = x[f] - x[e] * mask[f][..., None]  # (pairs, offsets, d_in): e's input patched by f's
        grad = g[e]  # (pairs, offsets, d_out)
        importance = torch.zeros(len(e), n_offsets, len(S), device=device)  # (pairs, offsets, k)
        for i in range(len(S)):
            coefficient = (delta @ Vh[i]) * S[i]  # (pairs, offsets)
            change = coefficient[..., None] * U[:, i]  # (pairs, offsets, d_out)
            importance[:, :, i] = (grad * change).sum(-1)
        effects[t.name] = importance
    totals = {name: v.sum(1) for name, v in effects.items()}  # (pairs, k)
    return {name: (v.max(0).values.cpu(), v.mean(0).cpu()) for name, v in totals.items()}


def run(setup: Setup, args: argparse.Namespace, method: str) -> object:
    """One run of a named method; returns its scores (None for floors)."""
    exact = ScoreConfig(partners="all", batch_size=args.batch_size, seed=args.seed)
    sampled = ScoreConfig(partners=args.partners, batch_size=args.batch_size, seed=args.seed)
    pad_id = setup.tokenizer.pad_token_id
    if method == "floor":
        return floor(setup, setup.encoded, args.batch_size, args.seed)
    if method == "floor_subset":
        return floor(setup, setup.subset, args.batch_size, args.seed)
    if method == "scoring":
        return score(setup.model, setup.targets, setup.components, setup.encoded, pad_id, sampled, progress=False)
    if method == "scoring_subset":
        return score(setup.model, setup.targets, setup.components, setup.subset, pad_id, exact, progress=False)
    if method == "reference":
        return reference_scores(setup, setup.subset, args.batch_size)
    raise ValueError(f"unknown method {method}")


METHODS = ("floor", "scoring", "floor_subset", "scoring_subset", "reference")


# -- measuring ----------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """Bytes the process's peak grows by while `fn` runs, and how that was measured."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return max(torch.cuda.max_memory_allocated(device) - base, PAGE), "cuda max_memory_allocated delta"
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so reuse cannot hide growth
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _status_kib("VmRSS")
    except OSError:  # no /proc or clear_refs: the lifetime peak, which the model load may already exceed
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        fn()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
        return max(grown * 1024, PAGE), "ru_maxrss growth (a lower bound)"
    fn()
    return max(_status_kib("VmHWM") - base, PAGE // 1024) * 1024, "peak RSS (VmHWM) growth, fresh process"


def _memory_child(argv: list[str], method: str, conn) -> None:
    """Child process: load everything, warm up, then measure one run of `method`; send (bytes, how)."""
    try:
        args = parser().parse_args(argv)
        set_threads(args.threads)
        if args.memory_jobs > 1:  # children side by side: share the cores rather than oversubscribe them
            torch.set_num_threads(max(1, torch.get_num_threads() // args.memory_jobs))
        setup = prepare(args)
        floor(setup, setup.subset[: args.batch_size], args.batch_size, args.seed)  # one-time allocations
        conn.send(peak_memory(lambda: run(setup, args, method), setup.device))
    finally:
        conn.close()


def measure_memory(argv: list[str], methods: tuple[str, ...], jobs: int) -> tuple[dict[str, int], str, list[str]]:
    """Each method once, in its own freshly spawned process that loads the model first; `jobs` at a time.
    A child that dies (say, out of memory) is listed in the third value instead of measured."""
    context = multiprocessing.get_context("spawn")
    peaks, how, failed = {}, "", []
    for start in range(0, len(methods), jobs):
        children = []
        for method in methods[start : start + jobs]:
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_memory_child, args=(argv, method, send))
            child.start()
            send.close()
            children.append((method, child, receive))
        for method, child, receive in children:
            try:
                peaks[method], how = receive.recv()
            except EOFError:  # the child died before sending
                pass
            child.join()
            if method not in peaks:
                failed.append(f"{method} (exit code {child.exitcode})")
    return peaks, how, failed


def compare(got: Scores, want: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Eigenprune exact-mode scores vs the reference's: max abs difference and an allclose verdict."""
    diff, scale, ok = 0.0, 0.0, True
    for name, (ref_max, ref_mean) in want.items():
        for ours, theirs in ((got.max[name], ref_max), (got.mean[name], ref_mean)):
            diff = max(diff, float((ours - theirs).abs().max()))
            scale = max(scale, float(theirs.abs().max()))
            ok &= torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()) + 1e-7)
    return {"passed": bool(ok), "max_abs_diff": diff, "max_abs_score": scale}


def profile(setup: Setup, args: argparse.Namespace, rows: int) -> None:
    """torch.profiler tables (self CPU time) of one floor run and one scoring run."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for method in ("floor", "scoring"):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run(setup, args, method)
        print(f"\n== profile: {method}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# -- command line -------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/scoring.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python bench/scoring.py --model smollm2-135m --n 512 "
                                       "--reference-n 64 --json scoring.json")
    add_common_options(p)
    p.add_argument("--n", type=int, default=512, help="examples scored by floor and eigenprune")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--partners", type=int, default=4, help="K of eigenprune's default mode")
    p.add_argument("--reference-n", type=int, default=16, help="subset for the reference and exact mode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", choices=("all", "subset", "off"), default="all",
                   help="peak memory of every method, of the subset's three only, or none; one fresh process each")
    p.add_argument("--memory-jobs", type=int, default=1, help="child processes at a time (1: nothing shares)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print profiler tables (ROWS ops)")
    return p


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _above_floor(peaks: dict[str, int]) -> float | None:
    """Reference over exact scoring, each minus the floor's peak on the subset; None unless both
    differences are positive (on tiny models both sit inside the RSS noise)."""
    if not {"reference", "scoring_subset", "floor_subset"} <= peaks.keys():
        return None
    ours, theirs = (peaks[m] - peaks["floor_subset"] for m in ("scoring_subset", "reference"))
    return theirs / ours if ours > 0 and theirs > 0 else None


def measure(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    if args.n < 2 or args.reference_n < 2 or args.reference_n > args.n or args.repeats < 1:
        raise UsageError("need 2 <= --reference-n <= --n and --repeats >= 1")
    set_threads(args.threads)
    setup = prepare(args)
    floor(setup, setup.subset[: args.batch_size], args.batch_size, args.seed)  # warm-up, untimed
    if args.profile:
        profile(setup, args, args.profile)
    timed_methods = ("floor", "scoring", "scoring_subset", "reference")
    times: dict[str, list[float]] = {m: [] for m in timed_methods}
    cpu_times: dict[str, list[float]] = {m: [] for m in timed_methods}
    results: dict[str, object] = {}
    load_before = os.getloadavg()
    for r in range(args.repeats):
        for method in timed_methods if r % 2 == 0 else timed_methods[::-1]:
            seconds, cpu, results[method] = timed(lambda method=method: run(setup, args, method), setup.device)
            times[method].append(seconds)
            cpu_times[method].append(cpu)
            print(f"repeat {r + 1}/{args.repeats} {method:<15} {seconds:9.3f} s wall {cpu:9.3f} s cpu", flush=True)
    load_after = os.getloadavg()
    median = {m: statistics.median(v) for m, v in times.items()}
    cpu_median = {m: statistics.median(v) for m, v in cpu_times.items()}
    check = compare(results["scoring_subset"], results["reference"])
    measured = {"all": METHODS, "subset": METHODS[2:], "off": ()}[args.memory]
    peaks, how, failed = measure_memory(argv, measured, args.memory_jobs) if measured else ({}, "off", [])
    k = len(setup.subset)
    return {
        "model": args.model, "task": args.task, "targets": args.targets, "layers": args.layers,
        "n_targets": len(setup.targets), "n_components": sum(t.n_components for t in setup.targets),
        "n": args.n, "reference_n": k, "batch_size": args.batch_size, "partners": args.partners,
        "pairs": results["scoring"].n_pairs, "reference_pairs": k * (k - 1), "repeats": args.repeats,
        "device": str(setup.device), "dtype": args.dtype, "machine": machine(),
        "floor_s": median["floor"], "scoring_s": median["scoring"],
        "scoring_subset_s": median["scoring_subset"], "reference_s": median["reference"], "times_s": times,
        "cpu_s": cpu_median, "cpu_times_s": cpu_times, "load_average": {"before": load_before, "after": load_after},
        "scoring_over_floor": median["scoring"] / median["floor"],
        "scoring_over_floor_cpu": cpu_median["scoring"] / cpu_median["floor"],
        "reference_over_scoring_time": median["reference"] / median["scoring_subset"],
        "per_example_s": {"floor": median["floor"] / args.n, "scoring": median["scoring"] / args.n,
                          "scoring_subset": median["scoring_subset"] / k, "reference": median["reference"] / k},
        "peak_bytes": peaks, "memory_method": how, "memory_failed": failed,
        "reference_over_scoring_memory": _ratio(peaks.get("reference"), peaks.get("scoring_subset")),
        "reference_over_scoring_memory_above_floor": _above_floor(peaks),
        "reference_check": check,
    }


def report(r: dict) -> str:
    mib = lambda m: f"{r['peak_bytes'][m] / 2**20:10.1f}" if m in r["peak_bytes"] else f"{'-':>10}"
    n, k = r["n"], r["reference_n"]
    rows = [("floor", n, "-", r["floor_s"]), ("eigenprune", n, r["pairs"], r["scoring_s"]),
            ("floor_subset", k, "-", None), ("scoring_subset", k, r["reference_pairs"], r["scoring_subset_s"]),
            ("reference", k, r["reference_pairs"], r["reference_s"])]
    lines = [f"{r['model']} {r['task']} targets={r['targets']} ({r['n_targets']} matrices, {r['n_components']} "
             f"components), {r['device']} {r['dtype']}, torch {r['machine']['torch']}, "
             f"{r['machine']['torch_threads']} threads, median of {r['repeats']}",
             f"{'method':<15} {'examples':>8} {'pairs':>7} {'time s':>9} {'ms/example':>10} {'peak MiB':>10}"]
    for name, count, pairs, sec in rows:
        key = "scoring" if name == "eigenprune" else name
        t = f"{sec:9.3f} {1000 * sec / count:10.2f}" if sec is not None else f"{'-':>9} {'-':>10}"
        lines.append(f"{name:<15} {count:>8} {pairs:>7} {t} {mib(key)}")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    c = r["reference_check"]
    lines += [f"eigenprune / floor (time, n={n}):                 {fmt(r['scoring_over_floor'])}  (target <= 1.3; "
              f"CPU time {fmt(r['scoring_over_floor_cpu'])})",
              f"reference / eigenprune exact (time, n={k}):       {fmt(r['reference_over_scoring_time'])}  "
              "(target >= 20)",
              f"reference / eigenprune exact (peak memory, n={k}): {fmt(r['reference_over_scoring_memory'])}  "
              f"(target >= 100; above the floor: {fmt(r['reference_over_scoring_memory_above_floor'])})",
              f"reference check: {'passed' if c['passed'] else 'FAILED'} (max abs diff {c['max_abs_diff']:.3g}, "
              f"largest |score| {c['max_abs_score']:.3g}); memory: {r['memory_method']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, measure, report, parser, lambda r: r["reference_check"]["passed"])


if __name__ == "__main__":
    sys.exit(main())
