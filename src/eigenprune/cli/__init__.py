"""The `eigenprune` command: argparse subcommands, each with examples in its epilog.

`main(argv)` returns an exit code and is what the tests call. Anything the user can fix ends in one
line on stderr and exit code 2 (`UsageError`, or a config field that fails validation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eigenprune.core import settings, signals
from eigenprune.core.errors import UsageError
from eigenprune.edits.freeze import FreezeConfig
from eigenprune.edits.scoring import ScoreConfig
from eigenprune.protocol.config import SCORE_FLAGS

DEFAULT_MODEL = "smollm2-135m"


def _model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", default=None if required else DEFAULT_MODEL, required=required,
                   help=f"Hugging Face id or folder, a .gguf file, or '{DEFAULT_MODEL}' (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default="key",
                   help="preset (key, query, value, attn-out, mlp-in, mlp-out, all) or a regex on module "
                        "names; fused slices are NAME:q|k|v (default: key)")
    p.add_argument("--layers", default=None, help="restrict to layers: N, A-B, A- or -B")
    p.add_argument("--per-head", action="store_true", help="one component set per attention head")


def _data_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="built-in task (int-sum, int-mult, cb, copa, rte) or a task JSONL file")
    src.add_argument("--data", help='JSONL file of {"prompt": ..., "answer": ...} lines, all used for scoring')
    p.add_argument("--dev-fraction", type=float, default=0.2, help="dev share carved from train (default 0.2)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the dev split (default 0)")
    p.add_argument("--limit", type=int, default=None, help="cap each split at N examples (seeded)")


def _load(args):
    from eigenprune.core.models import load_model

    return load_model(args.model, args.dtype, args.device, args.trust_remote_code, args.device_map)


def _scoring_examples(args):
    if args.limit is not None and args.limit < 2:  # the rule every command applies (RunConfig.limit)
        raise UsageError(f"limit must be at least 2, got {args.limit}")
    from eigenprune.core.batching import load_prompt_answer_jsonl

    if args.data:
        examples = load_prompt_answer_jsonl(args.data)
        return examples[: args.limit] if args.limit else examples, {"data": args.data}
    from eigenprune.evaluation.splits import split_task
    from eigenprune.evaluation.tasks import load_task

    splits = split_task(load_task(args.task), args.dev_fraction, args.split_seed, args.limit)
    return splits.train, {"data": args.task, "split_seed": args.split_seed, "dev_fraction": args.dev_fraction}


def cmd_targets(args) -> int:
    from eigenprune.edits.targets import describe, find_targets

    model, _ = _load(args)
    print(describe(find_targets(model, args.targets, args.layers, args.per_head)))
    return 0


def _start_distributed(args) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, NCCL on GPU); returns the rank."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    if not dist.is_initialized():
        cuda = args.device.startswith("cuda")
        if cuda:
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def cmd_score(args) -> int:
    from eigenprune.edits.artifact import check_new_dir, save_scores
    from eigenprune.edits.engine import score_run

    config = _from_flags(ScoreConfig, args)
    import os

    check_new_dir(args.out, claim=os.environ.get("RANK", "0") == "0")  # before the long work; rank 0 writes
    examples, meta = _scoring_examples(args)
    rank = _start_distributed(args)
    model, tok = _load(args)
    run = score_run(model, tok, examples, args.targets, args.layers, args.per_head, config,
                    progress=not args.quiet, meta={"model": args.model, "dtype": args.dtype, **meta})
    if rank != 0:
        return 0
    save_scores(args.out, run.scores, run.targets, run.components, run.meta)
    n = sum(t.n_components for t in run.targets)
    print(f"scored {n} components in {len(run.targets)} targets on {len(examples)} examples "
          f"({run.scores.n_pairs} pairs) -> {args.out}/scores.safetensors")
    return 0


def cmd_prune(args) -> int:
    from eigenprune.edits.artifact import check_new_dir, load_scores, save_edit

    if args.p is None:
        raise UsageError("prune needs --p, the fraction of components to freeze (e.g. --p 0.05)")
    config = _from_flags(FreezeConfig, args)
    check_new_dir(args.out)
    run = load_scores(args.scores)
    edit = run.edit(config)
    save_edit(args.out, edit, run.edit_meta())
    total = sum(t.n_components for t in edit.targets)
    print(f"froze {edit.n_frozen} of {total} components (p={config.p}, {config.scope}, {config.aggregate}, "
          f"{config.bias} bias) -> {args.out}")
    return 0


def _load_with_edit(args):
    from eigenprune.edits.artifact import apply_saved_edit, load_edit

    _, meta = load_edit(args.edit)
    args.model = args.model or meta["base_model"]
    args.dtype = args.dtype or meta["base_fingerprint"]["dtype"]
    model, tok = _load(args)
    apply_saved_edit(model, args.edit)
    return model, tok


def cmd_export(args) -> int:
    from eigenprune.edits.export import export_merged

    if not args.merge:
        raise UsageError("export writes a plain Hugging Face model and needs --merge (the edit folder itself "
                         "is the unmerged form)")
    from eigenprune.edits.artifact import check_new_dir

    check_new_dir(args.out)
    model, tok = _load_with_edit(args)
    export_merged(model, tok, args.out)
    print(f"merged model -> {args.out} (loads with AutoModelForCausalLM.from_pretrained)")
    return 0


def _check_generation_fits(model, n_prompt: int, max_new_tokens: int) -> None:
    """A prompt plus the new tokens must fit the model's context (past it, positions index out of range)."""
    if n_prompt == 0:
        raise UsageError("--prompt tokenizes to nothing; give some text to continue")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and n_prompt >= limit:
        raise UsageError(f"the prompt is {n_prompt} tokens long but the model takes at most {limit}; shorten it")
    if limit and n_prompt + max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {max_new_tokens} after a {n_prompt}-token prompt passes the model's "
                         f"context of {limit} tokens; use at most {limit - n_prompt}")


