"""Invariants checked against independent computations, each chosen to fail on a named mistake.

- the bias table is Σ_i s_i u_i (v_i · x̄_t) of the frozen components, from inputs captured here
  (mistakes: dropping S; shifting offsets by one);
- an edit that removes nothing (p = 0 through the wrapper; p > 0 on the very examples its means came
  from, where x̄_t = x_t) gives the base logits (mistake: a wrong sign in the correction);
- `eigenprune run` chooses p on dev even where test would choose another p (mistake: choosing on test);
- exact-mode scores are the all-pairs formula on examples of different lengths, aligned by offset from
  the last prompt token (mistake: aligning by position from the start).

The references use only torch, forward hooks and autograd on one unpadded example at a time; they
never call the code under test to compute what it should produce.
"""

import contextlib
import json

import pytest
import torch
from conftest import build
from helpers import EXAMPLES
from transformers.pytorch_utils import Conv1D

from eigenprune.cli import main
from eigenprune.core.batching import collate, encode, teacher_forced
from eigenprune.edits.decompose import decompose_targets
from eigenprune.edits.freeze import FreezeConfig, FrozenLinear, applied, build_edit, make_edit
from eigenprune.edits.scoring import ScoreConfig, score
from eigenprune.edits.targets import find_targets


# ---------------------------------------------------------------- independent references
def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """(out, in) float64 copy of a Linear's or Conv1D's weight."""
    w = module.weight.t() if isinstance(module, Conv1D) else module.weight
    return w.detach().double().clone()


@contextlib.contextmanager
def recording(model, modules):
    """Within the block, each forward stores every named module's (input, output) in the yielded dict."""
    seen = {}
    hooks = [model.get_submodule(m).register_forward_hook(
        lambda mod, args, y, m=m: seen.__setitem__(m, (args[0], y))) for m in modules]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def per_example(model, encoded, modules, grads=False):
    """Run each example alone (no padding). Per example: offsets (pos,) from the last prompt token and,
    per module, its input x (pos, d_in) and, with `grads`, the answer-NLL gradient at its output."""
    out = []
    for e in encoded:
        ids = torch.tensor([e.prompt_ids + e.answer_ids[:-1]])  # (1, pos)
        with recording(model, modules) as seen, torch.set_grad_enabled(grads):
            logits = model(input_ids=ids).logits[0]  # (pos, vocab)
        p = len(e.prompt_ids)
        offsets = torch.arange(ids.shape[1]) - (p - 1)  # (pos,)
        row = {"offsets": offsets, "x": {m: seen[m][0][0].detach().double() for m in modules}}
        if grads:
            labels = torch.tensor(e.answer_ids)
            loss = torch.nn.functional.cross_entropy(logits[p - 1 :].float(), labels, reduction="sum")
            g = torch.autograd.grad(loss, [seen[m][1] for m in modules])
            row["g"] = {m: gm[0].double() for m, gm in zip(modules, g, strict=True)}
        out.append(row)
    return out


def mean_inputs(runs, module):
    """{offset: x̄_t} and the overall mean, over every example's real tokens (float64)."""
    sums, counts = {}, {}
    for r in runs:
        for t, x in zip(r["offsets"].tolist(), r["x"][module], strict=True):
            sums[t] = sums.get(t, 0) + x
            counts[t] = counts.get(t, 0) + 1
    overall = sum(sums.values()) / sum(counts.values())
    return {t: sums[t] / counts[t] for t in sums}, overall


def frozen_part(model, target, removed):
    """s_i, u_i, v_i (float64) of the given components of the target's (rows, in) block, by torch.linalg.svd."""
    W = weight_out_in(model.get_submodule(target.module_name))[target.rows[0] : target.rows[1]]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return S[removed], U[:, removed], Vh[removed]


