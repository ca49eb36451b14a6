"""Does `EarlyExit.calibrate` keep the accuracy drop it promises on new data, and what does
the promise cost in FLOPs, at each calibration-set size?

A ResNet-style CNN with two "sdn" heads (the deep-supervision benchmark's model, trained with
self-distillation on 55,000 Fashion-MNIST training images) is run once on 5,000 held-out
training images and the 10,000 test images, and each image's head logits, main logits and
label are cached (`benchmarks/_exit_cache.py`). Every calibration below is then replayed from
the cache with the same code `calibrate` runs (`auxhead.exits.choose_thresholds`), so
thousands of calibrations take minutes.

Sizes (the default): the 15,000 cached images are pooled; for each calibration-set size in
--sizes, each of --splits random splits calibrates on that many of them and measures on the
rest. Per method: the share of splits whose drop on the rest exceeds eps (the guarantee says
at most delta = 10%, up to chance: the table gives its 95% Clopper-Pearson upper bound), the
mean FLOPs saved, and that saving as a share of the plain fit's (`method="empirical"`, no
guarantee) and of the oracle's (the cheapest thresholds within eps fitted on the evaluation
images themselves: the limit; on the first --oracle-splits splits, it varies little).

--power prints, instead, how often each valid test of "drop > eps" passes on simulated losses
whose drop is below eps (pure tensor ops, a minute): betting alone, betting combined with
Hoeffding-Bentkus on the same shifted loss (Bonferroni: 2 min(p)), betting combined with the
exact binomial test of the harm rate (which bounds the drop), and those two alone.

--detail adds the earlier table at --calib-size: the normal-approximation baseline,
temperature scaling, the compute budget, and the protocol (calibrate on the 5,000 held-out
training images, serve the test set).

Commands:

    OMP_NUM_THREADS=1 python benchmarks/_exit_cache.py --out runs/exit-guarantee/cache.pt
    OMP_NUM_THREADS=1 python benchmarks/exit_guarantee.py --cache runs/exit-guarantee/cache.pt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from auxhead.exits import (
    FlopProfile,
    choose_budget_thresholds,
    choose_thresholds,
    exit_indices,
)
from auxhead.exits import confidence as max_softmax
from auxhead.exits._bounds import (  # the tests themselves, for --power
    binomial_p_value,
    bonferroni_min,
    hoeffding_bentkus_p_value,
    wsr_p_values,
)


def score_fn(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The forward's score: max softmax of logits / T."""
    return max_softmax(logits if temperature == 1.0 else logits / temperature)


class Pool:
    """Cached logits of some images: scores at any temperature, correctness, FLOPs."""

    def __init__(self, heads: torch.Tensor, main: torch.Tensor, y: torch.Tensor) -> None:
        self.heads, self.y = heads, y  # (N, E, K), (N,)
        right = [heads[:, e].argmax(-1) == y for e in range(heads.shape[1])]
        self.correct = torch.stack([*right, main.argmax(-1) == y], dim=1)  # (N, E + 1)
        self.scores = self.scored((1.0,) * heads.shape[1])

    def scored(self, temperatures: tuple[float, ...]) -> torch.Tensor:
        return torch.stack(
            [score_fn(self.heads[:, e], t) for e, t in enumerate(temperatures)], dim=1
        ).double()


def midpoints(column: torch.Tensor, limit: int = 64) -> list[float]:
    """0, 1 and thresholds midway between neighbouring distinct scores, thinned to `limit`."""
    values = column.unique()
    middle = (values[:-1] + values[1:]) / 2
    if middle.numel() > limit:
        middle = middle[torch.linspace(0, middle.numel() - 1, limit).round().long().unique()]
    return [0.0, *middle.tolist(), 1.0]


