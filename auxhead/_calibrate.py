"""Threshold search and the Learn-then-Test guarantee behind `EarlyExit.calibrate`.

Everything here works on what one pass over held-out data keeps: each head's score (N, E) and
whether each exit, then the main output, is right (N, E + 1). No forwards run here, so the
benchmark can replay thousands of calibrations from cached scores.

The guarantee (Angelopoulos, Bates, Candès, Jordan, Lei 2021, "Learn then Test",
arXiv 2110.01052). Call a sample *harmed* when the main head is right and the exit it leaves
at is wrong. The accuracy drop on any data is (harmed - helped) / N <= harmed / N, so the harm
rate bounds the drop. The calibration data is split at random in two: the *path* part orders
candidate thresholds from safe to aggressive (the FLOPs-optimal thresholds for harm budgets
0, 1, 2, ... samples), the *test* part tests each along that order, H0: harm rate > eps, with
the exact binomial tail; fixed-sequence testing stops at the first failure and keeps the last
one that passed. Then with probability >= 1 - delta over the draw of the calibration data, the
harm rate, hence the accuracy drop, on new data exchangeable with it is <= eps. The path and
the temperatures must not see the test part: that is what the split is for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from auxhead._exit_bounds import (
    binomial_p_value,
    binomial_upper_bound,
    fixed_sequence,
    hb_upper_bound,
    hoeffding_bentkus_p_value,
)
from auxhead._flops import FlopProfile

__all__ = ["METHODS", "Calibration", "check_targets", "choose_thresholds"]

METHODS = ("ltt", "empirical")
PATH_SHARE = 0.3  # share of the calibration data that orders the path; the rest tests it
EXHAUSTIVE_LIMIT = 20_000  # threshold combinations tried exhaustively; beyond, coordinate search
MAX_PATH = 64  # most path points tested (budgets are thinned beyond)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_targets(
    max_accuracy_drop: object,
    confidence: object = None,
    *,
    names: tuple[str, str] = ("max_accuracy_drop", "confidence"),
) -> None:
    """Refuse a drop outside [0, 1] or a confidence outside (0, 1), naming them as `names`
    (the command line checks its options with this before training)."""
    if not _is_number(max_accuracy_drop) or not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(
            f"{names[0]} is a fraction in [0, 1] (0.005 is half a point), got {max_accuracy_drop!r}"
        )
    if confidence is not None and (not _is_number(confidence) or not 0.0 < confidence < 1.0):
        raise ValueError(f"{names[1]} is a probability in (0, 1) such as 0.9, got {confidence!r}")


# ---- routing by the forward's rule -------------------------------------------------------


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """(..., E) bool -> (...) index of the first True along the last dim, E where there is none."""
    found = mask.any(dim=-1)
    first = mask.to(torch.uint8).argmax(dim=-1)  # argmax gives the first of equal maxima
    return torch.where(found, first, mask.shape[-1])


def _leaves(scores: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
    """Which samples leave at an exit: a score strictly above the threshold, or a threshold of
    0 (everyone), never a threshold of 1. Scores (b,) against a float, or (..., E) against
    (..., E) thresholds that broadcast; compared in the scores' dtype either way."""
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.to(scores.device, scores.dtype)
    return ((scores > thresholds) | (thresholds <= 0)) & (thresholds < 1)


def _exit_indices(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, E) scores, (E,) thresholds -> (N,) exit of each sample, E for the main head: the
    first exit it leaves at, by the forward's rule."""
    return _first_true(_leaves(scores, thresholds))


# ---- the search: exact over a grid of candidates -----------------------------------------


def _candidates(scores: torch.Tensor, limit: int = 64) -> list[float]:
    """Thresholds worth trying for one exit: the observed scores (a threshold at a score lets
    exactly the samples above it leave), thinned to `limit` quantiles, plus 0 and 1."""
    values = scores.flatten().unique()  # sorted
    if values.numel() > limit:
        values = values.quantile(torch.linspace(0, 1, limit, dtype=values.dtype))
    return sorted({0.0, 1.0, *values.clamp(0.0, 1.0).tolist()})


