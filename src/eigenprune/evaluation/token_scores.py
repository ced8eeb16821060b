"""Per-token NLL and KL(base ‖ edit) from LM-head inputs: the vocabulary-wide work of a side-effect pass.

A side-effect pass (`side_effects.SideEffectProbe`) keeps each forward's LM-head input, rows × d_model, and
scores the rows here in chunks of `CHUNK_ELEMENTS` // vocab rows (at least d_model / `HEAD_SHARE`), so no step
holds rows × vocab.

The exact path (`RowScorer`, the default). Per chunk: the head's logits z, NLL = logsumexp(z) − z[label], and
against the base the base head's logits and `kl_per_token`. It runs the very ops `torch.logsumexp` and
`kl_per_token` run, in their order, on the same rows, so it gives the same bits as calling them (the tests
check `torch.equal`); but every vocabulary-wide result lands in one of four (chunk, vocab) buffers made once
per pass, where calling them allocates about ten fresh vocabulary-wide tensors a chunk. On Linux an
allocation above 32 MiB is a fresh mmap whose pages fault in on first touch, which costs about as much as
the op itself; below that, buffers reused across chunks also stay in cache. A plain float32 `nn.Linear`
head writes into its buffer through the kernel its forward runs (mm, or addmm with a bias): the same bits.

The linear path (`LinearBase`, opt-in, `kl="linear"`). For a head z = W h + b that the edit leaves alone,
    KL(p_b ‖ p_e) = lse(z_e) − lse(z_b) − p_b·(z_e − z_b) = lse(z_e) − lse(z_b) − (Wᵀ p_b)·(h_e − h_b),
so the base keeps per row the d_model vector g = Wᵀ p_b and lse(z_b), and the edit needs only its own head
and log-sum-exp, which its NLL computes anyway: no base logits, no vocabulary-wide KL. The lse values are
the NLL's own float32 max and sum, added in float64; g·(h_e − h_b) runs in float64 (h_e − h_b is exact
there). An edit that leaves a row's head input bit-identical gets KL exactly 0. Elsewhere the result differs
from the exact path's by the float32 rounding of the logits that the exact path sees and this one does not,
Σ_v p_b,v (δ_b,v − δ_e,v), plus the float32 rounding of the two sums of exponentials: 1e-7 (tiny models), a few
1e-6 (SmolLM2) to about 3e-5 (Gemma-3 270M) nats a token whatever the KL (bench/README.md), so a near-zero KL
may come out slightly negative. Its base quantities are made in the edit's chunks (their lse bits must be the
edit's): by a linear probe's base pass as it goes (`LinearBase.batch`), else apart (one more pass of the base's
head); either way cached beside the base pass (`base_cache`).
It needs the head to be a plain float32 `nn.Linear` with the base's weights (`linear_ok`); the probe falls
back to the exact path otherwise.

Soft-capped logits. Gemma-2, Gemma-3n and Gemma-4 return cap · tanh(z / cap) (`config.final_logit_softcapping`);
`head_logits` caps every chunk as their forward does, in its order and dtype, and the linear path does not apply
(`linear_ok`). Any other change after the head (a scale, a hook) is refused before either path runs.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # rows × vocabulary of each (chunk, vocab) buffer: 32 MiB in float32, four of them
# (more for a large head: HEAD_SHARE below).
# Larger chunks run the head's matmul on more rows at once (it re-packs the head's weights each call), smaller
# ones keep the buffers in cache: 768 rows on 2 cores (bench/README.md), CPU seconds for the exact path per
# rows a chunk: 152k vocabulary, d_model 64: 1.48 at 32, 1.31 at 64, 1.48 at 128, 1.60 at 256;
# 49k vocabulary, d_model 576: 2.28 at 32, 1.82 at 64, 1.58 at 128, 1.71 at 341, 1.72 at 768.

HEAD_SHARE = 4  # and at least d_model / 4 rows, so the four buffers together may grow to the head's own size:
# every chunk's matmul reads the whole head (vocab × d_model), and below d_model / 4 rows re-reading it costs more
# than the chunk's vocabulary-wide work. It changes only a large vocabulary at a large d_model: Gemma-3 270M (262k
# × 640) 32 → 160 rows, its exact pass 3.03× → 1.96× a bare forward (bench/README.md). A head of up to
# 4 × CHUNK_ELEMENTS keeps its chunks, hence its bits (the matmul's may depend on the rows a call gets): SmolLM2
# (49k × 576), every test model.

_softmax_out = torch.ops.aten._softmax.out


def chunk_rows(vocab: int, d_model: int) -> int:
    """Rows a chunk: `CHUNK_ELEMENTS` // vocab, at least d_model / `HEAD_SHARE`. The base pass's NLL and the linear
    path's lse must come from chunks of the same rows as the edit's (a matmul's bits may depend on the rows a call
    gets), so `base_cache` keys its entries by this number too."""
    return max(1, CHUNK_ELEMENTS // vocab, d_model // HEAD_SHARE)


def kl_per_token(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(base) ‖ softmax(logits)) per row: (tokens, vocab) ×2 -> (tokens,).

    With d = base − logits shifted so that Σ p d = 0 (softmax ignores shifts), KL = log Σ p e^(−d)
    = log1p(Σ p (e^(−d) − 1 + d)), a sum of non-negative terms whose float32 error scales with the change:
    on 49,152-wide random logits at KL 5e-7 nats its error is 1e-11, where Σ p (log p − log q) in float32
    is off by 2.6e-7 (half the value) from rounding log-probs near −10. `RowScorer` runs these ops in buffers.
    """
    p = torch.softmax(base_logits, -1)  # (tokens, vocab)
    d = base_logits - logits  # (tokens, vocab); below it is reused in place, to hold few vocab-wide tensors
    d -= torch.linalg.vecdot(p, d)[:, None]
    t = torch.expm1(d.neg_()).sub_(d)  # e^(−d) − 1 + d
    kl = torch.log1p(torch.linalg.vecdot(p, t))  # (tokens,)
    if not torch.isfinite(kl).all():  # e^(−d) overflowed: an edit that broke the model; stay in log space
        kl = torch.where(torch.isfinite(kl), kl, torch.logsumexp(torch.log_softmax(base_logits, -1) + d, -1))
    return kl


