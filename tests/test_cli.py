"""The command line: score -> prune -> export/generate on a tiny saved model, and bad input -> one line, exit 2."""

import json
from contextlib import nullcontext

import pytest
import torch
from conftest import build
from transformers import AutoModelForCausalLM

from eigenprune.cli import main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"{a} + {b} =", "answer": f" {a + b}"} for a in range(4) for b in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_targets_lists_matches(capsys, saved_model_dir):
    code, out, _ = run_cli(capsys, "targets", "--model", saved_model_dir, "--targets", "key", "--per-head")
    assert code == 0
    assert "model.layers.0.self_attn.k_proj:h0" in out and "4 targets, 32 components" in out


def test_score_prune_export_generate(capsys, tmp_path, saved_model_dir, data_file):
    scores = tmp_path / "scores"
    code, out, err = run_cli(capsys, "score", "--model", saved_model_dir, "--data", data_file, "--out", scores,
                             "--quiet", "--partners", "2")
    assert code == 0, err
    assert {p.name for p in scores.iterdir()} >= {"scores.safetensors", "means.safetensors", "svd.safetensors",
                                                    "score_config.json"}
    code, out, err = run_cli(capsys, "prune", "--scores", scores, "--p", "0.25", "--bias", "constant",
                             "--out", tmp_path / "edit")
    assert code == 0, err
    assert "froze 8 of 32 components" in out
    code, out, err = run_cli(capsys, "export", "--edit", tmp_path / "edit", "--merge", "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.attention_bias is True
    code, out, err = run_cli(capsys, "generate", "--edit", tmp_path / "edit", "--prompt", "1 + 2 =",
                             "--max-new-tokens", "3")
    assert code == 0, err
    ids = torch.tensor([[0, 20]])
    assert merged(ids).logits.shape[-1] == 320


def test_generate_compare_prints_base_and_edit_side_by_side(capsys, tmp_path, saved_model_dir, data_file,
                                                         monkeypatch):
    """--compare: the base model's continuation beside the edit's. The tiny model's greedy text rarely changes
    under an edit, so the continuation is replaced by one that says whether the edit is on the model."""
    import eigenprune.cli as cli
    from eigenprune.edits.freeze import FrozenLinear

    assert run_cli(capsys, "score", "--model", saved_model_dir, "--data", data_file, "--out", tmp_path / "s",
                   "--quiet", "--partners", "2")[0] == 0
    assert run_cli(capsys, "prune", "--scores", tmp_path / "s", "--p", "0.5", "--out", tmp_path / "e")[0] == 0
    edited = lambda model: any(isinstance(m, FrozenLinear) for m in model.modules())
    monkeypatch.setattr(cli, "_greedy", lambda model, tok, inputs, n: f"{'edited' if edited(model) else 'plain'} {n}")
    code, out, err = run_cli(capsys, "generate", "--edit", tmp_path / "e", "--prompt", "1 + 2 =", "--max-new-tokens",
                             "3", "--compare")
    assert code == 0, err
    name = f"edit ({tmp_path / 'e'})"
    assert out.splitlines() == [f"{'prompt':<{len(name)}}  '1 + 2 ='", f"{'base':<{len(name)}}  'plain 3'",
                                f"{name}  'edited 3'"]
    assert run_cli(capsys, "generate", "--edit", tmp_path / "e", "--prompt", "1 + 2 =")[1] == "edited 16\n"
    assert run_cli(capsys, "generate", "--prompt", "1 + 2 =", "--compare")[0] == 2  # nothing to compare with


def test_device_map_auto_scores_like_a_plain_load(capsys, tmp_path, saved_model_dir, data_file):
    """`--device-map auto` goes through accelerate's placement (one CPU here; several GPUs elsewhere)."""
    from safetensors.torch import load_file

    for name, extra in (("plain", []), ("auto", ["--device-map", "auto"])):
        code, _, err = run_cli(capsys, "score", "--model", saved_model_dir, "--data", data_file,
                               "--out", tmp_path / name, "--quiet", "--partners", "2", *extra)
        assert code == 0, err
    plain, auto = (load_file(tmp_path / n / "scores.safetensors") for n in ("plain", "auto"))
    assert plain.keys() == auto.keys() and plain
    for key in plain:
        torch.testing.assert_close(auto[key], plain[key])


def test_score_with_a_builtin_task(capsys, tmp_path, saved_gpt2_dir):
    code, out, err = run_cli(capsys, "score", "--model", saved_gpt2_dir, "--task", "int-mult", "--limit", "6",
                             "--out", tmp_path / "s", "--quiet")
    assert code == 0, err
    meta = json.loads((tmp_path / "s" / "score_config.json").read_text())
    assert meta["n_examples"] == 6 and meta["targets"][0]["name"].endswith("c_attn:k")


def bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "1 + 1 =", "answer": " 2"}\n{"prompt": oops}\n')
    return path