# ---------------------------------------------------------------- 1. the bias table
def test_bias_table_is_the_frozen_components_at_the_mean_input_per_offset(arch):
    """Table row t holds Σ_i s_i u_i (v_i · x̄_t), the last row the overall mean's; the edited layer adds
    each token the row of its own offset and subtracts Σ_i s_i u_i (v_i · x)."""
    model, tok = build(arch)
    targets = find_targets(model, "key")
    modules = sorted({t.module_name for t in targets})
    encoded = encode(tok, EXAMPLES)
    scores = score(model, targets, decompose_targets(model, targets), encoded, tok.pad_token_id,
                   ScoreConfig(partners=2, batch_size=4), progress=False)
    edit = make_edit(targets, decompose_targets(model, targets), scores.max, scores.means, FreezeConfig(p=0.4))
    runs = per_example(model, encoded, modules)
    assert edit.offset_min == min(int(r["offsets"].min()) for r in runs)
    assert edit.n_frozen > 0
    for t in targets:
        removed = edit.removed[t.name]
        if not len(removed):
            continue
        S, U, Vh = frozen_part(model, t, removed)
        means, overall = mean_inputs(runs, t.module_name)
        table = edit.bias_tables[t.module_name][:, t.rows[0] : t.rows[1]].double()  # (rows, d_out slice)
        assert len(table) == max(means) - min(means) + 2
        for offset, x_bar in means.items():
            want = U @ (S * (Vh @ x_bar))  # (rows,)
            torch.testing.assert_close(table[offset - edit.offset_min], want, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, t=t, o=offset: f"{t.name} offset {o}: {m}")
        torch.testing.assert_close(table[-1], U @ (S * (Vh @ overall)), atol=1e-5, rtol=1e-4)

    # applied: each token gets the row of its own offset (its input x is the edited model's)
    parts = {t.name: frozen_part(model, t, edit.removed[t.name]) for t in targets}
    plain = {m: (weight_out_in(model.get_submodule(m)), model.get_submodule(m).bias) for m in modules}
    means = {m: mean_inputs(runs, m)[0] for m in modules}
    with applied(model, edit):
        for e in range(len(encoded)):
            with recording(model, modules) as seen, torch.no_grad():
                teacher_forced(model, collate(encoded, [e], tok.pad_token_id))
            offsets = runs[e]["offsets"].tolist()
            for t in targets:
                x, y = (v[0].double() for v in seen[t.module_name])  # (pos, d_in), (pos, d_out)
                W, b = plain[t.module_name]
                rows = slice(*t.rows)
                want = x @ W[rows].t() + (0 if b is None else b[rows].detach().double())
                S, U, Vh = parts[t.name]
                x_bar = torch.stack([means[t.module_name][o] for o in offsets])  # (pos, d_in)
                want = want + ((x_bar - x) @ Vh.t() * S) @ U.t()
                torch.testing.assert_close(y[:, rows], want, atol=1e-4, rtol=1e-4,
                                           msg=lambda m, t=t, e=e: f"{t.name}, example {e}: {m}")


# ---------------------------------------------------------------- 2. edits that remove nothing
def wrap_with_nothing(model, modules):
    """Every module wrapped in a FrozenLinear that freezes zero components (p = 0 through the wrapper)."""
    for name in modules:
        base = model.get_submodule(name)
        d_out, d_in = weight_out_in(base).shape
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                FrozenLinear(base, torch.zeros(d_out, 0), torch.zeros(0, d_in), torch.zeros(1, d_out), 0, None))


@pytest.mark.parametrize("case", ["p=0 through the wrapper", "p>0, rows with nothing frozen",
                                  "p>0 on the examples its means came from"])
