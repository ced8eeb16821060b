"""Shared test data: a few prompt/answer examples with varied prompt and answer lengths, a tiny model whose
edits change its answers, and a two-choice task file."""

import json

import torch
from conftest import build

from eigenprune.core.batching import Example

SCALE = 5.0  # random init leaves the blocks too weak to move a tiny model's choices; scaled, edits matter

EXAMPLES = [
    Example("3 + 4 =", " 7"),
    Example("12 + 30 =", " 42"),
    Example("The premise entails", " the cat sat"),
    Example("Alternative 1: the mat. Alternative 2:", " 1"),
    Example("9 x 9 =", " 81"),
    Example("What was the cause of this?", " is neutral"),
]


def sensitive(arch: str = "gpt2"):
    """A tiny model whose block weights are scaled up, so that cutting components changes its answers."""
    model, tok = build(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(k in name for k in ("attn", "mlp")):
                param.mul_(SCALE)
    return model, tok


def write_task(path):
    """A two-choice sum task: the right sum or a near miss, in a seeded order."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for a in range(12):
        for b in range(6):
            wrong = a + b + int(torch.tensor([-2, -1, 1, 2])[torch.randint(4, (1,), generator=g)])
            label = int(torch.randint(2, (1,), generator=g))
            choices = [f" {a + b}", f" {wrong}"] if label == 0 else [f" {wrong}", f" {a + b}"]
            rows.append({"prompt": f"{a} + {b} =", "choices": choices, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def without_timings(report: dict) -> dict:
    """A report without what differs between two runs of the same experiment: wall times and the machine."""
    import copy

    report = copy.deepcopy({k: v for k, v in report.items() if k not in ("timings", "machine", "out")})
    for model in (report.get("side_effects") or {}).get("models", {}).values():
        model.pop("wall_s", None)
    return report


def run_report(model_and_task, out, *argv) -> dict:
    """`eigenprune run --model M --task T ARGV --out OUT` (must exit 0); its report.json."""
    import json

    from eigenprune.cli import main

    model, task = model_and_task
    assert main(["run", "--model", str(model), "--task", str(task), *map(str, argv), "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def write_llama_gguf(path, with_tokenizer: bool = False):
    """conftest's tiny Llama as a GGUF file (float32 tensors), as the demo model comes; `with_tokenizer` adds its
    byte-level BPE tokenizer ('gpt2' in GGUF terms). Returns the tokenizer."""
    import gguf
    from conftest import build

    model, tok = build("llama")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    if with_tokenizer:
        bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
        tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
        writer.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])  # 3: control, 1: normal
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    names |= {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight"
              for i in range(c.num_hidden_layers) for hf, gg in parts.items()}
    for name, tensor in model.state_dict().items():
        writer.add_tensor(names[name], tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tok
