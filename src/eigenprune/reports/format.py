"""Number formatting shared by `run`'s report and plots: NaN-safe floats, intervals, the chosen p."""

from __future__ import annotations

import math


def _num(value) -> float:
    """A float, NaN for None or anything that is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _f(value, digits: int = 3, signed: bool = False) -> str:
    x = _num(value)
    return "n/a" if math.isnan(x) else f"{x:{'+' if signed else ''}.{digits}f}"


def _interval(lo, hi, signed: bool = False) -> str:
    if math.isnan(_num(lo)) or math.isnan(_num(hi)):
        return "[n/a]"
    return f"[{_f(lo, signed=signed)}, {_f(hi, signed=signed)}]"


def _acc_ci(entry: dict | None) -> str:
    """'0.412 [0.370, 0.450]' from {acc, lo, hi}."""
    return f"{_f((entry or {}).get('acc'))} {_interval((entry or {}).get('lo'), (entry or {}).get('hi'))}"


_p = lambda value: f"{_num(value):g}"  # 0.05 -> "0.05", 0.1 -> "0.1"
_split = lambda report, which, split: (report.get(which) or {}).get(split) or {}  # report["base"]["dev"] or {}


def _chosen_p(report: dict) -> float:
    return 0.0 if math.isnan(p := _num(report.get("chosen_p"))) else p


def _is_chosen(row: dict, report: dict) -> bool:
    return bool(row.get("chosen")) or ("chosen" not in row and _num(row.get("p")) == _chosen_p(report))


def _by_p(sweep: list[dict]) -> list[dict]:
    """The sweep's rows in order of p, each with `_order`: its place in the order tried (1 first)."""
    return sorted(({**r, "_order": i + 1} for i, r in enumerate(sweep)), key=lambda r: _num(r.get("p")))