def normal_search(scores, correct, profile, drop: float, confidence: float = 0.9):
    """The normal-approximation baseline: least FLOPs whose drop's normal-approximation
    upper bound (mean of the paired differences + z standard errors) is within `drop`, over
    every combination of per-exit candidate thresholds (ties: more samples right)."""
    n, n_exits = scores.shape
    main = correct[:, -1]
    main_hits = int(main.sum())
    z = statistics.NormalDist().inv_cdf(confidence)
    need = main_hits - math.floor(drop * n + 1e-9)
    grid = torch.cartesian_prod(
        *[torch.tensor(midpoints(scores[:, e]), dtype=torch.float64) for e in range(n_exits)]
    ).reshape(-1, n_exits)
    best, best_key = torch.ones(n_exits, dtype=torch.float64), None
    for thresholds in grid:
        exits = exit_indices(scores, thresholds)
        costs = torch.tensor(profile.exit_costs((thresholds < 1).tolist()), dtype=torch.float64)
        right = correct.gather(1, exits[:, None]).squeeze(1)
        hits, harms = int(right.sum()), int((main & ~right).sum())
        helped = hits - main_hits + harms  # D = -1 where the exit is right, main wrong
        mean = (main_hits - hits) / n  # mean of D = main right - exit right
        var = max(harms + helped - n * mean**2, 0.0) / max(n - 1, 1)
        if hits < need or mean + z * math.sqrt(var / n) > drop + 1e-12:
            continue
        key = (round(costs[exits].mean().item(), 9), -hits)
        if best_key is None or key < best_key:
            best, best_key = thresholds, key
    used = exit_indices(scores, best).bincount(minlength=n_exits + 1)[:n_exits] > 0
    return torch.where(used, best, 1.0)  # an exit nobody leaves at only costs its head


MODES = {
    "empirical": {"method": "empirical"},
    "normal 90%": None,
    "ltt 90% (default)": {"method": "ltt"},
    "ltt-harm 90%": {"method": "ltt-harm"},
    "ltt 90% + temperature": {"method": "ltt", "temperature": True},
    "max_flops=0.4, empirical": {"method": "empirical", "max_flops": 0.4},
    "max_flops=0.4, ltt 90%": {"method": "ltt", "max_flops": 0.4},
}


def calibrate(mode: dict | None, pool: Pool, profile: FlopProfile, eps: float, seed: int):
    """(thresholds, temperatures) for one mode, from the calibration pool."""
    n_exits = pool.heads.shape[1]
    if mode is None:
        return normal_search(pool.scores, pool.correct, profile, eps), (1.0,) * n_exits
    options = dict(mode)
    temperature = options.pop("temperature", False)
    budget = options.pop("max_flops", None)
    choose, target = (
        (choose_thresholds, {"max_accuracy_drop": eps})
        if budget is None
        else (choose_budget_thresholds, {"max_flops": budget})
    )
    choice = choose(
        pool.scores,
        pool.correct,
        profile,
        **target,
        confidence=0.9,
        logits=pool.heads if temperature else None,
        targets=pool.y if temperature else None,
        score_fn=score_fn if temperature else None,
        seed=seed,
        **options,
    )
    return torch.tensor(choice.thresholds, dtype=torch.float64), choice.temperatures


def measure(pool: Pool, profile: FlopProfile, thresholds, temperatures) -> dict[str, float]:
    scores = pool.scores if set(temperatures) == {1.0} else pool.scored(temperatures)
    exits = exit_indices(scores, thresholds)
    costs = torch.tensor(profile.exit_costs((thresholds < 1).tolist()), dtype=torch.float64)
    right = pool.correct.gather(1, exits[:, None]).squeeze(1)
    main = pool.correct[:, -1]
    return {
        "drop": (main.double().mean() - right.double().mean()).item(),
        "harm": (main & ~right).double().mean().item(),
        "flops": costs[exits].mean().item() / profile.full,
    }


def subset(pool: Pool, rows: torch.Tensor) -> Pool:
    out = Pool.__new__(Pool)
    out.heads, out.y = pool.heads[rows], pool.y[rows]
    out.correct, out.scores = pool.correct[rows], pool.scores[rows]
    return out


