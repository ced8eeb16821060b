"""`--also lm-eval:TASK`: lm-evaluation-harness as a side effect of run/compare/study. Every fold's chosen edit and
the base are evaluated on a local YAML task, and the section's rows equal a direct evaluation of the same edits
(`evaluate_tasks`, and `eigenprune lm-eval` on the saved edit), with `evaluation.significance`'s interval and exact
p-value on the per-sample logs; a missing lm-eval is one line before any work; the settings lm-eval adds stay out
of a study cell's identity at their defaults."""

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import EXAMPLES, run_report, sensitive

from eigenprune.cli import main
from eigenprune.core.batching import encode
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import FreezeConfig, applied, make_edit
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets
from eigenprune.evaluation.significance import holm, mcnemar_exact, paired_diff_interval
from eigenprune.evaluation.tasks import load_task
from eigenprune.protocol.config import RunConfig, compare_settings

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'eigenprune[lm-eval]'")
from eigenprune.evaluation.lm_eval_bridge import evaluate_tasks, per_sample  # noqa: E402
from eigenprune.experiments.fold_side_effects import FoldSideEffects  # noqa: E402

LIMIT = 24  # lm-eval's --limit: the first 24 sums
ARGS = ["--limit", "12", "--split-seed", "2", "--targets", "all", "--p", "0.5,0.9", "--partners", "2",
        "--n-boot", "50", "--eval-mode", "choice", "--quiet",
        "--select", "accuracy"]  # dev chooses p = 0.5 (test_run_side_effects); 1se (the default) keeps the base


@pytest.fixture(scope="module")
def yaml_folder(sums_setup, tmp_path_factory) -> str:
    """The sums JSONL as the local lm-eval task `sums_mc` (the choice is the continuation, as eigenprune scores it).
    One folder for the module: lm-eval indexes its task YAMLs (~10 s) once per set of include paths."""
    _, task_file = sums_setup
    folder = tmp_path_factory.mktemp("lm-eval-yaml")
    (folder / "sums_mc.yaml").write_text(
        f"task: sums_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(task_file))}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: label\ntarget_delimiter: \"\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    return str(folder)


def direct(model, tok, folder) -> np.ndarray:
    """Per-example acc (LIMIT,) of the model as it is, straight from the bridge."""
    acc = per_sample(evaluate_tasks(model, tok, ["sums_mc"], include_path=[folder], limit=LIMIT), "sums_mc")["acc"]
    return np.array([acc[d] for d in sorted(acc)])


def test_every_folds_edit_is_evaluated_and_paired_with_the_base(sums_setup, yaml_folder):
    _, task_file = sums_setup
    folder = yaml_folder
    model, tok = sensitive()
    targets = find_targets(model, "all")
    comps = decompose_targets(model, targets)
    scores = score(model, targets, comps, encode(tok, EXAMPLES), tok.pad_token_id, ScoreConfig(partners=2),
                   progress=False)
    edits = [make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=p, bias="position"))
             for p in (0.3, 0.5)]  # on the first 24 sums they change different answers
    cfg = RunConfig(task=str(task_file), also=["lm-eval:sums_mc"], lm_eval_include_path=[folder], lm_eval_limit=LIMIT,
                    n_boot=50)
    costs = FoldSideEffects(model, tok, load_task(str(task_file)), cfg, n_folds=2, quiet=True)
    for fold, edit in enumerate(edits):  # each fold chose its own edit
        result = SimpleNamespace(extra={}, changed_params=1, applied=lambda m, e=edit: applied(m, e))
        costs.measure(fold, SimpleNamespace(results={"eigenprune": result}))
    section = costs.section()["lm_eval"]

    base = direct(model, tok, folder)
    after = []
    for edit in edits:
        with applied(model, edit):
            after.append(direct(model, tok, folder))
    assert not np.array_equal(after[0], base) and not np.array_equal(after[0], after[1])  # the edits differ
    assert section["base"]["sums_mc"]["acc"]["acc"] == base.mean() and section["limit"] == LIMIT
    rows = section["rows"]
    assert [r["model"] for r in rows] == ["eigenprune (fold 1)", "eigenprune (fold 2)"]
    ps = [mcnemar_exact(base, a) for a in after]
    for row, a, adjusted in zip(rows, after, holm(ps), strict=True):
        assert (row["task"], row["metric"], row["n"]) == ("sums_mc", "acc", LIMIT)
        assert row["base"]["acc"] == base.mean() and row["edit"]["acc"] == a.mean()
        diff, lo, hi = paired_diff_interval(base, a)
        assert (row["diff"]["diff"], row["diff"]["lo"], row["diff"]["hi"]) == pytest.approx((diff, lo, hi), abs=1e-12)
        assert row["diff"]["p"] == pytest.approx(mcnemar_exact(base, a), abs=1e-12)
        assert row["diff"]["p_adjusted"] == pytest.approx(adjusted, abs=1e-12)
    assert section["family"] == 2


