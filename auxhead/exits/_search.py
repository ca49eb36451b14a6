"""The threshold search behind `EarlyExit.calibrate`: exact over a grid of candidate
thresholds (or, when the grid is too large, one exit at a time), on what one pass over
held-out data keeps: each head's score (N, E) and whether each exit, then the main output, is
right (N, E + 1). No forwards run here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from auxhead.exits._flops import FlopProfile
from auxhead.exits._route import exit_indices, first_true, leaves

__all__ = [
    "EXHAUSTIVE_LIMIT",
    "Judge",
    "Stats",
    "candidates",
    "drop_path",
    "harm_path",
    "optimise",
    "search_budget",
    "search_drop",
    "shared_path",
    "switch_off_unused",
]

EXHAUSTIVE_LIMIT = 20_000  # threshold combinations tried exhaustively; beyond, coordinate search
MAX_PATH = 64  # most path points tested (budgets are thinned beyond)


def candidates(scores: torch.Tensor, limit: int = 64) -> list[float]:
    """Thresholds worth trying for one exit: 0, 1, and one threshold midway between each two
    neighbouring distinct scores (thinned to `limit`), so that a sample scoring like one of
    these, give or take float noise (other kernels, another batch size), falls on the same side.

    A midpoint is rounded to the scores' dtype, the dtype the forward compares in, so the
    forward routes exactly as the search counted; between two neighbouring values of that
    dtype no value fits, and the lower one stands in (a score above it is the upper one)."""
    values = scores.flatten().unique()  # sorted, in the scores' dtype
    low, high = values[:-1], values[1:]
    middle = ((low.double() + high.double()) / 2).to(values.dtype)
    middle = torch.where(middle < high, middle, low).double()
    if middle.numel() > limit:
        keep = torch.linspace(0, middle.numel() - 1, limit).round().long().unique()
        middle = middle[keep]
    return sorted({0.0, 1.0, *middle.clamp(0.0, 1.0).tolist()})


@dataclass
class Stats:
    """Per threshold vector (M of them): mean FLOPs per sample, and counts over the N samples."""

    thresholds: torch.Tensor  # (M, E)
    cost: torch.Tensor  # (M,) float64
    hits: torch.Tensor  # (M,) samples right
    harms: torch.Tensor  # (M,) samples the main head gets right and the exit wrong


class Judge:
    """Evaluates batches of threshold vectors on fixed scores and correctness."""

    def __init__(self, scores: torch.Tensor, correct: torch.Tensor, profile: FlopProfile) -> None:
        self.scores, self.correct = scores, correct
        self.main = correct[:, -1]
        n_exits = scores.shape[1]
        # Exit costs for each on/off pattern of the heads (bit e: head e runs), (2^E, E + 1).
        patterns = [[bool(p >> e & 1) for e in range(n_exits)] for p in range(2**n_exits)]
        self.pattern_costs = torch.tensor(
            [profile.exit_costs(active) for active in patterns], dtype=torch.float64
        )
        self.bits = 2 ** torch.arange(n_exits)

    def __call__(self, thresholds: torch.Tensor) -> Stats:
        n = self.scores.shape[0]
        chunk = max(1, 4_000_000 // max(1, n * self.scores.shape[1]))
        costs, hits, harms = [], [], []
        for start in range(0, thresholds.shape[0], chunk):
            block = thresholds[start : start + chunk]  # (m, E)
            exits = first_true(leaves(self.scores[None], block[:, None, :]))  # (m, N)
            pattern = ((block < 1).long() * self.bits).sum(dim=1)  # (m,)
            per_sample = self.pattern_costs[pattern].gather(1, exits)  # (m, N)
            right = self.correct.T.gather(0, exits) if exits.numel() else exits.bool()
            costs.append(per_sample.mean(dim=1))
            hits.append(right.sum(dim=1))
            harms.append((self.main & ~right).sum(dim=1))
        return Stats(thresholds, torch.cat(costs), torch.cat(hits), torch.cat(harms))


def _best(stats: Stats, allowed: torch.Tensor, objective: str) -> int | None:
    """Index of the best allowed vector: least cost (ties: more hits) for "cost", most hits
    (ties: least cost) for "hits"; None if none is allowed."""
    if not bool(allowed.any()):
        return None
    cost = stats.cost.clone()
    # Costs within a relative 1e-12 are ties: round them so that the tie-break decides.
    cost = torch.round(cost / cost.abs().max().clamp_min(1.0) * 1e12)
    hits = stats.hits.double()
    keys = (cost, -hits) if objective == "cost" else (-hits, cost)
    order = torch.arange(len(cost))
    # lexicographic: sort by the secondary key, then stable-sort by the primary
    order = order[torch.argsort(keys[1][order], stable=True)]
    order = order[torch.argsort(keys[0][order], stable=True)]
    allowed_sorted = allowed[order]
    return int(order[allowed_sorted.nonzero()[0, 0]])


def _grid(per_exit: list[list[float]]) -> torch.Tensor:
    """Every combination of the per-exit candidates, (M, E)."""
    axes = [torch.tensor(values, dtype=torch.float64) for values in per_exit]
    return torch.cartesian_prod(*axes).reshape(-1, len(per_exit))


def optimise(
    judge: Judge,
    per_exit: list[list[float]],
    rules: Sequence[Callable[[Stats], torch.Tensor]],
    objective: str,
    limit: int,
) -> list[torch.Tensor | None]:
    """For each rule (stats -> allowed mask), the best thresholds by `objective`, or None.

    Exhaustive over the grid of per-exit candidates when it has at most `limit` points (exact
    on that grid); otherwise the best shared threshold, improved one exit at a time."""
    size = math.prod(len(values) for values in per_exit)
    if size <= limit:
        stats = judge(_grid(per_exit))
        picks = [_best(stats, rule(stats), objective) for rule in rules]
        return [None if pick is None else stats.thresholds[pick] for pick in picks]
    shared = sorted({value for values in per_exit for value in values})
    n_exits = len(per_exit)
    start_stats = judge(torch.tensor(shared, dtype=torch.float64)[:, None].repeat(1, n_exits))
    results: list[torch.Tensor | None] = []
    for rule in rules:
        pick = _best(start_stats, rule(start_stats), objective)
        if pick is None:
            results.append(None)
            continue
        best = start_stats.thresholds[pick]
        for _ in range(10):  # one exit at a time, until nothing improves
            before = best.clone()
            for index in range(n_exits):
                trials = best.repeat(len(per_exit[index]), 1)
                trials[:, index] = torch.tensor(per_exit[index], dtype=torch.float64)
                trials = torch.cat([best[None], trials])  # the incumbent first: it wins ties
                stats = judge(trials)
                best = trials[_best(stats, rule(stats), objective)]
            if torch.equal(before, best):
                break
        results.append(best)
    return results


def switch_off_unused(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """An exit no sample leaves at only costs its head: turn it off (nothing else changes)."""
    n_exits = scores.shape[1]
    used = exit_indices(scores, thresholds).bincount(minlength=n_exits + 1)[:n_exits] > 0
    return torch.where(used, thresholds, 1.0)


def search_drop(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    drop: float,
    *,
    limit: int = EXHAUSTIVE_LIMIT,
) -> tuple[float, ...]:
    """Thresholds with the least mean FLOPs whose accuracy is at most `drop` below the main
    head's on these samples (ties: the more accurate); all 1 if no exit helps."""
    n = scores.shape[0]
    # Counted in samples, so the comparison is exact: at most floor(drop * N) fewer correct.
    need = int(correct[:, -1].sum()) - math.floor(drop * n + 1e-9)
    judge = Judge(scores, correct, profile)
    per_exit = [candidates(scores[:, index]) for index in range(scores.shape[1])]
    (best,) = optimise(judge, per_exit, [lambda s: s.hits >= need], "cost", limit)
    assert best is not None  # all 1 (the main head alone) always meets the drop
    return tuple(switch_off_unused(scores, best).tolist())