def summarise(results: list[dict], eps: float, budget: float, is_budget: bool) -> dict:
    drops = [r["drop"] for r in results]
    flops = [r["flops"] for r in results]
    return {
        "over_eps": sum(d > eps for d in drops) / len(drops),
        "harm_over_eps": sum(r["harm"] > eps for r in results) / len(results),
        "over_budget": sum(f > budget for f in flops) / len(flops),
        "drop_mean": statistics.fmean(drops),
        "drop_p90": sorted(drops)[int(0.9 * (len(drops) - 1))],
        "drop_max": max(drops),
        "saved_mean": 1 - statistics.fmean(flops),
        "saved_min": 1 - max(flops),
        "is_budget": is_budget,
    }


def detail(args: argparse.Namespace, cache: dict, profile: FlopProfile) -> None:
    """The earlier table: every mode at --calib-size, and the protocol."""
    start = time.perf_counter()
    held = Pool(cache["held"]["heads"], cache["held"]["main"], cache["held"]["y"])
    test = Pool(cache["test"]["heads"], cache["test"]["main"], cache["test"]["y"])
    everything = Pool(
        torch.cat([held.heads, test.heads]),
        torch.cat([cache["held"]["main"], cache["test"]["main"]]),
        torch.cat([held.y, test.y]),
    )
    n = len(everything.y)
    exchangeable: dict[str, list[dict]] = {name: [] for name in MODES}
    protocol: dict[str, list[dict]] = {name: [] for name in MODES}
    for split in range(args.splits):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + split))
        calib, rest = (
            subset(everything, order[: args.calib_size]),
            subset(everything, order[args.calib_size :]),
        )
        for name, mode in MODES.items():
            thresholds, temperatures = calibrate(mode, calib, profile, args.eps, seed=split)
            exchangeable[name].append(measure(rest, profile, thresholds, temperatures))
            if (mode is not None and mode["method"] == "ltt") or split == 0:
                thresholds, temperatures = calibrate(mode, held, profile, args.eps, seed=split)
                protocol[name].append(measure(test, profile, thresholds, temperatures))
        if split % 20 == 19:
            print(f"  {split + 1} splits, {time.perf_counter() - start:.0f} s", flush=True)

    print(
        f"\n(exchangeable) {args.splits} random splits of the {n} held-out + test images: "
        f"calibrate on {args.calib_size}, measure on the other {n - args.calib_size}\n"
    )
    print(
        "| mode | test drop > 0.5 pt | harm > 0.5 pt | FLOPs > 40% | test drop: mean / 90th pct "
        "/ max | FLOPs saved: mean / worst |"
    )
    print("|---|---|---|---|---|---|")
    for name in MODES:
        s = summarise(exchangeable[name], args.eps, args.budget, "max_flops" in name)
        print(
            f"| {name} | {s['over_eps']:.1%} | {s['harm_over_eps']:.1%} | "
            f"{s['over_budget']:.1%} | {s['drop_mean'] * 100:.2f} / {s['drop_p90'] * 100:.2f} / "
            f"{s['drop_max'] * 100:.2f} pt | {s['saved_mean']:.1%} / {s['saved_min']:.1%} |"
        )
    print(
        "\n(protocol) calibrate on the 5,000 held-out training images, measure on the 10,000 "
        f"test images (ltt: mean over {args.splits} seeds of its internal split)\n"
    )
    print("| mode | test drop | FLOPs saved | seeds with test drop > 0.5 pt |")
    print("|---|---|---|---|")
    for name in MODES:
        rows = protocol[name]
        drop = statistics.fmean(r["drop"] for r in rows)
        saved = 1 - statistics.fmean(r["flops"] for r in rows)
        over = sum(r["drop"] > args.eps for r in rows)
        print(f"| {name} | {drop * 100:.2f} pt | {saved:.1%} | {over} of {len(rows)} |")
    print(f"\ndetail: {time.perf_counter() - start:.0f} s")


