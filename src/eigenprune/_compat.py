"""Old module paths (before the layer folders of 0.2), kept importable for one release with a warning.

`import eigenprune.baselines.laser` or `from eigenprune.freeze import applied` still work: a finder at
the front of `sys.meta_path` answers each old name with the module that now holds its code (the very
same module object, so patching one patches the other) and says where it went.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "errors": "core.errors", "settings": "core.settings", "models": "core.models", "data": "core.batching",
    "hooks": "core.hooks", "positions": "core.positions", "outdir": "core.outdir",
    "targets": "edits.targets", "decompose": "edits.decompose", "scoring": "edits.scoring", "freeze": "edits.freeze",
    "engine": "edits.engine", "iterative": "edits.iterative", "artifact": "edits.artifact", "export": "edits.export",
    "fingerprint": "edits.fingerprint",
    "tasks": "evaluation.tasks", "splits": "evaluation.splits", "evaluate": "evaluation.evaluate",
    "stats": "evaluation.stats", "side_effects": "evaluation.side_effects",
    "harness": "protocol.harness", "search": "protocol.search", "config": "protocol.config",
    "experiment": "experiments.run", "crossfit": "experiments.crossfit", "compare": "experiments.compare",
    "study": "experiments.study", "study_spec": "experiments.study_spec", "provenance": "experiments.provenance",
    "report": "reports.run_report", "compare_report": "reports.compare_report", "study_report": "reports.study_report",
    "demo": "cli.demo",
    "baselines": "methods", "baselines.eigenprune_method": "methods.eigenprune",
    "baselines.iterative_method": "methods.eigenprune_iterative",
}


def new_name(old: str) -> str | None:
    """The module that holds what `eigenprune.<old>` held, or None when `old` never moved."""
    if old in MOVED:
        return MOVED[old]
    head, _, leaf = old.rpartition(".")
    return f"{MOVED[head]}.{leaf}" if head in MOVED else None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("eigenprune."):
            return None
        new = new_name(fullname[len("eigenprune."):])
        if new is None or importlib.util.find_spec(f"eigenprune.{new}") is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = "eigenprune." + new_name(spec.name[len("eigenprune."):])
        warnings.warn(f"{spec.name} moved to {new}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the module was executed under its new name


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
