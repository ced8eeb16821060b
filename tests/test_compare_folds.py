"""`eigenprune compare --folds K`: every example tested exactly once, by a fold whose train and dev never
held it; rows pooled over the same N examples for every method; choices blind to test; `--folds 1` is the
fixed split; and the methods' own words (the random control's verdict, svd-clip's ICL only) describe the
pooled result, not one fold's."""

import json

import pytest
import torch
from helpers import write_task

from eigenprune.cli import build_parser
from eigenprune.core.errors import UsageError
from eigenprune.evaluation.significance import two_level_diff_ci
from eigenprune.evaluation.splits import FoldSplit, fold_splits
from eigenprune.evaluation.stats import fold_paired_diff_ci
from eigenprune.evaluation.tasks import load_task
from eigenprune.methods import registry
from eigenprune.methods.base import MethodResult
from eigenprune.methods.controls import _pool_random
from eigenprune.protocol.harness import Harness

SMALL = ["--split-seed", "2", "--targets", "all", "--p", "0.1,0.5", "--partners", "2", "--n-boot", "50", "--quiet"]
GRIDS = {"random": ["--random-seeds", "2"], "laser": ["--laser-kinds", "mlp-out", "--laser-keep", "0.1"],
         "svd-clip": ["--set", "svd-clip.demos=2", "--set", "svd-clip.keep=[1, 0.5]"]}
METHODS = ("eigenprune", "random", "laser", "svd-clip")
LIMIT = 18  # pooled examples with --folds 3: 6 tested per fold


def small(*methods: str) -> list[str]:
    return ["--methods", ",".join(methods), *SMALL, *(a for m in methods for a in GRIDS.get(m, []))]


def run_compare(*argv) -> tuple[int, str]:
    args = build_parser().parse_args(["compare", *map(str, argv)])
    try:
        return args.func(args), ""
    except UsageError as err:
        return 2, str(err)


@pytest.fixture(scope="session")
def setup(sums_setup):
    return sums_setup


def recording(mp) -> list[FoldSplit]:
    """Record the split of every harness compare builds for a fold."""
    seen, plain = [], Harness.__init__

    def init(self, model, tok, splits, *args, **kwargs):
        if isinstance(splits, FoldSplit):
            seen.append(splits)
        plain(self, model, tok, splits, *args, **kwargs)

    mp.setattr(Harness, "__init__", init)
    return seen


@pytest.fixture(scope="module")
def folded(setup, tmp_path_factory):
    model, task = setup
    out = tmp_path_factory.mktemp("runs") / "k3"
    with pytest.MonkeyPatch.context() as mp:
        splits = recording(mp)
        code, err = run_compare("--model", model, "--task", task, *small(*METHODS), "--folds", 3,
                                "--limit", LIMIT, "--out", out)
    assert code == 0, err
    return out, json.loads((out / "comparison.json").read_text()), splits


def test_every_example_is_tested_once_by_a_fold_that_never_trained_or_chose_on_it(folded, setup):
    _, report, splits = folded
    pool = fold_splits(load_task(str(setup[1])), 3, 2, 0.2, LIMIT).examples
    assert len(pool) == LIMIT and len({ex.prompt for ex in pool}) == LIMIT  # prompts name the examples
    assert [s.fold for s in splits] == [0, 1, 2]
    tested = [ex.prompt for s in splits for ex in s.test]
    assert sorted(tested) == sorted(ex.prompt for ex in pool)  # each pooled example in exactly one fold's test
    for s in splits:
        seen = {ex.prompt for ex in s.train + s.dev}
        assert seen and not seen & {ex.prompt for ex in s.test}, s.fold
    assert report["folds"]["n_tested"] == LIMIT and report["folds"]["k"] == 3
    assert sum(report["folds"]["pooled"].values()) == LIMIT


