"""Tests for token_scores.py: the exact path gives the bits of `torch.logsumexp` and `kl_per_token` called on
the same rows (plain heads with and without a bias, a wrapped head, several chunks, an overflowing edit); the
linear path equals KL computed by hand in float64 from log-softmax, is exactly 0 for untouched rows, and is
chosen only where it applies (`plain_linear`, `linear_ok`), in the probe too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build
from test_side_effects import MAX_TOKENS, direct, documents, edited  # noqa: F401 (documents: a fixture)

from eigenprune.core.errors import UsageError
from eigenprune.edits.freeze import applied
from eigenprune.evaluation import side_effects as se
from eigenprune.evaluation import token_scores as ts

VOCAB, D, ROWS = 50, 8, 13


class Scaled(torch.nn.Linear):
    """A subclass: not a plain Linear, whatever its forward does."""


def heads(bias: bool) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    head = torch.nn.Linear(D, VOCAB, bias=bias).requires_grad_(False)
    return head, head


def rows(scale: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(ROWS, D, generator=g) * 3  # (rows, d_model)
    return base + torch.randn(ROWS, D, generator=g) * scale, torch.randint(0, VOCAB, (ROWS, 1), generator=g), base


def by_calls(head, base_head, x, labels, base_x, step):
    """What the pass computed before buffers: the head, torch.logsumexp, kl_per_token, chunk by chunk."""
    nll, kl = [], []
    for r in range(0, len(x), step):
        z = head(x[r:r + step]).float()
        nll.append(torch.logsumexp(z, -1) - z.gather(1, labels[r:r + step])[:, 0])
        kl.append(ts.kl_per_token(base_head(base_x[r:r + step]).float(), z))
    return torch.cat(nll), torch.cat(kl)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("step", [ROWS, 5, 1])
@pytest.mark.parametrize("scale", [0.1, 60.0])  # 60: e^(−d) overflows, the log-space fallback runs
def test_exact_path_gives_the_bits_of_the_calls_it_replaces(bias, step, scale, monkeypatch):
    monkeypatch.setattr(ts, "CHUNK_ELEMENTS", step * VOCAB)
    head, _ = heads(bias)
    torch.manual_seed(2)
    base_head = torch.nn.Linear(D, VOCAB, bias=bias).requires_grad_(False)  # another head: weights differ
    x, labels, base_x = rows(scale)
    with torch.inference_mode():
        want = by_calls(head, base_head, x, labels, base_x, step)
        scorer = ts.RowScorer(head, VOCAB, torch.device("cpu"), ts.plain_linear(head), base_head, True)
        got = scorer.nll_kl(x, labels, base_x)
        wrapped = ts.RowScorer(head, VOCAB, torch.device("cpu"), False, base_head, False).nll_kl(x, labels, base_x)
        alone = scorer.nll(x, labels)
    assert torch.isfinite(got[1]).all() and (got[1] > 0).all()
    for g, w, a in zip(got, want, wrapped, strict=True):
        assert torch.equal(g, w) and torch.equal(a, w)
    assert torch.equal(alone, want[0])


def test_which_heads_are_plain_and_when_the_linear_path_applies():
    head, _ = heads(True)
    assert ts.plain_linear(head)
    assert not ts.plain_linear(Scaled(D, VOCAB))
    assert not ts.plain_linear(torch.nn.Linear(D, VOCAB).to(torch.bfloat16))
    handle = head.register_forward_hook(lambda m, a, out: out * 2)
    assert not ts.plain_linear(head)
    handle.remove()
    other = torch.nn.Linear(D, VOCAB)
    other.load_state_dict(head.state_dict())
    assert ts.linear_ok(head, other)
    with torch.no_grad():
        other.bias[3] += 1e-3
    assert not ts.linear_ok(head, other)
    other.load_state_dict(head.state_dict())
    with torch.no_grad():
        other.weight[0, 0] += 1e-3
    assert not ts.linear_ok(head, other)
    assert not ts.linear_ok(torch.nn.Linear(D, VOCAB, bias=False), torch.nn.Linear(D, VOCAB))


def kl_by_hand(head, x, base_x) -> torch.Tensor:
    """KL(base ‖ edit) per row in float64 from log-softmax of float64 logits."""
    w = head.weight.double()
    b = head.bias.double() if head.bias is not None else 0.0
    logp = torch.log_softmax(base_x.double() @ w.T + b, -1)
    logq = torch.log_softmax(x.double() @ w.T + b, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale", [1e-2, 0.3, 2.0])
def test_linear_path_equals_kl_by_hand_and_is_zero_for_untouched_rows(bias, scale, monkeypatch):
    monkeypatch.setattr(ts, "CHUNK_ELEMENTS", 5 * VOCAB)  # three chunks
    head, _ = heads(bias)
    x, labels, base_x = rows(scale)
    x[4] = base_x[4]  # one row the edit left alone
    with torch.inference_mode():
        scorer = ts.RowScorer(head, VOCAB, torch.device("cpu"), True)
        linear = ts.LinearBase(scorer, [base_x[None]])
        nll, kl = linear.nll_kl(scorer, 0, x, labels, base_x)
        exact_nll, exact_kl = ts.RowScorer(head, VOCAB, torch.device("cpu"), True, head, True).nll_kl(x, labels, base_x)
    assert kl.dtype == torch.float64 and kl[4] == 0.0 and exact_kl[4] == 0.0
    by_hand = kl_by_hand(head, x, base_x)
    assert (by_hand[torch.arange(ROWS) != 4] > 1e-6).all()
    torch.testing.assert_close(kl, by_hand, rtol=1e-4, atol=5e-7)  # atol: float32 rounding of logits and sums
    torch.testing.assert_close(kl, exact_kl.double(), rtol=1e-4, atol=5e-7)
    assert torch.equal(nll, exact_nll)  # the NLL is the exact path's, bit for bit


# -- in the probe ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "phi"])  # phi: a head with a bias
def test_the_probe_linear_path_equals_the_direct_computation(arch, documents):  # noqa: F811
    model, tok, edit = edited(arch, 0.4)
    exact = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False)
    linear = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False, kl="linear")
    base_copy, _ = edited(arch, 0.4)[:2]
    with applied(model, edit):
        want, got = exact.measure(model), linear.measure(model)
        _, kl, _ = direct(base_copy, model, tok, documents)
    assert got.kl_path == "linear" and want.kl_path == "exact"
    np.testing.assert_array_equal(got.nll, want.nll)
    np.testing.assert_allclose(got.kl, kl, rtol=1e-4, atol=5e-7 * MAX_TOKENS)  # a few 1e-7 nats a token
    np.testing.assert_allclose(got.kl, want.kl, rtol=1e-4, atol=5e-7 * MAX_TOKENS)
    unedited = linear.measure(model)  # the same model: every row untouched, KL exactly 0
    assert unedited.kl_path == "linear" and np.array_equal(unedited.kl, np.zeros(len(documents)))


def test_the_probe_falls_back_to_the_exact_path_when_the_head_changed(documents):  # noqa: F811
    model, tok = build("llama")
    base_copy, _ = build("llama")
    probe = se.SideEffectProbe(model, tok, documents, batch_size=4, max_tokens=MAX_TOKENS, cache=False, kl="linear")
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    measured = probe.measure(model)
    assert measured.kl_path == "exact"
    _, kl, _ = direct(base_copy, model, tok, documents)
    np.testing.assert_allclose(measured.kl, kl, rtol=1e-4)


def test_an_unknown_kl_path_is_one_usage_error(documents):  # noqa: F811
    model, tok = build("llama")
    with pytest.raises(UsageError, match="unknown KL path 'fast'; choose one of exact, linear"):
        se.SideEffectProbe(model, tok, documents, max_tokens=MAX_TOKENS, kl="fast")


# -- chunk size and the linear path's cache -----------------------------------------------------------------

def test_a_chunk_has_at_least_a_quarter_of_d_model_rows(monkeypatch):
    """Gemma-3's head (262k × 640) got 32-row chunks from CHUNK_ELEMENTS alone, each re-reading the 671 MB head;
    d_model / HEAD_SHARE rows bound that. Heads up to 4 × CHUNK_ELEMENTS (SmolLM2's 49k × 576, every test
    model) keep their chunks, hence their bits; chunks of the new size still give the bits of the calls."""
    assert ts.RowScorer(None, 262_144, torch.device("cpu"), True, d_model=640).step == 160
    assert ts.RowScorer(None, 49_152, torch.device("cpu"), True, d_model=576).step == ts.CHUNK_ELEMENTS // 49_152
    assert ts.RowScorer(None, VOCAB, torch.device("cpu"), True, d_model=D).step == ts.CHUNK_ELEMENTS // VOCAB
    monkeypatch.setattr(ts, "CHUNK_ELEMENTS", VOCAB)  # one row a chunk but for d_model
    head, _ = heads(True)
    torch.manual_seed(2)
    base_head = torch.nn.Linear(D, VOCAB).requires_grad_(False)
    x, labels, base_x = rows(0.3)
    with torch.inference_mode():
        scorer = ts.RowScorer(head, VOCAB, torch.device("cpu"), True, base_head, True, d_model=20)
        assert scorer.step == 5  # three chunks of 13 rows
        want = by_calls(head, base_head, x, labels, base_x, 5)
        for got, w in zip(scorer.nll_kl(x, labels, base_x), want, strict=True):
            assert torch.equal(got, w)


def test_the_linear_base_is_made_once_and_cached_beside_the_base_pass(documents, tmp_path, monkeypatch):  # noqa: F811
    """A linear probe's base pass makes the linear base as it goes (the same bits as a separate build, and the base
    NLL an exact probe gets); a probe whose base pass was cached without it makes it once, separately; either is
    written beside the base pass and read back by later probes, from the process's memory or from disk."""
    monkeypatch.setenv("EIGENPRUNE_CACHE", str(tmp_path))
    model, tok, edit = edited("llama", 0.4)
    built, saved = [], []
    make, save = ts.LinearBase.__init__, se.base_cache.save_linear
    monkeypatch.setattr(ts.LinearBase, "__init__", lambda self, *a: (built.append(1), make(self, *a))[1])
    monkeypatch.setattr(se.base_cache, "save_linear", lambda *a: (saved.append(a[0]), save(*a))[1])
    first = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, kl="linear")
    assert (built, len(saved)) == ([], 1)  # made by the base pass itself
    with applied(model, edit):
        want = first.measure(model)
    assert want.kl_path == "linear" and (built, len(saved)) == ([], 1)
    base, linear = sorted(p.name for p in (tmp_path / "side-effects-v1").iterdir())
    assert linear == se.base_cache.linear_name(base, "cpu", first._linear.step) == saved[0]
    separate = ts.LinearBase(ts.RowScorer(first._head, first.vocab, torch.device("cpu"), True,
                                          d_model=model.config.hidden_size), first._hidden)
    for a, b in zip(separate.g + separate.lse, first._linear.g + first._linear.lse, strict=True):
        assert torch.equal(a, b)
    exact = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False)
    np.testing.assert_array_equal(exact.base.nll, first.base.nll)
    built.clear()
    monkeypatch.setenv("EIGENPRUNE_CACHE", "off")  # no disk: what follows comes from the process's memory
    same_process = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, kl="linear")
    with applied(model, edit):
        np.testing.assert_array_equal(same_process.measure(model).kl, want.kl)
    monkeypatch.setenv("EIGENPRUNE_CACHE", str(tmp_path))
    se.base_cache._MEMORY.clear()
    se.base_cache._LINEAR_MEMORY.clear()  # read back from disk, as another process would
    again = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, kl="linear")
    with applied(model, edit):
        got = again.measure(model)
    assert (built, len(saved)) == ([], 1)  # read, not made again
    for a, b in zip(again._linear.g + again._linear.lse, first._linear.g + first._linear.lse, strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(got.kl, want.kl)
    np.testing.assert_array_equal(got.nll, want.nll)
    se.SideEffectProbe(model, tok, documents[:3], batch_size=3, max_tokens=MAX_TOKENS)  # an exact probe's base pass
    later = se.SideEffectProbe(model, tok, documents[:3], batch_size=3, max_tokens=MAX_TOKENS, kl="linear")
    with applied(model, edit):
        later.measure(model)
    assert (built, len(saved)) == ([1], 2)  # the base pass came from the cache: the linear base made apart, once
    for n in (4, 5):  # other samples: their own entries; the process remembers the last two
        other = se.SideEffectProbe(model, tok, documents[:n], batch_size=3, max_tokens=MAX_TOKENS, kl="linear")
        with applied(model, edit):
            other.measure(model)
    assert len(saved) == 4 and len(se.base_cache._LINEAR_MEMORY) == se.base_cache.MEMORY_ENTRIES
    assert all(t.device.type == "cpu" for part in se.base_cache._LINEAR_MEMORY.values() for ts_ in part for t in ts_)


def test_without_the_cache_the_linear_base_is_neither_kept_nor_written(documents, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("EIGENPRUNE_CACHE", str(tmp_path))
    model, tok, edit = edited("llama", 0.4)
    probe = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False, kl="linear")
    with applied(model, edit):
        assert probe.measure(model).kl_path == "linear"
    assert not (tmp_path / "side-effects-v1").exists() and not se.base_cache._LINEAR_MEMORY


def test_an_unedited_model_gets_kl_exactly_0_whatever_the_chunks(documents, monkeypatch):  # noqa: F811
    """The linear base's lse must come from chunks of the edit's rows: made in others (a matmul's bits may depend on
    the rows a call gets) an unedited row gets about 4e-7 instead of 0. Chunks of 1 row by CHUNK_ELEMENTS, of
    d_model / 4 = 8 by HEAD_SHARE, at 2 threads."""
    monkeypatch.setattr(ts, "CHUNK_ELEMENTS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, tok, _ = edited("llama", 0.4)
        probe = se.SideEffectProbe(model, tok, documents, batch_size=3, max_tokens=MAX_TOKENS, cache=False, kl="linear")
        same = probe.measure(model)  # the linear base from the base pass itself
        probe._linear = None
        apart = probe.measure(model)  # made apart, as after a base pass read from the cache
    finally:
        torch.set_num_threads(threads)
    assert probe._linear.step == model.config.hidden_size // ts.HEAD_SHARE
    for measured in (same, apart):
        assert measured.kl_path == "linear" and np.array_equal(measured.kl, np.zeros(len(documents)))
    scorer = ts.RowScorer(probe._head, probe.vocab, torch.device("cpu"), True)  # chunks of 1 row
    with pytest.raises(ValueError, match="made in chunks of 8 rows, this scorer's are 1"):
        probe._linear.nll_kl(scorer, 0, probe._hidden[0].flatten(0, 1), torch.zeros(1, 1, dtype=torch.long),
                             probe._hidden[0].flatten(0, 1))


def test_the_base_pass_is_keyed_by_its_chunk_rows(documents, monkeypatch):  # noqa: F811
    """The edit's NLL is compared with the stored base's: an entry made in other chunks is another entry."""
    model, tok = build("llama")
    encoded = se.SideEffectProbe(model, tok, documents[:2], max_tokens=MAX_TOKENS, cache=False).encoded
    monkeypatch.setattr(ts, "CHUNK_ELEMENTS", 1)  # d_model / HEAD_SHARE decides
    key = se.base_cache.key(model, encoded, 8)
    assert se.base_cache.key(model, encoded, 8) == key
    monkeypatch.setattr(ts, "HEAD_SHARE", 2)
    assert se.base_cache.key(model, encoded, 8) != key