def test_edits_that_remove_nothing_give_the_base_logits(arch, case):
    """The last case freezes half of every matrix, but its means come from the one example it is run on
    (twice), so x̄_t = x_t at every offset and each frozen E_i x is replaced by itself."""
    model, tok = build(arch)
    example = EXAMPLES[2]  # a three-token answer: offsets 0, 1, 2 all carry a bias row
    encoded = encode(tok, [example])
    batch = collate(encoded, [0], tok.pad_token_id)
    width = batch.input_ids.shape[1]
    with torch.no_grad():
        base = teacher_forced(model, batch, width)  # (1, pos, vocab)
    if case == "p=0 through the wrapper":
        targets = find_targets(model, "all")
        wrap_with_nothing(model, sorted({t.module_name for t in targets}))
        with torch.no_grad():
            assert torch.equal(teacher_forced(model, batch, width), base)
        return
    if case == "p>0, rows with nothing frozen":
        targets = find_targets(model, "key", per_head=True)
        comps = decompose_targets(model, targets)
        first = {t.module_name: t.name for t in reversed(targets)}  # each module's first head
        removed = {t.name: torch.arange(3) for t in targets if first[t.module_name] == t.name}
        edit = build_edit(targets, comps, removed, None, FreezeConfig(bias="none"))
        modules = sorted({t.module_name for t in targets})
        with applied(model, edit):
            with recording(model, modules) as outputs, torch.no_grad():
                teacher_forced(model, batch, width)
            for t in targets:
                if t.name in removed:
                    continue
                x, y = outputs[t.module_name]
                layer = model.get_submodule(t.module_name).base_layer
                with torch.no_grad():
                    assert torch.equal(y[..., slice(*t.rows)], layer(x)[..., slice(*t.rows)]), t.name
        return
    targets = find_targets(model, "all")
    twice = encode(tok, [example, example])
    comps = decompose_targets(model, targets)
    scores = score(model, targets, comps, twice, tok.pad_token_id, ScoreConfig(partners="all"), progress=False)
    edit = make_edit(targets, comps, scores.max, scores.means, FreezeConfig(p=0.5))
    assert edit.n_frozen >= sum(t.n_components for t in targets) // 2 - 1
    with applied(model, edit), torch.no_grad():
        torch.testing.assert_close(teacher_forced(model, batch, width), base, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- 3. p is chosen on dev, never on test
def top_two_task(path, model, tok, n=60):
    """Two-choice items whose choices are the model's own top two next tokens, on the prompts where they are
    closest, with seeded random labels: edits flip answers, and dev and test disagree about which p is best."""
    g = torch.Generator().manual_seed(0)
    items = []
    for k in range(400):
        prompt = f"{k // 10} + {k % 10} ="
        with torch.no_grad():
            values, top = model(**tok(prompt, return_tensors="pt")).logits[0, -1].topk(2)
        choices = [tok.decode([t]) for t in top.tolist()]
        if all(tok(c, add_special_tokens=False)["input_ids"] == [t]
               for c, t in zip(choices, top.tolist(), strict=True)):
            items.append((float(values[0] - values[1]), prompt, choices))
    items.sort()
    rows = [{"prompt": p, "choices": c, "label": int(torch.randint(2, (1,), generator=g))} for _, p, c in items[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def best_p(base_acc: float, sweep: list[dict], split: str) -> float:
    """The p with the best accuracy on `split`; the base model (p = 0) competes and ties go to the smaller p."""
    best, p_best = base_acc, 0.0
    for row in sorted(sweep, key=lambda r: r["p"]):
        if row[f"{split}_acc"] > best:
            best, p_best = row[f"{split}_acc"], row["p"]
    return p_best


def test_run_chooses_p_on_dev_where_test_would_choose_another(tmp_path):
    model, tok = build("gpt2")
    with torch.no_grad():  # strong blocks and outputs: freezing components moves this tiny model's answers
        for name, param in model.named_parameters():
            if param.dim() == 2 and any(k in name for k in ("attn", "mlp")):
                param.mul_(100 if name.endswith("c_proj.weight") else 10)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    task = top_two_task(tmp_path / "task.jsonl", model, tok)
    code = main(["run", "--model", str(tmp_path / "model"), "--task", str(task), "--targets", "all",
                 "--p", "0.1,0.2,0.3,0.5,0.7", "--split-seed", "2", "--partners", "2", "--n-boot", "20",
                 "--select", "accuracy",  # the argmax rule this test checks (test_select_1se checks 1se's)
                 "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    sweep, base = report["sweep"], report["base"]
    assert any(row["dev_acc"] != base["dev"]["acc"] for row in sweep), "no p changed a dev answer: the case is void"
    on_dev, on_test = best_p(base["dev"]["acc"], sweep, "dev"), best_p(base["test"]["acc"], sweep, "test")
    assert on_dev != on_test, f"dev and test prefer the same p ({on_dev}): the case cannot tell them apart"
    assert report["chosen_p"] == on_dev, f"chose p = {report['chosen_p']}; dev prefers {on_dev}, test {on_test}"
    chosen = next(row for row in sweep if row["p"] == on_dev)
    assert report["pruned"]["test"]["acc"] == chosen["test_acc"]


# ---------------------------------------------------------------- 4. exact-mode scores
def all_pairs(model, target, runs):
    """(ordered pairs, k) ΔL_i(e, f) = s_i Σ_t (g_{e,t}·u_i)(v_i·(x_{f,t} − x_{e,t})) over the offsets t both
    examples have, in float64 from the captured x and g."""
    W = weight_out_in(model.get_submodule(target.module_name))[target.rows[0] : target.rows[1]]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    m, rows = target.module_name, slice(*target.rows)
    effects = []
    for e, ex in enumerate(runs):
        for f, fx in enumerate(runs):
            if e == f:
                continue
            common = sorted(set(ex["offsets"].tolist()) & set(fx["offsets"].tolist()))
            at_e = [ex["offsets"].tolist().index(t) for t in common]
            at_f = [fx["offsets"].tolist().index(t) for t in common]
            a = ex["g"][m][at_e][:, rows] @ U  # (common, k)
            b = (fx["x"][m][at_f] - ex["x"][m][at_e]) @ Vh.t()  # (common, k)
            effects.append(S * (a * b).sum(0))
    return torch.stack(effects)


def test_exact_scores_are_the_all_pairs_formula_on_examples_of_different_lengths(arch):
    model, tok = build(arch)
    encoded = encode(tok, EXAMPLES)
    assert len({len(e.prompt_ids) for e in encoded}) > 2 and len({len(e.answer_ids) for e in encoded}) > 1
    targets = find_targets(model, "key")
    got = score(model, targets, decompose_targets(model, targets), encoded, tok.pad_token_id,
                ScoreConfig(partners="all", batch_size=4), progress=False)
    runs = per_example(model, encoded, sorted({t.module_name for t in targets}), grads=True)
    for t in targets:
        effects = all_pairs(model, t, runs)  # (pairs, k)
        atol = 1e-4 * float(effects.abs().max())  # float32 against float64, at the scores' own scale
        torch.testing.assert_close(got.max[t.name].double(), effects.max(0).values, atol=atol, rtol=1e-4,
                                   msg=lambda m, t=t: f"max over pairs, {t.name}: {m}")
        torch.testing.assert_close(got.mean[t.name].double(), effects.mean(0), atol=atol, rtol=1e-4,
                                   msg=lambda m, t=t: f"mean over pairs, {t.name}: {m}")
    assert got.n_pairs == len(encoded) * (len(encoded) - 1)
