"""Attribution-patching scores for every singular component, and the mean inputs for freezing.

For target A = Σ_i s_i u_i v_iᵀ, an example e (module input x_e, output gradient g_e) and a partner
e′, patching e's input by e′'s through component i changes the loss, to first order, by

    ΔL_i(e, e′) = s_i Σ_t (g_{e,t}·u_i) (v_i·(x_{e′,t} − x_{e,t}))

over the positions t present in both, aligned by offset from the last prompt token. With
a = g·U and b = x·V per position (both (pos, k)), that is s ⊙ Σ_t a_e (b_e′ − b_e · m_e′): two
projections per batch and an elementwise product per pair, no loop over components.

Pairs: the examples are streamed in a seeded random order; example j's K partners are drawn from
the W examples before it in that order (wrapping around), so batch size 1 works and memory holds
only the last W examples' projections. `partners="all"` is the exact mode: every ordered pair.
Scores keep the max over pairs (the paper) and the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Batch, Encoded, answer_nll, collate
from .decompose import Components
from .errors import UsageError
from .hooks import activation_grads_only, capture_io
from .targets import Target


@dataclass
class ScoreConfig:
    """How to pair examples and batch them."""

    partners: int | str = field(default=4, metadata={"help": "partners per example, or 'all' (exact)"})
    window: int = field(default=32, metadata={"help": "partners come from this many preceding examples"})
    seed: int = field(default=0, metadata={"help": "seed of the stream order and partner draws"})
    batch_size: int = field(default=8, metadata={"help": "examples per forward/backward"})

    def __post_init__(self) -> None:
        if isinstance(self.partners, str):
            if self.partners != "all":
                if not self.partners.isdigit():
                    raise ValueError(f"partners must be a positive integer or 'all', got '{self.partners}'")
                self.partners = int(self.partners)
        if self.partners != "all" and self.partners < 1:
            raise ValueError(f"partners must be at least 1, got {self.partners}")
        if self.window < 1:
            raise ValueError(f"window must be at least 1, got {self.window}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


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
    logits = model(**batch.model_inputs(), use_cache=False).logits  # (batch, pos, vocab)
    answer_nll(logits, batch.labels).sum().backward()


def score(
    model: nn.Module,
    targets: list[Target],
    components: dict[str, Components],
    encoded: list[Encoded],
    pad_id: int,
    config: ScoreConfig | None = None,
    progress: bool = True,
) -> Scores:
    """Score every component of every target on `encoded` (one forward+backward per batch)."""
    config = config or ScoreConfig()
    n = len(encoded)
    if n < 2:
        raise UsageError(f"scoring pairs different examples, so it needs at least 2 (got {n})")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=generator).tolist()
    steps = _partner_offsets(n, config, generator)  # (n, K)
    window = int(steps.max())
    capacity = window + config.batch_size

    offset_min = 1 - max(len(e.prompt_ids) for e in encoded)
    n_offsets = max(len(e.answer_ids) for e in encoded) - offset_min
    modules = sorted({t.module_name for t in targets})
    basis = {t.name: (components[t.name].U.to(device), components[t.name].S.to(device),
                      components[t.name].Vh.t().to(device)) for t in targets}
    sums = {m: None for m in modules}
    counts = torch.zeros(n_offsets, dtype=torch.float64, device=device)
    ring = {t.name: torch.zeros(capacity, n_offsets, t.n_components, device=device) for t in targets}
    ring_mask = torch.zeros(capacity, n_offsets, device=device)
    head: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # first `window` examples' (a, b)
    best = {t.name: torch.full((t.n_components,), -torch.inf, device=device) for t in targets}
    total = {t.name: torch.zeros(t.n_components, dtype=torch.float64, device=device) for t in targets}
    n_pairs = 0

    def accumulate(name: str, a, b_self, b_partner, mask_partner) -> None:
        for start in range(0, a.shape[0], 256):  # bound memory on large pair sets
            sl = slice(start, start + 256)
            effects = pair_effects(a[sl], b_self[sl], b_partner[sl], mask_partner[sl], basis[name][1])
            best[name] = torch.maximum(best[name], effects.max(0).values)
            total[name] += effects.sum(0, dtype=torch.float64)

    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="scoring", unit="ex", disable=not progress)
    try:
        with activation_grads_only(model), capture_io(model, modules) as cap:
            for start in range(0, n, config.batch_size):
                positions = list(range(start, min(start + config.batch_size, n)))
                batch = collate(encoded, [order[j] for j in positions], pad_id).to(device)
                cap.clear()
                _loss_and_backward(model, batch)
                mask = aligned(batch.attention_mask[..., None].float(), batch, offset_min, n_offsets)[..., 0]
                counts += mask.sum(0, dtype=torch.float64)
                for m in modules:
                    x = aligned(cap.inputs[m].float(), batch, offset_min, n_offsets).sum(0, dtype=torch.float64)
                    sums[m] = x if sums[m] is None else sums[m] + x
                slots = torch.tensor(positions, device=device) % capacity
                ring_mask[slots] = mask
                # pairs whose partner is already in the ring: (row in batch, partner stream position)
                rows, partners = [], []
                for r, j in enumerate(positions):
                    for step in steps[j].tolist():
                        if j - step >= 0:
                            rows.append(r)
                            partners.append((j - step) % capacity)
                rows_t = torch.tensor(rows, dtype=torch.long, device=device)
                partners_t = torch.tensor(partners, dtype=torch.long, device=device)
                for t in targets:
                    U, _, V = basis[t.name]
                    grads = cap.grads[t.module_name][..., t.rows[0] : t.rows[1]].float()
                    a = aligned(grads @ U, batch, offset_min, n_offsets)  # (batch, offsets, k)
                    b = aligned(cap.inputs[t.module_name].float() @ V, batch, offset_min, n_offsets)
                    ring[t.name][slots] = b
                    early = [r for r, j in enumerate(positions) if j < window]
                    if early:
                        prev = head.get(t.name)
                        new = (a[early], b[early])
                        head[t.name] = new if prev is None else (torch.cat([prev[0], new[0]]),
                                                                 torch.cat([prev[1], new[1]]))
                    if rows:
                        accumulate(t.name, a[rows_t], b[rows_t], ring[t.name][partners_t],
                                   ring_mask[partners_t])
                n_pairs += len(rows)
                bar.update(len(positions))
        # the first examples' partners at the end of the stream, now in the ring
        rows, partners = [], []
        for j in range(min(window, n)):
            for step in steps[j].tolist():
                if j - step < 0:
                    rows.append(j)
                    partners.append((j - step + n) % capacity)
        if rows:
            rows_t = torch.tensor(rows, device=device)
            partners_t = torch.tensor(partners, device=device)
            for t in targets:
                a, b = head[t.name]
                accumulate(t.name, a[rows_t], b[rows_t], ring[t.name][partners_t], ring_mask[partners_t])
            n_pairs += len(rows)
    finally:
        bar.close()
        model.train(was_training)

    means = InputMeans(offset_min, {m: s.cpu() for m, s in sums.items()}, counts.cpu())
    return Scores({k: v.cpu() for k, v in best.items()},
                  {k: (v / n_pairs).float().cpu() for k, v in total.items()}, n_pairs, means)
