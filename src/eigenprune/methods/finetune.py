"""`finetune`: every parameter fine-tuned with the authors' released recipe, a learned stage (`finetune+X`).

The training itself, its settings and its saved form live in `methods.training`, which the released
recipe (`released_recipe.py`) shares.
"""

from __future__ import annotations

from eigenprune.methods.base import MethodResult
from eigenprune.methods.registry import Context, register, resolve
from eigenprune.methods.training import FinetuneConfig, finetune_stage
from eigenprune.protocol.harness import Harness


@register("finetune", FinetuneConfig, stage=finetune_stage,
          summary="every parameter fine-tuned on train with the released recipe (Adam, lr 0.01, batch 1, 1 epoch, "
                  "seed 42); nothing chosen on dev")
def finetune(harness: Harness, config: FinetuneConfig, ctx: Context) -> MethodResult:
    return ctx.stage(harness, resolve("finetune").method, config.as_finetune())[0].result
