"""The first load of a GGUF model (de-quantizing it and filling the cache), with `gguf_fast.fast_gguf` and
without, alternated, each in a fresh process with `$EIGENPRUNE_CACHE` pointed at a new empty folder.

    python bench/gguf_load.py --model smollm2-135m --repeats 3 --threads 2

Per load: wall seconds, the process's CPU seconds (all threads) and its main thread's CPU seconds (on a loaded
machine the CPU times say more than the wall time; an idle machine's wall time is at least the main thread's
CPU time and half the process's), the 1-minute load average after it, and the process's peak resident memory
(`ru_maxrss`, read right after the load; it includes Python, torch and transformers themselves). The float
model's size is its parameters' bytes. The loads' weights (sha256 over the state dict) and tokenizer ids on
sample texts must be identical (the script exits 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import hashlib, json, os, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import eigenprune.core.models as m
m.FAST_GGUF = sys.argv[2] == "fast"
start, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
model, tok = m.load_model(sys.argv[1])
wall, cpu, main = time.perf_counter() - start, time.process_time() - cpu, time.thread_time() - main
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the hashing below copies tensors
digest = hashlib.sha256()
for name, p in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
size = sum(p.numel() * p.element_size() for p in model.parameters())
ids = [tok(t)["input_ids"] for t in ("The cat sat on the mat.", "12 * 34 = 408", "  héllo\tWORLD\n")]
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "main_thread_cpu_s": main, "peak_rss_bytes": peak,
                  "float_model_bytes": size, "weights_sha256": digest.hexdigest(), "vocab": len(tok),
                  "token_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
                  "load_avg_1min": os.getloadavg()[0]}))
"""

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file or the smollm2-135m alias")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p


def load_once(model: str, mode: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="eigenprune-gguf-bench-") as cache:
        env = {**os.environ, "EIGENPRUNE_CACHE": cache, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", CHILD, model, mode, str(threads)], env=env, check=True,
                             capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    runs: dict[str, list[dict]] = {"plain": [], "fast": []}
    for r in range(args.repeats):
        for mode in (("plain", "fast") if r % 2 == 0 else ("fast", "plain")):
            runs[mode].append(load_once(args.model, mode, args.threads))
            print(mode, json.dumps(runs[mode][-1]), flush=True)
    ratios = [f["wall_s"] / p["wall_s"] for f, p in zip(runs["fast"], runs["plain"], strict=True)]
    size = runs["fast"][0]["float_model_bytes"]
    result = {"model": args.model, "threads": args.threads, "repeats": args.repeats, "runs": runs,
              "plain_wall_s_median": statistics.median(r["wall_s"] for r in runs["plain"]),
              "fast_wall_s_median": statistics.median(r["wall_s"] for r in runs["fast"]),
              "fast_over_plain_median": statistics.median(ratios), "fast_over_plain_range": [min(ratios), max(ratios)],
              "fast_peak_over_float_model": max(r["peak_rss_bytes"] for r in runs["fast"]) / size,
              "plain_peak_over_float_model": max(r["peak_rss_bytes"] for r in runs["plain"]) / size,
              "plain_cpu_s_median": statistics.median(r["cpu_s"] for r in runs["plain"]),
              "fast_cpu_s_median": statistics.median(r["cpu_s"] for r in runs["fast"]),
              "fast_main_thread_cpu_s_median": statistics.median(r["main_thread_cpu_s"] for r in runs["fast"]),
              "load_avg_range": [min(r["load_avg_1min"] for rs in runs.values() for r in rs),
                                 max(r["load_avg_1min"] for rs in runs.values() for r in rs)],
              "same_weights": len({r["weights_sha256"] for rs in runs.values() for r in rs}) == 1,
              "same_token_ids": len({r["token_ids_sha256"] for rs in runs.values() for r in rs}) == 1}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["same_weights"] and result["same_token_ids"] else 1


if __name__ == "__main__":
    sys.exit(main())
