"""lm-evaluation-harness on an edited model: on CB (eigenprune's prompts as a local lm-eval YAML task) lm-eval's
log-likelihoods and accuracy equal eigenprune's own choice evaluation example by example, for the base model and
for edits (position-dependent bias included); the command writes both results and a paired table; a missing
lm-eval, an unknown task and a task whose data would need a download are one line each."""

import json
import sys

import pytest
import torch
from conftest import _randomize_biases, make_tokenizer
from helpers import EXAMPLES
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from eigenprune.cli import main
from eigenprune.core.batching import encode
from eigenprune.core.errors import UsageError
from eigenprune.edits.artifact import fingerprint, save_edit
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import FreezeConfig, applied, make_edit
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets
from eigenprune.evaluation.evaluate import choice_nll
from eigenprune.evaluation.tasks import load_task

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'eigenprune[lm-eval]'")
from eigenprune.evaluation.lm_eval_bridge import choice_logliks, evaluate_tasks, per_sample  # noqa: E402

CB = load_task("cb")  # test = SuperGLUE validation; prompts up to ~1100 tokens of the tiny tokenizer
N = 16  # the first N validation examples: lm-eval's --limit, and what eigenprune evaluates


def long_context(arch: str):
    """Tiny models whose context holds a whole CB prompt (the conftest ones stop at 256 positions)."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=320, n_positions=2048,
                                           bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                                             max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
                                             pad_token_id=1))
    _randomize_biases(model)
    with torch.no_grad():  # a 0.02-std init leaves the blocks too weak for an edit to move the logits much
        for name, p in model.named_parameters():
            if (".h." in name or ".layers." in name) and name.endswith("weight") and p.dim() == 2:
                p.mul_(8)
    return model.eval(), make_tokenizer("llama" if arch == "llama" else "gpt2")


def an_edit(model, tok, bias: str):
    targets = find_targets(model, "all")
    comps = decompose_targets(model, targets)
    scores = score(model, targets, comps, encode(tok, EXAMPLES), tok.pad_token_id, ScoreConfig(partners=2),
                   progress=False)
    return make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.3, bias=bias))


def both_ways(model, tok, folder):
    """(eigenprune's choice log-likelihoods, lm-eval's), each (N, 3), and lm-eval's per-example acc (N,)."""
    mine = -torch.stack(choice_nll(model, tok, CB.test[:N]))  # (N, 3)
    results = evaluate_tasks(model, tok, ["eigenprune_cb"], task_folder=folder, limit=N)
    theirs = choice_logliks(results, "eigenprune_cb")
    acc = per_sample(results, "eigenprune_cb")["acc"]
    return mine, torch.tensor([theirs[i] for i in range(N)], dtype=mine.dtype), torch.tensor([acc[i] for i in range(N)])


@pytest.mark.parametrize(("arch", "bias"), [("llama", "position"), ("gpt2", "position"), ("gpt2", "constant")])
def test_lm_eval_equals_eigenprune_choice_evaluation_on_cb(arch, bias, tmp_path):
    model, tok = long_context(arch)
    labels = torch.tensor([ex.label for ex in CB.test[:N]])
    base_mine, base_theirs, base_acc = both_ways(model, tok, tmp_path)
    with applied(model, an_edit(model, tok, bias)):
        mine, theirs, acc = both_ways(model, tok, tmp_path)
    for m, t, a in ((base_mine, base_theirs, base_acc), (mine, theirs, acc)):
        torch.testing.assert_close(t, m, atol=2e-4, rtol=1e-5)
        assert torch.equal(a == 1.0, m.argmax(1) == labels)
    assert (mine - base_mine).abs().max() > 0.05  # the edit moves the numbers: the equality is about the edit


def test_unknown_task_and_a_task_that_needs_a_download_are_one_line(tmp_path, monkeypatch):
    model, tok = long_context("llama")
    with pytest.raises(UsageError, match="knows no task 'no_such_task'"):
        evaluate_tasks(model, tok, ["no_such_task"])
    (tmp_path / "hub.yaml").write_text("task: needs_hub\ndataset_path: someone/not-here-dataset\noutput_type: "
                                       "multiple_choice\ntest_split: test\ndoc_to_text: '{{q}}'\n"
                                       "doc_to_choice: ['a', 'b']\ndoc_to_target: 0\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UsageError, match="'needs_hub' cannot load its data") as info:
        evaluate_tasks(model, tok, ["needs_hub"], include_path=[tmp_path])
    assert "\n" not in str(info.value)


def test_command_writes_results_for_both_and_a_paired_table(capfd, tmp_path, saved_model_dir, monkeypatch):
    from conftest import build

    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` must not print git's complaint

    model, tok = build("llama")  # the model saved in saved_model_dir (256 positions: lm-eval truncates CB's left)
    edit = an_edit(model, tok, "position")
    save_edit(tmp_path / "edit", edit, {"base_model": str(saved_model_dir),
                                        "base_fingerprint": fingerprint(model, edit.modules)})
    code = main(["lm-eval", "--edit", str(tmp_path / "edit"), "--tasks", "eigenprune_cb", "--limit", "6",
                 "--out", str(tmp_path / "lm")])
    out, err = capfd.readouterr()  # the file descriptors: what a subprocess prints too
    assert code == 0, err
    assert "not a git repository" not in err + out
    assert "| eigenprune_cb | acc | 6 |" in out
    report = json.loads((tmp_path / "lm" / "report.json").read_text())
    assert [r["n"] for r in report["rows"]] == [6]
    for side in ("base", "edit"):
        assert "eigenprune_cb" in json.loads((tmp_path / "lm" / side / "results.json").read_text())["results"]
        assert len((tmp_path / "lm" / side / "samples_eigenprune_cb.jsonl").read_text().splitlines()) == 6


def test_without_lm_eval_the_command_says_so_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code = main(["lm-eval", "--edit", str(tmp_path / "edit"), "--tasks", "eigenprune_cb"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'eigenprune[lm-eval]'" in err and len(err.strip().splitlines()) == 1