def empty_jsonl(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    return path


CASES = {
    "missing file": (lambda t, m: ["score", "--model", m, "--data", t / "nope.jsonl", "--out", t / "o"],
                     "file not found"),
    "malformed line": (lambda t, m: ["score", "--model", m, "--data", bad_jsonl(t), "--out", t / "o"], "bad.jsonl:2"),
    "unknown model": (lambda t, m: ["score", "--model", t / "no-model", "--task", "int-mult", "--out", t / "o"],
                      "model not found"),
    "p too large": (lambda t, m: ["prune", "--scores", t, "--p", "1.0", "--out", t / "o"], "p must be in [0, 1)"),
    "p negative": (lambda t, m: ["prune", "--scores", t, "--p", "-0.1", "--out", t / "o"], "p must be in [0, 1)"),
    "empty data": (lambda t, m: ["score", "--model", m, "--data", empty_jsonl(t), "--out", t / "o"], "no examples"),
    "unknown task": (lambda t, m: ["score", "--model", m, "--task", "int-div", "--out", t / "o"], "unknown task"),
    "bad targets": (lambda t, m: ["targets", "--model", m, "--targets", "nothing_here"], "matches no linear module"),
    "not a score dir": (lambda t, m: ["prune", "--scores", t, "--p", "0.1", "--out", t / "o"], "no score_config.json"),
    "bad partners": (lambda t, m: ["score", "--model", m, "--task", "int-mult", "--partners", "x", "--out", t / "o"],
                     "partners"),
    "negative limit": (lambda t, m: ["score", "--model", m, "--task", "int-mult", "--limit", "-3", "--out", t / "o"],
                       "limit must be at least 2"),
    "zero limit": (lambda t, m: ["score", "--model", m, "--task", "int-mult", "--limit", "0", "--out", t / "o"],
                   "limit must be at least 2"),
    "negative batch": (lambda t, m: ["score", "--model", m, "--task", "int-mult", "--batch-size", "-1", "--out",
                                     t / "o"], "batch_size must be at least 1"),
    "no p": (lambda t, m: ["prune", "--scores", t, "--out", t / "o"], "prune needs --p"),
}


def test_score_spells_the_pairing_seed_as_run_does_and_keeps_the_old_flag(capsys, tmp_path, saved_model_dir,
                                                                          data_file):
    from safetensors.torch import load_file

    runs = {}
    for name, flag in (("new", "--score-seed"), ("old", "--seed")):
        with pytest.warns(FutureWarning, match="--seed is deprecated") if name == "old" else nullcontext():
            code, out, err = run_cli(capsys, "score", "--model", saved_model_dir, "--data", data_file, "--out",
                                     tmp_path / name, "--quiet", "--partners", "2", flag, "3")
        assert code == 0, err
        runs[name] = load_file(tmp_path / name / "scores.safetensors")
    assert runs["new"].keys() == runs["old"].keys()
    assert all(torch.equal(runs["new"][k], runs["old"][k]) for k in runs["new"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, saved_model_dir, case):
    make_argv, message = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_cli(capsys, *make_argv(work, saved_model_dir))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (work / "o").exists()


def test_edit_for_another_base_is_refused(capsys, tmp_path, saved_model_dir, data_file):
    run_cli(capsys, "score", "--model", saved_model_dir, "--data", data_file, "--out", tmp_path / "s", "--quiet")
    run_cli(capsys, "prune", "--scores", tmp_path / "s", "--p", "0.1", "--out", tmp_path / "edit")
    other, tok = build("llama", seed=9)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    code, out, err = run_cli(capsys, "export", "--edit", tmp_path / "edit", "--merge", "--model", tmp_path / "other",
                             "--out", tmp_path / "merged")
    assert code == 2 and "other base weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()


def test_bad_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--p", "0.1"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
