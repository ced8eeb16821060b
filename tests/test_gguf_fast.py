"""core/gguf_fast.py: the fast first load of a GGUF file changes the cost, never the result. On the tiny GGUF of
test_models (a Llama with a byte-level BPE vocabulary, half its matrices Q8_0): the reader's fields, the weights
(bit for bit, float32 and bfloat16), the tokenizer, the config; what it patches is restored; the saved model is
freed before its copy is loaded; a file it cannot read still ends in one line."""

import gc
import hashlib
import threading
import weakref

import gguf
import numpy as np
import pytest
import torch
import transformers.modeling_gguf_pytorch_utils as hf_gguf
from test_models import write_tiny_gguf
from transformers.integrations.ggml import _gguf_parse_value

from eigenprune.core import gguf_fast, models
from eigenprune.core.errors import UsageError
from eigenprune.core.models import CACHE_ENV, load_model

TEXTS = ["Premise: the cat sat on the mat. 12 + 34 =", "  héllo\tWORLD\n\n<s>x</s>", "", "0.5 * 7 = 3.5!?"]


@pytest.fixture
def tiny_gguf(tmp_path) -> str:
    return str(write_tiny_gguf(tmp_path / "tiny.gguf"))


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parsed(field) -> list:
    return [_gguf_parse_value(field.parts[i], field.types) for i in field.data]


def test_the_plain_reader_reads_the_same_fields(tiny_gguf):
    want, got = gguf.GGUFReader(tiny_gguf), gguf_fast._plain_reader_class(gguf.GGUFReader)(tiny_gguf)
    assert list(want.fields) == list(got.fields)
    kinds = set()
    for name, a in want.fields.items():
        b = got.fields[name]
        assert (a.offset, a.name, a.data, a.types) == (b.offset, b.name, b.data, b.types), name
        assert sum(int(p.nbytes) for p in a.parts) == sum(int(p.nbytes) for p in b.parts), name
        assert parsed(a) == parsed(b) and a.contents() == b.contents(), name
        kinds.add(tuple(int(t) for t in a.types))
    string_array, int_array = (9, 8), (9, 5)  # tokens and merges; token types (int32)
    assert string_array in kinds and int_array in kinds  # the two fast paths ran
    assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in want.tensors] == \
        [(t.name, t.tensor_type, t.data_offset, t.n_bytes) for t in got.tensors]


def test_dequantizing_gives_the_pages_back_and_the_same_floats(tiny_gguf):
    reader = gguf_fast._plain_reader_class(gguf.GGUFReader)(tiny_gguf)
    dequantize = gguf_fast._dequantizer(reader)
    for tensor in reader.tensors:
        want = gguf.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(dequantize(tensor.data, tensor.tensor_type), want)
        assert np.array_equal(gguf.dequantize(tensor.data, tensor.tensor_type), want)  # pages read again: same


def load(path: str, monkeypatch, fast: bool, dtype: str = "float32"):
    monkeypatch.setenv(CACHE_ENV, "off")
    monkeypatch.setattr(models, "FAST_GGUF", fast)
    return load_model(path, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fast_first_load_gives_the_plain_loads_model_and_tokenizer(tiny_gguf, monkeypatch, dtype):
    """One parse, one name table, threaded de-quantizing and processing: the same weights bit for bit, the same
    config and tokenizer; gguf's and transformers' functions restored, the threads stopped, gc as it was."""
    before = (gguf.GGUFReader, gguf.dequantize, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint)
    plain, plain_tok = load(tiny_gguf, monkeypatch, fast=False, dtype=dtype)
    parses = []
    real_build = gguf.GGUFReader._build_fields
    monkeypatch.setattr(gguf.GGUFReader, "_build_fields", lambda self, *a: parses.append(1) or real_build(self, *a))
    fast, fast_tok = load(tiny_gguf, monkeypatch, fast=True, dtype=dtype)
    assert len(parses) == 1  # config, tokenizer and weights share one reader
    assert (gguf.GGUFReader, gguf.dequantize, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint) == before
    assert not [t for t in threading.enumerate() if t.name.startswith("dequantize")] and gc.isenabled()
    assert weights_sha256(fast) == weights_sha256(plain) and next(fast.parameters()).dtype == models.DTYPES[dtype]
    assert fast.config.to_dict() == plain.config.to_dict()
    assert fast_tok.get_vocab() == plain_tok.get_vocab()
    assert [fast_tok(t)["input_ids"] for t in TEXTS] == [plain_tok(t)["input_ids"] for t in TEXTS]
    assert fast_tok.all_special_ids == plain_tok.all_special_ids


def test_fresh_arrays_are_not_copied(tiny_gguf, monkeypatch):
    """transformers' loop copies every de-quantized array; here only the file's own float32 tensors (views of the
    file, which must not stay mapped) are copied."""
    copies = []
    real_copy = np.copy
    monkeypatch.setattr(np, "copy", lambda a, *args, **kw: copies.append(a.shape) or real_copy(a, *args, **kw))
    load(tiny_gguf, monkeypatch, fast=True)
    unquantized = [tuple(int(d) for d in reversed(t.shape)) for t in gguf.GGUFReader(tiny_gguf).tensors
                   if t.tensor_type == gguf.GGMLQuantizationType.F32]
    assert sorted(copies) == sorted(unquantized)


def test_gc_paused_restores_the_collector_as_it_was():
    with gguf_fast.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gguf_fast.gc_paused():
            pass
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()


def test_the_saved_model_is_freed_before_its_copy_is_loaded(tiny_gguf, tmp_path, monkeypatch):
    """SmolLM2's first model ends in a reference cycle (a frame of its load refers to it); with the collector
    paused it would stay alive beside the copy loaded from the cache (1x the model's size more at the peak)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    first: list = []
    fill, from_pretrained_real = models._fill, models._from_pretrained

    def fill_and_watch(entry, model, tokenizer, about):
        first.append(weakref.ref(model))
        object.__setattr__(model, "_cycle", [model])  # as SmolLM2's load leaves it (a frame of its own load)
        return fill(entry, model, tokenizer, about)

    def from_pretrained(spec, source, *args, **kwargs):
        if first:  # the second load, from the cache entry
            assert first[0]() is None, "the first model is still alive"
        return from_pretrained_real(spec, source, *args, **kwargs)

    monkeypatch.setattr(models, "_fill", fill_and_watch)
    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    load_model(tiny_gguf)
    assert first


@pytest.mark.parametrize("fast", [True, False])
def test_a_file_that_is_not_gguf_ends_in_one_line(tmp_path, monkeypatch, fast):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(UsageError, match="cannot load model"):
        load(str(path), monkeypatch, fast=fast)
