"""Work shared across a study (issue 17, part 3): SVDs once per matrix (`edits.decompose`), base evaluations once
per fold (`evaluation.base_memo`, `experiments.pipeline.base_evaluations`), a fingerprint's statistics once per
weights (`edits.fingerprint`), the dev NLL from exact mode's own pass (`evaluate(..., with_nll=True)`); every
cache misses when anything its result depends on changes, and a cached run reports what an uncached one does."""

import copy
import json

import pytest
import torch
from conftest import build
from helpers import EXAMPLES, without_timings

from eigenprune.cli import main
from eigenprune.core.batching import Example
from eigenprune.edits import decompose, fingerprint
from eigenprune.edits.decompose import SVDs, decompose_targets, svd
from eigenprune.edits.engine import score_run
from eigenprune.edits.freeze import FreezeConfig, applied
from eigenprune.edits.scoring import ScoreConfig
from eigenprune.edits.targets import find_targets, target_weight
from eigenprune.evaluation import base_memo
from eigenprune.evaluation.calibration import Calibration
from eigenprune.evaluation.evaluate import evaluate
from eigenprune.protocol.search import dev_nll


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in ((a.U, b.U), (a.S, b.S), (a.Vh, b.Vh)))


def test_svd_is_computed_once_per_matrix_and_equals_a_fresh_one():
    model, _ = build("llama")
    targets = find_targets(model, "all")
    first = decompose_targets(model, targets)
    again = decompose_targets(model, targets)
    assert decompose.SHARED.counts == {"computed": len(targets), "reused": len(targets)}
    for t in targets:
        assert again[t.name] is first[t.name]
        assert _same(first[t.name], svd(target_weight(model, t)))


@pytest.mark.parametrize("change", ["weight", "dtype", "threads"])
def test_svd_cache_misses_when_what_the_svd_depends_on_changes(change):
    model, _ = build("llama")
    target = find_targets(model, "key")[0]
    before = decompose.decompose(target_weight(model, target))
    threads = torch.get_num_threads()
    if change == "weight":
        with torch.no_grad():
            target_weight(model, target)[0, 0] += 1e-3
    elif change == "dtype":
        model = model.to(torch.bfloat16)
    else:
        torch.set_num_threads(threads + 1)
    try:
        after = decompose.decompose(target_weight(model, target))
        fresh = svd(target_weight(model, target))  # under the same thread count: LAPACK's sums follow it
    finally:
        torch.set_num_threads(threads)
    assert decompose.SHARED.counts == {"computed": 2}
    assert _same(after, fresh)
    if change != "threads":
        assert not _same(after, before)


def test_svd_cache_keeps_at_most_its_bytes():
    model, _ = build("llama")
    targets = find_targets(model, "all")
    one = svd(target_weight(model, targets[0])).nbytes
    cache = SVDs(max_bytes=2 * one)
    for t in targets[:4]:
        cache.get(target_weight(model, t))
    assert sum(c.nbytes for c in cache.entries.values()) <= 2 * one and len(cache.entries) >= 1


def test_fingerprint_of_seen_weights_equals_a_fresh_one_and_misses_on_a_change():
    model, _ = build("gpt2")
    fingerprint.fingerprint(model)["tensors"].clear()  # a caller's change does not reach the remembered copy
    fingerprint.fingerprint(model)["tensors"].clear()  # nor does one to a copy handed out from it
    again = fingerprint.fingerprint(model)
    fingerprint._SEEN.clear()
    assert again == fingerprint.fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    changed = fingerprint.fingerprint(model)
    assert changed["sha256"] != again["sha256"] and changed["tensors"] != again["tensors"]


def _key(model, tok, examples=EXAMPLES, mode="exact", batch_size=4, calibration=None):
    return base_memo.key(fingerprint.fingerprint(model)["sha256"], model, tok, examples, mode, batch_size,
                         calibration)


