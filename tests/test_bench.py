"""Smoke runs of bench/scoring.py, bench/sweep.py, bench/run.py and bench/study.py on a tiny in-code Llama: they
finish, write the figures they promise, and pass their own checks (reference agrees with exact scoring; the p
loop does no SVD and no scoring; choice scoring on the KV cache agrees with teacher forcing; a study makes each
distinct pass once)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ sits beside src/, not installed

from bench import run, scoring, sweep  # noqa: E402


@pytest.fixture(scope="module")
def scoring_figures(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "scoring.json"
    code = scoring.main(["--model", "tiny-llama", "--n", "16", "--reference-n", "6", "--repeats", "1",
                         "--memory", "subset", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("key", ["floor_s", "scoring_s", "reference_s", "scoring_subset_s", "scoring_over_floor",
                                 "reference_over_scoring_time", "reference_over_scoring_memory"])
def test_scoring_bench_reports_positive_figures(scoring_figures, key):
    assert scoring_figures[key] > 0


def test_scoring_bench_reference_agrees_on_the_same_pairs(scoring_figures):
    assert scoring_figures["reference_check"]["passed"]
    assert scoring_figures["reference_pairs"] == 6 * 5
    assert scoring_figures["pairs"] == 16 * 4  # default K = 4 partners per example
    assert set(scoring_figures["peak_bytes"]) == {"floor_subset", "scoring_subset", "reference"}
    assert not scoring_figures["memory_failed"]


def test_floor_makes_the_same_model_calls_as_scoring():
    argv = ["--model", "tiny-llama", "--n", "12", "--reference-n", "4", "--batch-size", "5"]
    args = scoring.parser().parse_args(argv)
    setup = scoring.prepare(args)
    calls = {"n": 0}
    handle = setup.model.register_forward_pre_hook(lambda module, inputs: calls.__setitem__("n", calls["n"] + 1))
    try:
        counts = []
        for method in ("floor", "scoring"):
            calls["n"] = 0
            scoring.run(setup, args, method)
            counts.append(calls["n"])
    finally:
        handle.remove()
    assert counts == [3, 3]  # ceil(12 / 5) forward+backward passes each


def test_sweep_bench_extra_p_is_one_dev_evaluation(tmp_path):
    out = tmp_path / "sweep.json"
    code = sweep.main(["--model", "tiny-llama", "--n", "12", "--dev-n", "8", "--p", "0.1,0.3,0.5", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["svd_calls_in_decompose"] == r["n_targets"] and r["score_calls_in_scoring"] == 1  # the counters count
    assert r["svd_calls_in_loop"] == 0 and r["score_calls_in_loop"] == 0
    assert r["one_eval_per_p"] and r["forwards_per_eval"] > 0
    assert [row["p"] for row in r["rows"]] == [0.1, 0.3, 0.5]
    assert all(row["make_edit_s"] > 0 and row["eval_s"] > 0 for row in r["rows"])
    assert r["rows"][0]["n_frozen"] < r["rows"][-1]["n_frozen"]
    for key in ("svd_s", "scoring_s", "base_eval_s", "extra_p_s", "extra_p_over_eval"):
        assert r[key] > 0


def test_sweep_bench_times_the_p_search_against_the_grid(tmp_path):
    out = tmp_path / "sweep.json"
    code = sweep.main(["--model", "tiny-llama", "--n", "12", "--dev-n", "8", "--p", "0.1,0.3", "--no-side-effects",
                       "--search", "--p-budget", "5", "--json", str(out)])
    assert code == 0
    s = json.loads(out.read_text())["search"]
    phases = [step["phase"] for step in s["steps"]]
    assert phases[:3] == ["base", "grid", "grid"] and set(phases[3:]) <= {"extend", "refine"}
    assert s["grid_evaluations"] == 2 and s["evaluations"] == len(phases) - 1 <= 5
    assert s["chosen"] in [step["p"] for step in s["steps"]] and s["svd_calls"] == s["score_calls"] == 0
    assert s["search_s"] >= s["grid_s"] > 0 and s["search_over_grid"] >= 1


def test_run_bench_times_every_phase_against_its_floor(tmp_path, saved_model_dir):
    out = tmp_path / "run.json"
    code = run.main(["--model", str(saved_model_dir), "--task", "copa", "--limit", "6", "--p", "0.1,0.3",
                     "--choice-check", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    for phase in ("load", "base_eval", "scoring", "sweep"):
        assert r["run"][phase] > 0 and r["floor"][phase] > 0
    assert r["run"]["wall"] >= sum(r["run"][k] for k in run.PHASES) and r["ratio"] > 0
    for check in ("base", "p=0.3"):
        assert r["choice_check"][check]["max_rel_diff"] <= 1e-4
        assert r["choice_check"][check]["same_argmin"] == r["choice_check"]["examples"]


def test_exact_bench_same_verdicts_and_ratios(tmp_path):
    from bench import exact

    out = tmp_path / "exact.json"
    assert exact.main(["--model", "tiny-llama", "--n", "24", "--score-n", "8", "--repeats", "2",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["model"] for row in r["rows"]] == ["base", "p = 0.3"]
    for row in r["rows"]:
        assert row["same_verdicts"] and row["self_same_verdicts"] and len(row["generated"]) == 2
        for key in ("ratio", "ratio_cpu", "floor", "floor_cpu"):
            assert len(row[key]["all"]) == 2 and row[key]["min"] <= row[key]["median"] <= row[key]["max"]
        tokens = row["tokens"]
        assert tokens["teacher_forced"] >= tokens["prefill"] > 0 and tokens["decode"] > 0


def test_exact_bench_counts_the_examples_sent_to_generation(monkeypatch):
    """With every margin a near tie, the teacher-forced path generates every example, and the bench says so."""
    from bench import exact, shuffled_examples, tiny_llama
    from eigenprune.evaluation import evaluate as ev

    model, tok = tiny_llama()
    examples = shuffled_examples("int-mult")[:20]
    assert exact._new(model, tok, examples, 8)[1] == 0
    real = ev.position_verdicts
    monkeypatch.setattr(ev, "position_verdicts", lambda z, y, t: real(z, y, 1e9))
    correct, generated = exact._new(model, tok, examples, 8)
    assert generated == 20 and correct.tolist() == exact._old(model, tok, examples, 8)[0].tolist()
    assert ev.greedy_continuations.__name__ == "greedy_continuations"  # the counter is gone after the block


def test_side_effects_bench_matches_the_old_pass(tmp_path):
    from bench import side_effects

    out = tmp_path / "side.json"
    assert side_effects.main(["--model", "tiny-llama", "--docs", "6", "--max-tokens", "40", "--repeats", "1",
                              "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["same_numbers"] and r["bits_equal"] and r["new_over_bare_median"] > 0 and r["old_over_bare_median"] > 0
    assert set(r["peak_rss_bytes"]) == {"bare", "old", "new", "linear", "nll_floor"} and r["base_pass_cached_s"] > 0
    assert r["nll_floor_over_bare_median"] > 0
    assert r["linear_over_bare_median"] > 0 and r["linear_nll_bits_equal"]  # the opt-in path: same NLL, KL close
    assert r["linear_max_abs_diff_kl_per_token_by_doc"] < 1e-6
    assert r["linear_base_s"] > 0 and r["linear_base_cached_s"] > 0
    assert r["base_pass_linear_uncached_s"] > 0 and r["linear_base_made_in_the_base_pass"]


def test_side_effect_chunks_bench_times_both_chunk_rules(tmp_path):
    from bench import side_effect_chunks
    from eigenprune.evaluation import token_scores

    before = token_scores.CHUNK_ELEMENTS, token_scores.HEAD_SHARE
    out = tmp_path / "chunks.json"
    vocab = 261  # tiny-llama's; 2 rows a chunk before HEAD_SHARE, d_model 32 / 4 = 8 now
    assert side_effect_chunks.main(["--model", "tiny-llama", "--docs", "5", "--max-tokens", "30", "--repeats", "1",
                                    "--threads", "1", "--chunk-elements", str(2 * vocab), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["vocab"], r["rows_before"], r["rows_now"]) == (vocab, 2, 8)
    assert all(r[f"{k}_over_bare_median"] > 0 for k in ("exact-now", "exact-before", "linear-now", "linear-before"))
    assert isinstance(r["exact_bits_equal"], bool) and isinstance(r["linear_bits_equal"], bool)
    assert (token_scores.CHUNK_ELEMENTS, token_scores.HEAD_SHARE) == before  # the module is left as it was


def test_gguf_load_bench_same_weights(tmp_path):
    from test_models import write_tiny_gguf

    from bench import gguf_load

    out = tmp_path / "gguf.json"
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert gguf_load.main(["--model", str(path), "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["same_weights"] and r["same_token_ids"] and r["fast_wall_s_median"] > 0 and r["plain_wall_s_median"] > 0
    assert r["fast_cpu_s_median"] > 0 and r["fast_main_thread_cpu_s_median"] > 0


def test_study_bench_counts_each_distinct_pass_once(tmp_path):
    """bench/study.py on the tiny Llama (int-sum and int-mult, exact mode; 3 folds; side effects on): SVDs once per
    matrix, the unedited model evaluated once per (fold, split) and its side-effect pass once for the model, no
    dev NLL pass (exact mode's evaluation gives it), and a wall-to-floor ratio."""
    from bench import study

    out = tmp_path / "study.json"
    code = study.main(["--tiny", "--limit", "12", "--random-seeds", "2", "--n-boot", "20", "--no-auto",
                       "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())["grid"]
    passes = r["passes"]
    assert passes["svd"]["count"] == 2 and "svd (repeated)" not in passes  # 2 key matrices, once for the study
    assert r["svd_cache"] == {"computed": 2, "reused": 2 * 3 * 2 - 2}  # tasks x folds x matrices, 2 made
    assert passes["evaluation, unedited"]["count"] == 2 * 3 * 2  # tasks x folds x (dev, test)
    assert "evaluation, unedited (repeated)" not in passes
    assert not any(k.startswith("dev NLL pass") for k in passes)
    assert passes["side-effect pass, unedited"]["count"] == 1 and "side-effect pass, unedited (repeated)" not in passes
    assert passes["scoring"]["count"] == 2 * 3
    assert r["floor_s"] > 0 and r["wall_over_floor"] >= 1
