"""Fault injection: nothing a user asked for is lost, nothing silently wrong is accepted, and bad input is
one line (exit 2), not a traceback. Two real processes on one --out, killed runs, truncated files, a
negated-weights model in another dtype, files from different scoring runs mixed in one folder."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build
from helpers import EXAMPLES

from eigenprune.cli import main
from eigenprune.core.batching import encode
from eigenprune.core.errors import UsageError
from eigenprune.edits.artifact import (
    apply_saved_edit,
    atomic_dir,
    check_new_dir,
    fingerprint,
    load_edit,
    load_scores,
    save_edit,
    save_scores,
)
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import FreezeConfig, apply_edit
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets, weight_view

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

# A writer that claims --out, says so, and waits for a go file before (or while) writing it.
WRITER = r"""
import sys, time
from pathlib import Path
from eigenprune.edits.artifact import atomic_dir, check_new_dir
from eigenprune.core.errors import UsageError
out, name, claimed, go, phase = sys.argv[1:6]
wait = lambda: [time.sleep(0.02) for _ in iter(lambda: Path(go).exists(), True)]
try:
    check_new_dir(out)
    Path(claimed).touch()
    if phase == "before":
        wait()
    with atomic_dir(out) as tmp:
        (tmp / "who").write_text(name)
        if phase == "inside":
            Path(claimed + ".inside").touch()
            wait()
except UsageError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
print(f"wrote {out}")
"""


def writer(tmp_path, out, name, phase="before"):
    claimed, go = tmp_path / f"{name}.claimed", tmp_path / f"{name}.go"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), name, str(claimed), str(go), phase],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, claimed, go


def wait_for(path, proc, timeout=60):
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout
        time.sleep(0.02)


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---------------------------------------------------------------- data loss: two runs, one --out
def test_a_second_process_on_a_claimed_out_fails_at_once_and_the_first_keeps_its_output(tmp_path):
    out = tmp_path / "out"
    first, claimed, go = writer(tmp_path, out, "first")
    wait_for(claimed, first)
    second, _, second_go = writer(tmp_path, out, "second")
    second_go.touch()
    _, err = second.communicate(timeout=60)
    assert second.returncode == 2 and one_line(err) and "being written by another eigenprune" in err
    assert f"pid {first.pid}" in err
    go.touch()
    stdout, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert (out / "who").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, no partial


def test_two_cli_runs_racing_for_one_out_leave_exactly_one_complete_output(tmp_path, saved_model_dir):
    out = tmp_path / "scores"
    data = {}
    for n in (4, 6):
        data[n] = tmp_path / f"d{n}.jsonl"
        data[n].write_text("".join(f'{{"prompt": "{a} + {a} =", "answer": " {2 * a}"}}\n' for a in range(n)))
    argv = lambda n: [sys.executable, "-m", "eigenprune", "score", "--model", str(saved_model_dir), "--data",
                      str(data[n]), "--partners", "2", "--quiet", "--out", str(out)]
    procs = {n: subprocess.Popen(argv(n), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in data}
    results = {n: (*proc.communicate(timeout=300), proc.returncode) for n, proc in procs.items()}
    winners = [n for n, (_, _, code) in results.items() if code == 0]
    assert len(winners) == 1, results
    for n, (stdout, err, code) in results.items():
        if n not in winners:
            assert code == 2 and one_line(err) and not stdout, results
            assert "being written by another eigenprune" in err or "already exists" in err
    assert load_scores(out).meta["n_examples"] == winners[0]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_final_step_never_replaces_what_it_did_not_create(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="appeared while this run was writing it") as info:
        with atomic_dir(out) as tmp:
            (tmp / "ours").write_text("ours")
            out.mkdir()
            (out / "theirs").write_text("theirs")  # not eigenprune: it does not claim first
    assert (out / "theirs").read_text() == "theirs" and not (out / "ours").exists()
    assert str(tmp) in str(info.value) and (tmp / "ours").read_text() == "ours"


# ---------------------------------------------------------------- work lost at the end
def test_an_unwritable_out_is_refused_before_any_work(capsys, tmp_path, scores_dir):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_new_dir(tmp_path / "file" / "sub" / "out")
    code = main(["prune", "--scores", str(tmp_path / "no-scores-here"), "--p", "0.1",
                 "--out", str(tmp_path / "file" / "out")])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and "is a file, not a folder" in err  # before reading the scores


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="not writable"):
            check_new_dir(folder / "out")
    finally:
        folder.chmod(0o755)


def test_out_as_a_symlink_to_an_empty_folder_writes_into_the_folder(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with atomic_dir(link) as tmp:
        (tmp / "report.md").write_text("done")
    assert link.is_symlink() and (target / "report.md").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_out_as_the_current_empty_folder_fills_it(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with atomic_dir(".") as tmp:
        (tmp / "report.md").write_text("done")
    assert (here / "report.md").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_leaves_nothing_the_next_run_does_not_clean(tmp_path, sig):
    out = tmp_path / "out"
    proc, claimed, _ = writer(tmp_path, out, "killed", phase="inside")
    wait_for(Path(str(claimed) + ".inside"), proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert f".out.partial-{proc.pid}" in leftovers  # what a killed process cannot clean itself
    with atomic_dir(out) as tmp:  # the lock died with the process; the partial goes with the next claim
        (tmp / "who").write_text("next")
    assert (out / "who").read_text() == "next"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_claim_cleans_partials_of_dead_runs_in_the_same_folder(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".other.partial-{int(dead.stdout)}"
    (stale / "scores").mkdir(parents=True)
    live = tmp_path / f".mine.partial-{os.getppid()}"  # a live process's: kept
    live.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists() and live.exists()


def make_scores(directory, arch="llama", seed=0):
    model, tok = build(arch, seed)
    targets = find_targets(model, "key")
    comps = decompose_targets(model, targets)
    scores = score(model, targets, comps, encode(tok, EXAMPLES), tok.pad_token_id, ScoreConfig(partners=2),
                   progress=False)
    meta = {"model": f"tiny-{arch}", "base_fingerprint": fingerprint(model)}
    return save_scores(directory, scores, targets, comps, meta)


@pytest.fixture(scope="module")
def arch_scores(tmp_path_factory):
    """Scores of each tiny architecture, made once per module (read-only for the tests)."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_scores(tmp_path_factory.mktemp(arch) / "scores", arch)
        return made[arch]

    return get


