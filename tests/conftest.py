"""Tiny random models and tokenizers built in code: GPT-2 (Conv1D, fused c_attn), Llama (nn.Linear,
grouped-query attention) and Phi (q/k/v with biases). Nothing is downloaded."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "Premise: the cat sat on the mat. Hypothesis: a cat sat. Does the premise entail, contradict or is",
    "neutral to the hypothesis? Answer (entails, contradicts, is neutral): The premise entails contradicts",
    "Alternative 1: Alternative 2: What is the correct alternative? The correct alternative is alternative",
    "What was the cause of this? What happened as a result? 0 1 2 3 4 5 6 7 8 9 + x = 12 34 56 78 90",
] * 20
VOCAB = 320


def make_tokenizer(style: str = "gpt2") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer; 'llama' style adds BOS and splits numbers into single digits."""
    tok = Tokenizer(models.BPE())
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
    if style == "llama":
        pre = [pre_tokenizers.Digits(individual_digits=True), *pre]
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if style == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.pad_token = fast.eos_token
    return fast


def tiny_gpt2(seed: int = 0, n_head: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=n_head, vocab_size=VOCAB, n_positions=256,
                     bos_token_id=0, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def tiny_phi(seed: int = 0) -> PhiForCausalLM:
    torch.manual_seed(seed)
    cfg = PhiConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                    vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                    pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    return PhiForCausalLM(cfg).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "phi": tiny_phi}


def _randomize_biases(model: torch.nn.Module, seed: int = 1) -> None:
    """Random init leaves biases at zero; non-zero biases make the tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


def build(arch: str, seed: int = 0):
    model = BUILDERS[arch](seed)
    _randomize_biases(model, seed + 1)
    return model, make_tokenizer("llama" if arch == "llama" else "gpt2")


@pytest.fixture
def model_and_tokenizer(arch):
    return build(arch)


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a local Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = build("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def saved_gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    model, tok = build("gpt2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sums_setup(tmp_path_factory):
    """A saved tiny model whose edits do change answers (`helpers.sensitive`) and a two-choice sums task:
    (model folder, task JSONL). Read-only: a test that changes either makes its own copy."""
    from helpers import sensitive, write_task

    folder = tmp_path_factory.mktemp("sums")
    model, tok = sensitive()
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model", write_task(folder / "sums.jsonl")


@pytest.fixture(autouse=True)
def _no_work_shared_between_tests():
    """Each test starts as a fresh process would: no SVD, base evaluation or base side-effect pass remembered
    from another test (a test that wraps an evaluation must see it made)."""
    from eigenprune.edits import decompose
    from eigenprune.evaluation import base_cache, base_memo

    decompose.SHARED.clear()
    base_memo.SHARED.clear()
    base_cache._MEMORY.clear()
    base_cache._LINEAR_MEMORY.clear()
    yield


@pytest.fixture(autouse=True, scope="session")
def _cache_in_a_temporary_folder(tmp_path_factory):
    """De-quantized models and base side-effect passes go to a temporary folder, never the user's cache
    (tests that need another place set $EIGENPRUNE_CACHE themselves)."""
    import os

    before = os.environ.get("EIGENPRUNE_CACHE")
    os.environ["EIGENPRUNE_CACHE"] = str(tmp_path_factory.mktemp("eigenprune-cache"))
    yield
    if before is None:
        os.environ.pop("EIGENPRUNE_CACHE", None)
    else:
        os.environ["EIGENPRUNE_CACHE"] = before
