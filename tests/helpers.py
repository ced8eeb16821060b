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