@pytest.fixture
def scores_dir(tmp_path):
    return make_scores(tmp_path / "scores")


@pytest.fixture
def edit_dir(scores_dir, tmp_path):
    run = load_scores(scores_dir)
    return save_edit(tmp_path / "edit", run.edit(FreezeConfig(p=0.3)), run.edit_meta())


# ---------------------------------------------------------------- silently wrong results: the base check
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def keys_negated(model):
    with torch.no_grad():
        for t in find_targets(model, "key"):
            weight_view(model.get_submodule(t.module_name)).neg_()
    return model


@pytest.mark.parametrize("made_in,used_in", [("float32", "bfloat16"), ("float32", "float16"),
                                             ("bfloat16", "float32"), ("float16", "bfloat16")])
def test_the_same_base_in_another_dtype_is_accepted(tmp_path, arch_scores, arch, made_in, used_in):
    model, _ = build(arch)
    edit = load_scores(arch_scores(arch)).edit(FreezeConfig(p=0.3))
    save_edit(tmp_path / "edit", edit, {"base_model": arch, "base_fingerprint": fingerprint(model.to(DTYPES[made_in]))})
    fresh, _ = build(arch)
    apply_saved_edit(fresh.to(DTYPES[used_in]), tmp_path / "edit")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("change", ["keys negated", "embeddings changed", "an mlp changed"])
