"""Attribution-patching scores for every singular component, and the mean inputs for freezing.

For target A = Σ_i s_i u_i v_iᵀ, an example e (module input x_e, output gradient g_e) and a partner
e′, patching e's input by e′'s through component i changes the loss, to first order, by

    ΔL_i(e, e′) = s_i Σ_t (g_{e,t}·u_i) (v_i·(x_{e′,t} − x_{e,t}))

over the positions t present in both, aligned by offset from the last prompt token. With
a = g·U and b = x·V per position (both (pos, k)), that is s ⊙ Σ_t a_e (b_e′ − b_e · m_e′): two
projections per batch and an elementwise product per pair, no loop over components. In exact
mode, where pairs fill most of (batch × earlier examples), the products are two batched matmuls.

Pairs: the examples are streamed in a seeded random order; example j's K partners are drawn from
the W examples before it in that order (wrapping around), so batch size 1 works and memory holds
only the last W examples' projections. `partners="all"` is the exact mode: every ordered pair.
Scores keep the max over pairs (the paper) and the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eigenprune.core.batching import Batch, Encoded, batch_nll, check_fits, collate, teacher_forced
from eigenprune.core.errors import UsageError
from eigenprune.core.hooks import activation_grads_only, capture_io
from eigenprune.core.progress import bar as progress_bar
from eigenprune.edits.config import ScoreConfig  # noqa: F401  (defined torch-free for the CLI)
from eigenprune.edits.decompose import Components
from eigenprune.edits.targets import Target


@dataclass
class InputMeans:
    """Sums of each module's input at each offset from the last prompt token, over real tokens."""

    offset_min: int
    sums: dict[str, torch.Tensor]  # module -> (n_offsets, d_in) float64
    counts: torch.Tensor  # (n_offsets,) float64, the same for every module

    def table(self, module: str) -> torch.Tensor:
        """(n_offsets + 1, d_in) float32: the mean per offset; the last row is the overall mean,
        which also stands in for offsets never seen."""
        sums, counts = self.sums[module], self.counts
        overall = sums.sum(0) / counts.sum()
        per = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], overall)
        return torch.cat([per, overall[None]]).float()


@dataclass
class Scores:
    """Per target, one value per component in SVD order (descending singular value)."""

    max: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    n_pairs: int
    means: InputMeans

    def ranking(self, aggregate: str) -> dict[str, torch.Tensor]:
        """The scores components are ranked by: the max over pairs, or their mean (`FreezeConfig.aggregate`)."""
        if aggregate not in ("max", "mean"):
            raise ValueError(f"aggregate must be 'max' or 'mean', got '{aggregate}'")
        return self.max if aggregate == "max" else self.mean


def aligned(values: torch.Tensor, batch: Batch, offset_min: int, n_offsets: int) -> torch.Tensor:
    """Move (batch, pos, d) values onto the offset grid: (batch, n_offsets, d), zeros where absent."""
    slot = (batch.offsets - offset_min).masked_fill(batch.attention_mask == 0, n_offsets)  # (batch, pos)
    out = values.new_zeros(values.shape[0], n_offsets + 1, values.shape[2])
    out.scatter_(1, slot[..., None].expand_as(values), values)
    return out[:, :n_offsets]