def test_every_row_pools_the_same_examples(folded):
    out, report, _ = folded
    assert report["base"]["test"]["n"] == LIMIT
    for name in METHODS:
        row = report["methods"][name]
        assert row["test"]["n"] == LIMIT, name
        assert [r["fold"] for r in row["runs"]] == [1, 2, 3] and sum(r["n_test"] for r in row["runs"]) == LIMIT
        pooled_acc = sum(r["test_acc"] * r["n_test"] for r in row["runs"]) / LIMIT
        assert row["test"]["acc"] == pytest.approx(pooled_acc), name
        assert row["dev"]["acc"] == pytest.approx(sum(r["dev_acc"] for r in row["runs"]) / 3), name
        assert len(row["config"]["per_fold"]) == 3 and len(row["extra"]["per_fold"]) == 3
        for i, path in enumerate(row["saved_edit"]):
            assert path == f"edits/{name}/fold-{i + 1}" and (out / path).is_dir()
    md = (out / "comparison.md").read_text()
    assert "## Folds" in md and "resample within folds" in md and "### svd-clip" in md
    assert report["verdict"].startswith("Pooled over 3 cross-fitted folds")


def test_method_words_describe_the_pooled_result(folded):
    _, report, _ = folded
    rand, eigen = report["methods"]["random"], report["methods"]["eigenprune"]
    versus = rand["extra"]["vs_eigenprune"]
    assert versus["n_frozen"] == [r["config"]["n_frozen"] for r in eigen["runs"]]
    per_seed = [sum(f["runs"][j]["test"]["acc"] * f["runs"][j]["test"]["n"] for f in rand["extra"]["per_fold"])
                / LIMIT for j in range(2)]
    assert versus["random_test_accs"] == pytest.approx(per_seed)
    assert [m["acc"] for m in rand["markers"]] == pytest.approx(per_seed)
    assert versus["diff"]["diff"] == pytest.approx(eigen["test"]["acc"] - rand["test"]["acc"])
    assert rand["verdict"] in report["verdict"] and "fold" in rand["verdict"]
    icl = report["methods"]["svd-clip"]["extra"]["icl_only"]
    folds_icl = [f["extra"]["icl_only"]["test"] for f in report["methods"]["svd-clip"]["extra"]["per_fold"]]
    assert icl["test"]["n"] == LIMIT
    assert icl["test"]["acc"] == pytest.approx(sum(c["acc"] * c["n"] for c in folds_icl) / LIMIT)
    assert f"{icl['test']['acc']:.3f}" in report["methods"]["svd-clip"]["markers"][0]["label"]


def test_choices_do_not_depend_on_test(folded, setup, tmp_path, monkeypatch):
    """Judge every test answer the opposite way: no fold's choice may move."""
    _, want, _ = folded
    model, task = setup
    plain = Harness.evaluate
    monkeypatch.setattr(Harness, "evaluate", lambda self, split: ~plain(self, split) if split == "test"
                        else plain(self, split))
    code, err = run_compare("--model", model, "--task", task, *small(*METHODS), "--folds", 3, "--limit", LIMIT,
                            "--out", tmp_path / "flipped")
    assert code == 0, err
    got = json.loads((tmp_path / "flipped" / "comparison.json").read_text())
    assert got["base"]["test"]["acc"] == pytest.approx(1 - want["base"]["test"]["acc"])
    for name, row in got["methods"].items():
        assert row["config"] == want["methods"][name]["config"], name
        assert row["dev"] == want["methods"][name]["dev"], name
        assert row["test"]["acc"] == pytest.approx(1 - want["methods"][name]["test"]["acc"]), name


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in ("wall_s", "timings")}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_one_fold_is_the_fixed_split(setup, tmp_path):
    model, task = setup
    methods = small("eigenprune", "random", "svd-clip")
    reports = []
    for name, flag in (("plain", []), ("k1", ["--folds", 1])):
        code, err = run_compare("--model", model, "--task", task, *methods, "--limit", 12, *flag,
                                "--out", tmp_path / name)
        assert code == 0, err
        reports.append(json.loads((tmp_path / name / "comparison.json").read_text()))
    assert _without_timings(reports[0]) == _without_timings(reports[1])
    assert "folds" not in reports[1] and reports[1]["methods"]["eigenprune"]["saved_edit"] == "edits/eigenprune"
    config = json.loads((tmp_path / "k1" / "config.json").read_text())
    assert config["run"]["folds"] == 1


