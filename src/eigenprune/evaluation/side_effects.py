"""What an edit costs elsewhere: perplexity and KL on general English text, and accuracy on other tasks.

The text sample ships in `data/text/documents.jsonl` (RTE and CB premises: news, Wikipedia, WSJ,
fiction, dialogue; `data/text/SOURCE.md` says how it was built). `sample_for_task` leaves out the
text of the task being pruned: its source, and any document sharing an 8-word run with its prompts.

Where a document's "prompt" ends. A frozen component adds a bias looked up by a token's offset from
the last prompt token (`positions.py`), and free text has no prompt. Each document is scored as the
continuation of its first token: prompt = the first token of the encoded document (BOS where the
tokenizer adds one, else the first word piece), every later token is scored. The tokens then sit
at offsets 0, 1, 2, ... which is exactly what `model.generate` does when handed that first token
and forced along the document. So the numbers are what the edited model, as deployed, assigns to
general text it continues. (Treating the whole document as prompt instead would give every token
a negative offset that depends on the document's length, which no deployed call reproduces.)

Memory. KL(base ‖ edit) needs the base's full next-token distribution at every scored token; as
log-probs that is tokens × vocab (10,901 × 49,152 in float32 on SmolLM2-135M: 2.0 GiB). The probe
keeps instead the base's final hidden states (tokens × d_model: 25 MiB) and a copy of its LM head,
and recomputes the base logits with one head matmul per chunk of rows: exact (the same values as the
base pass) for one head's share of a forward. No step holds batch × positions × vocab: the model's
own head runs on the last position only, and NLL and KL run over chunks of rows in reused buffers
(`token_scores.py`, which also holds the opt-in linear path: KL without the base's logits).
The base pass is cached on disk across processes (`base_cache.py`), so a study's cells and folds
share it.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from eigenprune.core.batching import Encoded, batches, check_fits, read_jsonl
from eigenprune.core.errors import UsageError
from eigenprune.core.positions import prompt_lengths
from eigenprune.core.progress import bar as progress_bar
from eigenprune.evaluation import base_cache
from eigenprune.evaluation.evaluate import _evaluating, evaluate
from eigenprune.evaluation.splits import split_task
from eigenprune.evaluation.stats import Accuracy, accuracy_ci, bootstrap_means, paired_diff_ci
from eigenprune.evaluation.tasks import Task, load_task
from eigenprune.evaluation.token_scores import LinearBase, RowScorer, chunk_rows, head_logits, linear_ok, plain_linear

SHINGLE_WORDS = 8  # documents sharing a run of this many words with excluded text are left out
BASE = "base"
KL_PATHS = ("exact", "linear")  # token_scores.py: exact (the default) or linear (opt-in, up to ~3e-5 nats a token off)


@dataclass(frozen=True)
class Document:
    """One text of the sample: where it came from (`source`, `id`) and the text."""

    id: str
    source: str
    text: str


def load_documents(path: str | Path | None = None) -> list[Document]:
    """The packaged sample, or a JSONL file of {"id", "source", "text"} lines."""
    if path is None:
        with resources.as_file(resources.files("eigenprune").joinpath("data", "text", "documents.jsonl")) as p:
            rows = read_jsonl(p)
    else:
        rows = read_jsonl(path)
    docs = []
    for n, row in rows:
        if not all(isinstance(row.get(k), str) and row[k] for k in ("id", "source", "text")):
            raise UsageError(f"{path or 'documents.jsonl'}:{n}: each line needs string fields 'id', 'source', 'text'")
        docs.append(Document(row["id"], row["source"], row["text"]))
    return docs


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}


def sample(exclude_sources: Iterable[str] = (), exclude_text: Iterable[str] = (),
           documents: Sequence[Document] | None = None) -> list[Document]:
    """The documents (default: the packaged sample) minus the excluded sources and any document that
    shares an 8-word run with one of `exclude_text` (e.g. a custom task's prompts)."""
    documents = load_documents() if documents is None else list(documents)
    sources = sorted({d.source for d in documents})
    excluded = set(exclude_sources)
    unknown = sorted(excluded - set(sources))
    if unknown:
        raise UsageError(f"unknown text source(s) {', '.join(unknown)}; the sample's sources are {', '.join(sources)}")
    banned = set().union(*map(_shingles, exclude_text))
    kept = [d for d in documents if d.source not in excluded and not (banned and _shingles(d.text) & banned)]
    if not kept:
        raise UsageError(f"no side-effect documents are left after leaving out sources {sorted(excluded)} and text "
                         "overlapping the task; pass documents of your own or turn side effects off")
    return kept


def sample_for_task(task: Task, documents: Sequence[Document] | None = None) -> list[Document]:
    """The sample without the pruned task's text: its source (task rte: no RTE text) and every
    document that shares an 8-word run with the task's prompts or answers."""
    documents = load_documents() if documents is None else list(documents)
    sources = {d.source for d in documents}
    texts = [t for ex in (*task.train, *task.test) for t in (ex.prompt, ex.answer)]
    return sample([task.name] if task.name in sources else [], texts, documents)


# -- the text pass ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextScores:
    """One model's pass over the sample, per document in sample order."""

    nll: np.ndarray  # (docs,) summed next-token NLL over the scored tokens
    kl: np.ndarray  # (docs,) summed KL(base ‖ this model) over the same positions; zeros for the base
    tokens: np.ndarray  # (docs,) scored tokens
    wall_s: float
    kl_path: str = "exact"  # how KL was computed: "exact" or "linear" (token_scores.py)


def _encode(tokenizer, doc: Document, max_tokens: int | None) -> Encoded:
    ids = tokenizer(doc.text, add_special_tokens=True)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"side-effect document {doc.id} has fewer than 2 tokens; nothing to score")
    return Encoded(tuple(ids[:1]), tuple(ids[1:]))  # prompt = the first token (module docstring)