SIZE_METHODS = {
    "empirical (plain fit, no guarantee)": {"method": "empirical"},
    "ltt-harm (harm rate, binomial, 30/70 split; the old default)": {"method": "ltt-harm"},
    "ltt (drop, betting, shared threshold, no split; the default)": {"method": "ltt"},
    "ltt, path_share=0.2 (drop, betting, per-exit path on 20%)": {
        "method": "ltt",
        "path_share": 0.2,
    },
}


def clopper_pearson_upper(k: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate, k events in n: the largest p with
    P(Bin(n, p) <= k) >= 1 - level."""
    if k >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))

    low, high = k / n, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) > 1 - level else (low, mid)
    return high


def oracle(pool: Pool, profile: FlopProfile, eps: float) -> dict[str, float]:
    """The cheapest thresholds within eps on `pool` itself, measured on it: the limit."""
    choice = choose_thresholds(
        pool.scores, pool.correct, profile, max_accuracy_drop=eps, method="empirical"
    )
    return measure(pool, profile, torch.tensor(choice.thresholds, dtype=torch.float64), (1.0,))


def sizes_table(args: argparse.Namespace, everything: Pool, profile: FlopProfile) -> None:
    """Per calibration-set size, per method: violations, saving, shares of plain and oracle;
    each size's rows printed as it ends (and, with --json, its raw results saved)."""
    n = len(everything.y)
    splits = range(args.first_split, args.first_split + args.splits)
    print(
        f"\n(sizes) random splits {splits.start} to {splits.stop - 1} of the {n} held-out + test "
        f"images per size: calibrate on the size, measure on the rest; eps = "
        f"{args.eps * 100:.1f} pt, delta = 0.1; oracle on the first {args.oracle_splits} splits",
        flush=True,
    )
    raw = {}
    for size in args.sizes:
        start = time.perf_counter()
        results: dict[str, list[dict]] = {name: [] for name in SIZE_METHODS}
        oracles = []
        for split in splits:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(10_000 + split))
            calib, rest = subset(everything, order[:size]), subset(everything, order[size:])
            for name, options in SIZE_METHODS.items():
                choice = choose_thresholds(
                    calib.scores, calib.correct, profile, max_accuracy_drop=args.eps,
                    confidence=0.9, seed=split, **options,
                )  # fmt: skip
                thresholds = torch.tensor(choice.thresholds, dtype=torch.float64)
                results[name].append(measure(rest, profile, thresholds, choice.temperatures))
            if split - splits.start < args.oracle_splits:
                oracles.append(oracle(rest, profile, args.eps))
        raw[size] = {"methods": results, "oracle": oracles}
        print(f"\nsize {size}: {time.perf_counter() - start:.0f} s", flush=True)
        print_rows(size, results, oracles, args.eps)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"eps": args.eps, "splits": list(splits), "sizes": raw}))


def print_rows(size: int, results: dict[str, list[dict]], oracles: list[dict], eps: float):
    """One size's rows of the table: violations, mean drop, saving, shares of plain, oracle."""
    plain = 1 - statistics.fmean(r["flops"] for r in results[next(iter(SIZE_METHODS))])
    limit = 1 - statistics.fmean(r["flops"] for r in oracles)
    print(
        f"\n| calibration images | method | splits with drop > {eps * 100:.1f} pt | "
        "95% upper bound on that rate | mean drop | FLOPs saved | share of plain | "
        "share of oracle |\n|---|---|---|---|---|---|---|---|"
    )
    for name, runs in results.items():
        over = sum(r["drop"] > eps for r in runs)
        saved = 1 - statistics.fmean(r["flops"] for r in runs)
        print(
            f"| {size:,} | {name} | {over} of {len(runs)} ({over / len(runs):.1%}) | "
            f"{clopper_pearson_upper(over, len(runs)):.1%} | "
            f"{statistics.fmean(r['drop'] for r in runs) * 100:.2f} pt | {saved:.1%} | "
            f"{saved / plain:.0%} | {saved / limit:.0%} |"
        )
    print(
        f"| {size:,} | oracle (fitted on the evaluation images, {len(oracles)} splits) | - | - | "
        f"{statistics.fmean(r['drop'] for r in oracles) * 100:.2f} pt | {limit:.1%} | "
        f"{limit / plain:.0%} | 100% |",
        flush=True,
    )


