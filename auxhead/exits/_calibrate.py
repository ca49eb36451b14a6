"""The Learn-then-Test guarantee behind `EarlyExit.calibrate` (the search: `_search`).

Everything here works on what one pass over held-out data keeps: each head's score (N, E) and
whether each exit, then the main output, is right (N, E + 1). No forwards run here, so the
benchmark can replay thousands of calibrations from cached scores.

The guarantee (Angelopoulos, Bates, Candès, Jordan, Lei 2021, "Learn then Test", arXiv
2110.01052). Per sample, loss = [main head right] - [the exit it leaves at right], in
{-1, 0, 1}: its mean is the accuracy drop. Candidate thresholds are put in an order from safe
to aggressive *before* the test sees any data; each is the hypothesis H0: drop > eps, tested in
that order on samples the order did not see, and fixed-sequence testing stops at the first
that fails. With probability >= 1 - delta no true H0 is among those it passed (family-wise
error <= delta, whatever the order, as long as it is fixed before the test), so any of them
may be kept: "ltt" keeps the cheapest on the test samples, "ltt-harm" the last.

Statement: if the calibration samples and the samples served are i.i.d. from one
distribution, then over the draw of the calibration samples

    P(accuracy drop of the chosen thresholds on that distribution > eps) <= delta.

The drop is the population's (the expected drop on new samples); a finite test set's drop
scatters around it. Not covered: data from another distribution (another camera, month,
class balance), calibration data reused after looking at the result, a model changed after
calibration. The search over the path part and the temperatures are data-dependent, which is
why they see only the path part.

method="ltt" (the default): the drop itself, shifted to [0, 1] as (loss + 1) / 2, tested by
Waudby-Smith-Ramdas betting (`wsr_p_values`): variance-adaptive, and samples an exit gets
right where the main head is wrong count in its favour. The order is fixed before any data is
seen, so every sample tests: one threshold shared by the exits, stepping from 1 (all off)
down to 0 (CALM's one-parameter family; `shared_path`). With path_share > 0 the order is the
FLOPs-optimal per-exit thresholds for growing drop budgets on a random share of the data,
tested on the rest (measured against the shared path in docs/benchmarks/early-exits.md).
method="ltt-harm" (the default until this release): the harm rate (main right, exit wrong),
which bounds the drop, with the exact binomial tail, ordered on 30% and tested on 70%.
The compute budget (`choose_budget_thresholds`): the mean FLOPs, Hoeffding-Bentkus, ordered
on the path part and tested on the rest, for either "ltt" method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from auxhead.exits._bounds import (
    binomial_p_value,
    binomial_upper_bound,
    fixed_sequence,
    hb_upper_bound,
    hoeffding_bentkus_p_value,
    wsr_p_values,
    wsr_upper_bound,
)
from auxhead.exits._flops import FlopProfile
from auxhead.exits._route import exit_indices, first_true, leaves
from auxhead.exits._search import (
    EXHAUSTIVE_LIMIT,
    Judge,
    candidates,
    drop_path,
    harm_path,
    search_budget,
    search_drop,
    shared_path,
)

__all__ = [
    "METHODS",
    "Calibration",
    "check_budget",
    "check_targets",
    "choose_budget_thresholds",
    "choose_thresholds",
]

METHODS = ("ltt", "ltt-harm", "empirical")
# Share of the calibration data that orders the path (and fits temperatures); the rest tests
# it. "ltt": 0, a path fixed in advance (one threshold shared by the exits) tested on all of
# the data, chosen by measurement (docs/benchmarks/early-exits.md).
PATH_SHARE = {"ltt": 0.0, "ltt-harm": 0.3}
BUDGET_PATH_SHARE = 0.3  # the compute budget's path share, for either "ltt" method
TEMPERATURE_SHARE = 0.3  # the path share when temperatures are fitted and path_share is 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_targets(
    max_accuracy_drop: object,
    confidence: object,
    *,
    names: tuple[str, str] = ("max_accuracy_drop", "confidence"),
) -> None:
    """Refuse a drop outside [0, 1] or a confidence outside (0, 1), naming them as `names`
    (the command line checks its options with this before training).

    Raises:
        ValueError: naming the bad value and the valid range.
    """
    if not _is_number(max_accuracy_drop) or not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(
            f"{names[0]} is a fraction in [0, 1] (0.005 is half a point), got {max_accuracy_drop!r}"
        )
    if not _is_number(confidence) or not 0.0 < confidence < 1.0:
        raise ValueError(f"{names[1]} is a probability in (0, 1) such as 0.9, got {confidence!r}")


def check_budget(max_flops: object) -> None:
    """Refuse a compute budget that is not a positive share of the full model's FLOPs."""
    if not _is_number(max_flops) or not 0.0 < max_flops <= 10.0:
        raise ValueError(
            f"max_flops is a share of the full model's FLOPs such as 0.4, got {max_flops!r}"
        )


