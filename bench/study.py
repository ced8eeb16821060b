"""What a small study costs against the passes it cannot avoid, and what `--p auto` costs against the fixed grid.

The study (default: `smollm2-135m`; int-mult and COPA; eigenprune, random, smallest; 3 folds; side effects on)
runs through `experiments.study.run_study` in this process, once with the fixed grid and once with `--p auto`,
while a `Ledger` wraps every pass the library makes and times it where it runs:

- model load (`core.models.load_model`): necessary the first time per model;
- SVD (`torch.linalg.svd`): the first time per matrix (sha256 of its bytes);
- scoring (`edits.engine.score`): always (each fold of a cell scores its own train split);
- evaluation and dev NLL pass (`evaluation.evaluate.evaluate`, `protocol.search.dev_nll`): on an edited model
  always (each edit is a model of its own), on the unedited one the first time per (weights, examples, mode);
- side-effect pass (`SideEffectProbe._pass`): of an edited model always, of the unedited one the first time per
  (weights, documents);
- the base side-effect pass read from the disk cache (`evaluation.base_cache.load`): listed, never necessary;
- hashing (`edits.fingerprint.fingerprint`, `evaluation.base_cache.key`): listed, never necessary.

The floor is the sum of the necessary passes' times, measured in the same process at the same moment as the
study; `wall / floor` is what the study adds (repeated passes, the key hashing, CIs, reports, plots, writing).
Timing each pass where it runs (not one pass of each kind times a count) keeps the folds' and tasks' sizes right.
The repeated passes are listed with their time: what a cache would save.

    python bench/study.py --limit 24 --threads 1 --json study.json          # SmolLM2, see README.md
    python bench/study.py --tiny                                          # a tiny in-code Llama, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

if __package__ in (None, ""):  # run as `python bench/study.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import TINY, cli_main, machine, set_threads, tiny_llama  # noqa: E402


def _digest_tensor(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy()
                          .tobytes()).hexdigest()


class Ledger:
    """Every pass of the wrapped kinds: (kind, necessary, seconds), and the repeated ones by kind."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, float]] = []
        self.seen: set = set()
        self._weights: dict[int, tuple[object, str]] = {}  # id(model) -> (model, digest of its unedited weights)
        self.depth = 0  # a pass inside a pass (an SVD inside a load) is counted in the outer one only

    def weights(self, model) -> str:
        held = self._weights.get(id(model))
        if held is None or held[0] is not model:
            digest = hashlib.sha256()
            for name, t in sorted(model.state_dict().items()):
                digest.update(name.encode() + _digest_tensor(t).encode())
            held = self._weights[id(model)] = (model, digest.hexdigest())
        return held[1]

    def wrap(self, kind: str, fn, key_of=None):
        """`fn` timed; `key_of(*args, **kwargs)` names its distinct work (it returns None: always necessary; no
        `key_of`: never necessary)."""

        def wrapped(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            key = key_of(*args, **kwargs) if key_of is not None else ()
            necessary = key_of is not None and (key is None or (kind, key) not in self.seen)
            self.seen.add((kind, key))
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                self.rows.append((kind, necessary, time.perf_counter() - t0))

        return wrapped

    def summary(self, wall: float) -> dict:
        count, seconds = Counter(), defaultdict(float)
        for kind, necessary, s in self.rows:
            tag = kind if necessary else f"{kind} (repeated)"
            count[tag] += 1
            seconds[tag] += s
        floor = sum(s for _, necessary, s in self.rows if necessary)
        return {"wall_s": wall, "floor_s": floor, "wall_over_floor": wall / floor if floor else None,
                "passes": {k: {"count": count[k], "seconds": seconds[k]} for k in sorted(count)}}


@contextlib.contextmanager
def ledger() -> Iterator[Ledger]:
    """Wrap the library's passes (see the module docstring) for as long as the context lasts."""
    import eigenprune.core.models as models
    import eigenprune.edits.decompose as decompose
    import eigenprune.edits.engine as engine
    import eigenprune.evaluation.evaluate as evaluate
    import eigenprune.experiments.pipeline as pipeline
    import eigenprune.protocol.search as search
    from eigenprune.core.positions import tracker_of
    from eigenprune.evaluation import base_cache, base_memo
    from eigenprune.evaluation.side_effects import SideEffectProbe

    book = Ledger()

    def unedited(model, examples, *rest) -> object:
        return (book.weights(model), tuple((e.prompt, e.answer) for e in examples), rest)

    def by_model(kind: str, fn, key_of):
        """`kind, unedited` and `kind, edited` counted apart."""
        plain = book.wrap(f"{kind}, unedited", fn, key_of)
        edited = book.wrap(f"{kind}, edited", fn, lambda *a, **k: None)
        return lambda model, *rest, **kwargs: (edited if tracker_of(model) is not None else plain)(model, *rest,
                                                                                                  **kwargs)

    def evaluation_key(model, tokenizer, examples, mode, *args, **kwargs):
        return unedited(model, examples, mode)

    def nll_key(model, tokenizer, examples, *args, **kwargs):
        return unedited(model, examples)

    svd, load, pass_ = torch.linalg.svd, models.load_model, SideEffectProbe._pass
    base_pass = book.wrap("side-effect pass, unedited", pass_, lambda probe, model, base_hidden, *r, **k: (
        book.weights(model), tuple(d.text for d in probe.documents)))
    edited_pass = book.wrap("side-effect pass, edited", pass_, lambda *a, **k: None)

    def side_effect_pass(probe, model, base_hidden, *rest, **kwargs):
        return (base_pass if base_hidden is None else edited_pass)(probe, model, base_hidden, *rest, **kwargs)
    cached = base_cache.load

    def cache_read(name):
        found = cached(name)
        if found is not None:
            book.rows.append(("side-effect base pass read from the cache", False, 0.0))
        return found

    patches = [
        mock.patch.object(torch.linalg, "svd", book.wrap("svd", svd, lambda a, *r, **k: _digest_tensor(a))),
        mock.patch.object(models, "load_model", book.wrap("model load", load, lambda spec, *r, **k: spec)),
        mock.patch.object(engine, "score", book.wrap("scoring", engine.score, lambda *a, **k: None)),
        mock.patch.object(evaluate, "evaluate", by_model("evaluation", evaluate.evaluate, evaluation_key)),
        mock.patch.object(search, "dev_nll", by_model("dev NLL pass", search.dev_nll, nll_key)),
        mock.patch.object(SideEffectProbe, "_pass", side_effect_pass),
        mock.patch.object(base_cache, "load", cache_read),
        mock.patch.object(base_cache, "key", book.wrap("hashing: side-effect cache key", base_cache.key)),
        mock.patch.object(pipeline, "fingerprint", book.wrap("hashing: model unchanged check", pipeline.fingerprint)),
        mock.patch.object(engine, "fingerprint", book.wrap("hashing: an edit's base fingerprint", engine.fingerprint)),
        mock.patch.object(decompose.SVDs, "key", staticmethod(book.wrap("hashing: SVD cache key",
                                                                        decompose.SVDs.key))),
        mock.patch.object(base_memo, "key", book.wrap("hashing: base evaluation key", base_memo.key)),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield book


SPEC = """[study]
models = [{model}]
tasks = [{tasks}]
targets = [{targets}]
methods = [{methods}]

[settings]
limit = {limit}
folds = {folds}
p = {p}
side_effects = {side_effects}
n_boot = {n_boot}
{extra}{random}"""
RANDOM = """
[method_args.random]
seeds = {seeds}
side_effect_seeds = {side_effect_seeds}
"""


def write_spec(args, folder: Path, model: str, p: str) -> Path:
    quote = lambda items: ", ".join(json.dumps(i) for i in items)
    extra = f"p_budget = {args.p_budget}\nselect = {json.dumps(args.select)}\n" if p == "auto" else \
        f"select = {json.dumps(args.select)}\n"
    text = SPEC.format(model=json.dumps(model), tasks=quote(args.tasks.split(",")), targets=json.dumps(args.targets),
                       methods=quote(args.methods.split(",")), limit=args.limit, folds=args.folds,
                       p=json.dumps(p) if p == "auto" else "[" + args.p + "]",
                       side_effects="true" if args.side_effects else "false", n_boot=args.n_boot, extra=extra,
                       random=RANDOM.format(seeds=args.random_seeds, side_effect_seeds=args.side_effect_seeds)
                       if "random" in args.methods.split(",") else "")
    path = folder / f"study-{'auto' if p == 'auto' else 'grid'}.toml"
    path.write_text(text)
    return path


def one_study(spec: Path, out: Path) -> dict:
    """Run the study in this process under a ledger: its wall time, floor and passes."""
    from eigenprune.edits.decompose import SHARED as svds
    from eigenprune.evaluation.base_memo import SHARED as bases
    from eigenprune.experiments.study import load_spec, run_study

    study = load_spec(spec)
    svds.clear()  # each study starts as a fresh process would
    bases.clear()
    with ledger() as book:
        t0, cpu = time.perf_counter(), time.process_time()
        run_study(study, out, quiet=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
    cells = [json.loads(p.read_text()) for p in sorted(out.glob("cells/*/comparison.json"))]
    method_s = defaultdict(float)
    for cell in cells:
        for name, row in cell["methods"].items():
            method_s[name] += row["wall_s"]
    return book.summary(wall) | {"cpu_s": cpu, "method_wall_s": dict(method_s), "svd_cache": dict(svds.counts),
                                 "base_memo": dict(bases.counts)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help=f"a model spec for load_model, or '{TINY}' (--tiny)")
    p.add_argument("--tiny", action="store_true", help=f"the in-code {TINY} on int-sum and int-mult: a smoke run")
    p.add_argument("--tasks", default="int-mult,copa")
    p.add_argument("--targets", default="key")
    p.add_argument("--methods", default="eigenprune,random,smallest")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--limit", type=int, default=24)
    p.add_argument("--p", default="0.01,0.05,0.1,0.3", help="the fixed grid")
    p.add_argument("--p-budget", type=int, default=10)
    p.add_argument("--select", default="accuracy+loss", help="the dev rule of both studies")
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--side-effect-seeds", type=int, default=1, help="random seeds measured for side effects per fold")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-side-effects", dest="side_effects", action="store_false")
    p.add_argument("--no-auto", dest="auto", action="store_false", help="skip the `--p auto` study")
    p.add_argument("--cache", default=None, help="$EIGENPRUNE_CACHE for the run (default: yours; with --tiny a new "
                                                 "empty folder)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write the figures here")
    return p


def measure(argv: list[str]) -> dict:
    args = parser().parse_args(argv)
    set_threads(args.threads)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="eigenprune-bench-study-") as tmp:
        folder = Path(tmp)
        model = args.model
        if args.tiny:
            model = str(folder / "tiny")
            built, tok = tiny_llama()
            built.save_pretrained(model)
            tok.save_pretrained(model)
            if args.tasks == parser().get_default("tasks"):
                args.tasks = "int-sum,int-mult"
        old = os.environ.get("EIGENPRUNE_CACHE")
        cache = args.cache or (str(folder / "cache") if args.tiny else old)  # a real model: its de-quantized entry
        if cache is not None:
            os.environ["EIGENPRUNE_CACHE"] = cache
        try:
            result = {"grid": one_study(write_spec(args, folder, model, args.p), folder / "grid")}
            if args.auto:
                result["auto"] = one_study(write_spec(args, folder, model, "auto"), folder / "auto")
                result["auto_over_grid"] = result["auto"]["wall_s"] / result["grid"]["wall_s"]
                result["auto_over_grid_cpu"] = result["auto"]["cpu_s"] / result["grid"]["cpu_s"]
                result["auto_over_grid_eigenprune"] = (result["auto"]["method_wall_s"]["eigenprune"]
                                                       / result["grid"]["method_wall_s"]["eigenprune"])
        finally:
            if old is None:
                os.environ.pop("EIGENPRUNE_CACHE", None)
            else:
                os.environ["EIGENPRUNE_CACHE"] = old
    return result | {"settings": {k: v for k, v in vars(args).items() if k != "json"} | {"model": model},
                     "load_before": load, "load_after": os.getloadavg(), "machine": machine()}


def report(result: dict) -> str:
    lines = []
    for name in ("grid", "auto"):
        if name not in result:
            continue
        r = result[name]
        lines.append(f"{name}: wall {r['wall_s']:.2f} s (CPU {r['cpu_s']:.2f} s), floor {r['floor_s']:.2f} s, "
                     f"wall / floor {r['wall_over_floor']:.2f}")
        for kind, row in r["passes"].items():
            lines.append(f"  {kind:50s} {row['count']:5d}  {row['seconds']:9.2f} s")
        lines.append("  methods' own wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["method_wall_s"].items()))
        lines.append(f"  SVD cache {r['svd_cache']}, base evaluations {r['base_memo']}")
    if "auto_over_grid" in result:
        lines.append(f"--p auto / grid, wall: {result['auto_over_grid']:.2f}, CPU: {result['auto_over_grid_cpu']:.2f}; "
                     "eigenprune's own wall: "
                     f"{result['auto_over_grid_eigenprune']:.2f}")
    lines.append(f"load average before {result['load_before']}, after {result['load_after']}")
    return "\n".join(lines)


def passed(result: dict) -> bool:
    return all(result[n]["floor_s"] > 0 for n in ("grid", "auto") if n in result)


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv, measure, report, parser, passed)


if __name__ == "__main__":
    sys.exit(main())
