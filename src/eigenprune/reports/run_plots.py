"""`run`'s three plots: accuracy against p (dev and test, with CIs), where the frozen components sit, and
the score distribution with the frozen ones marked."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from eigenprune.reports.format import _by_p, _chosen_p, _is_chosen, _num, _p, _split

DPI = 120
DEV_COLOR, TEST_COLOR, FROZEN_COLOR = "#1f77b4", "#ff7f0e", "#d62728"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_accuracy_vs_p(report: dict, path: Path) -> None:
    """Dev and test accuracy per candidate p (p = 0 is the base model) on a categorical axis, in order of p;
    each tick says when a searched p was tried (#1 first)."""
    sweep = _by_p(report.get("sweep") or [])
    base_dev, base_test = _split(report, "base", "dev"), _split(report, "base", "test")
    rows = [{"p": 0.0, "n_frozen": 0, **{f"{s}_{k}": e.get(k) for s, e in (("dev", base_dev), ("test", base_test))
                                         for k in ("acc", "lo", "hi")}}, *sweep]
    col = lambda key: np.array([_num(r.get(key)) for r in rows])  # (n_candidates,)
    x = np.arange(len(rows))
    fig = _figure(max(7.0, 1.0 * len(rows) + 2.0), 5.4)
    ax = fig.add_subplot()
    chosen = next((i for i, r in enumerate(rows[1:], 1) if _is_chosen(r, report)), 0)
    ax.axvspan(chosen - 0.4, chosen + 0.4, color="gold", alpha=0.3, label=f"chosen on dev: p = {_p(rows[chosen]['p'])}")
    for split, color, marker, shift, label in (
            ("dev", DEV_COLOR, "o-", -0.07, "dev (used to choose p)"),
            ("test", TEST_COLOR, "s--", 0.07, "test (shown only, not used to choose p)")):
        acc = col(f"{split}_acc")
        err = np.nan_to_num(np.clip(np.stack([acc - col(f"{split}_lo"), col(f"{split}_hi") - acc]), 0, None))  # (2, n)
        if not np.isnan(acc).all():  # a NaN interval draws no bar; a split never evaluated draws nothing
            ax.errorbar(x + shift, acc, yerr=err, fmt=marker, color=color, capsize=4, markersize=6,
                        label=f"{label}, 95% CI")
        base = _num((base_dev if split == "dev" else base_test).get("acc"))
        if not math.isnan(base):
            ax.axhline(base, color=color, linestyle=":", linewidth=1.2, label=f"base {split} accuracy ({base:.3f})")
    majority = _num((report.get("majority_rate") or {}).get("test"))
    if not math.isnan(majority):
        ax.axhline(majority, color="grey", linestyle="-.", linewidth=1, label=f"majority class, test ({majority:.3f})")
    ax.set_xticks(x, ["0\n(base)"] + [f"{_p(r.get('p'))}\n({r.get('n_frozen', '?')})\n#{r['_order']}" for r in sweep])
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("pruning fraction p (components frozen), #order tried; one tick per candidate")
    ax.set_ylabel("accuracy")
    model = Path(str(report.get("model", "model"))).name  # a folder path would not fit the title
    ax.set_title(f"{report.get('task', 'task')} on {model}: accuracy vs p", wrap=True)
    ax.grid(axis="y", alpha=0.3)
    if not sweep:
        ax.text(0.5, 0.05, "no p was swept", transform=ax.transAxes, ha="center", color="grey")
    fig.legend(fontsize=8, loc="outside lower center", ncol=2, frameon=False)
    fig.savefig(path, dpi=DPI)


def _frozen_grid(rows: list[dict]) -> tuple[list, list[str], np.ndarray, np.ndarray]:
    """Layers, kinds (first-seen order) and (n_layers, n_kinds) frozen and total counts; NaN: no target."""
    module = lambda r: str(r.get("target", "?")).split(":")[0]
    kind = lambda r: r.get("kind") or module(r).rsplit(".", 1)[-1]
    owners: dict[tuple, set[str]] = {}
    for r in rows:
        owners.setdefault((r.get("layer"), kind(r)), set()).add(module(r))
    cells: dict[tuple, list[int]] = {}
    for r in rows:  # GPT-2's attn.c_proj and mlp.c_proj share a last name: keep the parent to tell them apart
        name = kind(r) if len(owners[r.get("layer"), kind(r)]) == 1 else ".".join(module(r).split(".")[-2:])
        cell = cells.setdefault((r.get("layer"), name), [0, 0])
        cell[0] += int(r.get("n_frozen") or 0)
        cell[1] += int(r.get("n_components") or 0)
    layers = sorted({k[0] for k in cells}, key=lambda v: (v is None, v if v is not None else 0))
    kinds = list(dict.fromkeys(k[1] for k in cells))
    frozen = np.full((len(layers), len(kinds)), np.nan)  # (n_layers, n_kinds)
    total = np.full_like(frozen, np.nan)
    for (layer, kind), (n, of) in cells.items():
        frozen[layers.index(layer), kinds.index(kind)], total[layers.index(layer), kinds.index(kind)] = n, of
    return layers, kinds, frozen, total


def plot_pruned_components(report: dict, path: Path) -> None:
    """Heatmap of layer × target kind: the share of each cell's components the chosen edit froze."""
    import matplotlib

    layers, kinds, frozen, total = _frozen_grid(report["frozen_by_target"])
    share = np.where(total > 0, frozen / np.where(total > 0, total, 1), np.nan)  # (n_layers, n_kinds)
    fig = _figure(max(6.0, 1.0 * len(kinds) + 3.0), max(3.2, 0.3 * len(layers) + 1.8))
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["Reds"].with_extremes(bad="#bdbdbd")  # grey: no target there
    image = ax.imshow(share, aspect="auto", cmap=cmap, vmin=0, vmax=max(np.nanmax(share), 1e-9),
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of components frozen")
    if share.size <= 400:
        for i, j in np.ndindex(share.shape):
            if not np.isnan(share[i, j]):
                dark = share[i, j] > 0.6 * np.nanmax(share)
                ax.text(j, i, f"{int(frozen[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    sums = [f"{k}\n{int(np.nansum(frozen[:, j]))}/{int(np.nansum(total[:, j]))}" for j, k in enumerate(kinds)]
    ax.set_xticks(range(len(kinds)), sums, fontsize=8)
    ax.set_yticks(range(len(layers)), ["other" if v is None else str(v) for v in layers], fontsize=8)
    ax.set_xlabel("target kind (frozen / components)")
    ax.set_ylabel("layer")
    ax.set_title(f"Frozen at p = {_p(report.get('chosen_p'))}: {int(np.nansum(frozen))} of "
                 f"{int(np.nansum(total))} components\n(number: count in the cell; grey: not a target)", fontsize=10)
    fig.savefig(path, dpi=DPI)


def _score_bins(values: np.ndarray) -> tuple[np.ndarray, str, float]:
    """Bin edges and x scale: log (or symlog) when a heavy tail would squash the low scores into a few bins."""
    low, span = np.quantile(values, 0.3) - values.min(), values.max() - values.min()
    magnitude = np.abs(values[values != 0])
    if magnitude.size < 2 or low >= span / 20:  # the low end, where components get frozen, is readable
        return np.histogram_bin_edges(values, bins=60), "linear", 0.0
    if values.min() > 0:
        return np.geomspace(values.min(), values.max(), 61), "log", 0.0
    from matplotlib.scale import SymmetricalLogTransform

    linthresh = float(np.quantile(magnitude, 0.05))
    transform = SymmetricalLogTransform(10, linthresh, 1.0)
    ends = transform.transform(np.array([values.min(), values.max()]))
    return transform.inverted().transform(np.linspace(ends[0], ends[1], 61)), "symlog", linthresh


def plot_score_distribution(report: dict, scores: dict[str, torch.Tensor], removed: dict[str, torch.Tensor] | None,
                            path: Path) -> None:
    """Histogram of every component score, frozen ones stacked in red, the chosen p's threshold marked."""
    from matplotlib.ticker import MaxNLocator

    kept, frozen = [], []
    for name, s in scores.items():
        values = s.detach().float().cpu().reshape(-1).numpy()  # (k,)
        mask = np.isin(np.arange(values.size), (removed or {}).get(name, torch.empty(0)).long().cpu().numpy())  # (k,)
        kept.append(values[~mask & np.isfinite(values)])
        frozen.append(values[mask & np.isfinite(values)])
    kept_v, frozen_v = np.concatenate(kept), np.concatenate(frozen)
    values = np.concatenate([kept_v, frozen_v])
    if values.size == 0:
        raise ValueError("no finite scores")
    bins, scale, linthresh = _score_bins(values)
    fig = _figure(7.5, 4.4)
    ax = fig.add_subplot()
    parts = [(kept_v, DEV_COLOR, f"kept ({kept_v.size})" if frozen_v.size else f"all kept ({kept_v.size})")]
    if frozen_v.size:
        parts.append((frozen_v, FROZEN_COLOR, f"frozen at p = {_p(report.get('chosen_p'))} ({frozen_v.size})"))
    counts, _, _ = ax.hist([v for v, _, _ in parts], bins=bins, stacked=True, color=[c for _, c, _ in parts],
                           label=[lab for _, _, lab in parts])
    totals = np.asarray(counts).reshape(-1, len(bins) - 1)[-1]  # (n_bins,) stacked: the last row is the total
    if totals.max() > 0.5 * values.size or totals.max() > 30 * np.median(totals[totals > 0]):
        ax.set_yscale("log")
    if scale != "linear":
        ax.set_xscale(scale, **({"linthresh": linthresh} if scale == "symlog" else {}))
    ordered, label = np.sort(values), "cut of each swept p (global ranking)"  # (n,)
    for p in (_num(r.get("p")) for r in report.get("sweep") or []):
        if not 1 <= p * values.size <= values.size:
            continue
        cut = ordered[int(p * values.size) - 1]
        if p != _chosen_p(report) or not frozen_v.size:  # the chosen p's cut is drawn as the threshold below
            ax.axvline(cut, color="grey", linestyle=":", linewidth=1, label=label)
            label = None
        ax.text(cut, 0.98, f"p={p:g} ", transform=ax.get_xaxis_transform(), rotation=90, ha="right", va="top",
                fontsize=7, color="dimgrey", bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "edgecolor": "none"})
    if frozen_v.size:
        threshold = float(frozen_v.max())
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2,
                   label=f"threshold: largest frozen score ({threshold:.3g})")
    aggregate = report.get("aggregate", "max")
    ax.set_xlabel(f"component score ({aggregate} over pairs; lowest are frozen first)"
                  + (", log scale" if scale != "linear" else ""))
    ax.set_ylabel("number of components" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Score distribution: {values.size} components in {len(scores)} target(s)")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=DPI)
