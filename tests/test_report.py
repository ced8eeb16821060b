"""Tests for report.py: report.md and the PNGs on synthetic report dicts, edge cases, verdict wording."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from eigenprune.edits.freeze import lowest_fraction
from eigenprune.reports.run_plots import _frozen_grid, _score_bins
from eigenprune.reports.run_report import verdict, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
NAN = float("nan")


def acc(a: float, n: int, half: float = 0.04) -> dict:
    return {"acc": a, "lo": a - half, "hi": a + half, "n": n}


def make_scores(n_layers: int = 4, kinds=KINDS, k: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Log-normal scores spanning orders of magnitude, like real max-over-pairs attributions."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{layer}.self_attn.{kind}": torch.exp(2.5 * torch.randn(k, generator=g)) * 1e-3
            for layer in range(n_layers) for kind in kinds}


def make_report(chosen_p: float = 0.05, diff: tuple[float, float, float] = (0.014, -0.01, 0.04),
                scores: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict, dict]:
    """A full report (every optional key present), its scores and the chosen edit's removed indices."""
    scores = scores if scores is not None else make_scores()
    removed = lowest_fraction(scores, chosen_p)
    ps = [0.01, 0.05, 0.1, 0.3]
    sweep = [{"p": p, "n_frozen": sum(len(i) for i in lowest_fraction(scores, p).values()),
              "dev_acc": 0.40 + (0.03 if p == chosen_p else 0.01 * i - 0.01), "dev_lo": 0.35, "dev_hi": 0.47,
              "n_dev": 200, "test_acc": 0.41 - 0.02 * i, "test_lo": 0.37 - 0.02 * i, "test_hi": 0.45 - 0.02 * i,
              "chosen": p == chosen_p} for i, p in enumerate(ps)]
    base = {"dev": acc(0.40, 200), "test": acc(0.398, 400)}
    chosen_row = next((r for r in sweep if r["chosen"]), None)
    diff = diff if chosen_row else (0.0, 0.0, 0.0)
    pruned = base if chosen_row is None else {"dev": acc(chosen_row["dev_acc"], 200), "test": acc(0.412, 400)}
    n_frozen = sum(len(i) for i in removed.values())
    report = {
        "model": "smollm2-135m", "task": "rte", "targets": "all", "layers": None, "per_head": False,
        "eval_mode": "choice", "split_seed": 0, "score_seed": 0,
        "split_sizes": {"train": 800, "dev": 200, "test": 400},
        "base": base, "pruned": pruned, "chosen_p": chosen_p, "n_frozen": n_frozen,
        "n_components": sum(len(s) for s in scores.values()), "sweep": sweep,
        "diff_ci": dict(zip(("diff", "lo", "hi"), diff, strict=True)),
        "dev_diff_ci": {"diff": 0.03, "lo": 0.005, "hi": 0.055},
        "majority_rate": {"dev": 0.52, "test": 0.5},
        "frozen_by_target": [{"target": name, "layer": int(name.split(".")[2]), "kind": name.rsplit(".", 1)[-1],
                              "n_frozen": len(removed[name]), "n_components": len(s)} for name, s in scores.items()],
        "timings": {"load": 3.2, "base_eval": 10.5, "scoring": 42.0, "sweep": 60.1, "test_eval": 5.0},
        "warnings": ["answer ' yes' is several tokens; next-token accuracy uses its first token"],
        "machine": "x86_64 2 threads, torch 2.5",
    }
    return report, scores, removed


def read_outputs(out_dir, paths) -> str:
    assert paths[0] == out_dir / "report.md"
    for path in paths:
        assert path.parent == out_dir and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_SIGNATURE
    return (out_dir / "report.md").read_text()


def test_normal_run_writes_everything(tmp_path):
    report, scores, removed = make_report()
    paths = write_report(tmp_path, report, scores, removed)
    assert sorted(p.name for p in paths) == ["accuracy_vs_p.png", "pruned_components.png", "report.md",
                                             "score_distribution.png"]
    md = read_outputs(tmp_path, paths)
    assert verdict(report) in md
    assert "not used for selection" in md
    assert "p = 0.05" in md and "◀ chosen" in md
    for order, row in enumerate(report["sweep"], 1):
        assert f"| {row['p']:g} | {order} | {row['n_frozen']} |" in md
    chosen_line = next(line for line in md.splitlines() if line.startswith("| 0.05 |"))
    assert "◀ chosen" in chosen_line
    assert "always the majority class" in md and "0.500" in md
    assert "95% CI [-0.010, +0.040]" in md
    assert "## Timings" in md and "**total**" in md and "## Warnings" in md and "several tokens" in md
    for name in ("accuracy_vs_p.png", "pruned_components.png", "score_distribution.png"):
        assert f"]({name})" in md
    assert "could not be drawn" not in md