@dataclass
class _Stats:
    """Per threshold vector (M of them): mean FLOPs per sample, and counts over the N samples."""

    thresholds: torch.Tensor  # (M, E)
    cost: torch.Tensor  # (M,) float64
    hits: torch.Tensor  # (M,) samples right
    harms: torch.Tensor  # (M,) samples the main head gets right and the exit wrong


class _Judge:
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

    def __call__(self, thresholds: torch.Tensor) -> _Stats:
        n = self.scores.shape[0]
        chunk = max(1, 4_000_000 // max(1, n * self.scores.shape[1]))
        costs, hits, harms = [], [], []
        for start in range(0, thresholds.shape[0], chunk):
            block = thresholds[start : start + chunk]  # (m, E)
            exits = _first_true(_leaves(self.scores[None], block[:, None, :]))  # (m, N)
            pattern = ((block < 1).long() * self.bits).sum(dim=1)  # (m,)
            per_sample = self.pattern_costs[pattern].gather(1, exits)  # (m, N)
            right = self.correct.T.gather(0, exits) if exits.numel() else exits.bool()
            costs.append(per_sample.mean(dim=1))
            hits.append(right.sum(dim=1))
            harms.append((self.main & ~right).sum(dim=1))
        return _Stats(thresholds, torch.cat(costs), torch.cat(hits), torch.cat(harms))


def _best(stats: _Stats, allowed: torch.Tensor, objective: str) -> int | None:
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


def _optimise(
    judge: _Judge,
    per_exit: list[list[float]],
    rules: Sequence[Callable[[_Stats], torch.Tensor]],
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


def _switch_off_unused(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """An exit no sample leaves at only costs its head: turn it off (nothing else changes)."""
    n_exits = scores.shape[1]
    used = _exit_indices(scores, thresholds).bincount(minlength=n_exits + 1)[:n_exits] > 0
    return torch.where(used, thresholds, 1.0)


def _search(
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
    judge = _Judge(scores, correct, profile)
    per_exit = [_candidates(scores[:, index]) for index in range(scores.shape[1])]
    (best,) = _optimise(judge, per_exit, [lambda s: s.hits >= need], "cost", limit)
    assert best is not None  # all 1 (the main head alone) always meets the drop
    return tuple(_switch_off_unused(scores, best).tolist())


def _budget_search(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    budgets: Sequence[float],
    *,
    limit: int = EXHAUSTIVE_LIMIT,
) -> list[torch.Tensor | None]:
    """For each budget (mean FLOPs per sample), the most accurate thresholds within it (ties:
    the cheaper); None where nothing fits."""
    judge = _Judge(scores, correct, profile)
    per_exit = [_candidates(scores[:, index]) for index in range(scores.shape[1])]
    rules = [lambda s, b=budget: s.cost <= b * (1 + 1e-12) for budget in budgets]
    picks = _optimise(judge, per_exit, rules, "hits", limit)
    return [None if p is None else _switch_off_unused(scores, p) for p in picks]


def _harm_path(
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
    judge = _Judge(scores, correct, profile)
    per_exit = [_candidates(scores[:, index]) for index in range(scores.shape[1])]
    rules = [lambda s, b=budget: s.harms <= b for budget in budgets]
    path: list[torch.Tensor] = []
    for pick in _optimise(judge, per_exit, rules, "cost", limit):
        if pick is None:
            continue
        pick = _switch_off_unused(scores, pick)
        if not path or not torch.equal(pick, path[-1]):
            path.append(pick)
    return path


# ---- temperature scaling -----------------------------------------------------------------


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), (N, K)
    logits; a golden-section search on 1 / T in [0.02, 50] (the NLL is convex in 1 / T)."""
    logits, targets = logits.double(), targets.long()

    def nll(beta: float) -> float:
        return torch.nn.functional.cross_entropy(logits * beta, targets).item()

    low, high = math.log(0.02), math.log(50.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(math.exp(a)), nll(math.exp(b))
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(math.exp(b))
    return 1.0 / math.exp((low + high) / 2)


# ---- the whole calibration ---------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What `choose_thresholds` decided, and the evidence for it."""

    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...]  # per head: its scores come from logits / T
    method: str  # "ltt" or "empirical"
    target: str  # "drop" (max_accuracy_drop) or "flops" (max_flops)
    fallback: bool  # nothing usable: every sample goes to the main head
    confidence: float | None  # ltt: 1 - delta
    bound: float | None  # ltt: the (1 - delta) upper bound the test used (harm rate or FLOPs share)
    path_samples: int  # samples that ordered the path (and fitted the temperatures)
    test_samples: int  # samples that tested it (ltt)
    path_length: int  # threshold vectors on the path
    passed: int  # of them that passed the test in sequence


def _split(n: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = min(n - 1, max(1, round(share * n)))
    return order[:cut], order[cut:]


def choose_thresholds(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    *,
    max_accuracy_drop: float | None = 0.005,
    max_flops: float | None = None,
    confidence: float = 0.9,
    method: str = "ltt",
    logits: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    score_fn: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    path_share: float = PATH_SHARE,
    seed: int = 0,
    limit: int = EXHAUSTIVE_LIMIT,
) -> Calibration:
    """Pick thresholds from one pass's scores (N, E) and correctness (N, E + 1).

    Args:
        max_accuracy_drop: the accuracy the exits may lose against the main head; with "ltt",
            held with probability >= `confidence` on new exchangeable data.
        max_flops: instead of a drop, a compute budget as a share of the full model's FLOPs:
            the most accurate thresholds whose mean FLOPs stay within it (with "ltt", with
            probability >= `confidence`).
        confidence: 1 - delta, for "ltt".
        method: "ltt" (the guarantee) or "empirical" (met on these samples only).
        logits, targets, score_fn: (N, E, K) head logits, (N,) labels and the criterion
            (logits, T) -> scores, to fit one temperature per head; the scores are then
            score_fn(logits, T).
        path_share: share of the samples that order the path (and fit temperatures) in "ltt".
        seed: the random split.
        limit: most threshold combinations searched exhaustively.
    """
    n, n_exits = scores.shape
    guaranteed = method == "ltt"
    if guaranteed:
        path_rows, test_rows = _split(n, path_share, seed)
    else:
        path_rows = test_rows = torch.arange(n)
    temperatures = (1.0,) * n_exits
    if logits is not None:
        assert targets is not None and score_fn is not None
        temperatures = tuple(
            fit_temperature(logits[path_rows, e], targets[path_rows]) for e in range(n_exits)
        )
        scores = torch.stack(
            [score_fn(logits[:, e], temperatures[e]) for e in range(n_exits)], dim=1
        )
    scores = scores.double()
    delta = 1 - confidence
    if not guaranteed:
        if max_flops is not None:
            (pick,) = _budget_search(scores, correct, profile, [max_flops * profile.full],
                                     limit=limit)  # fmt: skip
            found = _Found([] if pick is None else [pick], 1 if pick is not None else 0, None)
        else:
            found = _Found([torch.tensor(_search(scores, correct, profile, max_accuracy_drop,
                                                 limit=limit))], 1, None)  # fmt: skip
    else:
        path_part = (scores[path_rows], correct[path_rows])
        test_part = (scores[test_rows], correct[test_rows])
        if max_flops is not None:
            found = _test_flops(path_part, test_part, profile, max_flops, delta, limit)
        else:
            assert max_accuracy_drop is not None
            found = _test_harm(path_part, test_part, profile, max_accuracy_drop, delta, limit)
    chosen = found.path[found.passed - 1] if found.passed else torch.ones(n_exits)
    values = tuple(float(t) for t in chosen.tolist())
    return Calibration(
        thresholds=values,
        temperatures=temperatures,
        method=method,
        target="flops" if max_flops is not None else "drop",
        # An exit that takes no one saves nothing: every sample to the main head.
        fallback=all(t >= 1.0 for t in values),
        confidence=confidence if guaranteed else None,
        bound=found.bound,
        path_samples=len(path_rows),
        test_samples=len(test_rows) if guaranteed else 0,
        path_length=len(found.path),
        passed=found.passed,
    )


def _with_safe_start(path: list[torch.Tensor], steps: int = 8) -> list[torch.Tensor]:
    """`path` with thresholds stepping from 1 (all off) to its first point that lets samples
    leave: fixed-sequence testing stops at the first failure, and the zero-harm point of a
    small path part can already be too bold; these give it safer points to pass first."""
    first = next((i for i, t in enumerate(path) if bool((t < 1).any())), None)
    if first is None:
        return path
    target = path[first]
    ramp = [1 - (1 - target) * step / steps for step in range(1, steps)]
    return [*path[:first], *ramp, *path[first:]]


@dataclass
class _Found:
    path: list[torch.Tensor]  # threshold vectors, safe to aggressive
    passed: int  # how many of them passed, in sequence; the last of them is chosen
    bound: float | None  # its (1 - delta) upper bound on the tested risk


def _test_harm(
    path_part: tuple[torch.Tensor, torch.Tensor],
    test_part: tuple[torch.Tensor, torch.Tensor],
    profile: FlopProfile,
    eps: float,
    delta: float,
    limit: int,
) -> _Found:
    """Learn then Test of the harm rate: the path from the path part, each point tested on the
    test part with the exact binomial p-value of H0: harm rate > eps."""
    # Beyond eps on the path part, a point could still pass on the test part: go to 3 eps.
    path = _with_safe_start(_harm_path(*path_part, profile, 3 * eps, limit=limit))
    scores, correct = test_part
    n, main = len(scores), correct[:, -1]
    harms = []
    for thresholds in path:
        right = correct.gather(1, _exit_indices(scores, thresholds)[:, None]).squeeze(1)
        harms.append(int((main & ~right).sum()))
    passed = fixed_sequence([binomial_p_value(k, n, eps) for k in harms], delta)
    bound = binomial_upper_bound(harms[passed - 1], n, delta) if passed else None
    return _Found(path, passed, bound)


def _test_flops(
    path_part: tuple[torch.Tensor, torch.Tensor],
    test_part: tuple[torch.Tensor, torch.Tensor],
    profile: FlopProfile,
    max_flops: float,
    delta: float,
    limit: int,
) -> _Found:
    """Learn then Test of the mean FLOPs: the path runs from cheap (safe for the budget) to
    accurate, the most accurate thresholds on the path part for budgets of 50% to 150% of
    `max_flops`; each point is tested on the test part with the Hoeffding-Bentkus p-value of
    H0: mean FLOPs > max_flops, the per-sample cost rescaled to [0, 1]."""
    budget = max_flops * profile.full
    budgets = [budget * (0.5 + i / 40) for i in range(41)]
    path: list[torch.Tensor] = []
    for pick in _budget_search(*path_part, profile, budgets, limit=limit):
        if pick is not None and not (path and torch.equal(pick, path[-1])):
            path.append(pick)
    judge = _Judge(*test_part, profile)
    low, high = float(judge.pattern_costs.min()), float(judge.pattern_costs.max())
    span = max(high - low, 1e-12)
    n = len(test_part[0])
    means = [(float(judge(t[None]).cost[0]) - low) / span for t in path]
    p_values = [hoeffding_bentkus_p_value(m, n, (budget - low) / span) for m in means]
    passed = fixed_sequence(p_values, delta)
    bound = None
    if passed:
        bound = (hb_upper_bound(means[passed - 1], n, delta) * span + low) / profile.full
    return _Found(path, passed, bound)