def pair_effects(a: torch.Tensor, b_self: torch.Tensor, b_partner: torch.Tensor,
                 mask_partner: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """ΔL per pair and component: (pairs, offsets, k) ×3, (pairs, offsets), (k,) -> (pairs, k)."""
    delta = b_partner - b_self * mask_partner[..., None]  # (pairs, offsets, k)
    return S * (a * delta).sum(1)


def _partner_offsets(n: int, config: ScoreConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, K) distinct steps back in the stream, each in 1..W."""
    if config.partners == "all":
        return torch.arange(1, n).expand(n, n - 1)
    window = min(n - 1, max(config.window, config.partners))
    k = min(config.partners, window)
    return torch.rand(n, window, generator=generator).argsort(1)[:, :k] + 1


def _loss_and_backward(model: nn.Module, batch: Batch) -> None:
    batch_nll(model, batch).sum().backward()


def _distributed() -> tuple[int, int]:
    """(rank, world size) when torch.distributed is running, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Stream:
    """The scoring pass over the examples in stream order, batch by batch.

    Keeps a ring of the last `window + batch_size` examples' input projections b (the partners'
    side of a pair) and, for the first `window` examples, their (a, b) until the end of the stream
    brings their wrapped-around partners. Under torch.distributed each rank processes a contiguous
    share of the batches, first re-running (forward only) the batches before its share that hold
    its partners, so every rank computes exactly the pairs one process would.
    """

    def __init__(self, model, targets, components, encoded, pad_id, config: ScoreConfig) -> None:
        n = len(encoded)
        self.model, self.targets, self.encoded, self.pad_id, self.config = model, targets, encoded, pad_id, config
        self.device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(config.seed)
        self.order = torch.randperm(n, generator=generator).tolist()
        self.steps = _partner_offsets(n, config, generator)  # (n, K)
        self.window = int(self.steps.max())
        self.capacity = self.window + config.batch_size
        self.ring_keeps_all = n <= self.capacity  # nothing is overwritten: the ring holds every example's b
        self.dense = config.partners == "all"  # pairs fill most of (batch × ring): matmuls beat gathers
        self.offset_min = 1 - max(len(e.prompt_ids) for e in encoded)
        self.n_offsets = max(len(e.answer_ids) for e in encoded) - self.offset_min
        self.modules = sorted({t.module_name for t in targets})
        dev = self.device
        self.basis = {t.name: (components[t.name].U.to(dev), components[t.name].S.to(dev),
                               components[t.name].Vh.t().to(dev)) for t in targets}
        self.sums = {m: torch.zeros(self.n_offsets, t_in, dtype=torch.float64, device=dev)
                     for m, t_in in {t.module_name: t.in_features for t in targets}.items()}
        self.counts = torch.zeros(self.n_offsets, dtype=torch.float64, device=dev)
        # the partners' b by ring slot: (k, offsets, slots) for matmuls, (slots, offsets, k) for gathers
        self.ring = {t.name: torch.zeros((t.n_components, self.n_offsets, self.capacity) if self.dense
                                         else (self.capacity, self.n_offsets, t.n_components), device=dev)
                     for t in targets}
        self.ring_mask = torch.zeros(self.capacity, self.n_offsets, device=dev)
        # the first `window` examples' a (and b, unless the ring keeps every example) until finish_head
        self.head: list[int] = []  # stream positions held, in the order they came
        self.head_a = {t.name: torch.zeros(min(self.window, n), self.n_offsets, t.n_components, device=dev)
                       for t in targets}
        self.head_b = {} if self.ring_keeps_all else {name: torch.zeros_like(a) for name, a in self.head_a.items()}
        self.best = {t.name: torch.full((t.n_components,), -torch.inf, device=dev) for t in targets}
        self.total = {t.name: torch.zeros(t.n_components, dtype=torch.float64, device=dev) for t in targets}
        self.n_pairs = 0

    def batch_positions(self) -> list[list[int]]:
        n, size = len(self.encoded), self.config.batch_size
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]

    def _aligned(self, values: torch.Tensor, batch: Batch) -> torch.Tensor:
        return aligned(values, batch, self.offset_min, self.n_offsets)

    def _ring_write(self, name: str, slots: torch.Tensor, b: torch.Tensor) -> None:
        if self.dense:
            self.ring[name][..., slots] = b.permute(2, 1, 0)
        else:
            self.ring[name][slots] = b

    def _ring_read(self, name: str, slots: torch.Tensor) -> torch.Tensor:  # (slots, offsets, k)
        return self.ring[name][..., slots].permute(2, 1, 0) if self.dense else self.ring[name][slots]

    def _accumulate(self, name: str, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor,
                    partners: torch.Tensor) -> None:
        """Pairs (a[rows], b[rows]) × ring[partners]; a, b (examples, offsets, k), rows and partners (pairs,)."""
        ring, ring_mask, S = self.ring[name], self.ring_mask, self.basis[name][1]
        if self.dense:
            # every example against every ring slot as two matmuls per component, (k, examples, slots),
            # then reduced over the listed pairs. Shapes depend only on the batch, so ranks get one
            # process's bits; s_i ≥ 0 scales after the max without changing it.
            valid = torch.zeros(a.shape[0], self.capacity, dtype=torch.bool, device=a.device)
            valid[rows, partners] = True
            a_k = a.permute(2, 0, 1).contiguous()  # (k, examples, offsets)
            effects = torch.bmm(a_k, ring)  # Σ_t a_e b_f
            effects -= (a_k * b.permute(2, 0, 1)) @ ring_mask.t()  # Σ_t a_e b_e m_f
            best = effects.masked_fill(~valid, -torch.inf).amax((1, 2))  # (k,)
            self.best[name] = torch.maximum(self.best[name], S * best)
            self.total[name] += S.double() * (effects * valid).sum((1, 2), dtype=torch.float64)
            return
        for start in range(0, rows.numel(), 256):  # 256 pairs at a time: memory stays bounded
            r, p = rows[start : start + 256], partners[start : start + 256]
            effects = pair_effects(a[r], b[r], ring[p], ring_mask[p], S)  # (chunk, k)
            self.best[name] = torch.maximum(self.best[name], effects.max(0).values)
            self.total[name] += effects.sum(0, dtype=torch.float64)

    def step(self, positions: list[int], cap, full: bool) -> None:
        """One batch. `full`: forward+backward, means and pairs; else forward only, to fill the ring."""
        batch = collate(self.encoded, [self.order[j] for j in positions], self.pad_id).to(self.device)
        cap.clear()
        if full:
            _loss_and_backward(self.model, batch)
        else:
            with torch.no_grad():
                teacher_forced(self.model, batch, last=1)  # only the captured inputs matter
        mask = self._aligned(batch.attention_mask[..., None].float(), batch)[..., 0]  # (batch, offsets)
        slots = torch.tensor(positions, device=self.device) % self.capacity
        self.ring_mask[slots] = mask
        # (batch, pos, d_in); .to(): with --device-map auto the layers sit on several devices
        inputs = {m: cap.inputs[m].to(self.device).float() for m in self.modules}
        if full:
            self.counts += mask.sum(0, dtype=torch.float64)
            for m in self.modules:
                self.sums[m] += self._aligned(inputs[m], batch).sum(0, dtype=torch.float64)
        # pairs whose partner is already in the ring: (row in batch, partner's ring slot)
        rows, partners = [], []
        for r, j in enumerate(positions):
            for step in self.steps[j].tolist():
                if j - step >= 0:
                    rows.append(r)
                    partners.append((j - step) % self.capacity)
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        partners_t = torch.tensor(partners, dtype=torch.long, device=self.device)
        heads = [(r, j) for r, j in enumerate(positions) if j < self.window] if full else []
        head_rows = torch.tensor([r for r, _ in heads], dtype=torch.long, device=self.device)
        head_slots = torch.tensor([j for _, j in heads], dtype=torch.long, device=self.device)
        self.head += [j for _, j in heads]
        for t in self.targets:
            U, _, V = self.basis[t.name]
            b = self._aligned(inputs[t.module_name] @ V, batch)  # (batch, offsets, k)
            self._ring_write(t.name, slots, b)
            if not full:
                continue
            grads = cap.grads[t.module_name][..., t.rows[0] : t.rows[1]].to(self.device).float()  # (batch, pos, rows)
            a = self._aligned(grads @ U, batch)  # (batch, offsets, k)
            if heads:
                self.head_a[t.name][head_slots] = a[head_rows]
                if not self.ring_keeps_all:
                    self.head_b[t.name][head_slots] = b[head_rows]
            if rows:
                self._accumulate(t.name, a, b, rows_t, partners_t)
        if full:
            self.n_pairs += len(rows)

    def finish_head(self) -> None:
        """Pairs of the first examples with partners at the end of the stream (now in the ring), one
        stream batch of them at a time (the same groups under torch.distributed as in one process)."""
        n, size = len(self.encoded), self.config.batch_size
        groups: dict[int, list[int]] = {}
        for j in sorted(self.head):
            groups.setdefault(j // size, []).append(j)
        for heads in groups.values():
            rows, partners = [], []
            for i, j in enumerate(heads):
                for step in self.steps[j].tolist():
                    if j - step < 0:
                        rows.append(i)
                        partners.append((j - step + n) % self.capacity)
            if not rows:
                continue
            rows_t = torch.tensor(rows, dtype=torch.long, device=self.device)
            partners_t = torch.tensor(partners, dtype=torch.long, device=self.device)
            index = torch.tensor(heads, dtype=torch.long, device=self.device)
            for t in self.targets:
                a = self.head_a[t.name][index]  # (heads, offsets, k)
                # in exact mode ring slot j holds example j
                b = self._ring_read(t.name, index) if self.ring_keeps_all else self.head_b[t.name][index]
                self._accumulate(t.name, a, b, rows_t, partners_t)
            self.n_pairs += len(rows)

    def run(self, progress: bool | str) -> None:
        rank, world = _distributed()
        batches = self.batch_positions()
        share = [batches[i] for i in range(len(batches)) if i * world // len(batches) == rank]
        before = [b for b in batches if share and b[-1] < share[0][0] and b[-1] >= share[0][0] - self.window]
        tail_start = len(self.encoded) - self.window
        after = [b for b in batches if share and b[0] > share[-1][-1] and b[-1] >= tail_start]
        bar = progress_bar(total=sum(len(b) for b in share), progress=progress if rank == 0 else False,
                           what="scoring", unit="ex")
        try:
            with activation_grads_only(self.model), capture_io(self.model, self.modules) as cap:
                for positions in before:
                    self.step(positions, cap, full=False)
                for positions in share:
                    self.step(positions, cap, full=True)
                    bar.update(len(positions))
                if self.head:
                    for positions in after:
                        self.step(positions, cap, full=False)
            self.finish_head()
        finally:
            bar.close()
        if world > 1:
            self._reduce()

    def _reduce(self) -> None:
        import torch.distributed as dist

        for name in self.best:
            dist.all_reduce(self.best[name], op=dist.ReduceOp.MAX)
            dist.all_reduce(self.total[name])
        for m in self.sums:
            dist.all_reduce(self.sums[m])
        dist.all_reduce(self.counts)
        pairs = torch.tensor([self.n_pairs], dtype=torch.float64, device=self.device)
        dist.all_reduce(pairs)
        self.n_pairs = int(pairs.item())


def score(
    model: nn.Module,
    targets: list[Target],
    components: dict[str, Components],
    encoded: list[Encoded],
    pad_id: int,
    config: ScoreConfig | None = None,
    progress: bool | str = True,
) -> Scores:
    """Score every component of every target on `encoded` (one forward+backward per batch).

    Under torch.distributed, every rank calls this with the same arguments and gets the same result.
    """
    config = config or ScoreConfig()
    if len(encoded) < 2:
        raise UsageError(f"scoring pairs different examples, so it needs at least 2 (got {len(encoded)})")
    check_fits(model, encoded)
    stream = _Stream(model, targets, components, encoded, pad_id, config)
    was_training = model.training
    model.eval()
    try:
        stream.run(progress)
    finally:
        model.train(was_training)
    means = InputMeans(stream.offset_min, {m: s.cpu() for m, s in stream.sums.items()}, stream.counts.cpu())
    return Scores({k: v.cpu() for k, v in stream.best.items()},
                  {k: (v / stream.n_pairs).float().cpu() for k, v in stream.total.items()}, stream.n_pairs, means)