def plain_linear(head: torch.nn.Module) -> bool:
    """Whether `head(x)` is exactly F.linear(x, weight, bias) in float32: an nn.Linear itself (not a subclass
    or a wrapper), no hooks of its own or global ones."""
    from torch.nn.modules import module as m

    hooks = (head._forward_hooks, head._forward_pre_hooks, m._global_forward_hooks, m._global_forward_pre_hooks)
    return type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and not any(hooks)


def linear_ok(head: torch.nn.Module, base_head: torch.nn.Module, softcap: float | None = None) -> bool:
    """Whether the linear path applies: both heads plain float32 Linears with equal weights and biases, and logits
    that are the head's output (no soft-cap: KL's linear term needs z linear in h)."""
    if softcap is not None or not (plain_linear(head) and plain_linear(base_head)):
        return False
    if not torch.equal(head.weight, base_head.weight):
        return False
    return (head.bias is None and base_head.bias is None) or (
        head.bias is not None and base_head.bias is not None and torch.equal(head.bias, base_head.bias))


def head_logits(head: torch.nn.Module, plain: bool, x: torch.Tensor, out: torch.Tensor | None,
                softcap: float | None = None) -> torch.Tensor:
    """head(x) as float32, (n, vocab), then cap · tanh(z / cap) where the model soft-caps its final logits (Gemma-2,
    Gemma-3n, Gemma-4: `config.final_logit_softcapping`), in its order and dtype (so the same bits as its forward).
    A plain Linear writes into `out` (F.linear's own mm / addmm) and is capped there, in place."""
    if plain:
        z = torch.mm(x, head.weight.t(), out=out) if head.bias is None else torch.addmm(head.bias, x, head.weight.t(),
                                                                                       out=out)
        return z.div_(softcap).tanh_().mul_(softcap) if softcap is not None else z
    head._eigenprune_bypass = True  # past side_effects._head_input's hook
    try:
        z = head(x)
    finally:
        head._eigenprune_bypass = False
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z.float()