def search_budget(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    budgets: Sequence[float],
    *,
    limit: int = EXHAUSTIVE_LIMIT,
) -> list[torch.Tensor | None]:
    """For each budget (mean FLOPs per sample), the most accurate thresholds within it (ties:
    the cheaper); None where nothing fits."""
    judge = Judge(scores, correct, profile)
    per_exit = [candidates(scores[:, index]) for index in range(scores.shape[1])]
    rules = [lambda s, b=budget: s.cost <= b * (1 + 1e-12) for budget in budgets]
    picks = optimise(judge, per_exit, rules, "hits", limit)
    return [None if p is None else switch_off_unused(scores, p) for p in picks]


def harm_path(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    max_harm: float,
    *,
    limit: int = EXHAUSTIVE_LIMIT,
) -> list[torch.Tensor]:
    """The FLOPs-optimal thresholds for harm budgets 0, 1, 2, ... samples, up to `max_harm`
    (a rate) of these samples: the path from safe to aggressive, duplicates removed."""
    n = scores.shape[0]
    top = max(0, math.ceil(max_harm * n))
    budgets = (
        sorted({round(top * i / MAX_PATH) for i in range(MAX_PATH + 1)})
        if top > MAX_PATH
        else range(top + 1)
    )
    judge = Judge(scores, correct, profile)
    per_exit = [candidates(scores[:, index]) for index in range(scores.shape[1])]
    rules = [lambda s, b=budget: s.harms <= b for budget in budgets]
    return _distinct(scores, optimise(judge, per_exit, rules, "cost", limit))