def test_given_verdict_is_used(tmp_path):
    report, scores, removed = make_report()
    report["verdict"] = "A verdict written by the experiment."
    md = read_outputs(tmp_path, write_report(tmp_path, report, scores, removed))
    assert "A verdict written by the experiment." in md


def test_chosen_p_zero_keeps_base_and_skips_component_map(tmp_path):
    report, scores, removed = make_report(chosen_p=0.0)
    assert report["n_frozen"] == 0
    paths = write_report(tmp_path, report, scores, removed)
    md = read_outputs(tmp_path, paths)
    assert "pruned_components.png" not in {p.name for p in paths}
    assert "froze nothing" in md
    assert "No p improved dev accuracy" in md
    base_row = next(line for line in md.splitlines() if line.startswith("| 0 (base) |"))
    assert "◀ chosen" in base_row


OPTIONAL = ("timings", "warnings", "machine", "majority_rate", "dev_diff_ci", "diff_ci", "repeats", "verdict",
            "split_sizes", "frozen_by_target")


@pytest.mark.parametrize("missing", [("timings", "warnings", "machine"), ("majority_rate", "dev_diff_ci", "diff_ci"),
                                     ("repeats", "verdict", "split_sizes"), ("frozen_by_target",), OPTIONAL])
def test_missing_optional_keys(tmp_path, missing):
    report, _, _ = make_report()
    for key in missing:
        report.pop(key, None)
    md = read_outputs(tmp_path, write_report(tmp_path, report))  # no scores: the histogram is tested elsewhere
    assert "## Verdict" in md and "not used for selection" in md and "could not be drawn" not in md
    assert verdict(report) in md
    if "frozen_by_target" in missing:
        assert "no `frozen_by_target`" in md


def test_sweep_rows_without_chosen_flags_use_chosen_p(tmp_path):
    report, _, _ = make_report()
    for row in report["sweep"]:
        del row["chosen"]
    md = read_outputs(tmp_path, write_report(tmp_path, report))
    assert "◀ chosen" in next(line for line in md.splitlines() if line.startswith("| 0.05 |"))


def test_component_map_sums_heads_and_tells_gpt2_projections_apart():
    rows = [{"target": f"transformer.h.{layer}.{name}", "layer": layer, "kind": kind, "n_frozen": 1, "n_components": 8}
            for layer in (1, 0) for name, kind in (("attn.c_attn:k:h0", "k"), ("attn.c_attn:k:h1", "k"),
                                                   ("attn.c_proj", "c_proj"), ("mlp.c_proj", "c_proj"))]
    rows.append({"target": "lm_head", "layer": None, "kind": "lm_head", "n_frozen": 0, "n_components": 8})
    layers, kinds, frozen, total = _frozen_grid(rows)
    assert layers == [0, 1, None] and kinds == ["k", "attn.c_proj", "mlp.c_proj", "lm_head"]
    assert frozen[0].tolist()[:3] == [2, 1, 1] and total[0].tolist()[:3] == [16, 8, 8]
    assert np.isnan(frozen[2, 0]) and frozen[2, 3] == 0  # no k target outside the layers; lm_head froze nothing


@pytest.mark.parametrize("scale, values", [
    ("log", torch.exp(4 * torch.randn(200, generator=torch.Generator().manual_seed(0)))),
    ("symlog", torch.cat([-torch.logspace(-6, -2, 40), torch.zeros(5), torch.logspace(-6, 2, 160)])),
    ("linear", torch.randn(200, generator=torch.Generator().manual_seed(0))),
    ("linear", torch.full((50,), 0.25)),
])
def test_score_axis_follows_the_distribution(tmp_path, scale, values):
    assert _score_bins(values.numpy().astype(np.float64))[1] == scale
    if scale == "symlog" or values.std() == 0:  # draw the unusual shapes too
        report, scores, removed = make_report(scores={"model.layers.0.mlp.down_proj": values})
        md = read_outputs(tmp_path, write_report(tmp_path, report, scores, removed))
        assert "score_distribution.png" in md and "could not be drawn" not in md


def test_a_searched_sweep_is_shown_in_order_of_p_with_the_order_tried(tmp_path):
    report, scores, removed = make_report()
    report["sweep"] = [report["sweep"][i] | {"dev_nll": 10.0 + i} for i in (2, 0, 3, 1)]  # tried 0.1, 0.01, 0.3, 0.05
    report["p_search"] = {"mode": "auto", "select": "accuracy+loss", "budget": 10, "base_dev_nll": 12.5}
    md = read_outputs(tmp_path, write_report(tmp_path, report, scores, removed))
    lines = [line for line in md.splitlines() if line.startswith(("| 0.01 |", "| 0.05 |", "| 0.1 |", "| 0.3 |"))]
    assert [line.split(" | ")[:2] for line in lines] == [["| 0.01", "2"], ["| 0.05", "4"], ["| 0.1", "1"],
                                                          ["| 0.3", "3"]]
    assert "--p auto" in md and "4 dev evaluations of 10 allowed" in md and "lower dev NLL" in md
    assert "| 0 (base) | – | 0 |" in md and "12.500" in md


