"""Two controls that reuse eigenprune's SVDs and bias, and change only *which* components are frozen.

- `run_random`: as many components as eigenprune's chosen edit froze, drawn uniformly at random over
  all target components, with the same bias freezing. If eigenprune's gain is no larger than this,
  the scores are not what helps: freezing anything (plus a mean bias) would. Several seeds; no choice
  is made on dev (the number of components is eigenprune's dev choice). The comparison counts the
  seeds' own spread: the difference's CI is a two-level bootstrap (seeds, then examples within folds;
  `significance.two_level_diff_ci`), and eigenprune's test accuracy is ranked among the seeds' with
  the permutation p-value (1 + #seeds at least as good) / (1 + #seeds) (`significance.seed_rank_pvalue`).
  The default seed count is the fewest that can reach p < 0.05 (`significance.seeds_needed`: 20), each
  seed one test evaluation per fold.
- `run_smallest`: freeze the components with the smallest singular values (ranked globally or per
  target, following `scope`), with the configured bias, over the same p list, chosen on dev like
  eigenprune. This asks whether the scores beat the obvious "small components are noise" heuristic.

Both take the `ScoreRun` that eigenprune's scoring produced, so they share its targets, SVDs and the
mean inputs behind the bias.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from eigenprune.edits.artifact import ScoreRun
from eigenprune.edits.freeze import Edit, FreezeConfig, build_edit, make_edit
from eigenprune.evaluation.significance import seed_rank_pvalue, seeds_needed, two_level_diff_ci
from eigenprune.evaluation.stats import ALPHA, Difference, mean_sd, significance
from eigenprune.methods.base import (
    MethodResult,
    accuracy,
    edit_applier,
    edit_changed_params,
    edit_saver,
    evaluate_edit,
)
from eigenprune.methods.registry import Context, Pooled, register
from eigenprune.protocol.harness import Harness, base_correct, chosen_on_dev, ci, diff_ci


def random_components(score_run: ScoreRun, n_frozen: int, seed: int) -> dict[str, torch.Tensor]:
    """`n_frozen` component indices per target, uniform without replacement over all targets' components."""
    sizes = [t.n_components for t in score_run.targets]
    total = sum(sizes)
    if not 0 <= n_frozen <= total:
        raise ValueError(f"n_frozen must be in [0, {total}], got {n_frozen}")
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(total, generator=generator)[:n_frozen]  # (n_frozen,) indices into all components
    starts = torch.tensor([0, *sizes]).cumsum(0)  # (n_targets + 1,)
    return {t.name: torch.sort(flat[(flat >= starts[i]) & (flat < starts[i + 1])] - starts[i]).values
            for i, t in enumerate(score_run.targets)}


def random_edit(score_run: ScoreRun, n_frozen: int, seed: int, freeze: FreezeConfig) -> Edit:
    removed = random_components(score_run, n_frozen, seed)
    return build_edit(score_run.targets, score_run.components, removed, score_run.scores.means, freeze)


def smallest_edit(score_run: ScoreRun, freeze: FreezeConfig) -> Edit:
    """Freeze the fraction `freeze.p` of components with the smallest singular values."""
    by_size = {name: c.S for name, c in score_run.components.items()}
    return make_edit(score_run.targets, score_run.components, by_size, score_run.scores.means, freeze)


