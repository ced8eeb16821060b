"""EleutherAI's lm-evaluation-harness on an in-memory (possibly edited) model, and eigenprune tasks as lm-eval tasks.

`evaluate_tasks` runs lm-eval's `simple_evaluate` through its `HFLM` wrapper around the model object itself, so
an edit that cannot be merged (a position-dependent bias) is evaluated as it is. lm-eval scores a choice by one
forward of context + continuation with no attention mask; an edited model must be told where each row's context
ends (`core.positions`), which `_EditAwareLM._model_call` does from the (context, continuation) pairs it was
handed. With that, lm-eval's `acc` on a task written by `write_task` equals eigenprune's `choice` accuracy
example by example (tests/test_lm_eval.py).

`write_task` writes an eigenprune classification task (cb, copa, rte, or a custom JSONL) as a local lm-eval task:
a JSONL of the prompts eigenprune renders and a YAML that reads it with the same choices (the continuation is the
choice itself: target_delimiter ""). Task names `eigenprune_<task>` are written on the fly by `evaluate_tasks`.
Everything here is offline: a task whose data lm-eval would download fails in one line naming it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from eigenprune.core.errors import UsageError
from eigenprune.core.positions import prompt_lengths, tracker_of
from eigenprune.evaluation.tasks import CLASSIFICATION, Task

PREFIX = "eigenprune_"  # lm-eval task names that eigenprune writes itself, e.g. eigenprune_cb


def require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails where the hf extra's parts are missing)
    except ImportError:
        raise UsageError("lm-eval is not installed: pip install 'eigenprune[lm-eval]'") from None
    return lm_eval


def write_task(task: Task, folder: str | Path, split: str = "test") -> str:
    """Write `task`'s `split` examples as the lm-eval task `eigenprune_<name>` in `folder`; returns its name."""
    if task.kind != CLASSIFICATION:
        raise UsageError(f"only classification tasks become lm-eval tasks here; {task.name} is a {task.kind} task")
    name = PREFIX + "".join(c if c.isalnum() else "_" for c in task.name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    rows = [{"prompt": ex.prompt, "choices": list(ex.choices), "label": ex.label} for ex in getattr(task, split)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            f"metadata:\n  version: 1.0\n  eigenprune_split: {split}\n")
    (folder / f"{name}.yaml").write_text(yaml)
    return name


def _edit_aware_lm(model: torch.nn.Module, tokenizer, batch_size: int, progress: bool = True):
    """lm-eval's HFLM around the model object; an edited model learns each row's context length."""
    from lm_eval.models.huggingface import HFLM

    class _EditAwareLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not progress)

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            # row input = (context + continuation)[-(max_length + 1):][:-1]; its context is all but the
            # continuation's last len - 1 tokens
            self._contexts = {}
            for _, context, continuation in requests:
                row = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                self._contexts.setdefault(row, set()).add(len(row) - len(continuation) + 1)
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                self._contexts = {}

        def _model_call(self, inps, attn_mask=None, labels=None):
            contexts = getattr(self, "_contexts", None)
            if not contexts or tracker_of(self.model) is None:
                return super()._model_call(inps, attn_mask, labels)
            return _with_context_lengths(self, inps, contexts, lambda: super(_EditAwareLM, self)._model_call(
                inps, attn_mask, labels))

    return _EditAwareLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(
        next(model.parameters()).device))