# ---- the search: exact over a grid of candidates -----------------------------------------


# ---- temperature scaling -----------------------------------------------------------------


TEMPERATURE_BOUNDS = (0.02, 50.0)  # the range `fit_temperature` searches


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al. 2017), (N, K)
    logits; a golden-section search on 1 / T in [0.02, 50] (the NLL is convex in 1 / T).
    A result at a bound (`pinned_bound`) means the NLL has no minimum inside: a head that
    separates every sample it is fitted on drives T to 0.02."""
    logits, targets = logits.double(), targets.long()

    def nll(beta: float) -> float:
        return torch.nn.functional.cross_entropy(logits * beta, targets).item()

    low, high = (math.log(t) for t in TEMPERATURE_BOUNDS)
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


def pinned_bound(temperature: float) -> float | None:
    """The search bound `temperature` sits at (a fit that found no minimum inside), or None."""
    for bound in TEMPERATURE_BOUNDS:
        if math.isclose(temperature, bound, rel_tol=1e-6):
            return bound
    return None


# ---- the whole calibration ---------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """What `choose_thresholds` decided, and the evidence for it."""

    thresholds: tuple[float, ...]
    temperatures: tuple[float, ...]  # per head: its scores come from logits / T
    method: str  # "ltt", "ltt-harm" or "empirical"
    target: str  # "drop" (max_accuracy_drop) or "flops" (max_flops)
    fallback: bool  # nothing usable: every sample goes to the main head
    confidence: float | None  # ltt: 1 - delta
    # ltt: the (1 - delta) upper bound on the tested risk of the chosen thresholds, on the
    # test part: the drop ("ltt"), the harm rate ("ltt-harm") or the FLOPs share (budget)
    bound: float | None
    path_samples: int  # samples that ordered the path (and fitted the temperatures)
    test_samples: int  # samples that tested it (ltt)
    path_length: int  # threshold vectors on the path
    passed: int  # of them that passed the test in sequence
    # (exit index, bound) of each temperature fit that ran to a search bound; that head's
    # temperature falls back to 1.0
    pinned: tuple[tuple[int, float], ...] = ()


def _split(n: int, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = min(n - 1, max(1, round(share * n)))
    return order[:cut], order[cut:]


def choose_thresholds(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    *,
    max_accuracy_drop: float = 0.005,
    confidence: float = 0.9,
    method: str = "ltt",
    logits: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    score_fn: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    path_share: float | None = None,
    seed: int = 0,
    limit: int = EXHAUSTIVE_LIMIT,
) -> Calibration:
    """The thresholds `EarlyExit.calibrate` picks, from one pass's scores and correctness:
    the least mean FLOPs whose accuracy drop against the main head is within
    `max_accuracy_drop`. No forwards run, so scores cached once can be calibrated many times.

    With "ltt" (and "ltt-harm"): if these samples and the samples served are i.i.d. from one
    distribution, then with probability >= `confidence` over the draw of these samples the
    accuracy drop of the chosen thresholds on that distribution is <= `max_accuracy_drop`
    (Learn then Test; the module docstring says how and what it does not cover).

    Args:
        scores: (N, E) each head's score by the criterion; compared in their dtype, as the
            forward compares them.
        correct: (N, E + 1) bool, whether each head, then the main output, is right.
        profile: the FLOPs of the exits (`flop_profile`).
        max_accuracy_drop: the accuracy the exits may lose against the main head, a fraction.
        confidence: 1 - delta, for "ltt".
        method: "ltt" (the guarantee: the drop, by a betting test), "ltt-harm" (the
            guarantee by the harm rate and a binomial test, the default until this release; more
            conservative) or "empirical" (met on these samples only).
        logits: (N, E, K) head logits, to fit one temperature per head first (with
            `targets` and `score_fn`, all three or none); the scores are then
            score_fn(logits, T).
        targets: (N,) class indices, for the temperatures.
        score_fn: the criterion (logits, T) -> scores, for the temperatures.
        path_share: share of the samples that order the path (and fit temperatures); the
            rest tests it. None: 0 for "ltt" (one threshold shared by the exits, stepped
            from 1 down, tested on every sample; 0.3 still fits temperatures, when asked),
            0.3 for "ltt-harm". Above 0 with "ltt": per-exit thresholds ordered on that share.
        seed: the random split and the order the betting test reads the samples in.
        limit: most threshold combinations searched exhaustively.

    Returns:
        A `Calibration`: the thresholds (all 1 and `fallback` when no exit meets the target),
        temperatures and the evidence.

    Raises:
        ValueError: a drop outside [0, 1], a confidence outside (0, 1) or an unknown method.
    """
    check_targets(max_accuracy_drop, confidence)
    return _choose(
        scores, correct, profile, ("drop", max_accuracy_drop), confidence, method, logits,
        targets, score_fn, path_share, seed, limit,
    )  # fmt: skip


def choose_budget_thresholds(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    *,
    max_flops: float,
    confidence: float = 0.9,
    method: str = "ltt",
    logits: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    score_fn: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    path_share: float | None = None,
    seed: int = 0,
    limit: int = EXHAUSTIVE_LIMIT,
) -> Calibration:
    """The thresholds `EarlyExit.calibrate_budget` picks: the most accurate whose mean FLOPs
    stay within `max_flops`, a share of the full model's (with "ltt", on new exchangeable data
    with probability >= `confidence`, by a Hoeffding-Bentkus test of the mean cost).

    Args:
        scores: (N, E) each head's score, as in `choose_thresholds`.
        correct: (N, E + 1) bool, as in `choose_thresholds`.
        profile: the FLOPs of the exits (`flop_profile`).
        max_flops: the budget, a share of the full model's FLOPs per sample (0.4: 40%).
        confidence: 1 - delta, for "ltt".
        method: "ltt" or "ltt-harm" (the guarantee; the same test for a budget) or
            "empirical" (met on these samples only).
        logits: as in `choose_thresholds`.
        targets: as in `choose_thresholds`.
        score_fn: as in `choose_thresholds`.
        path_share: the share that orders the path; None (or 0): 0.3.
        seed: the random split ("ltt").
        limit: most threshold combinations searched exhaustively.

    Returns:
        A `Calibration`, as `choose_thresholds`.

    Raises:
        ValueError: a budget that is not a positive share, a confidence outside (0, 1) or an
            unknown method.
    """
    check_budget(max_flops)
    check_targets(0.0, confidence)
    return _choose(
        scores, correct, profile, ("flops", max_flops), confidence, method, logits, targets,
        score_fn, path_share, seed, limit,
    )  # fmt: skip


def _choose(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    target: tuple[str, float],
    confidence: float,
    method: str,
    logits: torch.Tensor | None,
    targets: torch.Tensor | None,
    score_fn: Callable[[torch.Tensor, float], torch.Tensor] | None,
    path_share: float | None,
    seed: int,
    limit: int,
) -> Calibration:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if (logits is None) != (targets is None) or (logits is None) != (score_fn is None):
        raise ValueError("fitting temperatures needs logits, targets and score_fn, all three")
    if path_share is not None and not (
        _is_number(path_share) and 0.0 <= path_share < 1.0 and (path_share > 0 or method == "ltt")
    ):
        raise ValueError(
            f"path_share is a share of the samples in (0, 1) (0 too, with method='ltt'), got "
            f"{path_share!r}; None picks the method's default"
        )
    kind, value = target
    n, n_exits = scores.shape
    guaranteed = method != "empirical"
    if kind == "flops":
        share = path_share or BUDGET_PATH_SHARE
    else:
        share = PATH_SHARE.get(method, 0.0) if path_share is None else path_share
    shared = share == 0.0  # "ltt": the path fixed in advance, one threshold for every exit
    if shared and logits is not None:
        share = TEMPERATURE_SHARE  # the temperatures must not see the samples that test
    if not guaranteed:
        path_rows = test_rows = torch.arange(n)
    elif share == 0.0:  # nothing to fit: every sample tests, in a seeded order
        path_rows = torch.arange(0)
        test_rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        path_rows, test_rows = _split(n, share, seed)
    temperatures = (1.0,) * n_exits
    pinned: tuple[tuple[int, float], ...] = ()
    if logits is not None:
        assert targets is not None and score_fn is not None
        fitted = [fit_temperature(logits[path_rows, e], targets[path_rows]) for e in range(n_exits)]
        # A fit at a search bound found no minimum: its T is an artefact of the bound (0.02
        # saturates the scores to ties at 1), so that head stays unscaled.
        bounds = [pinned_bound(t) for t in fitted]
        pinned = tuple((e, b) for e, b in enumerate(bounds) if b is not None)
        temperatures = tuple(
            1.0 if b is not None else t for t, b in zip(fitted, bounds, strict=True)
        )
        scores = torch.stack(
            [score_fn(logits[:, e], temperatures[e]) for e in range(n_exits)], dim=1
        )
    if not scores.is_floating_point():
        scores = scores.double()
    delta = 1 - confidence
    if not guaranteed:
        if kind == "flops":
            (pick,) = search_budget(scores, correct, profile, [value * profile.full], limit=limit)
            found = _Found([], 0, None, None) if pick is None else _Found([pick], 1, 0, None)
        else:
            best = search_drop(scores, correct, profile, value, limit=limit)
            found = _Found([torch.tensor(best, dtype=torch.float64)], 1, 0, None)
    else:
        path_part = (scores[path_rows], correct[path_rows])
        test_part = (scores[test_rows], correct[test_rows])
        if kind == "flops":
            found = _test_flops(path_part, test_part, profile, value, delta, limit)
        elif method == "ltt-harm":
            found = _test_harm(path_part, test_part, profile, value, delta, limit)
        else:
            found = _test_drop(path_part, test_part, profile, value, delta, limit, shared)
    values = tuple(float(t) for t in found.chosen(n_exits).tolist())
    return Calibration(
        thresholds=values,
        temperatures=temperatures,
        method=method,
        target=kind,
        # An exit that takes no one saves nothing: every sample to the main head.
        fallback=all(t >= 1.0 for t in values),
        confidence=confidence if guaranteed else None,
        bound=found.bound,
        path_samples=len(path_rows),
        test_samples=len(test_rows) if guaranteed else 0,
        path_length=len(found.path),
        passed=found.passed,
        pinned=pinned,
    )


def _with_safe_start(
    path: list[torch.Tensor], per_exit: list[list[float]] | None = None, steps: int = 8
) -> list[torch.Tensor]:
    """`path` with thresholds stepping from 1 (all off) to its first point that lets samples
    leave: fixed-sequence testing stops at the first failure, and the zero-harm point of a
    small path part can already be too bold; these give it safer points to pass first. With
    `per_exit` (each exit's candidate thresholds), each step moves to the nearest candidate
    between the point and 1, so steps stay midway between scores too."""
    first = next((i for i, t in enumerate(path) if bool((t < 1).any())), None)
    if first is None:
        return path
    target = path[first]
    ramp = [1 - (1 - target) * step / steps for step in range(1, steps)]
    if per_exit is not None:
        ramp = [_nearest(point, target, per_exit) for point in ramp]
    steps_taken: list[torch.Tensor] = []
    for point in ramp:
        if not (steps_taken and torch.equal(point, steps_taken[-1])) and not torch.equal(
            point, target
        ):
            steps_taken.append(point)
    return [*path[:first], *steps_taken, *path[first:]]


def _nearest(point: torch.Tensor, low: torch.Tensor, per_exit: list[list[float]]) -> torch.Tensor:
    """Each exit's threshold in `point` moved to the nearest of its candidates in [low, 1]."""
    out = []
    for e, value in enumerate(point.tolist()):
        allowed = [c for c in per_exit[e] if float(low[e]) <= c <= 1.0] or [1.0]
        out.append(min(allowed, key=lambda c, v=value: abs(c - v)))
    return torch.tensor(out, dtype=point.dtype)


@dataclass
class _Found:
    path: list[torch.Tensor]  # threshold vectors, safe to aggressive
    passed: int  # how many of them passed, in sequence
    # the index of the chosen one on the path, one of those that passed; None: none of them,
    # every sample goes to the main head
    pick: int | None
    bound: float | None  # the chosen one's (1 - delta) upper bound on the tested risk

    def chosen(self, n_exits: int) -> torch.Tensor:
        return torch.ones(n_exits) if self.pick is None else self.path[self.pick]


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
    per_exit = [candidates(path_part[0][:, e]) for e in range(path_part[0].shape[1])]
    path = _with_safe_start(harm_path(*path_part, profile, 3 * eps, limit=limit), per_exit)
    scores, correct = test_part
    n, main = len(scores), correct[:, -1]
    harms = []
    for thresholds in path:
        right = correct.gather(1, exit_indices(scores, thresholds)[:, None]).squeeze(1)
        harms.append(int((main & ~right).sum()))
    passed = fixed_sequence([binomial_p_value(k, n, eps) for k in harms], delta)
    bound = binomial_upper_bound(harms[passed - 1], n, delta) if passed else None
    return _Found(path, passed, passed - 1 if passed else None, bound)


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
    for pick in search_budget(*path_part, profile, budgets, limit=limit):
        if pick is not None and not (path and torch.equal(pick, path[-1])):
            path.append(pick)
    judge = Judge(*test_part, profile)
    low, high = float(judge.pattern_costs.min()), float(judge.pattern_costs.max())
    span = max(high - low, 1e-12)
    n = len(test_part[0])
    means = [(float(judge(t[None]).cost[0]) - low) / span for t in path]
    p_values = [hoeffding_bentkus_p_value(m, n, (budget - low) / span) for m in means]
    passed = fixed_sequence(p_values, delta)
    bound = None
    if passed:
        bound = (hb_upper_bound(means[passed - 1], n, delta) * span + low) / profile.full
    return _Found(path, passed, passed - 1 if passed else None, bound)


def _test_drop(
    path_part: tuple[torch.Tensor, torch.Tensor],
    test_part: tuple[torch.Tensor, torch.Tensor],
    profile: FlopProfile,
    eps: float,
    delta: float,
    limit: int,
    shared: bool,
) -> _Found:
    """Learn then Test of the accuracy drop: the path is one threshold shared by the exits
    stepping down from 1 (`shared`, fixed in advance) or the FLOPs-optimal thresholds for
    growing drop budgets on the path part; each point is tested on the test part, in its
    (random) order, by the betting p-value of H0: drop > eps, the per-sample loss
    (main right - exit right + 1) / 2 in [0, 1]."""
    scores, correct = test_part
    n_exits = scores.shape[1]
    if shared:
        path = shared_path(n_exits)
    else:
        per_exit = [candidates(path_part[0][:, e]) for e in range(n_exits)]
        path = _with_safe_start(drop_path(*path_part, profile, 3 * eps, limit=limit), per_exit)
    # All thresholds 1 route every sample to the main head: drop exactly 0, nothing to test.
    path = [t for t in path if bool((t < 1).any())]
    if not path:
        return _Found(path, 0, None, None)
    main = correct[:, -1].double()
    exits = first_true(leaves(scores[None], torch.stack(path)[:, None, :]))  # (M, n)
    right = correct.T.gather(0, exits).double()  # (M, n)
    shifted = (main - right + 1) / 2
    passed = fixed_sequence(wsr_p_values(shifted, (1 + eps) / 2, delta).tolist(), delta)
    if not passed:
        return _Found(path, 0, None, None)
    # Fixed-sequence testing rejects every H0 it passed at once (family-wise error <= delta),
    # so any of those points carries the guarantee: take the cheapest on these samples, or
    # none when heads that run cost more than the samples leaving save (scores near 1).
    costs = Judge(scores, correct, profile)(torch.stack(path[:passed])).cost
    pick = int(torch.argmin(costs))
    if float(costs[pick]) >= profile.full:
        return _Found(path, passed, None, None)
    return _Found(path, passed, pick, 2 * wsr_upper_bound(shifted[pick], delta) - 1)
