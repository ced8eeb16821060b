"""Competing methods run in the same harness as eigenpruning (same splits, eval mode, statistics).

One module per method; each exposes a `run_<method>(harness, ...) -> MethodResult` function that
chooses its configuration on dev only and evaluates the chosen one on test once. `compare` (in
`eigenprune.compare`) runs them side by side.
"""
