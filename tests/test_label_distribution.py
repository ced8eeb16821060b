"""Which labels a model answers (choice tasks): the distribution, the >= 90% one-label flag, the predictions
`evaluate` keeps for the very correctness tensor it returned, and the reports that carry and word them."""

import pytest
from helpers import sensitive

from eigenprune.core.batching import Example
from eigenprune.evaluation.evaluate import evaluate, predicted_choices
from eigenprune.evaluation.stats import label_distribution
from eigenprune.reports.words import one_label_text


@pytest.mark.parametrize("labels, top, share, flagged", [
    (["yes"] * 9 + ["no"], "yes", 0.9, True),  # exactly 90%: flagged
    (["yes"] * 17 + ["no"] * 2 + ["maybe"], "yes", 0.85, False),
    (["b", "a"], "a", 0.5, False),  # ties: alphabetical
])
def test_label_distribution_counts_and_flags(labels, top, share, flagged):
    dist = label_distribution(labels)
    assert dist["top"] == top and dist["top_share"] == pytest.approx(share) and dist["one_label"] is flagged
    assert sum(dist["counts"].values()) == dist["n"] == len(labels)
    assert bool(one_label_text("The base model", dist)) is flagged


def test_evaluate_keeps_the_choice_it_picked_for_its_own_tensor():
    model, tok = sensitive()
    shared = [Example(f"{a} + 1 =", f" {a + 1}", choices=(" yes", " no"), label=a % 2) for a in range(6)]
    result = evaluate(model, tok, shared, "choice")
    assert result.predicted is not None and set(result.predicted) <= {"yes", "no"}  # label words
    assert predicted_choices(result.correct) == result.predicted
    assert predicted_choices(result.correct.clone()) is None  # only the tensor evaluate returned
    # correctness is exactly "the picked label is the example's label"
    expected = [p == ex.choices[ex.label].strip() for p, ex in zip(result.predicted, shared, strict=True)]
    assert result.correct.tolist() == expected
    varied = [Example(f"{a} + 1 =", f" {a + 1}", choices=(f" {a + 1}", f" {a}"), label=0) for a in range(4)]
    picked = evaluate(model, tok, varied, "choice").predicted
    assert set(picked) <= {"choice 1", "choice 2"}  # positions where every example has its own choices
    assert evaluate(model, tok, varied, "exact").predicted is None


def test_run_and_compare_report_the_predicted_labels(sums_setup, tmp_path):
    import json

    from eigenprune.cli import main

    model, task = map(str, sums_setup)
    common = ["--model", model, "--task", task, "--limit", "16", "--split-seed", "2", "--targets", "all",
              "--partners", "2", "--n-boot", "50", "--no-side-effects", "--quiet", "--p", "0.5"]
    assert main(["compare", *common, "--eval-mode", "choice", "--methods", "eigenprune,smallest",
                 "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "comparison.json").read_text())
    n = report["base"]["test"]["n"]
    for row in [report["base"], *report["methods"].values()]:
        dist = row["predicted_labels"]
        assert set(dist["counts"]) <= {"choice 1", "choice 2"} and dist["n"] == n
    assert main(["run", *common, "--eval-mode", "choice", "--out", str(tmp_path / "r")]) == 0
    run = json.loads((tmp_path / "r" / "report.json").read_text())
    assert run["predicted_labels"]["base"] == report["base"]["predicted_labels"]


def test_verdicts_flag_a_base_that_answers_one_label():
    from eigenprune.reports.compare_report import verdict

    labels = label_distribution(["entailment"] * 19 + ["not_entailment"])
    d = {"diff": 0.0, "lo": -0.1, "hi": 0.1, "p": 1.0, "n": 20, "discordant": 0, "mde": None}
    text = verdict({"methods": {"m": {"diff_vs_base": d}}, "base": {"predicted_labels": labels}})
    assert "The base model answers 'entailment' for 95% of the 20 test examples" in text
    assert "moving the label prior" in text
    labels = label_distribution(["entailment"] * 17 + ["not_entailment"] * 3)
    text = verdict({"methods": {"m": {"diff_vs_base": d}}, "base": {"predicted_labels": labels}})
    assert "label prior" not in text