def test_minimal_report_empty_sweep_no_scores(tmp_path):
    report = {"model": "m", "task": "t", "base": {"dev": acc(0.5, 10), "test": acc(0.5, 10)},
              "pruned": {"dev": acc(0.5, 10), "test": acc(0.5, 10)}, "chosen_p": 0.0, "n_frozen": 0, "sweep": []}
    paths = write_report(tmp_path, report)
    md = read_outputs(tmp_path, paths)
    assert [p.name for p in paths] == ["report.md", "accuracy_vs_p.png"]
    assert "No pruning fraction was swept" in md and "Pruning was not tried" in md


def test_nan_intervals_and_single_target(tmp_path):
    scores = {"transformer.h.0.attn.c_attn:k": torch.linspace(-1.0, 2.0, 32)}
    report, scores, removed = make_report(diff=(0.01, NAN, NAN), scores=scores)
    for split in ("dev", "test"):
        report["base"][split]["lo"] = report["pruned"][split]["hi"] = NAN
    for row in report["sweep"]:
        row["dev_lo"] = row["test_hi"] = NAN
        row["test_acc"] = None if row["p"] == 0.3 else row["test_acc"]  # a p whose test was not evaluated
    report["frozen_by_target"][0]["kind"] = "k"
    report["repeats"] = {"seeds": [0], "base_test": {"mean": 0.4, "sd": NAN}, "pruned_test": {"mean": 0.41, "sd": NAN},
                         "diff": {"mean": 0.01, "sd": NAN}, "chosen_p": [0.05], "runs": []}
    paths = write_report(tmp_path, report, scores, removed)
    md = read_outputs(tmp_path, paths)
    assert len(paths) == 4 and "could not be drawn" not in md
    assert "[n/a]" in md and "not evaluated" in md
    assert "unknown" in verdict(report)


def test_scores_with_non_finite_values_and_no_removed(tmp_path):
    report, scores, _ = make_report()
    scores = copy.deepcopy(scores)
    next(iter(scores.values()))[0] = math.inf
    md = read_outputs(tmp_path, write_report(tmp_path, report, scores, None))
    assert "score_distribution.png" in md and "could not be drawn" not in md


def test_repeats_section(tmp_path):
    report, scores, removed = make_report()
    runs = [{"seed": s, "base_test": 0.40, "pruned_test": 0.40 + d, "diff": d, "chosen_p": p}
            for s, d, p in ((0, 0.014, 0.05), (1, -0.004, 0.1), (2, 0.0, 0.0))]
    report["repeats"] = {"seeds": [0, 1, 2], "base_test": {"mean": 0.40, "sd": 0.0},
                         "pruned_test": {"mean": 0.4033, "sd": 0.009}, "diff": {"mean": 0.0033, "sd": 0.0093},
                         "chosen_p": [0.05, 0.1, 0.0], "runs": runs}
    md = read_outputs(tmp_path, write_report(tmp_path, report, scores, removed))
    assert "## Repeats over split seeds" in md
    assert "| difference (pruned − base) | +0.003 | 0.009 |" in md
    assert "| 1 | 0.400 | 0.396 | -0.004 | 0.1 |" in md
    assert "Across 3 split seeds" in verdict(report) and "chosen in 1 of 3" in verdict(report)


@pytest.mark.parametrize("diff, expected, absent", [
    ((0.03, 0.01, 0.05), "a significant gain at the 5% level", "no gain larger"),
    ((0.014, -0.01, 0.04), "no gain larger than +4.0 points (95% upper bound)", "did not carry"),
    ((-0.01, -0.04, 0.02), "the gain on dev (+0.030) did not carry to test", "significant"),
    ((-0.05, -0.08, -0.02), "significantly worse", "significant gain"),
])
def test_verdict_wording(diff, expected, absent):
    report, _, _ = make_report(diff=diff)
    text = verdict(report)
    assert expected in text and absent not in text
    assert text.startswith("Pruned (p=0.05) test accuracy 0.412 [0.372, 0.452] vs base 0.398 [0.358, 0.438]")


def test_verdict_when_pruning_did_not_help():
    report, _, _ = make_report(chosen_p=0.0)
    text = verdict(report)
    assert text.startswith("No p improved dev accuracy")
    assert "kept the base model" in text and "significant" not in text and "did not help" not in text


def test_verdict_flags_majority_class():
    report, _, _ = make_report()
    report["majority_rate"] = {"dev": 0.6, "test": 0.6}
    assert "Note that neither model beats always answering the majority class on test (0.600)." in verdict(report)
    report, _, _ = make_report(chosen_p=0.0)
    report["majority_rate"] = {"dev": 0.6, "test": 0.6}
    assert "the base model does not beat always answering the majority class" in verdict(report)