@contextlib.contextmanager
def _head_input(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within: each model call's LM head input, (batch, pos, d_model), lands in the yielded list, and the head
    itself runs on the last position only, so no forward holds a (batch, pos, vocab) tensor; the caller runs
    the head over the rows in chunks. Calling the head directly (with `_bypass` set) is unaffected."""
    grabbed: list[torch.Tensor] = []

    def pre_hook(module, args):
        if getattr(module, "_eigenprune_bypass", False):
            return None
        grabbed.append(args[0])
        return (args[0][:, -1:], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield grabbed
    finally:
        handle.remove()


class SideEffectProbe:
    """The base model's pass over the documents, kept so `measure` can score any edit against it.

    `measure(model)` takes the same model object with an edit applied, or another model with the same
    tokenizer; it runs one forward pass over the sample and no second base pass. The base pass itself is
    read from the cache (`base_cache.py`) when this model, dtype, sample and torch set-up made it before.

    Each forward runs the LM head on its last position only and keeps the head's input; NLL and KL then run
    over the rows in chunks (`token_scores.RowScorer`: the head, log-sum-exp, the base's head and KL per
    chunk, in four reused chunk × vocab buffers), not over batch × positions × vocab. Every row is computed
    by the operations `torch.logsumexp` and `kl_per_token` run: a batch that fits in one chunk gives the same
    bits as calling them on the whole batch. `kl="linear"` opts into the linear path where it applies
    (`token_scores.linear_ok`; the exact path otherwise): KL from the edit's own head and log-sum-exp, 1e-7
    to about 3e-5 nats a token off the exact path; each `TextScores.kl_path` says which ran.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, documents: Sequence[Document], batch_size: int = 8,
                 max_tokens: int | None = None, progress: bool = False, cache: bool = True,
                 kl: str = "exact") -> None:
        if kl not in KL_PATHS:
            raise UsageError(f"unknown KL path {kl!r}; choose one of {', '.join(KL_PATHS)}")
        self.kl = kl
        self._linear: LinearBase | None = None
        if not documents:
            raise UsageError("the side-effect sample is empty")
        if batch_size < 1:
            raise UsageError(f"side-effect batch size must be at least 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 2:
            raise UsageError(f"max_tokens must be at least 2, got {max_tokens}")
        self.documents = list(documents)
        self.encoded = [_encode(tokenizer, d, max_tokens) for d in self.documents]
        check_fits(model, self.encoded)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size, self.progress = batch_size, progress
        head = model.get_output_embeddings()
        self._head_name = next((n for n, m in model.named_modules() if m is head), None)
        if self._head_name is None:
            raise UsageError("side effects need a model with an output embedding (LM head) module")
        self._head = copy.deepcopy(head)  # the base head, even if the caller then edits the model in place
        self._softcap = final_softcap(model)
        self._hidden: list[torch.Tensor] = []  # per batch (batch, pos, d_model), the head's input, on CPU
        self.vocab = 0
        self._key = key = base_cache.key(model, self.encoded, batch_size) if cache else None
        stored = base_cache.load(key) if key else None
        if stored is not None:
            nll, tokens, self._hidden, self.vocab, wall = stored
            self.base = TextScores(nll, np.zeros(len(nll)), tokens, wall)
        else:
            self.base = self._pass(model, None)
            if key:
                base_cache.save(key, self.base.nll, self.base.tokens, self._hidden, self.vocab, self.base.wall_s)

    @property
    def n_tokens(self) -> int:
        return int(self.base.tokens.sum())

    def measure(self, model: torch.nn.Module, name: str = "edit") -> TextScores:
        """NLL and KL(base ‖ model) per document for `model`, against the stored base pass."""
        return self._pass(model, self._hidden, name)

    def _pass(self, model: torch.nn.Module, base_hidden: list[torch.Tensor] | None, name: str = BASE) -> TextScores:
        n = len(self.encoded)
        nll, kl, tokens = np.zeros(n), np.zeros(n), np.zeros(n)
        device = next(model.parameters()).device
        head = model.get_submodule(self._head_name)
        base_head = self._head.to(device) if base_hidden is not None else None
        plain = plain_linear(head)  # decided before the head is hooked
        linear = self.kl == "linear" and base_head is not None and linear_ok(head, base_head, self._softcap)
        scorer = None
        # the base pass of a probe that will take the linear path makes its base quantities as it goes (`LinearBase.
        # batch`: the head's logits a chunk serve the NLL, lse and g), instead of one more pass of the head later
        fuse = base_hidden is None and self.kl == "linear" and plain and self._softcap is None
        made: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        start = time.perf_counter()
        with _evaluating(model), _head_input(head) as grabbed:
            what = f"side effects: {name}"
            groups = progress_bar(batches(self.encoded, self.batch_size, self.pad_id), total=-(-n // self.batch_size),
                                  progress=self.progress, what=what, unit="batch")
            for i, batch in enumerate(groups):
                batch = batch.to(device)
                grabbed.clear()
                with prompt_lengths(model, batch.prompt_lengths):
                    last = model(**batch.model_inputs(), use_cache=False).logits  # (batch, 1, vocab)
                hidden = grabbed[-1]  # (batch, pos, d_model)
                if i == 0:
                    self._check_head(head, hidden, last, self._softcap)
                    scorer = RowScorer(head, last.shape[-1], device, plain, base_head,
                                       base_head is not None and plain_linear(base_head), hidden.shape[-1],
                                       self._softcap)
                if base_hidden is None:
                    self.vocab = last.shape[-1]
                    self._hidden.append(hidden.cpu())
                elif last.shape[-1] != self.vocab:
                    raise UsageError(f"the measured model's vocabulary ({last.shape[-1]}) differs from the "
                                     f"base's ({self.vocab}); side effects compare models of one tokenizer")
                # every position but padding is scored (prompt = the first token): work on all rows, in chunks
                rows = hidden.flatten(0, 1)  # (rows, d_model) rows = batch * pos
                labels = batch.labels.flatten().clamp(min=0)[:, None]  # (rows, 1)
                kl_tok = None
                if fuse:
                    nll_tok, lse, g = LinearBase.batch(scorer, rows, labels)  # NLL: `scorer.nll`'s bits
                    made[0].append(g)
                    made[1].append(lse)
                elif base_hidden is None:
                    nll_tok = scorer.nll(rows, labels)  # (rows,)
                elif linear:
                    nll_tok, kl_tok = self._linear_base(device, scorer.step).nll_kl(
                        scorer, i, rows, labels, base_hidden[i].to(device).flatten(0, 1))
                else:
                    nll_tok, kl_tok = scorer.nll_kl(rows, labels, base_hidden[i].to(device).flatten(0, 1))
                scored = (batch.labels != -100).flatten()  # (rows,)
                index = batch.index.cpu().numpy()  # (batch,) positions of the documents
                nll[index] = _per_doc(torch.where(scored, nll_tok, 0.0), len(index))
                tokens[index] = _per_doc(scored, len(index))
                if kl_tok is not None:
                    kl[index] = _per_doc(torch.where(scored, kl_tok, 0.0), len(index))
        if fuse:
            self._linear = LinearBase.stored(*made, scorer.step)
            if self._key:
                base_cache.save_linear(base_cache.linear_name(self._key, device.type, scorer.step), *made)
        return TextScores(nll, kl, tokens, time.perf_counter() - start, "linear" if linear else "exact")

    def _linear_base(self, device: torch.device, step: int | None = None) -> LinearBase:
        """The linear path's base quantities for an edit scored in chunks of `step` rows (default: today's rule,
        `chunk_rows`) on `device`: those the base pass made (a linear probe's), else read from the cache, else made
        from the stored head inputs, and cached beside the base pass (`base_cache.save_linear`), so the folds,
        cells and later runs of a study make them once."""
        step = step or chunk_rows(self.vocab, self._hidden[0].shape[-1])
        if self._linear is None or self._linear.step != step or self._linear.g[0].device != device:
            name = base_cache.linear_name(self._key, device.type, step) if self._key else None
            stored = base_cache.load_linear(name) if name else None
            if stored is not None:
                self._linear = LinearBase.stored(*([t.to(device) for t in part] for part in stored), step)
            else:
                scorer = RowScorer(self._head.to(device), self.vocab, device, True)
                scorer.step = step  # the edit's chunks: the lse bits must be its own
                self._linear = LinearBase(scorer, self._hidden)
                if name:
                    base_cache.save_linear(name, self._linear.g, self._linear.lse)
        return self._linear

    @staticmethod
    def _check_head(head: torch.nn.Module, hidden: torch.Tensor, last: torch.Tensor, softcap: float | None) -> None:
        again = head_logits(head, False, hidden[:, -1:], None, softcap)
        if again.shape != last.shape or not torch.allclose(again, last.float(), rtol=1e-4, atol=1e-4):
            capped = f", soft-capped at {softcap:g}" if softcap is not None else ""
            raise UsageError(f"this model's logits are not its LM head's output{capped} (scaled or transformed after "
                             "the head?), which side effects' KL relies on; turn side effects off for it")


def final_softcap(model: torch.nn.Module) -> float | None:
    """The cap of a model that soft-caps its final logits (`config.final_logit_softcapping`: Gemma-2, Gemma-3n,
    Gemma-4), else None; `SideEffectProbe._check_head` confirms it on the first batch."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _per_doc(values: torch.Tensor, n_docs: int) -> np.ndarray:
    """Sum per-position values (batch * pos,) over each document's positions: (batch,) float64."""
    return values.double().view(n_docs, -1).sum(1).cpu().numpy()


# -- other tasks ----------------------------------------------------------------------------------------

class TaskProbe:
    """Accuracy on other tasks (built-in names or JSONL paths): each task's test split, or a fixed
    subsample of `limit` items of it, evaluated in the task's default mode. The base runs here, once."""

    def __init__(self, model: torch.nn.Module, tokenizer, tasks: Sequence[str], limit: int | None = None,
                 batch_size: int = 16, progress: bool = False) -> None:
        self.tokenizer, self.batch_size, self.progress = tokenizer, batch_size, progress
        self.tasks: dict[str, tuple[str, str, list]] = {}  # spec -> (name, eval mode, examples)
        for spec in dict.fromkeys(tasks):
            task = load_task(spec)
            self.tasks[spec] = (task.name, task.eval_mode, split_task(task, limit=limit).test)
        self.base = self.measure(model)

    def measure(self, model: torch.nn.Module) -> dict[str, np.ndarray]:
        """Per task spec, per-example correctness (n,) bool."""
        return {spec: evaluate(model, self.tokenizer, examples, mode, self.batch_size,
                               f"also {name}" if self.progress else False).correct.numpy()
                for spec, (name, mode, examples) in self.tasks.items()}


# -- the section: base model and each edit ----------------------------------------------------------------

class SideEffects:
    """Build on the base model, `measure` each edit (applied to it, or another model), then `section()`."""

    def __init__(self, model: torch.nn.Module, tokenizer, documents: Sequence[Document], also: Sequence[str] = (),
                 also_limit: int | None = None, batch_size: int = 8, eval_batch_size: int = 16,
                 max_tokens: int | None = None, progress: bool = False, cache: bool = True,
                 kl: str = "exact") -> None:
        self.text = SideEffectProbe(model, tokenizer, documents, batch_size, max_tokens, progress, cache, kl)
        self.tasks = TaskProbe(model, tokenizer, also, also_limit, eval_batch_size, progress) if also else None
        self.edits: dict[str, tuple[TextScores, dict[str, np.ndarray]]] = {}

    def measure(self, name: str, model: torch.nn.Module) -> None:
        if name == BASE or name in self.edits:
            raise UsageError(f"side effects of {name!r} are already measured; give each edit its own name")
        self.edits[name] = (self.text.measure(model, name), self.tasks.measure(model) if self.tasks else {})

    def section(self, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
        return summarize(self.text, {k: v[0] for k, v in self.edits.items()}, self.tasks,
                         {k: v[1] for k, v in self.edits.items()}, n_boot, seed, level)


def _quantiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def perplexity_ci(scores: TextScores, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """exp(Σ NLL / Σ tokens) with a percentile bootstrap CI over documents."""
    # one seed for both: the same resampled documents in numerator and denominator
    draws = np.exp(bootstrap_means(scores.nll, n_boot, seed) / bootstrap_means(scores.tokens, n_boot, seed))
    lo, hi = _quantiles(draws, level)
    return {"value": float(np.exp(scores.nll.sum() / scores.tokens.sum())), "lo": lo, "hi": hi}


def delta_perplexity_ci(base: TextScores, edit: TextScores, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict:
    """Perplexity (edit − base) with a paired bootstrap CI: each resample of documents serves both."""
    tokens = bootstrap_means(base.tokens, n_boot, seed)
    draws = (np.exp(bootstrap_means(edit.nll, n_boot, seed) / tokens)
             - np.exp(bootstrap_means(base.nll, n_boot, seed) / tokens))
    lo, hi = _quantiles(draws, level)
    total = base.tokens.sum()
    return {"diff": float(np.exp(edit.nll.sum() / total) - np.exp(base.nll.sum() / total)), "lo": lo, "hi": hi}


def kl_ci(edit: TextScores, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean per-token KL(base ‖ edit) in nats, with a bootstrap CI over documents."""
    draws = bootstrap_means(edit.kl, n_boot, seed) / bootstrap_means(edit.tokens, n_boot, seed)
    lo, hi = _quantiles(draws, level)
    return {"value": float(edit.kl.sum() / edit.tokens.sum()), "lo": lo, "hi": hi}


def _acc(correct: np.ndarray, n_boot: int, seed: int, level: float) -> dict:
    return Accuracy(*accuracy_ci(correct, n_boot, seed, level), int(correct.size)).to_dict()


def summarize(probe: SideEffectProbe, edits: Mapping[str, TextScores], tasks: TaskProbe | None = None,
              task_edits: Mapping[str, Mapping[str, np.ndarray]] | None = None, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> dict:
    """The JSON-ready "Side effects" section: the sample, then per model (base first) perplexity, and for
    each edit Δ perplexity, KL and the other tasks' accuracies with paired differences."""
    base = probe.base
    sources: dict[str, int] = {}
    for d in probe.documents:
        sources[d.source] = sources.get(d.source, 0) + 1
    models = {BASE: {"perplexity": perplexity_ci(base, n_boot, seed, level), "wall_s": base.wall_s}}
    for name, scores in edits.items():
        models[name] = {"perplexity": perplexity_ci(scores, n_boot, seed, level),
                        "delta_perplexity": delta_perplexity_ci(base, scores, n_boot, seed, level),
                        "kl": kl_ci(scores, n_boot, seed, level), "wall_s": scores.wall_s}
        if scores.kl_path != "exact":  # recorded only off the default, so reports of exact KL keep their keys
            models[name]["kl"]["path"] = scores.kl_path
    also = {}
    if tasks is not None:
        also = {spec: {"name": name, "eval_mode": mode, "n": len(examples)}
                for spec, (name, mode, examples) in tasks.tasks.items()}
        models[BASE]["also"] = {spec: _acc(c, n_boot, seed, level) for spec, c in tasks.base.items()}
        for name, per_task in (task_edits or {}).items():
            models[name]["also"] = {}
            for spec, correct in per_task.items():
                diff, lo, hi = paired_diff_ci(tasks.base[spec], correct, n_boot, seed, level)
                models[name]["also"][spec] = {**_acc(correct, n_boot, seed, level),
                                              "diff_vs_base": {"diff": diff, "lo": lo, "hi": hi}}
    section = {"sample": {"documents": len(probe.documents), "tokens": probe.n_tokens, "sources": sources},
               "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level},
               "model_order": list(models), "models": models, "also": also}
    if probe.kl != "exact":  # what the user asked for, so the report can say where it did not apply
        section["kl_requested"] = probe.kl
    return section


# -- rendering (reads only the section dict, so a saved report re-renders) ---------------------------------