def drop_path(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    max_drop: float,
    *,
    limit: int = EXHAUSTIVE_LIMIT,
) -> list[torch.Tensor]:
    """The FLOPs-optimal thresholds for accuracy-drop budgets (in samples, main head's hits
    minus the exits') from the lowest any thresholds reach on these samples (below 0 where
    exits get right what the main head gets wrong) up to `max_drop` (a rate) of them: the
    path from safe to aggressive, duplicates removed."""
    n = scores.shape[0]
    main_hits = int(correct[:, -1].sum())
    judge = Judge(scores, correct, profile)
    per_exit = [candidates(scores[:, index]) for index in range(scores.shape[1])]
    (most,) = optimise(judge, per_exit, [lambda s: s.hits >= 0], "hits", limit)
    assert most is not None  # every vector is allowed
    low = main_hits - int(judge(most[None]).hits[0])
    top = max(low, math.ceil(max_drop * n))
    budgets = (
        sorted({round(low + (top - low) * i / MAX_PATH) for i in range(MAX_PATH + 1)})
        if top - low > MAX_PATH
        else range(low, top + 1)
    )
    rules = [lambda s, b=budget: main_hits - s.hits <= b for budget in budgets]
    return _distinct(scores, optimise(judge, per_exit, rules, "cost", limit))


def shared_path(n_exits: int, steps: int = 64, closest: float = 1e-6) -> list[torch.Tensor]:
    """One threshold shared by the `n_exits` exits, from 1 - `closest` down to 0 in `steps`
    equal steps of log(1 - t): a path fixed before any data is seen, fine near 1, where the
    scores of confident heads crowd."""
    logs = torch.linspace(math.log(closest), 0.0, steps, dtype=torch.float64)
    return [(1 - torch.exp(v)).repeat(n_exits) for v in logs]


def _distinct(scores: torch.Tensor, picks: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The picks found, heads that save nothing switched off, without repeats in a row."""
    path: list[torch.Tensor] = []
    for pick in picks:
        if pick is None:
            continue
        pick = switch_off_unused(scores, pick)
        if not path or not torch.equal(pick, path[-1]):
            path.append(pick)
    return path
