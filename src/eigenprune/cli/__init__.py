"""The `eigenprune` command: argparse subcommands, each with examples in its epilog.

`main(argv)` returns an exit code and is what the tests call. Anything the user can fix ends in one
line on stderr and exit code 2 (`UsageError`, or a config field that fails validation). This module and
the parsers it builds (`run.py`, `compare.py`, `study.py`, `common.py`) import no torch: arguments,
settings, task names and `--out` are checked first, and each command imports its work when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eigenprune.cli.common import FMT, Parser, add_common, cap_threads, check_out, check_task, from_flags
from eigenprune.core import settings, signals
from eigenprune.core.errors import UsageError
from eigenprune.edits.config import FreezeConfig, ScoreConfig
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

    return load_model(args.model, args.dtype, args.device, args.trust_remote_code, args.device_map,
                      progress=not getattr(args, "quiet", False))


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
    import os

    config = from_flags(ScoreConfig, args)
    check_task(args.task)
    if args.data and not os.path.isfile(args.data):
        raise UsageError(f"data file not found: {args.data}")
    from eigenprune.edits.artifact import check_new_dir, save_scores
    from eigenprune.edits.engine import score_run

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
    if args.p is None:
        raise UsageError("prune needs --p, the fraction of components to freeze (e.g. --p 0.05)")
    config = from_flags(FreezeConfig, args)
    check_out(args.out)
    from eigenprune.edits.artifact import check_new_dir, load_scores, save_edit

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
    if args.format == "peft":  # the edit as a LoRA adapter (edits/peft_export.py)
        if args.merge:
            raise UsageError("--merge and --format peft exclude each other (an adapter is the unmerged form)")
        check_out(args.out)
        from eigenprune.edits.artifact import check_new_dir
        from eigenprune.edits.peft_export import export_peft, require_peft

        require_peft()
        check_new_dir(args.out)
        model, _ = _load_with_edit(args)  # sets args.model to the edit's base when not given
        print(export_peft(model, args.out, args.model).summary())
        return 0
    if not args.merge:
        raise UsageError("export writes a plain Hugging Face model and needs --merge (the edit folder itself "
                         "is the unmerged form)")
    check_out(args.out)
    from eigenprune.edits.artifact import check_new_dir
    from eigenprune.edits.export import export_merged

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


def _greedy(model, tok, inputs, max_new_tokens: int) -> str:
    import torch

    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def side_by_side(prompt: str, texts: dict[str, str]) -> str:
    """The prompt, then each model's continuation under its name, names aligned."""
    width = max(len(name) for name in texts)
    lines = [f"{'prompt':<{width}}  {prompt!r}"]
    lines += [f"{name:<{width}}  {text!r}" for name, text in texts.items()]
    return "\n".join(lines)


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise UsageError("--prompt is empty; give some text to continue")
    if args.compare and not args.edit:
        raise UsageError("--compare shows the base model beside an edit; give the edit with --edit")
    if args.edit:
        model, tok = _load_with_edit(args)
    else:
        args.model = args.model or DEFAULT_MODEL
        args.dtype = args.dtype or "float32"
        model, tok = _load(args)
    inputs = tok(args.prompt, return_tensors="pt").to(args.device)
    _check_generation_fits(model, inputs["input_ids"].shape[1], args.max_new_tokens)
    edited = _greedy(model, tok, inputs, args.max_new_tokens)
    if not args.compare:
        print(edited)
        return 0
    from eigenprune.edits.freeze import remove_edit

    remove_edit(model)  # the original layers back: the base model, loaded once
    base = _greedy(model, tok, inputs, args.max_new_tokens)
    print(side_by_side(args.prompt, {"base": base, f"edit ({args.edit})": edited}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = FMT
    parser = Parser(prog="eigenprune", formatter_class=fmt, description=(
        "Remove singular components of a causal LM's weights to help one task, and measure it honestly."),
        epilog="start with `eigenprune run --help`; `make demo` runs SmolLM2-135M on int-mult and CB")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")

    # the experiments first: what most people run
    from eigenprune.cli.compare import add_compare_parser
    from eigenprune.cli.run import add_run_parser
    from eigenprune.cli.study import add_study_parser

    add_run_parser(sub, fmt)
    add_compare_parser(sub, fmt)
    add_study_parser(sub, fmt)
    from eigenprune.cli.lm_eval import add_lm_eval_parser

    add_lm_eval_parser(sub, fmt)
    from eigenprune.cli.track import add_track_parser

    add_track_parser(sub, fmt)

    p = sub.add_parser("targets", help="list the weight matrices a selection matches", formatter_class=fmt,
                       description="List the weight matrices --targets and --layers select: name, shape, components.",
                       epilog="examples:\n  eigenprune targets --model smollm2-135m --targets key\n"
                              "  eigenprune targets --model gpt2 --targets 'c_attn:v' --layers 6- --per-head")
    _model_args(p)
    _target_args(p)
    add_common(p, quiet=False)
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("score", help="score every singular component on a task's train split",
                       description="SVD the targets and score every component by attribution patching; `prune` "
                                   "then makes an edit at any p without rescoring.",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune score --model smollm2-135m --task int-mult --out runs/scores\n"
                           "  eigenprune score --model ./my-model --data train.jsonl --partners all --out s\n"
                           "  torchrun --nproc_per_node 2 -m eigenprune score --task cb --out s"))
    _model_args(p)
    _target_args(p)
    _data_args(p)
    settings.add_flags(p, ScoreConfig, rename=SCORE_FLAGS, aliases={"seed": ("--seed",)})  # as `run` spells them
    p.add_argument("--out", required=True, help="directory to write (must not exist)")
    add_common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("prune", help="freeze the lowest fraction p of scored components into an edit",
                       description="Make an edit from saved scores: freeze the lowest-scoring fraction p of "
                                   "components (no model is loaded).",
                       formatter_class=fmt, epilog=(
                           "examples:\n  eigenprune prune --scores runs/scores --p 0.05 --out runs/edit\n"
                           "  eigenprune prune --scores runs/scores --p 0.1 --scope per-target --bias constant "
                           "--out e"))
    p.add_argument("--scores", required=True, help="directory written by `eigenprune score`")
    settings.add_flags(p, FreezeConfig)  # --p (required), --scope, --aggregate, --bias, as `run` spells them
    p.add_argument("--out", required=True, help="edit directory to write (must not exist)")
    add_common(p, quiet=False)
    p.set_defaults(func=cmd_prune)

    for name in ("export", "generate"):
        if name == "export":
            p = sub.add_parser(name, help="write the edit merged into a Hugging Face model, or as a LoRA adapter",
                               formatter_class=fmt,
                               description="Fold a saved edit into the base model's weights and save the result as "
                                           "a model folder that loads in plain transformers.",
                               epilog="examples:\n  eigenprune export --edit runs/mult/edit --merge --out merged-model")
        else:
            p = sub.add_parser(name, help="greedy-generate from a prompt, with or without an edit", formatter_class=fmt,
                               description="Greedy continuation of a prompt by the base model or an edited one; "
                                           "--compare prints both.",
                               epilog="examples:\n  eigenprune generate --edit runs/mult/edit --prompt '7 x 8 =' "
                                      "--compare\n  eigenprune generate --prompt 'The capital of France is'")
        p.add_argument("--edit", required=name == "export", help="edit directory (written by `prune`, or a run's "
                                                                  "edit/ folder)")
        p.add_argument("--model", default=None, help="base model (default: the one the edit records, else "
                                                     f"{DEFAULT_MODEL})")
        p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the dtype the edit "
                                                     "was made in)")
        p.add_argument("--device", default="cpu", help="torch device to load the model on, e.g. cpu or cuda "
                                                       "(default cpu)")
        p.add_argument("--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)")
        p.add_argument("--trust-remote-code", action="store_true", help="allow a model's own Python code")
        if name == "export":
            p.add_argument("--merge", action="store_true",
                           help="fold the edit into the weights (needed for --format merged): works for every "
                                "edit `prune`, `run` and `compare` save (eigenprune and its controls, LASER, SVD "
                                "clipping, feature space), each a weight change plus, for eigenprune, a bias; LoRA and "
                                "fine-tune results are saved as full weights already")
            p.add_argument("--format", choices=("merged", "peft"), default="merged",
                           help="merged: a Hugging Face model (with --merge); peft: a LoRA adapter of the edit, "
                                "for --bias none or constant edits (default: merged)")
            p.add_argument("--out", required=True, help="model folder to write (must not exist)")
            p.set_defaults(func=cmd_export)
        else:
            p.add_argument("--prompt", required=True, help="text to continue")
            p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
            p.add_argument("--compare", action="store_true",
                           help="with --edit: print the base model's continuation beside the edited one's")
            p.set_defaults(func=cmd_generate)
        add_common(p, quiet=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cap_threads(args.threads)
        return args.func(args)
    except UsageError as err:
        print(f"eigenprune {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM under the entry point's handler (core/signals.py)
        return signals.report(signals.signal_of(err))
