"""Regenerate the golden outputs: run every case in `cases.py` through the CLI on the tiny inputs and save
each one's normalised JSON as tests/golden/NAME.json.

    OMP_NUM_THREADS=1 python tests/golden/make_golden.py [NAME ...]

Run it only when a change of numbers is intended, and say so in the commit.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import BY_NAME, CASES, make_inputs, run_case, save  # noqa: E402


def main(names: list[str]) -> int:
    chosen = [BY_NAME[n] for n in names] if names else CASES
    with tempfile.TemporaryDirectory(prefix="eigenprune-golden-") as tmp:
        inputs = make_inputs(Path(tmp) / "inputs")
        for case in chosen:
            start = time.perf_counter()
            data = run_case(case, inputs, Path(tmp) / "out" / case.name)
            path = save(case, data)
            print(f"{case.name}: {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