def power_table(eps: float, delta: float = 0.1, draws: int = 400) -> None:
    """Share of `draws` simulated calibration sets on which each test passes a point whose
    true drop is below eps: per sample the loss is +1 (harm) with probability h, -1 (help)
    with probability g, 0 otherwise."""
    g = torch.Generator().manual_seed(0)
    alpha = (1 + eps) / 2
    print(
        f"\n(power) share of {draws} draws passing H0: drop > {eps * 100:.1f} pt at delta = "
        f"{delta}\n\n| n | harm / help (true drop) | betting | betting + HB | betting + "
        "binomial on harm | Hoeffding-Bentkus | binomial on harm |\n|---|---|---|---|---|---|---|"
    )
    for n in (700, 1000, 2000):
        for harm, help_ in [
            (0.002, 0.0),
            (0.005, 0.005),
            (0.005, 0.01),
            (0.01, 0.015),
            (0.02, 0.02),
        ]:
            u = torch.rand(draws, n, generator=g, dtype=torch.float64)
            loss = (u < harm).double() - ((u >= harm) & (u < harm + help_)).double()
            shifted = (loss + 1) / 2
            betting = wsr_p_values(shifted, alpha, delta).tolist()
            hb = [hoeffding_bentkus_p_value(float(row.mean()), n, alpha) for row in shifted]
            binomial = [binomial_p_value(int((row == 1).sum()), n, eps) for row in loss]
            rules = [
                betting,
                [bonferroni_min(a, b) for a, b in zip(betting, hb, strict=True)],
                [bonferroni_min(a, b) for a, b in zip(betting, binomial, strict=True)],
                hb,
                binomial,
            ]
            shares = " | ".join(f"{sum(p <= delta for p in rule) / draws:.0%}" for rule in rules)
            print(
                f"| {n:,} | {harm:.1%} / {help_:.1%} ({(harm - help_) * 100:+.1f} pt) | {shares} |"
            )


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("runs/exit-guarantee/cache.pt"))
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--first-split", type=int, default=0, help="seed of the first split")
    parser.add_argument("--json", type=Path, default=None, help="save the raw results here")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    parser.add_argument("--oracle-splits", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.005)
    parser.add_argument("--detail", action="store_true", help="the earlier table too")
    parser.add_argument("--power", action="store_true", help="only the tests' power table")
    parser.add_argument("--calib-size", type=int, default=5000, help="--detail's size")
    parser.add_argument("--budget", type=float, default=0.4, help="--detail's FLOPs budget")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    if args.power:
        power_table(args.eps)
        return
    start = time.perf_counter()
    cache = torch.load(args.cache)
    profile = FlopProfile(**cache["profile"])
    everything = Pool(
        torch.cat([cache["held"]["heads"], cache["test"]["heads"]]),
        torch.cat([cache["held"]["main"], cache["test"]["main"]]),
        torch.cat([cache["held"]["y"], cache["test"]["y"]]),
    )
    test_right = cache["test"]["main"].argmax(-1) == cache["test"]["y"]
    print(
        f"model: {cache['train']}; main head test accuracy {test_right.double().mean():.2%}; "
        f"full model {profile.full / 1e6:.2f} MFLOPs; one torch thread; load average "
        f"{os.getloadavg()[0]:.2f} at the start",
        flush=True,
    )
    sizes_table(args, everything, profile)
    if args.detail:
        detail(args, cache, profile)
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f} "
        "at the end"
    )


if __name__ == "__main__":
    main()
