"""`eigenprune compare` end to end on a tiny saved model: files, keys, saved edits, choices made on dev
only, implicit eigenprune, one-line errors and a directory that is complete or absent."""

import json

import pytest
import torch
from helpers import sensitive, write_task

import eigenprune.experiments.compare as compare_module
from eigenprune.cli import build_parser
from eigenprune.core.errors import UsageError
from eigenprune.edits.artifact import load_edit
from eigenprune.experiments.compare import CompareConfig
from eigenprune.methods import registry
from eigenprune.methods.base import MethodResult
from eigenprune.protocol.harness import Harness
from eigenprune.reports.compare_report import method_order, render_markdown, verdict

SMALL = ["--limit", "12", "--split-seed", "2", "--targets", "all", "--p", "0.1,0.3,0.5",  # eigenprune picks 0.5
         "--partners", "2", "--n-boot", "50", "--quiet",
         "--select", "accuracy"]  # on 12 examples the default ("1se") keeps the base model: these tests need edits
GRIDS = {"random": ["--random-seeds", "2"], "laser": ["--laser-kinds", "mlp-in,mlp-out", "--laser-keep", "0.5,0.1"],
         "svd-clip": ["--set", "svd-clip.demos=2", "--set", "svd-clip.keep=[1, 0.5]"]}  # old flags and --set alike


def small(*methods: str) -> list[str]:
    """The shared small settings and the grids of the methods that run."""
    return ["--methods", ",".join(methods), *SMALL, *(a for m in methods for a in GRIDS.get(m, []))]
OPTIONAL = {"feature-space": ["--set", "feature-space.max_layers=1"],
            "lora": ["--set", "lora.steps=4", "--set", "lora.checkpoints=2"],
            "lora+eigenprune": ["--set", "lora+eigenprune.steps=4", "--set", "lora+eigenprune.checkpoints=2"]}
# the same settings for both LoRA methods: compare fine-tunes once for the two
ROW_KEYS = {"config", "dev", "test", "diff_vs_base", "dev_evaluations", "wall_s", "changed_params", "runs", "extra",
            "saved_edit"}


def available(method: str) -> bool:
    return all(part in registry.methods() for part in method.split("+"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    model, tok = sensitive()
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", write_task(folder / "sums.jsonl")


def run_compare(*argv) -> tuple[int, str]:
    """What `eigenprune compare ...` does: exit code and the one-line error."""
    args = build_parser().parse_args(["compare", *map(str, argv)])
    try:
        return args.func(args), ""
    except UsageError as err:
        return 2, str(err)


def methods_to_try() -> tuple[list[str], list[str]]:
    names = ["eigenprune", "random", "smallest", "laser", "svd-clip"]
    extra = [m for m in OPTIONAL if available(m)]
    return names + extra, [a for m in extra for a in OPTIONAL[m]]


@pytest.fixture(scope="module")
def full(setup, tmp_path_factory):
    model, task = setup
    out = tmp_path_factory.mktemp("runs") / "all"
    names, extra_args = methods_to_try()
    tunes = []
    with pytest.MonkeyPatch.context() as mp:
        if available("lora"):
            import eigenprune.methods.lora as lora

            plain = lora._fine_tune
            mp.setattr(lora, "_fine_tune", lambda *a, **k: tunes.append(1) or plain(*a, **k))
        code, err = run_compare("--model", model, "--task", task, *small(*names),
                                *extra_args, "--out", out)
    assert code == 0, err
    if {"lora", "lora+eigenprune"} <= set(names):
        assert len(tunes) == 1  # one fine-tune serves both LoRA rows
    return out, names


def test_writes_every_file_and_key(full):
    out, names = full
    assert {p.name for p in out.iterdir()} == {"comparison.json", "comparison.md", "comparison.png", "config.json",
                                               "edits", "side_effects.png"}
    report = json.loads((out / "comparison.json").read_text())
    measured = report["side_effects"]["model_order"]  # the base, then every method that changed the model
    seeds = len(report["methods"]["random"]["runs"])  # the random control: each seed's edit (up to 5)
    want = {n for n in names if report["methods"][n]["changed_params"] and n != "random"}
    if report["methods"]["random"]["changed_params"]:
        want |= {f"random (seed {s})" for s in range(min(seeds, 5))}
    assert measured[0] == "base" and set(measured[1:]) == want
    assert "| Δ perplexity | KL |" in (out / "comparison.md").read_text()
    report = json.loads((out / "comparison.json").read_text())
    assert report["methods_run"] == names and set(report["methods"]) == set(names) and report["implicit"] == []
    for name, row in report["methods"].items():
        assert ROW_KEYS <= set(row), name
        assert {"acc", "lo", "hi", "n"} <= set(row["test"]) and {"diff", "lo", "hi"} <= set(row["diff_vs_base"])
        if row["saved_edit"] is not None and name in ("eigenprune", "random", "smallest", "laser", "svd-clip"):
            _, meta = load_edit(out / row["saved_edit"])
            assert meta["method"] == name
    rows = report["methods"]
    assert rows["eigenprune"]["dev_evaluations"] == 4 and rows["laser"]["dev_evaluations"] == 9
    assert rows["eigenprune"]["config"]["p"] == 0.5 and rows["random"]["config"]["n_frozen"] > 0
    assert len(report["methods"]["random"]["runs"]) == 2
    assert "icl_only" in report["methods"]["svd-clip"]["extra"]
    md = (out / "comparison.md").read_text()
    assert report["verdict"] in md and "random control" in report["verdict"]
    assert all(f"| {name} |" in md for name in names)
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())
    assert config["compare"]["methods"] == names and config["run"]["limit"] == 12


def test_choices_do_not_depend_on_test(full, setup, tmp_path, monkeypatch):
    """Judge every test answer the opposite way: the chosen configurations must not move."""
    out, names = full
    model, task = setup
    plain = Harness.evaluate
    monkeypatch.setattr(Harness, "evaluate", lambda self, split: ~plain(self, split) if split == "test"
                        else plain(self, split))
    methods = small("eigenprune", "random", "smallest", "laser", "svd-clip")
    code, err = run_compare("--model", model, "--task", task, *methods, "--out", tmp_path / "flipped")
    assert code == 0, err
    want = json.loads((out / "comparison.json").read_text())
    got = json.loads((tmp_path / "flipped" / "comparison.json").read_text())
    assert got["base"]["test"]["acc"] == pytest.approx(1 - want["base"]["test"]["acc"])
    for name, row in got["methods"].items():
        assert row["config"] == want["methods"][name]["config"], name
        assert row["dev"] == want["methods"][name]["dev"], name
        assert row["test"]["acc"] == pytest.approx(1 - want["methods"][name]["test"]["acc"]), name


def test_random_runs_eigenprune_implicitly(setup, tmp_path):
    model, task = setup
    code, err = run_compare("--model", model, "--task", task, *small("random"), "--out", tmp_path / "r")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "comparison.json").read_text())
    assert report["implicit"] == ["eigenprune"] and report["methods_run"] == ["eigenprune", "random"]
    assert report["methods"]["random"]["config"]["n_frozen"] == report["methods"]["eigenprune"]["config"]["n_frozen"]
    assert "Run implicitly" in (tmp_path / "r" / "comparison.md").read_text()


def boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["method", "writing"])
def test_failure_leaves_no_directory(setup, tmp_path, monkeypatch, where):
    model, task = setup
    if where == "method":
        monkeypatch.setattr("eigenprune.methods.laser.run_laser", boom)
    else:
        monkeypatch.setattr(compare_module, "plot_comparison", boom)
    with pytest.raises(RuntimeError, match="boom"):
        run_compare("--model", model, "--task", task, *small("laser"), "--out", tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


BAD = {
    "unknown method": (["--methods", "eigenprune,magic"], "unknown method 'magic'"),
    "bad argument": (["--methods", "laser", "--set", "laser.steps=3"], "laser: unknown setting 'steps'"),
    "bad grid": (["--methods", "laser", "--laser-keep", "0"], "keep fractions"),
    "bad grid by --set": (["--methods", "laser", "--set", "laser.keep=0.5,2"], "keep fractions"),
    "wrong type": (["--methods", "random", "--set", "random.seeds=many"], "seeds must be an integer"),
    "random seeds": (["--random-seeds", "0"], "seeds must be at least 1"),
    "missing module": (["--methods", "missing"], "no_such_module could not be loaded"),
    "bad lora setting": (["--methods", "lora", "--set", "lora.stepz=3"], "lora: unknown setting 'stepz'"),
    "set for a method not run": (["--methods", "eigenprune", "--set", "lora.steps=5"], "'lora' is not among"),
    "composite without a stage": (["--methods", "laser+eigenprune"], "'laser' is not a learned stage"),
    "composite of two stages": (["--methods", "lora+lora"], "is itself a learned stage"),
    "composite setting of neither part": (["--methods", "lora+laser", "--set", "lora+laser.p=3"],
                                          "lora+laser has no setting 'p'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(setup, tmp_path, monkeypatch, case):
    model, task = setup
    registry.methods()
    monkeypatch.setitem(registry._UNAVAILABLE, "no_such_module", "No module named 'no_such_module'")
    argv, message = BAD[case]
    code, err = run_compare("--model", model, "--task", task, *argv, "--out", tmp_path / "o")
    assert code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_an_existing_directory_is_refused_before_any_work(setup, tmp_path):
    model, task = setup
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, err = run_compare("--model", model, "--task", task, "--out", tmp_path / "o")
    assert code == 2 and "already exists" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]


def row(diff, lo, hi, acc=0.5, own=""):
    return {"test": {"acc": acc}, "diff_vs_base": {"diff": diff, "lo": lo, "hi": hi}, "verdict": own}


VERDICTS = [
    ({"m": row(0.1, -0.1, 0.3)}, ["No method's test gain over the base model is significant"]),
    ({"m": row(0.2, 0.05, 0.35)}, ["Significant test gain over the base model", "m (+0.200"]),
    ({"m": row(-0.2, -0.35, -0.05)}, ["Significantly worse than base: m"]),
    ({"m": row(0.1, -0.1, 0.3, own="First words."), "n": row(0, 0, 0, own="Second words.")},
     ["no gain larger than +30.0 points (95% upper bound", "First words. Second words."]),
]


@pytest.mark.parametrize("methods,phrases", VERDICTS)
def test_verdict_words(methods, phrases):
    text = verdict({"methods": methods})
    assert all(p in text for p in phrases), text


def result(test: list[float], **extra) -> MethodResult:
    return MethodResult("m", {}, torch.tensor(test), torch.tensor(test), 1, 0.0, 0, extra=extra)


VERSUS = [  # eigenprune's test correctness, the random control's seeds' test accuracies, n_frozen, phrases
    ([1.0, 1.0, 0.0, 0.0], [0.5], 0, ["chose p = 0"]),
    ([1.0] * 8, [0.25, 0.5], 9, ["above the mean random draw (the CI excludes 0) but not above the draws themselves: "
                                 "0 of 2 draws", "lies above the random seeds' range"]),  # 2 seeds: p >= 1/3
    ([1.0] * 40, [0.25] * 10 + [0.5] * 10, 9, ["is distinguishable from freezing random", "above the draws"]),
    ([1.0] * 20 + [0.0] * 20, [0.25] * 18 + [0.6] * 2, 9, ["above the mean random draw", "2 of 20 draws did at"]),
    ([0.0] * 40, [0.5] * 20, 9, ["worse than freezing random components"]),
    ([1.0, 0.0] * 4, [0.25, 0.75], 9, ["not distinguishable from freezing random", "lies inside"]),
]


@pytest.mark.parametrize("eigen,accs,n_frozen,phrases", VERSUS)
def test_random_control_says_how_eigenprune_compares(eigen, accs, n_frozen, phrases):
    from eigenprune.methods.controls import _versus

    n = len(eigen)
    seeds = torch.tensor([[i < round(a * n) for i in range(n)] for a in accs])  # (seeds, n), accuracies `accs`
    rand = result([0.5] * n, n_frozen=n_frozen, _test_seeds=seeds)
    rand.runs = [{"test": {"acc": a}} for a in accs]
    versus, text = _versus(result(eigen), rand, n_boot=200)
    assert all(p in text for p in phrases), text
    assert versus["n_frozen"] == n_frozen and versus["random_test_accs"] == accs


@pytest.mark.parametrize("acc,icl,says", [(0.338, 0.35, True), (0.5, 0.35, False)])
def test_svd_clip_says_when_the_demonstrations_carry_it(acc, icl, says):
    from eigenprune.methods.svd_clip import _icl_report

    n = 1000
    clip = result([1.0] * round(acc * n) + [0.0] * (n - round(acc * n)),
                  icl_only={"dev": {"acc": icl, "lo": 0, "hi": 1}, "test": {"acc": icl, "lo": 0, "hi": 1}})
    _icl_report(clip)
    assert ("the prompt change, not the clipping" in clip.verdict) == says
    assert clip.markers[0]["acc"] == icl and "demonstrations alone" in clip.sections[0]


def test_config_validation_names_the_field():
    for kwargs, field in (({"methods": ("x",)}, "unknown method 'x'"), ({"method_args": {"x": {}}}, "'x' is not among"),
                          ({"methods": ("laser",), "method_args": {"laser": {"kinds": ["all"]}}}, "kinds"),
                          ({"methods": ("svd-clip",), "method_args": {"svd-clip": {"keep": [2.0]}}}, "keep")):
        with pytest.raises(ValueError, match=field):
            CompareConfig(**kwargs)
    assert CompareConfig().methods == ("eigenprune", "random", "smallest", "laser", "svd-clip")


def test_saved_json_re_renders_in_run_order(full):
    """comparison.json stores methods with sorted keys; the table and plot follow the order they ran."""
    out, names = full
    report = json.loads((out / "comparison.json").read_text())
    md = render_markdown(report)
    assert sorted(names) != names and method_order(report) == names
    assert [md.index(f"| {n} |") for n in names] == sorted(md.index(f"| {n} |") for n in names)


def test_eigenprune_reuses_the_shared_base_evaluation(setup, tmp_path, monkeypatch):
    """compare evaluates the base model once; eigenprune takes it rather than evaluating it again."""
    model, task = setup
    calls = []
    plain = Harness.evaluate
    monkeypatch.setattr(Harness, "evaluate", lambda self, split: calls.append(split) or plain(self, split))
    code, err = run_compare("--model", model, "--task", task, *small("eigenprune"),
                            "--out", tmp_path / "o")
    assert code == 0, err
    assert calls.count("dev") == 1 + 3 and calls.count("test") == 1 + 1  # base, 3 p on dev; the chosen p on test