class RowScorer:
    """Scores rows of head inputs chunk by chunk in reused buffers: `nll` alone (the base pass, the linear
    path) or `nll_kl` against the base's rows. `plain` (see `plain_linear`) is decided by the caller before
    it hooks the head; otherwise the head module is called and its output used as the chunk's logits."""

    def __init__(self, head: torch.nn.Module, vocab: int, device: torch.device, plain: bool,
                 base_head: torch.nn.Module | None = None, base_plain: bool = False, d_model: int = 0,
                 softcap: float | None = None) -> None:
        self.head, self.base_head, self.plain, self.base_plain = head, base_head, plain, base_plain
        self.step = chunk_rows(vocab, d_model)  # d_model 0: CHUNK_ELEMENTS alone (the tests' small chunks)
        self.vocab, self.device, self.softcap = vocab, device, softcap
        self._buffers: tuple[torch.Tensor, ...] = ()

    def _bufs(self, n: int) -> tuple[torch.Tensor, ...]:
        if not self._buffers or self._buffers[0].shape[0] < n:
            rows = min(self.step, max(n, 1))
            self._buffers = tuple(torch.empty(rows, self.vocab, device=self.device) for _ in range(4))
        return tuple(b[:n] for b in self._buffers)

    def _logits(self, head: torch.nn.Module, plain: bool, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The model's logits from head inputs, as float32, (n, vocab): head(x), soft-capped as the model does
        it (`softcap`); in `out` for a plain Linear (F.linear's own mm / addmm)."""
        return head_logits(head, plain, x, out, self.softcap)

    def nll(self, rows: torch.Tensor, labels: torch.Tensor,
            lse: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, d_model), (rows, 1) -> NLL (rows,); `lse` (rows,) float64, if given, gets log Σ e^z."""
        out = torch.empty(len(rows), device=rows.device)  # (rows,)
        for r in range(0, len(rows), self.step):
            z_buf, _, _, t = self._bufs(min(self.step, len(rows) - r))
            z = self._logits(self.head, self.plain, rows[r:r + self.step], z_buf)
            out[r:r + self.step] = self._nll_chunk(z, labels[r:r + self.step], t, lse, r)
        return out

    def _nll_chunk(self, z: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, lse: torch.Tensor | None,
                   r: int) -> torch.Tensor:
        # torch.logsumexp's own steps (ATen logsumexp_out_impl): the max with ±inf masked, Σ e^(z − max), log, + max
        m = torch.amax(z, -1, keepdim=True)  # (n, 1)
        m.masked_fill_(m.abs() == float("inf"), 0)
        s = torch.sub(z, m, out=t).exp_().sum(-1)  # (n,)
        if lse is not None:
            lse[r:r + len(z)] = s.double().log() + m[:, 0].double()
        return s.log_().add_(m[:, 0]) - z.gather(1, labels)[:, 0]

    def nll_kl(self, rows: torch.Tensor, labels: torch.Tensor,
               base_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL and KL(base ‖ this) per row, (rows,) each: `kl_per_token`'s ops in the chunk's buffers."""
        nll, kl = torch.empty(len(rows), device=rows.device), torch.empty(len(rows), device=rows.device)
        for r in range(0, len(rows), self.step):
            z_buf, zb_buf, p, t = self._bufs(min(self.step, len(rows) - r))
            z = self._logits(self.head, self.plain, rows[r:r + self.step], z_buf)  # (n, vocab)
            nll[r:r + self.step] = self._nll_chunk(z, labels[r:r + self.step], t, None, r)
            zb = self._logits(self.base_head, self.base_plain, base_rows[r:r + self.step], zb_buf)
            _softmax_out(zb, -1, False, out=p)  # p = softmax(base)
            d = zb.sub_(z)  # d = base − logits, in the base's buffer
            c = torch.mul(p, d, out=t).sum(-1)  # vecdot(p, d)
            torch.sub(c[:, None], d, out=d)  # −(d − Σ p d): the same bits as d -= c; d.neg_()
            torch.expm1(d, out=t).sub_(d).mul_(p)  # p (e^(−d) − 1 + d)
            k = torch.log1p(t.sum(-1))
            if not torch.isfinite(k).all():  # as kl_per_token, with the base's logits made again (rare: broken edits)
                base = self._logits(self.base_head, self.base_plain, base_rows[r:r + self.step], t)
                k = torch.where(torch.isfinite(k), k, torch.logsumexp(torch.log_softmax(base, -1) + d, -1))
            kl[r:r + self.step] = k
        return nll, kl


class LinearBase:
    """The base's per-row g = Wᵀ p_b (rows, d_model) and lse(z_b) (rows,), float64, for each batch of stored
    head inputs; built with the scorer the edit passes use, so an untouched row gives the same lse bits."""

    @classmethod
    def stored(cls, g: list[torch.Tensor], lse: list[torch.Tensor], step: int) -> LinearBase:
        """The quantities as an earlier build with chunks of `step` rows made them (`base_cache.load_linear`)."""
        made = cls.__new__(cls)
        made.g, made.lse, made.step = g, lse, step
        return made

    @torch.inference_mode()
    def __init__(self, scorer: RowScorer, hidden: list[torch.Tensor]) -> None:
        self.step = scorer.step  # `nll_kl` needs an edit scorer with the same chunks (the lse bits)
        self.g: list[torch.Tensor] = []
        self.lse: list[torch.Tensor] = []
        for h in hidden:
            rows = h.to(scorer.device).flatten(0, 1)  # (rows, d_model)
            labels = torch.zeros(len(rows), 1, dtype=torch.long, device=scorer.device)  # the NLL is unused
            _, lse, g = self.batch(scorer, rows, labels)
            self.g.append(g)
            self.lse.append(lse)

    @staticmethod
    def batch(scorer: RowScorer, rows: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch of base rows: NLL (rows,) with `scorer.nll`'s bits, lse (rows,) and g (rows, d_model) float64.
        One head matmul a chunk serves all three, so the base pass can make the linear base as it goes."""
        weight = scorer.head.weight  # (vocab, d_model)
        nll = torch.empty(len(rows), device=rows.device)
        lse = torch.empty(len(rows), dtype=torch.float64, device=rows.device)
        g = torch.empty(len(rows), rows.shape[1], dtype=torch.float64, device=rows.device)
        for r in range(0, len(rows), scorer.step):
            zb, _, p, t = scorer._bufs(min(scorer.step, len(rows) - r))
            zb = scorer._logits(scorer.head, scorer.plain, rows[r:r + scorer.step], zb)  # never soft-capped
            nll[r:r + scorer.step] = scorer._nll_chunk(zb, labels[r:r + scorer.step], t, lse, r)  # zb left intact
            _softmax_out(zb, -1, False, out=p)
            g[r:r + scorer.step] = torch.mm(p, weight).double()  # (n, d_model)
        return nll, lse, g

    def nll_kl(self, scorer: RowScorer, i: int, rows: torch.Tensor, labels: torch.Tensor,
               base_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `i`: NLL and KL(base ‖ this) per row from the edit's own head and log-sum-exp alone."""
        if scorer.step != self.step:
            raise ValueError(f"the linear base was made in chunks of {self.step} rows, this scorer's are "
                             f"{scorer.step}: an unedited row would not get KL 0")
        lse = torch.empty(len(rows), dtype=torch.float64, device=rows.device)  # (rows,)
        nll = scorer.nll(rows, labels, lse)
        shift = torch.linalg.vecdot(self.g[i], rows.double() - base_rows.double())  # p_b·(z_e − z_b), (rows,)
        return nll, (lse - self.lse[i]) - shift  # float64
