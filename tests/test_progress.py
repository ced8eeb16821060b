"""Progress bars name their step: which split, which p, which method and fold; none under --quiet."""

import pytest

import eigenprune.core.progress as progress
from eigenprune.cli import main as cli_main
from eigenprune.protocol.harness import Harness


class Recorder:
    """Stands in for tqdm: records each bar's description and whether it would draw."""

    bars: list[tuple[str, bool]] = []

    def __init__(self, iterable=None, desc="", disable=False, **kwargs):
        self.iterable = iterable
        Recorder.bars.append((desc, disable is not True))

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def close(self):
        pass


def main(argv) -> int:
    return cli_main([str(a) for a in argv])


@pytest.fixture
def bars(monkeypatch):
    Recorder.bars = []
    monkeypatch.setattr(progress, "tqdm", Recorder)
    return Recorder.bars


def test_harness_names_the_steps():
    harness = Harness(None, None, None, "exact", None, quiet=False, where=["fold 2/5", ""])
    with harness.step("laser"), harness.step("keep=0.5"):
        assert harness.progress("dev") == "fold 2/5 · laser · keep=0.5 · dev"
    assert harness.progress() == "fold 2/5"
    assert Harness(None, None, None, "exact", None, quiet=False).progress() is True
    assert Harness(None, None, None, "exact", None, quiet=True, where=["x"]).progress("dev") is False
    assert progress.label("fold 1/2 · dev", "choice") == "fold 1/2 · dev: choice"
    assert progress.label(True, "choice") == "choice"


def test_run_bars_name_split_and_p(bars, tmp_path, sums_setup):
    model, task = sums_setup
    common = ["--model", model, "--task", task, "--limit", "12", "--p", "0.3,0.5", "--no-side-effects",
              "--targets", "all", "--eval-mode", "choice"]
    assert main(["run", *common, "--out", tmp_path / "r"]) == 0
    names = [desc for desc, shown in bars if shown]
    assert names[:3] == ["base · dev: choice", "base · test: choice", "scoring"]
    for p in ("0.3", "0.5"):
        assert f"p={p} · dev: choice" in names and f"p={p} · test: choice" in names  # the sweep shows test too
    bars.clear()
    assert main(["run", *common, "--out", tmp_path / "q", "--quiet"]) == 0
    assert not any(shown for _, shown in bars)


def test_compare_bars_name_fold_and_method(bars, tmp_path, sums_setup):
    model, task = sums_setup
    assert main(["compare", "--model", model, "--task", task, "--limit", "12", "--p", "0.5", "--no-side-effects",
                 "--targets", "all", "--eval-mode", "choice", "--folds", "2", "--methods", "eigenprune,smallest",
                 "--out", tmp_path / "c"]) == 0
    names = {desc for desc, shown in bars if shown}
    for fold in ("fold 1/2", "fold 2/2"):
        assert f"{fold} · base · dev: choice" in names
        assert f"{fold} · eigenprune: scoring" in names
        assert f"{fold} · eigenprune · p=0.5 · dev: choice" in names
        assert any(n.startswith(f"{fold} · smallest · ") and n.endswith("dev: choice") for n in names)