def _with_context_lengths(lm, inps: torch.Tensor, contexts: dict, call):
    """Run `call` with each right-padded row's context length set (rows are found by their tokens)."""
    lengths = []
    for row in inps.tolist():  # (width,) right-padded with zeros
        found: set[int] = set()
        end = len(row)
        while True:  # the row, then the row with each of its trailing zeros taken as padding
            found |= contexts.get(tuple(row[:end]), set())
            if end == 0 or row[end - 1] != 0:
                break
            end -= 1
        if len(found) != 1:
            raise RuntimeError("lm-eval handed the edited model a row it cannot place (context length unknown)")
        lengths.append(found.pop())
    with prompt_lengths(lm.model, torch.tensor(lengths, device=inps.device)):
        return call()


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], defaults: bool = True):
    """lm-eval indexes its thousands of task YAMLs when a TaskManager is made (6 s of CPU): once per set of include
    paths; `defaults=False` indexes the include paths alone (milliseconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def _local_only(names: Sequence[str], include_path: Sequence[str]):
    """A TaskManager of the include paths alone when it holds and loads every task asked for (eigenprune's own
    tasks, local YAMLs), else None (a built-in task, or a local one that builds on built-in ones)."""
    from lm_eval.tasks import get_task_dict

    if not include_path:
        return None
    manager = _task_manager(tuple(include_path), defaults=False)
    if not all(n in manager.all_tasks for n in names):
        return None
    try:
        for name in names:
            get_task_dict([name], manager)
    except Exception:  # e.g. a local group of built-in tasks: the full index decides, and says what is wrong
        return None
    return manager


def _load_tasks(names: Sequence[str], include_path: Sequence[str]):
    """lm-eval's TaskManager with the include paths; an unknown task or one whose data are missing is one line."""
    from lm_eval.tasks import get_task_dict

    local = _local_only(names, include_path)
    if local is not None:
        return local
    manager = _task_manager(tuple(include_path))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UsageError(f"lm-eval knows no task '{unknown[0]}' (a local YAML task needs --include-path FOLDER; "
                         f"eigenprune's own: {PREFIX}cb, {PREFIX}copa, {PREFIX}rte)")
    for name in names:
        try:
            get_task_dict([name], manager)
        except Exception as err:  # datasets raises many kinds here (offline, missing file, no such repo)
            entry = manager.task_index.get(name)
            config = (entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", "")) or ""
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UsageError(f"lm-eval task '{name}' cannot load its data ({reason}); it needs a download or a "
                             f"local file that is not here{f' ({config})' if config else ''}") from None
    return manager


@contextlib.contextmanager
def _silenced(progress: bool) -> Iterator[None]:
    """With `progress` off: no progress bars from lm-eval or datasets, and lm-eval's log at errors only."""
    if progress:
        yield
        return
    import datasets
    import lm_eval.api.task
    from tqdm import tqdm

    logger, bars = logging.getLogger("lm_eval"), datasets.is_progress_bar_enabled()
    level, task_bar = logger.level, lm_eval.api.task.tqdm
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)  # building requests: a bar lm-eval cannot turn off
    try:
        yield
    finally:
        lm_eval.api.task.tqdm = task_bar
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _git_asked_quietly() -> Iterator[None]:
    """lm-eval records `git describe` of the working directory; outside a repository git printed "fatal: not a git
    repository" to the terminal. Same question, git's complaint discarded (None outside a repository)."""
    import lm_eval.evaluator

    def git_hash() -> str | None:
        try:
            return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
        except (subprocess.CalledProcessError, OSError):
            return None

    asked = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = asked


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: Sequence[str], include_path: Sequence[str] = (),
                   limit: int | None = None, batch_size: int = 16, task_folder: str | Path | None = None,
                   seed: int = 0, progress: bool = True) -> dict:
    """lm-eval's `simple_evaluate` on the model as it is (edited or not): its results dict, per-sample logs
    included. `eigenprune_<task>` names are written into `task_folder` first. `progress=False`: silent."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    include = [str(p) for p in include_path]
    own = [n for n in tasks if n.startswith(PREFIX)]
    if own:
        from eigenprune.evaluation.tasks import load_task

        if task_folder is None:
            raise UsageError("eigenprune's own lm-eval tasks need a folder to be written to")
        for name in own:
            write_task(load_task(name[len(PREFIX):]), task_folder)
        include.append(str(task_folder))
    with _silenced(progress), _git_asked_quietly():
        manager = _load_tasks(tasks, include)
        lm = _edit_aware_lm(model, tokenizer, batch_size, progress)
        return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=True,
                               bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                               torch_random_seed=seed, fewshot_random_seed=seed)


def per_sample(results: dict, task: str) -> dict[str, dict[int, float]]:
    """{metric (with its filter unless 'none'): {doc_id: value}} from lm-eval's per-sample logs of one task."""
    out: dict[str, dict[int, float]] = {}
    for sample in results.get("samples", {}).get(task, []):
        for metric in sample.get("metrics", []):
            value = sample.get(metric)
            if isinstance(value, (int, float, bool)):
                key = metric if sample.get("filter", "none") == "none" else f"{metric},{sample['filter']}"
                out.setdefault(key, {})[int(sample["doc_id"])] = float(value)
    return out


def choice_logliks(results: dict, task: str) -> dict[int, list[float]]:
    """{doc_id: [log-likelihood of each choice]} of a multiple-choice task, from lm-eval's per-sample logs."""
    out = {}
    for sample in results.get("samples", {}).get(task, []):
        if sample.get("filter", "none") == "none":
            out[int(sample["doc_id"])] = [float(r[0] if isinstance(r, (list, tuple)) else r)
                                          for r in sample["filtered_resps"]]
    return out