def test_base_memo_key_changes_with_everything_an_evaluation_depends_on():
    model, tok = build("llama")
    same = _key(model, tok)
    assert _key(*build("llama")) == same  # the same weights loaded again: the same key
    other_tok = build("gpt2")[1]
    keys = {"examples": _key(model, tok, EXAMPLES[:-1]), "mode": _key(model, tok, mode="next-token"),
            "batch size": _key(model, tok, batch_size=2), "tokenizer": _key(model, other_tok),
            "answer": _key(model, tok, [*EXAMPLES[:-1], Example(EXAMPLES[-1].prompt, " other")]),
            "calibration": _key(model, tok, calibration=Calibration("t", ("N/A =",), (" 1", " 2")))}
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    keys["weight"] = _key(model, tok)
    keys["dtype"] = _key(model.to(torch.float64), tok)
    for what, key in keys.items():
        assert key != same, f"a changed {what} must be another entry"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_evaluation_gives_the_dev_nll_bits_of_its_own_pass(arch):
    model, tok = build(arch)
    edit = score_run(model, tok, EXAMPLES, "all", config=ScoreConfig(partners=2), progress=False).edit(
        FreezeConfig(p=0.3))
    for context in (lambda: torch.no_grad(), lambda: applied(model, edit)):
        with context():
            result = evaluate(model, tok, EXAMPLES, "exact", batch_size=4, with_nll=True)
            assert torch.equal(result.nll, dev_nll(model, tok, EXAMPLES, batch_size=4))
            assert torch.equal(result.correct, evaluate(model, tok, EXAMPLES, "exact", batch_size=4).correct)
    assert evaluate(model, tok, [Example(e.prompt, e.answer, (e.answer, " x"), 0) for e in EXAMPLES], "choice",
                    batch_size=4, with_nll=True).nll is None  # choice mode's pass is another computation


def _compare(model_dir, task, out, *extra) -> dict:
    argv = ["compare", "--model", str(model_dir), "--task", str(task), "--split-seed", "2", "--targets", "all",
            "--partners", "2", "--n-boot", "50", "--quiet", "--limit", "18", "--p", "0.1,0.5", "--folds", "3",
            "--methods", "eigenprune,random,smallest", "--set", "random.seeds=2", "--no-side-effects",
            *extra, "--out", str(out)]
    assert main(argv) == 0
    return without_timings(json.loads((out / "comparison.json").read_text()))


def _strip_walls(report: dict) -> dict:
    """Without wall times, wherever they are (a fold's eigenprune report has its own timings)."""
    report = copy.deepcopy(report)

    def drop(value):
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if not k.endswith("_s") and k != "timings"}
        return [drop(v) for v in value] if isinstance(value, list) else value

    return drop(report)


def test_cells_of_one_model_share_svds_and_base_evaluations_and_report_the_same(sums_setup, tmp_path, monkeypatch):
    """Two cells of one model and task (a study's cells for two target sets see the same): the second computes no
    SVD and evaluates the base on no split, and both report what the same compare reports with the caches off."""
    import eigenprune.evaluation.evaluate as evaluation
    from eigenprune.core.positions import tracker_of

    model_dir, task = sums_setup
    base_calls, plain = [], evaluation.evaluate

    def counted(model, *args, **kwargs):
        base_calls.append(tracker_of(model) is None)
        return plain(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", counted)
    first = _compare(model_dir, task, tmp_path / "a")
    computed, made, base_first = decompose.SHARED.counts["computed"], base_memo.SHARED.counts["made"], sum(base_calls)
    assert made == 3 * 2 and base_first == 3 * 2  # dev and test of the unedited model, once per fold
    base_calls.clear()
    second = _compare(model_dir, task, tmp_path / "b")
    assert decompose.SHARED.counts["computed"] == computed  # no SVD made twice
    assert computed == len(find_targets(build("gpt2")[0], "all"))  # once per matrix, not once per fold
    assert base_memo.SHARED.counts == {"made": 6, "reused": 6} and sum(base_calls) == 0
    off = SVDs(max_bytes=0)  # caches off: every SVD and base evaluation made anew
    monkeypatch.setattr(decompose, "SHARED", off)
    monkeypatch.setattr(base_memo, "SHARED", base_memo.BaseEvaluations(max_entries=0))
    uncached = _compare(model_dir, task, tmp_path / "c")
    assert off.counts == {"computed": 3 * computed} and sum(base_calls) == 6  # what every fold made before
    assert _strip_walls(first) == _strip_walls(second) == _strip_walls(uncached)


def test_svd_cache_tells_apart_the_same_bytes_read_as_another_shape_or_dtype():
    bits = torch.randint(0x3C00, 0x3E00, (8, 6), generator=torch.Generator().manual_seed(0), dtype=torch.int16)
    as_bf16, as_f16 = bits.view(torch.bfloat16), bits.view(torch.float16)  # same bytes, other numbers
    for weight in (as_bf16, as_f16, as_f16.reshape(6, 8)):
        assert _same(decompose.decompose(weight), svd(weight))
    assert decompose.SHARED.counts == {"computed": 3}
