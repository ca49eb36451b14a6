"""The threshold search against brute force, the binomial and Hoeffding-Bentkus bounds against
hand computations, fixed-sequence testing, temperature fitting, and the Learn-then-Test
guarantees ("ltt": the drop; "ltt-harm": the harm rate) by simulation with known truth
(`auxhead.exits._calibrate`, `_search`; `tests/test_bounds.py` covers the betting bound,
`tests/test_exits.py` covers `calibrate`)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from auxhead.exits import (
    FlopProfile,
    choose_budget_thresholds,
    choose_thresholds,
    exit_indices,
)
from auxhead.exits._bounds import (
    binomial_cdf,
    binomial_p_value,
    binomial_upper_bound,
    fixed_sequence,
    hoeffding_bentkus_p_value,
    wsr_upper_bound,
)
from auxhead.exits._calibrate import _with_safe_start, fit_temperature
from auxhead.exits._search import (
    Judge,
    candidates,
    drop_path,
    harm_path,
    search_budget,
    search_drop,
    shared_path,
)

# ---- binomial tail, bound and p-values, by hand ----


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_binomial_cdf_matches_the_sum_by_hand(k):
    n, p = 10, 0.1
    by_hand = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    # k = 0: 0.9^10 = 0.3486784401; k = 1: + 10 * 0.1 * 0.9^9 = 0.7360989291
    assert binomial_cdf(k, n, p) == pytest.approx(by_hand, rel=1e-12)
    assert binomial_p_value(k, n, p) == pytest.approx(by_hand, rel=1e-12)
    assert binomial_cdf(0, 10, 0.1) == pytest.approx(0.3486784401, rel=1e-10)
    assert binomial_cdf(1, 10, 0.1) == pytest.approx(0.7360989291, rel=1e-10)


def test_binomial_cdf_edges_and_a_large_n():
    assert binomial_cdf(-1, 10, 0.5) == 0.0
    assert binomial_cdf(10, 10, 0.5) == 1.0
    assert binomial_cdf(3, 10, 0.0) == 1.0 and binomial_cdf(3, 10, 1.0) == 0.0
    # n = 5000, p = 0.005, k = 12: a sum of 13 exact terms (math.comb is exact in integers)
    n, p, k = 5000, 0.005, 12
    by_hand = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
    assert binomial_cdf(k, n, p) == pytest.approx(by_hand, rel=1e-9)


def test_binomial_upper_bound():
    # k = 0: P(Bin(n, p) <= 0) = (1 - p)^n = delta at p = 1 - delta^(1/n)
    assert binomial_upper_bound(0, 100, 0.1) == pytest.approx(1 - 0.1 ** (1 / 100), rel=1e-9)
    for k, n in [(1, 10), (3, 10), (12, 5000)]:
        bound = binomial_upper_bound(k, n, 0.05)
        assert bound > k / n
        assert binomial_cdf(k, n, bound) == pytest.approx(0.05, rel=1e-6)
    assert binomial_upper_bound(10, 10, 0.1) == 1.0


def test_hoeffding_bentkus_by_hand():
    n, mean, alpha = 100, 0.05, 0.1
    kl = mean * math.log(mean / alpha) + (1 - mean) * math.log((1 - mean) / (1 - alpha))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * sum(
        math.comb(n, i) * alpha**i * (1 - alpha) ** (n - i) for i in range(math.ceil(n * mean) + 1)
    )
    assert hoeffding_bentkus_p_value(mean, n, alpha) == pytest.approx(min(hoeffding, bentkus))
    assert hoeffding_bentkus_p_value(0.2, n, alpha) == 1.0  # mean above alpha: no evidence


def test_fixed_sequence_stops_at_the_first_failure():
    assert fixed_sequence([0.01, 0.05, 0.2, 0.01], 0.1) == 2
    assert fixed_sequence([0.2, 0.01], 0.1) == 0
    assert fixed_sequence([], 0.1) == 0


# ---- the search against brute force ----

PROFILE = FlopProfile(backbone={"a": 10, "b": 20, "c": 30}, heads={"a": 3, "b": 4, "c": 5}, full=50)


def _profile(n_exits: int) -> FlopProfile:
    names = list(PROFILE.backbone)[:n_exits]
    return FlopProfile(
        {k: PROFILE.backbone[k] for k in names}, {k: PROFILE.heads[k] for k in names}, PROFILE.full
    )


def _brute(scores, correct, profile, allowed, objective):
    """(cost, hits) of the best thresholds, every combination of {0, 1, each score} tried, in
    plain Python, by the forward's rule: leave at the first exit whose score is above its
    threshold (or whose threshold is 0), never at a threshold of 1."""
    n, n_exits = scores.shape
    per_exit = [sorted({0.0, 1.0, *scores[:, e].tolist()}) for e in range(n_exits)]
    best = None
    for combo in itertools.product(*per_exit):
        costs = profile.exit_costs([t < 1 for t in combo])
        total, hits, harms = 0.0, 0, 0
        for i in range(n):
            exit_ = next(
                (e for e, t in enumerate(combo) if t < 1 and (scores[i, e].item() > t or t <= 0)),
                n_exits,
            )
            total += costs[exit_]
            right = bool(correct[i, exit_])
            hits += right
            harms += bool(correct[i, -1]) and not right
        cost = total / n
        if not allowed(cost, hits, harms):
            continue
        key = (round(cost, 9), -hits) if objective == "cost" else (-hits, round(cost, 9))
        if best is None or key < best[0]:
            best = (key, (cost, hits))
    return None if best is None else best[1]


def _evaluate(scores, correct, profile, thresholds):
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    stats = Judge(scores, correct, profile)(thresholds[None])
    return stats.cost.item(), int(stats.hits), int(stats.harms)


def _random_case(seed: int, n: int, n_exits: int):
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.3, 0.5, 0.6, 0.8, 0.9, 0.95], dtype=torch.float64)
    scores = levels[torch.randint(len(levels), (n, n_exits), generator=g)]
    correct = torch.rand(n, n_exits + 1, generator=g) < 0.7
    return scores, correct


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_exits", [1, 2, 3])
def test_drop_search_matches_brute_force(seed, n_exits):
    scores, correct = _random_case(seed, 10, n_exits)
    profile = _profile(n_exits)
    for drop in (0.0, 0.1, 0.3):
        need = int(correct[:, -1].sum()) - math.floor(drop * 10 + 1e-9)
        found = search_drop(scores, correct, profile, drop)
        cost, hits, _ = _evaluate(scores, correct, profile, found)
        reference = _brute(scores, correct, profile, lambda c, h, _, n=need: h >= n, "cost")
        assert (cost, hits) == pytest.approx(reference)


@pytest.mark.parametrize("seed", range(6))
def test_budget_search_matches_brute_force(seed):
    scores, correct = _random_case(seed, 10, 2)
    profile = _profile(2)
    budgets = [15.0, 25.0, 40.0, 60.0]
    found_all = search_budget(scores, correct, profile, budgets)
    for budget, found in zip(budgets, found_all, strict=True):
        reference = _brute(scores, correct, profile, lambda c, h, _, b=budget: c <= b, "hits")
        if reference is None:
            assert found is None
            continue
        cost, hits, _ = _evaluate(scores, correct, profile, found)
        assert (hits, cost) == pytest.approx((reference[1], reference[0]))


@pytest.mark.parametrize("seed", range(4))
def test_harm_path_points_are_optimal_for_their_budgets(seed):
    scores, correct = _random_case(seed, 10, 2)
    profile = _profile(2)
    path = harm_path(scores, correct, profile, max_harm=0.3)
    costs = []
    for thresholds in path:
        cost, _, harms = _evaluate(scores, correct, profile, thresholds)
        reference = _brute(scores, correct, profile, lambda c, h, k, b=harms: k <= b, "cost")
        assert cost == pytest.approx(reference[0])
        costs.append(cost)
    assert costs == sorted(costs, reverse=True)  # safe (expensive) to aggressive (cheap)


@pytest.mark.parametrize("seed", range(4))
def test_drop_path_points_are_optimal_for_their_drop_budgets(seed):
    scores, correct = _random_case(seed, 10, 2)
    profile = _profile(2)
    path = drop_path(scores, correct, profile, max_drop=0.3)
    main_hits = int(correct[:, -1].sum())
    costs, drops = [], []
    for thresholds in path:
        cost, hits, _ = _evaluate(scores, correct, profile, thresholds)
        drop = main_hits - hits
        reference = _brute(
            scores, correct, profile, lambda c, h, k, d=drop: main_hits - h <= d, "cost"
        )
        assert cost == pytest.approx(reference[0])
        costs.append(cost)
        drops.append(drop)
    assert costs == sorted(costs, reverse=True)  # safe (expensive) to aggressive (cheap)
    assert drops == sorted(drops) and drops[-1] <= 3  # 0.3 of 10 samples
    # It starts at the most accurate thresholds any combination reaches (a drop below 0
    # where an exit gets right what the main head gets wrong).
    best = _brute(scores, correct, profile, lambda c, h, k: True, "hits")
    assert drops[0] == main_hits - best[1]


def test_the_shared_path_is_fixed_and_steps_from_1_to_0():
    path = shared_path(3, steps=5, closest=1e-4)
    assert len(path) == 5 and all(t.shape == (3,) and len(set(t.tolist())) == 1 for t in path)
    expected = [1 - 1e-4, 1 - 1e-3, 1 - 1e-2, 1 - 1e-1, 0.0]
    assert [t[0].item() for t in path] == pytest.approx(expected, abs=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(shared_path(3), shared_path(3), strict=True))


@pytest.mark.parametrize("seed", range(4))
def test_coordinate_search_is_feasible_and_no_worse_than_one_shared_threshold(seed):
    scores, correct = _random_case(seed, 12, 3)
    profile = _profile(3)
    need = int(correct[:, -1].sum()) - 1
    found = search_drop(scores, correct, profile, 1 / 12, limit=1)  # the coordinate search
    cost, hits, _ = _evaluate(scores, correct, profile, found)
    assert hits >= need
    shared = [
        _evaluate(scores, correct, profile, [t] * 3)
        for t in sorted({0.0, 1.0, *scores.flatten().tolist()})
    ]
    assert cost <= min(c for c, h, _ in shared if h >= need) + 1e-9
    exact = _brute(scores, correct, profile, lambda c, h, _: h >= need, "cost")
    assert cost >= exact[0] - 1e-9


# ---- Learn then Test ----


def _population(n: int, g: torch.Generator):
    """One exit, score s ~ U(0, 1), the exit right with probability s, the main head right with
    probability 0.9, independently. At threshold t (leave when s > t) the harm rate is
    0.9 * (1 - t)^2 / 2 and the accuracy drop 0.9 (1 - t) - (1 - t^2) / 2 =
    (1 - t)(0.4 - t / 2): below 0 for t > 0.8, where the exit helps more than it harms."""
    s = torch.rand(n, 1, generator=g, dtype=torch.float64)
    exit_right = torch.rand(n, generator=g, dtype=torch.float64) < s[:, 0]
    main_right = torch.rand(n, generator=g) < 0.9
    return s, torch.stack([exit_right, main_right], dim=1)


def _true_harm(t: float) -> float:
    return 0.0 if t >= 1 else 0.9 * (1 - t) ** 2 / 2


def _true_drop(t: float) -> float:
    return 0.0 if t >= 1 else (1 - t) * (0.4 - t / 2)


def _over_rate(methods, risk, eps, delta, draws, n, seed):
    """How many of `draws` calibrations on fresh samples pick thresholds whose true `risk` is
    over eps, per (method, path_share)."""
    profile = FlopProfile({"a": 10}, {"a": 1}, 40)
    g = torch.Generator().manual_seed(seed)
    over = dict.fromkeys(methods, 0)
    saved = dict.fromkeys(methods, 0.0)
    for draw in range(draws):
        scores, correct = _population(n, g)
        for method, share in methods:
            choice = choose_thresholds(
                scores, correct, profile, max_accuracy_drop=eps, confidence=1 - delta,
                method=method, path_share=share, seed=draw,
            )  # fmt: skip
            t = choice.thresholds[0]
            over[method, share] += risk(t) > eps
            saved[method, share] += (1 - t) * 29 / 40 if t < 1 else -1 / 40  # exit 11, main 41
    return over, {key: value / draws for key, value in saved.items()}


def _allowance(delta: float, draws: int) -> float:
    return delta * draws + 3 * math.sqrt(draws * delta * (1 - delta))  # binomial: 3 sd


def test_ltt_holds_the_drop_with_the_confidence_asked():
    eps, delta, draws = 0.02, 0.1, 100
    methods = [("ltt", None), ("empirical", None)]
    over, saved = _over_rate(methods, _true_drop, eps, delta, draws, 800, seed=0)
    # The guarantee: at most delta of the draws over eps, up to chance.
    assert over["ltt", None] <= _allowance(delta, draws)
    # The empirical fit is over eps in about half the draws (its target on the sample).
    assert over["empirical", None] > draws / 3
    # and the guarantee is not bought by exiting nobody: the drop is below eps for
    # t >= 0.676, where 0.32 of the samples leave (a saving of 0.235)
    assert saved["ltt", None] > 0.1


@pytest.mark.slow
def test_ltt_with_a_path_share_holds_the_drop_with_the_confidence_asked():
    eps, delta, draws = 0.02, 0.1, 100
    over, saved = _over_rate([("ltt", 0.2)], _true_drop, eps, delta, draws, 800, seed=0)
    assert over["ltt", 0.2] <= _allowance(delta, draws)
    assert saved["ltt", 0.2] > 0.1


def test_ltt_harm_holds_the_harm_rate_with_the_confidence_asked():
    eps, delta, draws = 0.05, 0.1, 150
    methods = [("ltt-harm", None), ("empirical", None)]
    over, _ = _over_rate(methods, _true_harm, eps, delta, draws, 400, seed=0)
    assert over["ltt-harm", None] <= _allowance(delta, draws)
    # The empirical fit gets the harm (not its target, the drop) over eps in most draws.
    assert over["empirical", None] > draws / 2


def test_ltt_harm_picks_the_last_point_that_passes_and_reports_its_bound():
    # 300 path / 700 test samples: 90% sure and right at exit 0; 10% unsure and wrong there,
    # right at exit 1; the main head always right.
    n = 1000
    scores = torch.tensor([[0.9, 0.9]] * 900 + [[0.6, 0.8]] * 100, dtype=torch.float64)
    correct = torch.tensor([[True, True, True]] * 900 + [[False, True, True]] * 100)
    profile = _profile(2)
    choice = choose_thresholds(
        scores, correct, profile, max_accuracy_drop=0.05, confidence=0.9, method="ltt-harm"
    )
    assert choice.method == "ltt-harm" and (choice.path_samples, choice.test_samples) == (300, 700)
    assert 0.6 <= choice.thresholds[0] < 0.9 and choice.thresholds[1] < 0.8
    # no harm on the 700 test samples: the Clopper-Pearson bound is 1 - 0.1^(1/700)
    assert choice.bound == pytest.approx(1 - 0.1 ** (1 / 700), rel=1e-6)
    assert 1 <= choice.passed < choice.path_length and not choice.fallback
    assert n == choice.path_samples + choice.test_samples


def test_ltt_drop_tests_the_shared_path_on_every_sample_and_reports_its_bound():
    # 800 samples every head gets right at 0.9. 200 score 0.3 at exit 0 (wrong there) and
    # 0.8 at exit 1 (right there); the main head is wrong on half of them. A shared threshold
    # in [0.3, 0.8) sends the 200 to exit 1: a drop of -10%, every such point passes; below
    # 0.3 they leave at exit 0: a drop of +10%, refused.
    scores = torch.tensor([[0.9, 0.9]] * 800 + [[0.3, 0.8]] * 200, dtype=torch.float64)
    correct = torch.tensor(
        [[True, True, True]] * 800 + [[False, True, False]] * 100 + [[False, True, True]] * 100
    )
    choice = choose_thresholds(scores, correct, _profile(2), max_accuracy_drop=0.01)
    assert choice.method == "ltt" and (choice.path_samples, choice.test_samples) == (0, 1000)
    t = choice.thresholds
    # Every grid point above 0.3 passes; of them, those below 0.8 cost the same here, and the
    # first (safest) of the cheapest is chosen.
    grid = [point[0].item() for point in shared_path(2)]
    assert choice.passed == sum(value > 0.3 for value in grid) < choice.path_length
    assert t[0] == t[1] == max(value for value in grid if value < 0.8)
    # The bound is betting's on the chosen point's losses, in the order the test read them.
    exits = exit_indices(scores, torch.tensor(t))
    right = correct.gather(1, exits[:, None]).squeeze(1).double()
    shifted = (correct[:, -1].double() - right + 1) / 2
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    assert choice.bound == pytest.approx(2 * wsr_upper_bound(shifted[order], 0.1) - 1)
    assert choice.bound < 0.01


def test_ltt_fits_temperatures_on_a_share_the_test_does_not_see():
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, 4, (500,), generator=g)
    honest = torch.randn(500, 2, 4, generator=g, dtype=torch.float64)
    honest += 2 * torch.nn.functional.one_hot(targets, 4)[:, None]
    logits = 3 * honest  # overconfident heads
    correct = torch.cat([logits.argmax(-1) == targets[:, None], torch.ones(500, 1).bool()], 1)

    def score(x, temperature):
        return (x / temperature).softmax(-1).amax(-1)

    choice = choose_thresholds(
        score(logits, 1.0), correct, _profile(2), max_accuracy_drop=0.1, logits=logits,
        targets=targets, score_fn=score,
    )  # fmt: skip
    assert (choice.path_samples, choice.test_samples) == (150, 350)
    # fitted on the 150 samples of the seeded split, none of the 350 that test
    path_rows = torch.randperm(500, generator=torch.Generator().manual_seed(0))[:150]
    expected = [fit_temperature(logits[path_rows, e], targets[path_rows]) for e in range(2)]
    assert choice.temperatures == pytest.approx(expected, rel=1e-9) and expected[0] > 1


def test_ltt_falls_back_when_nothing_passes():
    scores = torch.full((50, 1), 0.9, dtype=torch.float64)
    correct = torch.tensor([[False, True]] * 50)  # the exit is always wrong
    choice = choose_thresholds(
        scores, correct, FlopProfile({"a": 10}, {"a": 1}, 40), max_accuracy_drop=0.1
    )
    assert choice.fallback and choice.thresholds == (1.0,)


def test_budget_ltt_holds_the_mean_flops():
    g = torch.Generator().manual_seed(1)
    scores, correct = _population(2000, g)
    profile = FlopProfile({"a": 10}, {"a": 2}, 40)  # exit: 12, main: 42 FLOPs per sample
    choice = choose_budget_thresholds(scores, correct, profile, max_flops=0.6, confidence=0.9)
    t = choice.thresholds[0]
    # P(s > t) = 1 - t leave at 12 FLOPs, the rest pay 42: mean 42 - 30 (1 - t)
    assert (42 - 30 * (1 - t)) / 40 <= 0.6
    assert choice.bound is not None and choice.bound <= 0.6
    empirical = choose_budget_thresholds(
        scores, correct, profile, max_flops=0.6, method="empirical"
    )
    assert empirical.thresholds[0] >= t  # the empirical fit spends the budget to the last FLOP


# ---- temperature ----


def test_fit_temperature_recovers_an_overconfident_scale():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(6000, 5, generator=g) * 1.5
    targets = torch.multinomial(true_logits.softmax(-1), 1, generator=g).squeeze(1)
    assert fit_temperature(true_logits * 3.0, targets) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(true_logits, targets) == pytest.approx(1.0, rel=0.1)


def test_the_path_starts_with_a_ramp_from_all_off():
    ones, first, bolder = torch.ones(2), torch.tensor([0.6, 1.0]), torch.tensor([0.2, 0.5])
    path = _with_safe_start([ones, first, bolder], steps=4)
    expected = [[1.0, 1.0], [0.9, 1.0], [0.8, 1.0], [0.7, 1.0], [0.6, 1.0], [0.2, 0.5]]
    torch.testing.assert_close(torch.stack(path), torch.tensor(expected))
    assert _with_safe_start([ones], steps=4) == [ones]


def test_the_ramp_steps_onto_candidate_thresholds():
    ones, first = torch.ones(2), torch.tensor([0.6, 1.0])
    per_exit = [[0.0, 0.65, 0.85, 1.0], [0.0, 1.0]]
    path = _with_safe_start([ones, first], per_exit, steps=4)  # 0.9, 0.8, 0.7 -> 0.85, 0.65
    expected = [[1.0, 1.0], [0.85, 1.0], [0.65, 1.0], [0.6, 1.0]]
    torch.testing.assert_close(torch.stack(path), torch.tensor(expected))


# ---- thresholds that float noise cannot cross ----


def test_candidates_lie_midway_between_neighbouring_scores():
    scores = torch.tensor([0.9, 0.5, 0.7, 0.5, 0.3], dtype=torch.float64)
    assert candidates(scores) == [0.0, 0.4, 0.6, 0.8, 1.0]
    thinned = candidates(torch.linspace(0, 1, 1001, dtype=torch.float64), limit=5)
    assert thinned == pytest.approx([0.0, 0.0005, 0.2505, 0.5005, 0.7495, 0.9995, 1.0])


def test_a_midpoint_the_scores_dtype_cannot_hold_is_the_lower_score():
    # neighbouring float32 values: no float32 lies between, and the forward compares in float32
    low = torch.tensor(0.75, dtype=torch.float32)
    high = torch.nextafter(low, torch.tensor(1.0))
    (middle,) = candidates(torch.stack([low, high]))[1:-1]
    assert middle == low.item()
    routed = exit_indices(torch.stack([low, high])[:, None], torch.tensor([middle]))
    assert routed.tolist() == [1, 0]  # the lower stays, the higher leaves, as counted
    wide = candidates(torch.tensor([0.25, 0.75]))
    assert wide == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("method", "share"), [("ltt", 0.3), ("ltt-harm", None), ("empirical", None)]
)
def test_chosen_thresholds_sit_between_scores_and_route_nearby_scores_alike(method, share):
    # (The shared path of "ltt" with path_share=0 is a grid fixed in advance instead.)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(400, 2, generator=g)  # float32, as the criteria give
    correct = torch.rand(400, 3, generator=g) < torch.cat([scores, torch.ones(400, 1)], 1)
    choice = choose_thresholds(
        scores, correct, _profile(2), max_accuracy_drop=0.1, method=method, path_share=share
    )
    thresholds = torch.tensor(choice.thresholds)
    assert not choice.fallback
    observed = set(scores.flatten().tolist())
    assert not observed & set(choice.thresholds)
    # The scores a little perturbed (another batch size, other kernels) route the same way.
    noise = (torch.rand(400, 2, generator=g) - 0.5) * 2e-7
    assert torch.equal(exit_indices(scores + noise, thresholds), exit_indices(scores, thresholds))


@pytest.mark.parametrize("share", [-0.1, 1.0, "0.2", True])
def test_choose_refuses_a_bad_path_share(share):
    scores, correct = _random_case(0, 10, 2)
    with pytest.raises(ValueError, match=f"path_share is a share of the samples .* got {share!r}"):
        choose_thresholds(scores, correct, _profile(2), path_share=share)
    with pytest.raises(ValueError, match="path_share is a share"):  # no data-free harm path
        choose_thresholds(scores, correct, _profile(2), method="ltt-harm", path_share=0.0)


def test_choose_refuses_bad_targets():
    scores, correct = _random_case(0, 10, 2)
    with pytest.raises(ValueError, match="max_flops is a share"):
        choose_budget_thresholds(scores, correct, _profile(2), max_flops=0)
    with pytest.raises(ValueError, match="max_accuracy_drop is a fraction"):
        choose_thresholds(scores, correct, _profile(2), max_accuracy_drop=-0.1)
    with pytest.raises(ValueError, match="unknown method 'normal'"):
        choose_thresholds(scores, correct, _profile(2), method="normal")
