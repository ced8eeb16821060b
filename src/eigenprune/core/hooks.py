"""Capture the inputs and output gradients of chosen modules, with hooks that never outlive a context.

Scoring needs, for each target module, its true input x (after the norm) and the loss gradient g at
its output. Both are captured here; `activation_grads_only` makes the backward pass compute
activation gradients without weight gradients (about half the cost of a full backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class Captured:
    """What one forward/backward left behind: inputs and output grads per module name."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}  # (batch, pos, d_in)
        self.grads: dict[str, torch.Tensor] = {}  # (batch, pos, d_out)

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()


@contextlib.contextmanager
def capture_io(model: nn.Module, module_names: Iterable[str], grads: bool = True) -> Iterator[Captured]:
    """Within the context, every forward stores each named module's input (and, after backward,
    the gradient at its output) in the yielded `Captured`. Hooks are removed on exit."""
    captured = Captured()
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            captured.inputs[name] = args[0].detach()
            if grads and output.requires_grad:
                output.register_hook(lambda g: captured.grads.__setitem__(name, g.detach()))

        return hook

    try:
        for name in module_names:
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def activation_grads_only(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter but let gradients flow from the input embeddings onwards."""
    was = {name: p.requires_grad for name, p in model.named_parameters()}
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(was[name])