# -- the words of pooled rows, on made-up numbers --------------------------------------------------------

def _result(test, dev=(1.0,), runs=(), **extra) -> MethodResult:
    return MethodResult("m", {}, torch.tensor(dev), torch.tensor(test), 1, 0.0, 0, runs=list(runs), extra=extra)


def _pooled(per_fold: list[MethodResult], folds, **needed) -> registry.Pooled:
    test = torch.tensor(folds.pool([r.test for r in per_fold])[0])
    base = torch.zeros_like(test)
    result = _result(test.tolist())
    return registry.Pooled(result, per_fold, base, folds, n_boot=200, needed=needed)


def test_random_control_pools_its_seeds_and_its_comparison(tmp_path):
    """Fold 1 alone would say eigenprune beats every seed; pooled over both folds it lies inside their range."""
    folds = fold_splits(load_task(str(write_task(tmp_path / "t.jsonl"))), 2, 0, 0.2, 8)
    n = [len(f.test) for f in folds]  # 4, 4
    eigen_tests = [[1.0] * n[0], [0.0] * n[1]]
    seed_runs = [[0.25, 0.5], [0.75, 0.5]]  # per fold, each seed's test accuracy
    rand_folds = []
    for f, accs in enumerate(seed_runs):
        runs = [{"seed": s, "dev_acc": 0.5, "test": {"acc": a, "n": n[f]}} for s, a in enumerate(accs)]
        seeds = torch.tensor([[i < round(a * n[f]) for i in range(n[f])] for a in accs])  # (seeds, n_f)
        rand_folds.append(_result(seeds.float().mean(0).tolist(), runs=runs, n_frozen=3 + f, _test_seeds=seeds))
    eigen = _pooled([_result(t) for t in eigen_tests], folds)
    rand = _pooled(rand_folds, folds, eigenprune=eigen)
    _pool_random(rand)
    versus = rand.result.extra["vs_eigenprune"]
    assert versus["n_frozen"] == [3, 4] and versus["random_test_accs"] == [0.5, 0.5]
    examples_only = fold_paired_diff_ci(rand.result.test.numpy(), eigen.result.test.numpy(), rand.fold_of,
                                        n_boot=200)
    assert tuple(versus["diff_examples_only"].values()) == pytest.approx(examples_only)
    seeds = torch.stack([rand.pool([f.extra["_test_seeds"][j] for f in rand_folds]) for j in range(2)])
    want = two_level_diff_ci(eigen.result.test.numpy(), seeds.float().numpy(), strata=rand.fold_of, n_boot=200)
    assert tuple(versus["diff"][k] for k in ("diff", "lo", "hi")) == pytest.approx(want)  # seeds, then examples
    assert "3, 4 components in folds 1-2" in rand.result.verdict and "lies inside" in rand.result.verdict
    assert [m["acc"] for m in rand.result.markers] == [0.5, 0.5] and "pooled over 2 folds" in rand.result.sections[0]


def test_a_method_without_a_hook_keeps_only_what_every_fold_said(tmp_path):
    folds = fold_splits(load_task(str(write_task(tmp_path / "t.jsonl"))), 2, 0, 0.2, 8)
    per_fold = [_result([1.0] * len(f.test)) for f in folds]
    for i, r in enumerate(per_fold):
        r.notes, r.sections = ["the same words", f"fold {i} words"], ["## Same section"]
        r.verdict, r.markers = f"fold {i} wins", [{"acc": 0.5}]
    pooled = _pooled(per_fold, folds)
    plain = registry.Method("plain", registry.NoSettings, lambda *a: None, "")
    registry.pool_words(registry.Spec("plain", plain), pooled)
    words = pooled.result
    assert words.notes[0] == "the same words" and "left out of this pooled report" in words.notes[1]
    assert len(words.notes) == 2 and words.sections == ["## Same section"]
    assert words.verdict == "" and words.markers == []
    called = []
    hooked = registry.Method("hooked", registry.NoSettings, lambda *a: None, "", pool=called.append)
    registry.pool_words(registry.Spec("hooked", hooked), pooled)
    assert called == [pooled] and pooled.result.notes == ["the same words"]