def cmd_generate(args) -> int:
    import torch

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise UsageError("--prompt is empty; give some text to continue")
    if args.edit:
        model, tok = _load_with_edit(args)
    else:
        args.model = args.model or DEFAULT_MODEL
        args.dtype = args.dtype or "float32"
        model, tok = _load(args)
    inputs = tok(args.prompt, return_tensors="pt").to(args.device)
    _check_generation_fits(model, inputs["input_ids"].shape[1], args.max_new_tokens)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def _from_flags(cls, args):
    """A config from the flags `settings.add_flags` made for it; a bad value is one line."""
    try:
        return settings.from_dict(cls, settings.flag_values(args, cls))
    except ValueError as err:
        raise UsageError(str(err)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit 2), like every other usage error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="eigenprune", formatter_class=fmt, description=(
        "Remove singular components of a causal LM's weights to help one task, and measure it honestly."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("targets", help="list the weight matrices a selection matches", formatter_class=fmt,
                       epilog="examples:\n  eigenprune targets --model smollm2-135m --targets key\n"
                              "  eigenprune targets --model gpt2 --targets 'c_attn:v' --layers 6- --per-head")
    _model_args(p)
    _target_args(p)
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("score", help="score every singular component on a task's train split",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune score --model smollm2-135m --task int-mult --out runs/scores\n"
                           "  eigenprune score --model ./my-model --data train.jsonl --partners all --out s\n"
                           "  torchrun --nproc_per_node 2 -m eigenprune score --task cb --out s"))
    _model_args(p)
    _target_args(p)
    _data_args(p)
    settings.add_flags(p, ScoreConfig, rename=SCORE_FLAGS, aliases={"seed": ("--seed",)})  # as `run` spells them
    p.add_argument("--out", required=True, help="directory to write (must not exist)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="freeze the lowest fraction p of scored components into an edit",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune prune --scores runs/scores --p 0.05 --out runs/edit\n"
                           "  eigenprune prune --scores runs/scores --p 0.1 --scope per-target --bias constant "
                           "--out e"))
    p.add_argument("--scores", required=True, help="directory written by `eigenprune score`")
    settings.add_flags(p, FreezeConfig)  # --p (required), --scope, --aggregate, --bias, as `run` spells them
    p.add_argument("--out", required=True, help="edit directory to write (must not exist)")
    p.set_defaults(func=cmd_prune)

    for name, helptext, func in (("export", "write a plain Hugging Face model with the edit merged", cmd_export),
                                 ("generate", "greedy-generate from a prompt, with or without an edit",
                                  cmd_generate)):
        epilog = ("examples:\n  eigenprune export --edit runs/edit --merge --out merged-model"
                  if name == "export" else
                  "examples:\n  eigenprune generate --edit runs/edit --prompt '7 x 8 ='")
        p = sub.add_parser(name, help=helptext, formatter_class=fmt, epilog=epilog)
        p.add_argument("--edit", required=name == "export", help="edit directory written by `prune`")
        p.add_argument("--model", default=None, help="base model (default: the one the edit records)")
        p.add_argument("--dtype", default=None, help="default: the dtype the edit was made in")
        p.add_argument("--device", default="cpu")
        p.add_argument("--device-map", default=None)
        p.add_argument("--trust-remote-code", action="store_true")
        if name == "export":
            p.add_argument("--merge", action="store_true", help="fold the edit into the weights")
            p.add_argument("--out", required=True, help="model folder to write (must not exist)")
        else:
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=int, default=16)
        p.set_defaults(func=func)

    from eigenprune.experiments.compare import add_compare_parser  # `run` and `compare` live in their own modules
    from eigenprune.experiments.run import add_run_parser

    add_run_parser(sub, fmt)
    add_compare_parser(sub, fmt)
    from eigenprune.experiments.study import add_study_parser

    add_study_parser(sub, fmt)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"eigenprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM under the entry point's handler (core/signals.py)
        return signals.report(signals.signal_of(err))