def test_changed_base_weights_are_refused_in_every_dtype(tmp_path, edit_dir, dtype, change):
    model, _ = build("llama")
    with torch.no_grad():
        if change == "keys negated":
            keys_negated(model)
        elif change == "embeddings changed":
            emb = model.model.embed_tokens.weight
            emb.add_(0.05 * emb.std() * torch.randn(emb.shape, generator=torch.Generator().manual_seed(3)))
        else:
            model.model.layers[1].mlp.up_proj.weight.copy_(build("llama", seed=7)[0].model.layers[1].mlp.up_proj.weight)
    want = {"keys negated": "k_proj", "embeddings changed": "embed_tokens", "an mlp changed": "layers.1.mlp.up_proj"}
    with pytest.raises(UsageError, match="other base weights") as info:
        apply_saved_edit(model.to(DTYPES[dtype]), edit_dir)
    assert want[change] in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_tiny_change_is_refused_in_the_same_dtype(tmp_path, edit_dir):
    model, _ = build("llama")
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    with pytest.raises(UsageError, match="model.norm.weight differs"):
        apply_saved_edit(model, edit_dir)


def legacy_fingerprint(model, modules):
    """What eigenprune 0.1 recorded: sha256 of the targeted weights as float32, and their norms."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        w = weight_view(model.get_submodule(name)).detach().float().contiguous()
        digest.update(name.encode())
        digest.update(w.numpy().tobytes())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return {"sha256": digest.hexdigest(), "dtype": dtype,
            "norms": {m: float(weight_view(model.get_submodule(m)).detach().double().norm()) for m in modules}}


def test_edits_with_the_old_fingerprint_still_apply_where_that_is_safe(tmp_path, edit_dir):
    model, _ = build("llama")
    edit, meta = load_edit(edit_dir)
    meta["base_fingerprint"] = legacy_fingerprint(model, edit.modules)
    save_edit(tmp_path / "old", edit, meta)
    old = json.loads((tmp_path / "old" / "eigenprune_edit.json").read_text())
    (tmp_path / "old" / "eigenprune_edit.json").write_text(json.dumps({**old, "format_version": 1}))
    apply_saved_edit(build("llama")[0], tmp_path / "old")  # same weights, same dtype
    with pytest.raises(UsageError, match="older eigenprune.*--dtype float32"):
        apply_saved_edit(keys_negated(build("llama")[0]).to(torch.bfloat16), tmp_path / "old")
    with pytest.raises(UsageError, match="other base weights"):
        apply_saved_edit(keys_negated(build("llama")[0]), tmp_path / "old")


def test_an_edit_for_another_architecture_is_one_line(capsys, tmp_path, edit_dir, saved_gpt2_dir):
    gpt2, _ = build("gpt2")
    with pytest.raises(UsageError, match="another architecture"):
        apply_saved_edit(gpt2, edit_dir)
    edit, _ = load_edit(edit_dir)
    with pytest.raises(UsageError, match="another architecture"):
        apply_edit(gpt2, edit)  # the library call, without the fingerprint check
    assert not any("Frozen" in type(m).__name__ for m in gpt2.modules())
    code = main(["generate", "--edit", str(edit_dir), "--model", str(saved_gpt2_dir), "--prompt", "1 + 2 ="])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and "another architecture" in err


# ---------------------------------------------------------------- tracebacks: damaged files
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_json(directory, change):
    path = directory / "eigenprune_edit.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _scores_json(directory, change):
    path = directory / "score_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _mix(directory, legacy=False):
    """svd.safetensors from a scoring run of another model (with or without the run id of version 2)."""
    other = make_scores(directory.parent / "other", "llama", seed=3)
    if legacy:
        from safetensors.torch import load_file
        from safetensors.torch import save_file as plain_save

        plain_save(load_file(other / "svd.safetensors"), directory / "svd.safetensors")
        plain_save(load_file(other / "means.safetensors"), directory / "means.safetensors")
        return
    (directory / "svd.safetensors").write_bytes((other / "svd.safetensors").read_bytes())


def _legacy_mix_of_another_architecture(directory):
    from safetensors.torch import load_file
    from safetensors.torch import save_file as plain_save

    other = make_scores(directory.parent / "other", "gpt2")
    plain_save(load_file(other / "svd.safetensors"), directory / "svd.safetensors")


SCORE_FAULTS = {
    "truncated svd": (lambda d: _truncate(d / "svd.safetensors"), "truncated or corrupt"),
    "garbage scores": (lambda d: (d / "scores.safetensors").write_bytes(b"not a tensor file"), "truncated or corrupt"),
    "missing means": (lambda d: (d / "means.safetensors").unlink(), "means.safetensors is missing"),
    "no n_pairs": (lambda d: _scores_json(d, lambda m: {k: v for k, v in m.items() if k != "n_pairs"}),
                   "lacks 'n_pairs'"),
    "offset_min a string": (lambda d: _scores_json(d, lambda m: {**m, "offset_min": "-3"}),
                            "'offset_min' should be int"),
    "targets malformed": (lambda d: _scores_json(d, lambda m: {**m, "targets": [{"name": 1}]}),
                          "a target is malformed"),
    "not UTF-8 JSON": (lambda d: (d / "score_config.json").write_bytes(b'{"format": "\xff"}'), "not UTF-8"),
    "mixed runs": (_mix, "mixes files of different runs"),
    "mixed architectures, old files": (_legacy_mix_of_another_architecture, "files of different models or runs"),
}


@pytest.mark.parametrize("fault", sorted(SCORE_FAULTS))
def test_a_damaged_scores_folder_is_one_line(capsys, tmp_path, scores_dir, fault):
    damage, message = SCORE_FAULTS[fault]
    damage(scores_dir)
    code = main(["prune", "--scores", str(scores_dir), "--p", "0.1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "o").exists()


EDIT_FAULTS = {
    "truncated tensors": (lambda d: _truncate(d / "edit.safetensors"), "truncated or corrupt"),
    "missing tensors": (lambda d: (d / "edit.safetensors").unlink(), "edit.safetensors is missing"),
    "no offset_min": (lambda d: _edit_json(d, lambda m: {k: v for k, v in m.items() if k != "offset_min"}),
                      "lacks 'offset_min'"),
    "p out of range": (lambda d: _edit_json(d, lambda m: {**m, "freeze": {**m["freeze"], "p": 2}}),
                       "'freeze' is invalid"),
    "unknown freeze key": (lambda d: _edit_json(d, lambda m: {**m, "freeze": {**m["freeze"], "q": 1}}),
                           "'freeze' is invalid"),
    "fingerprint a list": (lambda d: _edit_json(d, lambda m: {**m, "base_fingerprint": []}),
                           "'base_fingerprint' should be dict"),
    "fingerprint entry damaged": (lambda d: _edit_json(d, lambda m: {**m, "base_fingerprint": {
        **m["base_fingerprint"], "tensors": {"model.norm.weight": {"shape": [32]}}}}), "fingerprint is malformed"),
    "targets not a list": (lambda d: _edit_json(d, lambda m: {**m, "targets": "key"}), "'targets' should be list"),
    "not JSON": (lambda d: (d / "eigenprune_edit.json").write_text("{"), "not valid JSON"),
}


@pytest.mark.parametrize("fault", sorted(EDIT_FAULTS))
def test_a_damaged_edit_is_one_line(capsys, tmp_path, edit_dir, saved_model_dir, fault):
    damage, message = EDIT_FAULTS[fault]
    damage(edit_dir)
    code = main(["export", "--edit", str(edit_dir), "--merge", "--model", str(saved_model_dir),
                 "--out", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and message in err, err
    assert not (tmp_path / "merged").exists()


def test_an_edit_file_from_another_edit_is_refused(tmp_path, scores_dir):
    run = load_scores(scores_dir)
    a = save_edit(tmp_path / "a", run.edit(FreezeConfig(p=0.3)), run.edit_meta())
    b = save_edit(tmp_path / "b", run.edit(FreezeConfig(p=0.1)), run.edit_meta())
    (a / "edit.safetensors").write_bytes((b / "edit.safetensors").read_bytes())
    with pytest.raises(UsageError, match="mixes files of different runs"):
        load_edit(a)


# ---------------------------------------------------------------- tracebacks: text files
def latin1_jsonl(path):
    path.write_bytes('{"prompt": "1 + 1 =", "answer": " 2"}\n{"prompt": "café =", "answer": " 2"}\n'.encode("latin-1"))
    return path


@pytest.mark.parametrize("flag", ["--data", "--task"])
def test_a_jsonl_file_that_is_not_utf8_is_one_line(capsys, tmp_path, saved_model_dir, flag):
    data = latin1_jsonl(tmp_path / "latin1.jsonl")
    code = main(["score", "--model", str(saved_model_dir), flag, str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and "latin1.jsonl:2: not UTF-8 text (byte 0xe9" in err


def test_a_jsonl_file_with_a_byte_order_mark_reads(tmp_path):
    from eigenprune.core.batching import load_prompt_answer_jsonl

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "1 + 1 =", "answer": " 2"}\n')
    assert load_prompt_answer_jsonl(path)[0].answer == " 2"


def test_a_jsonl_file_that_is_not_utf8_is_one_line_per_worker_under_torchrun(tmp_path, saved_model_dir):
    data = latin1_jsonl(tmp_path / "latin1.jsonl")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "eigenprune",
                           "score", "--model", str(saved_model_dir), "--data", str(data), "--quiet",
                           "--out", str(tmp_path / "o")], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("eigenprune score: error:")]
    assert lines and all("latin1.jsonl:2: not UTF-8 text" in line for line in lines)
    assert "UnicodeDecodeError" not in proc.stderr  # the launcher's own ChildFailedError report is torchrun's
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- tracebacks: generate
GENERATE_FAULTS = {
    "prompt past the context": (["--prompt", "1 + 2 = 3. " * 200], "tokens long but the model takes at most 256"),
    "new tokens past the context": (["--prompt", "1 + 2 =", "--max-new-tokens", "300"], "use at most"),
    "empty prompt": (["--prompt", ""], "--prompt is empty"),
    "negative count": (["--prompt", "1 + 2 =", "--max-new-tokens", "-1"], "at least 1, got -1"),
    "zero count": (["--prompt", "1 + 2 =", "--max-new-tokens", "0"], "at least 1, got 0"),
}


@pytest.mark.parametrize("fault", sorted(GENERATE_FAULTS))
def test_generate_refuses_what_cannot_be_generated_in_one_line(capsys, saved_gpt2_dir, fault):
    argv, message = GENERATE_FAULTS[fault]
    code = main(["generate", "--model", str(saved_gpt2_dir), *argv])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err) and message in err, err


def test_generate_fills_the_context_exactly(capsys, saved_gpt2_dir):
    from transformers import AutoTokenizer

    prompt = "1 + 2 = 3. " * 30
    room = 256 - len(AutoTokenizer.from_pretrained(saved_gpt2_dir)(prompt)["input_ids"])
    assert 0 < room < 30
    code = main(["generate", "--model", str(saved_gpt2_dir), "--prompt", prompt, "--max-new-tokens", str(room)])
    assert code == 0, capsys.readouterr().err


# ---------------------------------------------------------------- tracebacks: export of a GGUF-loaded model
def write_tiny_gguf(path):
    """The tiny Llama as a GGUF file (float32 tensors, no tokenizer), as the demo model comes."""
    from helpers import write_llama_gguf

    return write_llama_gguf(path)


@pytest.mark.parametrize("bias", ["none", "constant"])
def test_export_merges_an_edit_of_a_gguf_loaded_model(tmp_path, bias):
    from transformers import AutoModelForCausalLM

    from eigenprune.core.batching import collate
    from eigenprune.edits.export import export_merged
    from eigenprune.edits.freeze import make_edit

    tok = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    targets = find_targets(model, "all")
    comps = decompose_targets(model, targets)
    encoded = encode(tok, EXAMPLES)
    scores = score(model, targets, comps, encoded, tok.pad_token_id, ScoreConfig(partners=2), progress=False)
    apply_edit(model, make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.3, bias=bias)))
    batch = collate(encoded, range(len(encoded)), tok.pad_token_id)
    with torch.no_grad():
        want = model(**batch.model_inputs()).logits
    export_merged(model, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        got = plain(**batch.model_inputs()).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