def _base(harness: Harness, base: dict[str, torch.Tensor] | None, splits: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(base or {}) | {split: base_correct(harness, base, split) for split in splits}


def run_random(harness: Harness, score_run: ScoreRun, n_frozen: int, seeds: int = 5,
               freeze: FreezeConfig | None = None, first_seed: int = 0,
               base: dict[str, torch.Tensor] | None = None, side_effect_seeds: int = 0,
               dev_seeds: int | None = None) -> MethodResult:
    """Freeze `n_frozen` random components, once per seed; evaluate test for each and dev for the first `dev_seeds`.

    Nothing is chosen on dev, so dev is evaluated only to report the control's dev accuracy: by the first
    `dev_seeds` seeds (None: every seed). `dev` of the result holds each dev example's correctness averaged over
    those seeds, `test` each test example's averaged over all seeds (floats in [0, 1]): their mean is the mean
    accuracy over seeds, and a paired comparison with another method
    compares it with the random control's expected correctness on the same examples. `runs` has one
    row per seed; the saved edit is the first seed's. `extra["_test_seeds"]` (never written to JSON) is
    each seed's (seeds, n_test) test correctness, for comparisons that count the seeds' spread;
    `extra["_side_effect_variants"]` puts each of the first `side_effect_seeds` seeds' edits on a model
    (`experiments.fold_side_effects` measures each).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    t0 = time.perf_counter()
    n_components = sum(t.n_components for t in score_run.targets)
    freeze = dataclasses.replace(freeze or harness.config.freeze_at(0.0), p=min(n_frozen / n_components, 0.999999))
    n_boot = harness.config.n_boot
    seed_list = list(range(first_seed, first_seed + seeds))
    dev_seeds = seeds if dev_seeds is None else min(max(dev_seeds, 1), seeds)
    edits, devs, tests = [], [], []
    if n_frozen == 0:  # nothing to draw: every seed is the base model
        base = _base(harness, base, ("dev", "test"))
        edits = [random_edit(score_run, 0, s, freeze) for s in seed_list]
        devs, tests = [base["dev"]] * dev_seeds, [base["test"]] * seeds
    else:
        for i, s in enumerate(seed_list):
            edit = random_edit(score_run, n_frozen, s, freeze)
            edits.append(edit)
            if i < dev_seeds:
                devs.append(evaluate_edit(harness, edit, "dev"))
            tests.append(evaluate_edit(harness, edit, "test"))
    dev = torch.stack([d.float() for d in devs]).mean(0)  # (n_dev,) mean over the first dev_seeds seeds
    test = torch.stack([t.float() for t in tests]).mean(0)  # (n_test,) mean over every seed
    dev_accs = [accuracy(d) for d in devs] + [None] * (seeds - dev_seeds)
    runs = [{"seed": s, "n_frozen": e.n_frozen, "dev_acc": d, "test": ci(t, n_boot)}
            for s, e, d, t in zip(seed_list, edits, dev_accs, tests, strict=True)]
    extra = {
        "seeds": seed_list, "n_frozen": n_frozen, "n_components": n_components, "dev_seeds": dev_seeds,
        "dev_acc_mean_sd": _mean_sd_json(a for a in dev_accs if a is not None),
        "test_acc_mean_sd": dict(zip(("mean", "sd"), mean_sd(r["test"]["acc"] for r in runs), strict=True)),
        "note": (f"test holds per-example correctness averaged over the {seeds} seeds, dev over the first "
                 f"{dev_seeds} (nothing is chosen on dev: n_frozen is eigenprune's dev choice)"),
        "_test_seeds": torch.stack([t.bool() for t in tests]),  # (seeds, n_test)
        "_side_effect_variants": [(f"seed {s}", edit_applier(e))
                                  for s, e in zip(seed_list[:side_effect_seeds], edits, strict=False)],
    }
    if base is not None and "test" in base:
        for run, t in zip(runs, tests, strict=True):
            run["diff_vs_base"] = diff_ci(base["test"], t, n_boot)
        extra["diff_mean_sd"] = dict(zip(("mean", "sd"), mean_sd(r["diff_vs_base"]["diff"] for r in runs),
                                         strict=True))
    if n_frozen == 0:
        extra["identity"] = ("eigenprune chose p = 0 (no components frozen), so the random control freezes "
                             "nothing and is the base model")
    config = {"n_frozen": n_frozen, "seeds": seeds, "first_seed": first_seed,
              **{k: v for k, v in dataclasses.asdict(freeze).items() if k != "p"}}
    meta = score_run.edit_meta() | {"method": "random", "seed": seed_list[0]}
    return MethodResult(
        method="random", config=config, dev=dev, test=test, dev_evaluations=0, wall_s=time.perf_counter() - t0,
        changed_params=edit_changed_params(edits[0]), save=edit_saver(edits[0], meta), runs=runs, extra=extra,
        applied=edit_applier(edits[0]),
        modules=edits[0].modules,
    )


def run_smallest(harness: Harness, score_run: ScoreRun, ps: Sequence[float] | None = None,
                 freeze: FreezeConfig | None = None, base: dict[str, torch.Tensor] | None = None) -> MethodResult:
    """Sweep p over the smallest singular values, choose on dev (p = 0 competes; ties go to the smaller p; with
    the run's `select="1se"` the one-standard-error rule)."""
    t0 = time.perf_counter()
    freeze = freeze or harness.config.freeze_at(0.0)
    ps = sorted(float(p) for p in (ps if ps is not None else harness.config.grid))
    base = _base(harness, base, ("dev",))
    edits = [smallest_edit(score_run, dataclasses.replace(freeze, p=p)) for p in ps]
    devs = [evaluate_edit(harness, edit, "dev") for edit in edits]
    sweep = [{"p": p, "n_frozen": e.n_frozen, "dev_acc": accuracy(d)}
             for p, e, d in zip(ps, edits, devs, strict=True)]
    best = chosen_on_dev(base["dev"], devs, harness.config.select)  # accuracy, or the one-SE rule
    if best < 0:
        edit, dev = smallest_edit(score_run, dataclasses.replace(freeze, p=0.0)), base["dev"]
        test = base_correct(harness, base, "test")
    else:
        edit, dev = edits[best], devs[best]
        test = evaluate_edit(harness, edit, "test")
    config = {"p": ps[best] if best >= 0 else 0.0, "n_frozen": edit.n_frozen, "ranking": "singular value",
              **{k: v for k, v in dataclasses.asdict(freeze).items() if k not in ("p", "aggregate")}}
    return MethodResult(
        method="smallest", config=config, dev=dev, test=test, dev_evaluations=1 + len(ps),
        wall_s=time.perf_counter() - t0, changed_params=edit_changed_params(edit),
        save=edit_saver(edit, score_run.edit_meta() | {"method": "smallest"}), extra={"sweep": sweep},
        applied=edit_applier(edit),
        modules=edit.modules,
    )


@dataclass
class RandomSettings:
    """The random control: how many draws."""

    seeds: int = field(default=seeds_needed(0.05), metadata={
        "help": "random draws, one edit each (default: the fewest whose rank test can reach p < 0.05)"})
    first_seed: int = field(default=0, metadata={"help": "seed of the first draw"})
    side_effect_seeds: int = field(default=5, metadata={
        "help": "with side effects: how many of the draws (the first ones) to measure, in every fold; each is "
                "one pass over the text sample"})
    dev_seeds: int = field(default=1, metadata={
        "help": "how many of the draws (the first ones) are also evaluated on dev, only to report the control's dev "
                "accuracy (nothing is chosen on dev); each is one dev evaluation per fold"})

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        if self.dev_seeds < 1:
            raise ValueError(f"dev_seeds must be at least 1, got {self.dev_seeds}")
        if self.side_effect_seeds < 1:
            raise ValueError(f"side_effect_seeds must be at least 1, got {self.side_effect_seeds}")


@dataclass
class SmallestSettings:
    """The smallest-singular-value control: which fractions."""

    p: tuple[float, ...] | None = field(default=None, metadata={"help": "fractions to try; None: the run's --p"})


def seed_comparison(eigen_test: torch.Tensor, seed_tests: torch.Tensor, n_boot: int,
                    fold_of: list[int] | None = None) -> dict:
    """eigenprune's (n,) test correctness against the control's (seeds, n): the difference eigenprune - mean over
    seeds with its two-level bootstrap CI (seeds, then examples within `fold_of`'s folds), the same difference
    with examples resampled alone (what was reported before seeds counted; for reference), and eigenprune's rank
    among the seeds' test accuracies with its permutation p-value and the smallest p the seed count can give."""
    seeds = seed_tests.float().numpy()  # (seeds, n)
    treated = eigen_test.float().numpy()  # (n,)
    diff, lo, hi = two_level_diff_ci(treated, seeds, strata=fold_of, n_boot=n_boot)
    rank, p, p_min = seed_rank_pvalue(float(treated.mean()), seeds.mean(axis=1))
    if fold_of is None:
        examples_only = diff_ci(seed_tests.float().mean(0), eigen_test.float(), n_boot)
    else:
        from eigenprune.evaluation.stats import fold_paired_diff_ci

        examples_only = Difference(*fold_paired_diff_ci(seeds.mean(0), treated, fold_of, n_boot=n_boot)).to_dict()
    return {"diff": Difference(diff, lo, hi).to_dict(), "diff_examples_only": examples_only,
            "rank": rank, "of": int(seeds.shape[0]) + 1, "p_value": p, "p_min": p_min}


def _versus(eigen: MethodResult, rand: MethodResult, n_boot: int) -> tuple[dict, str]:
    """eigenprune against the random control: the difference counting seeds and examples, eigenprune's rank among
    the seeds, and one sentence for the verdict."""
    accs = [r["test"]["acc"] for r in rand.runs]
    return _versus_words(rand.extra["n_frozen"], accs, seed_comparison(eigen.test, rand.extra["_test_seeds"], n_boot),
                         accuracy(eigen.test))


def _versus_kind(sign: str | None, p_value: float, as_good: int, seeds: int) -> tuple[str, str]:
    """What the two tests say together, in words and as a key. The two-level CI compares eigenprune with the mean
    random draw (its uncertainty shrinks as seeds are added); the rank test with the draws themselves: eigenprune
    beats freezing random components only if both say so."""
    if sign == "gain" and p_value < ALPHA:
        return ("distinguishable from freezing random components: above the mean random draw (the CI excludes 0) and "
                f"above the draws themselves (permutation p < {ALPHA:g})"), "beats random"
    if sign == "gain":
        return (f"above the mean random draw (the CI excludes 0) but not above the draws themselves: {as_good} of "
                f"{seeds} draws did at least as well (permutation p >= {ALPHA:g}), so freezing as many random "
                "components can match it"), "above the mean draw only"
    if sign == "loss":
        return "worse than freezing random components (the CI lies below 0)", "worse than random"
    return "not distinguishable from freezing random components (the CI includes 0)", "not distinguishable"


def _versus_words(n_frozen: int | list[int], accs: list[float], comparison: dict, eigen_acc: float) -> tuple[dict, str]:
    """The comparison and its sentence from eigenprune's test accuracy, the seeds' test accuracies and
    `seed_comparison`'s numbers; `n_frozen` is one number, or one per fold when pooled over folds."""
    d = comparison["diff"]
    versus = {"n_frozen": n_frozen, "random_test_accs": accs, **comparison}
    per_fold = isinstance(n_frozen, list)
    if not any(n_frozen if per_fold else [n_frozen]):
        return versus, ("eigenprune chose p = 0 (the base model)" + (" in every fold" if per_fold else "") +
                        ", so the random control is the base model too and there is no eigenprune effect to tell "
                        "apart from freezing random components.")
    where = "above" if eigen_acc > max(accs) else "below" if eigen_acc < min(accs) else "inside"
    kind, versus["verdict"] = _versus_kind(significance(d), comparison["p_value"], comparison["rank"] - 1, len(accs))
    components = (f"{', '.join(map(str, n_frozen))} components in folds 1-{len(n_frozen)}, pooled over the folds"
                  if per_fold else f"{n_frozen} components")
    floor = comparison["p_min"]
    reach = (f"the smallest p {len(accs)} seeds can give is {floor:.3f}" + (
        "" if floor < 0.05 else f", so this test cannot reach p < 0.05 (`--set random.seeds={seeds_needed(0.05)}` "
                                "can)"))
    return versus, (f"eigenprune vs the random control ({components}, {len(accs)} seeds): test difference "
                    f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] (bootstrap over seeds and examples); "
                    f"eigenprune's effect is {kind}, and its test accuracy {eigen_acc:.3f} lies {where} the random "
                    f"seeds' range [{min(accs):.3f}, {max(accs):.3f}], rank {comparison['rank']} of "
                    f"{comparison['of']} (permutation p = {comparison['p_value']:.3f}; {reach}).")


def _mean_sd_json(values: Iterable[float]) -> dict[str, float | None]:
    """Mean and sd for a JSON report: the sd of a single value is null (not NaN, which is not JSON)."""
    mean, sd = mean_sd(values)
    return {"mean": mean, "sd": None if math.isnan(sd) else sd}


def _acc_text(acc: float | None) -> str:
    return "—" if acc is None else f"{acc:.3f}"


def _ci_text(c: dict) -> str:
    return f"{c['acc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}]"


def _pool_random(pooled: Pooled) -> None:
    """The random control over folds: each seed's test accuracy pooled over all folds' test examples, and the
    comparison with eigenprune's pooled result (its CI resampling within folds)."""
    rand, folds = pooled.result, pooled.folds
    eigen = pooled.need("eigenprune").result
    n_frozen = [f.extra["n_frozen"] for f in folds]
    n = sum(int(f.test.numel()) for f in folds)
    seeds = [r["seed"] for r in folds[0].runs]
    accs = [sum(f.runs[j]["test"]["acc"] * f.runs[j]["test"]["n"] for f in folds) / n for j in range(len(seeds))]
    devs = [None if folds[0].runs[j]["dev_acc"] is None else sum(f.runs[j]["dev_acc"] for f in folds) / len(folds)
            for j in range(len(seeds))]
    seed_tests = torch.stack([pooled.pool([f.extra["_test_seeds"][j] for f in folds])
                              for j in range(len(seeds))])  # (seeds, N): each seed's edits, every fold's test
    comparison = seed_comparison(eigen.test, seed_tests, pooled.n_boot, pooled.fold_of)
    rand.extra["vs_eigenprune"], rand.verdict = _versus_words(n_frozen, accs, comparison, accuracy(eigen.test))
    rand.markers = [{"acc": a, "marker": "x", "label": None} for a in accs]
    rand.sections = ["\n".join([f"## Random control, per seed (pooled over {len(folds)} folds)", "",
                                 "| seed | components per fold | dev acc (mean over folds) | test acc (pooled) |",
                                 "|---|---|---|---|",
                                 *(f"| {s} | {', '.join(map(str, n_frozen))} | {_acc_text(d)} | {a:.3f} |"
                                   for s, d, a in zip(seeds, devs, accs, strict=True))])]


@register("random", RandomSettings, default=2, needs=("eigenprune",), role="control", flags={"--random-seeds": "seeds"},
          pool=_pool_random, summary="freeze as many components as eigenprune chose, drawn at random (several seeds)")
def random_control(harness: Harness, config: RandomSettings, ctx: Context) -> MethodResult:
    eigen = ctx.result("eigenprune")
    result = run_random(harness, eigen.score_run, eigen.edit.n_frozen, config.seeds,
                        first_seed=config.first_seed, base=ctx.base, side_effect_seeds=config.side_effect_seeds,
                        dev_seeds=config.dev_seeds)
    result.extra["vs_eigenprune"], result.verdict = _versus(eigen, result, harness.config.n_boot)
    result.markers = [{"acc": r["test"]["acc"], "marker": "x", "label": None} for r in result.runs]
    result.sections = ["\n".join(["## Random control, per seed", "", "| seed | components | dev acc | test acc "
                                  "[95% CI] |", "|---|---|---|---|",
                                  *(f"| {r['seed']} | {r['n_frozen']} | {_acc_text(r['dev_acc'])} | "
                                    f"{_ci_text(r['test'])} |"
                                    for r in result.runs)])]
    result.notes = ["random chooses nothing on dev (its number of components is eigenprune's dev choice), so its "
                    f"dev evals are 0; its test is per-example correctness averaged over its {config.seeds} seeds, "
                    f"its dev over the first {min(config.dev_seeds, config.seeds)} (`--set random.dev_seeds=N`)."]
    return result


@register("smallest", SmallestSettings, default=3, needs=("eigenprune",),
          summary="freeze the components with the smallest singular values (p chosen on dev)")
def smallest_control(harness: Harness, config: SmallestSettings, ctx: Context) -> MethodResult:
    return run_smallest(harness, ctx.result("eigenprune").score_run, config.p, base=ctx.base)