def test_run_reports_the_saved_edit_as_eigenprune_lm_eval_measures_it(sums_setup, yaml_folder, tmp_path, capsys):
    folder = yaml_folder
    lm = ["--also", "lm-eval:sums_mc", "--lm-eval-include-path", folder, "--lm-eval-limit", str(LIMIT)]
    report = run_report(sums_setup, tmp_path / "r", *ARGS, *lm)
    plain = run_report(sums_setup, tmp_path / "plain", *ARGS, "--no-side-effects")
    for key in ("base", "pruned"):  # the lm-eval passes leave the model as they found it
        assert report[key]["test"] == plain[key]["test"] and report[key]["dev"] == plain[key]["dev"]
    (row,) = report["side_effects"]["lm_eval"]["rows"]
    assert row["model"] == "edit (p = 0.5)"
    assert "lm-evaluation-harness tasks" in (tmp_path / "r" / "report.md").read_text()

    capsys.readouterr()
    code = main(["lm-eval", "--edit", str(tmp_path / "r" / "edit"), "--tasks", "sums_mc", "--include-path", folder,
                 "--limit", str(LIMIT), "--out", str(tmp_path / "lm")])
    assert code == 0, capsys.readouterr().err
    (alone,) = json.loads((tmp_path / "lm" / "report.json").read_text())["rows"]
    assert (row["base"]["acc"], row["edit"]["acc"], row["n"]) == (alone["base"]["acc"], alone["edit"]["acc"], LIMIT)
    assert {k: row["diff"][k] for k in ("diff", "lo", "hi", "p")} == {k: alone["diff"][k] for k in ("diff", "lo", "hi",
                                                                                                    "p")}
    assert row["edit"]["acc"] != row["base"]["acc"]


def test_without_lm_eval_an_lm_eval_task_is_one_line_before_any_work(sums_setup, tmp_path, capsys, monkeypatch):
    model, task = sums_setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded: the check came after work started")

    monkeypatch.setattr("eigenprune.core.models.load_model", no_work)
    code = main(["run", "--model", str(model), "--task", str(task), *ARGS, "--also", "cb,lm-eval:eigenprune_copa",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'eigenprune[lm-eval]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("values", "says"), [
    ({"lm_eval_limit": 5}, "also names no lm-eval:TASK"),
    ({"also": ["lm-eval:"]}, "needs a task name"),
    ({"also": ["lm-eval:x"], "lm_eval_limit": 0}, "lm_eval_limit must be at least 1"),
])
def test_lm_eval_settings_that_cannot_apply_are_refused(values, says):
    with pytest.raises(ValueError, match=says):
        RunConfig(task="cb", **values)


def test_the_lm_eval_settings_stay_out_of_a_cells_identity_at_their_defaults():
    """A study cell finished before these settings existed keeps its settings hash."""
    plain = compare_settings(RunConfig(task="cb", also=["copa"]))
    assert not {"lm_eval_include_path", "lm_eval_limit"} & set(plain)
    given = compare_settings(RunConfig(task="cb", also=["lm-eval:eigenprune_copa"], lm_eval_limit=50))
    assert given["lm_eval_limit"] == 50 and "lm_eval_include_path" not in given


def study_spec(path, model, task, settings: str) -> str:
    path.write_text(f'[study]\nmodels = ["{model}"]\ntasks = ["{task}"]\ntargets = ["all"]\n'
                    f'methods = ["eigenprune"]\n\n[settings]\nlimit = 12\n{settings}\n')
    return str(path)


def test_a_study_spec_carries_lm_eval_tasks_and_settings_to_its_cells(sums_setup, tmp_path):
    from eigenprune.experiments.study_spec import load_spec

    model, task = sums_setup
    spec = study_spec(tmp_path / "s.toml", model, task, 'also = ["int-sum", "lm-eval:eigenprune_copa"]\n'
                      "lm_eval_limit = 20")
    (cell,) = load_spec(spec).cells
    assert cell.run.also == ["int-sum", "lm-eval:eigenprune_copa"] and cell.run.lm_eval_limit == 20
    assert cell.config()["run"]["lm_eval_limit"] == 20


def test_without_lm_eval_a_study_naming_an_lm_eval_task_is_one_line(sums_setup, tmp_path, capsys, monkeypatch):
    model, task = sums_setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    spec = study_spec(tmp_path / "s.toml", model, task, 'also = ["lm-eval:eigenprune_copa"]')
    code = main(["study", spec, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'eigenprune[lm-eval]'" in err and len(err.strip().splitlines()) == 1, err
    assert f"{spec}: line 9: " in err and not (tmp_path / "o").exists()  # the line of also
