"""The p-values and bounds of `auxhead.exits._bounds` against hand computation and against
simulation with known truth: a valid p-value rejects a true null at most at its level, and a
(1 - delta) upper bound covers the true mean in at least 1 - delta of the draws.

The simulations use fixed seeds, so they are deterministic; their margins are three binomial
standard deviations over the level, so a change of seed would not flip them either."""

from __future__ import annotations

import math

import pytest
import torch

from auxhead.exits._bounds import (
    binomial_p_value,
    bonferroni_min,
    hoeffding_bentkus_p_value,
    wsr_p_values,
    wsr_upper_bound,
)

LEVELS = (0.05, 0.1, 0.2)


def _allowance(level: float, draws: int) -> float:
    """The most rejections a valid test may show in `draws` true nulls, with 3 sd of room."""
    return level * draws + 3 * math.sqrt(draws * level * (1 - level))


def _three_point(draws: int, n: int, harm: float, helped: float, seed: int) -> torch.Tensor:
    """(draws, n) shifted drop losses (main right - exit right + 1) / 2: 1 with probability
    `harm`, 0 with probability `helped`, 0.5 otherwise; the mean is (1 + harm - helped) / 2."""
    u = torch.rand(draws, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 0.5 + 0.5 * (u < harm).double() - 0.5 * ((u >= harm) & (u < harm + helped)).double()


# ---- betting (Waudby-Smith-Ramdas), by hand ----


def _wsr_by_hand(x: list[float], alpha: float, delta: float) -> float:
    """The betting p-value in plain Python, from the paper's recursions."""
    n, capital, best, total, squares = len(x), 1.0, 1.0, 0.0, 0.0
    var_before = 0.25
    for t, value in enumerate(x, start=1):
        bet = min(math.sqrt(2 * math.log(1 / delta) / (n * var_before)), 0.75 / (1 - alpha))
        capital *= 1 + bet * (alpha - value)
        best = max(best, capital)
        total += value
        mean = (0.5 + total) / (t + 1)
        squares += (value - mean) ** 2
        var_before = (0.25 + squares) / (t + 1)
    return 1 / best


def test_wsr_p_value_matches_the_recursion_by_hand():
    x = [0.5, 0.5, 1.0, 0.0, 0.5, 0.5]
    for alpha in (0.4, 0.55, 0.7):
        got = float(wsr_p_values(torch.tensor(x), alpha, 0.1)[0])
        assert got == pytest.approx(_wsr_by_hand(x, alpha, 0.1), rel=1e-12)
    # Three losses of 0 against alpha = 0.5, delta = 0.1: the first bet is
    # sqrt(2 ln 10 / (3 * 0.25)) = 2.478 > 0.75 / 0.5, so 1.5 on every step (the variance
    # only shrinks): capital 1.75^3, p = 1 / 5.359375.
    assert float(wsr_p_values(torch.zeros(3), 0.5, 0.1)[0]) == pytest.approx(1 / 1.75**3)


def test_wsr_p_values_rows_are_independent_tests():
    rows = _three_point(4, 50, 0.05, 0.1, seed=0)
    together = wsr_p_values(rows, 0.52, 0.1)
    alone = torch.cat([wsr_p_values(row, 0.52, 0.1) for row in rows])
    torch.testing.assert_close(together, alone, rtol=0, atol=0)


def test_wsr_p_value_edges():
    assert float(wsr_p_values(torch.zeros(0), 0.5, 0.1)[0]) == 1.0
    assert float(wsr_p_values(torch.full((5,), 0.3), 0.0, 0.1)[0]) == 1.0
    assert float(wsr_p_values(torch.full((5,), 0.3), 1.0, 0.1)[0]) == 0.0
    # A mean above alpha gives no evidence: the capital never grows past 1.
    assert float(wsr_p_values(torch.ones(20), 0.5, 0.1)[0]) == 1.0


# ---- validity by simulation ----


@pytest.mark.parametrize(
    ("harm", "helped"),
    [(0.01, 0.0), (0.02, 0.01), (0.2, 0.1), (0.5, 0.5)],
)
def test_wsr_p_value_is_valid_at_the_edge_of_the_null(harm, helped):
    # H0: mean >= alpha is true with equality, the hardest case for validity.
    draws, n = 2000, 300
    x = _three_point(draws, n, harm, helped, seed=1)
    alpha = (1 + harm - helped) / 2
    for delta in (0.1, 0.05):  # the level the bets are sized for
        p = wsr_p_values(x, alpha, delta)
        for level in LEVELS:
            assert int((p <= level).sum()) <= _allowance(level, draws)


def test_wsr_upper_bound_covers_the_true_mean():
    draws, n, delta = 200, 200, 0.1
    x = _three_point(draws, n, 0.03, 0.02, seed=2)
    truth = (1 + 0.03 - 0.02) / 2
    missed = sum(wsr_upper_bound(row, delta) < truth for row in x)
    assert missed <= _allowance(delta, draws)
    # and it is a bound, not a formality: within a few points of the truth at n = 200
    assert wsr_upper_bound(x[0], delta) < truth + 0.05


def test_wsr_upper_bound_is_where_the_p_value_crosses_delta():
    x = _three_point(1, 500, 0.02, 0.03, seed=3)[0]
    bound = wsr_upper_bound(x, 0.1)
    assert float(wsr_p_values(x, bound, 0.1)[0]) <= 0.1
    assert float(wsr_p_values(x, bound - 1e-6, 0.1)[0]) > 0.1


def test_binomial_and_hoeffding_bentkus_p_values_are_valid():
    draws, n, eps = 2000, 200, 0.05
    g = torch.Generator().manual_seed(4)
    events = (torch.rand(draws, n, generator=g) < eps).sum(dim=1).tolist()
    binomial = torch.tensor([binomial_p_value(k, n, eps) for k in events])
    hb = torch.tensor([hoeffding_bentkus_p_value(k / n, n, eps) for k in events])
    for level in LEVELS:
        assert int((binomial <= level).sum()) <= _allowance(level, draws)
        assert int((hb <= level).sum()) <= _allowance(level, draws)
    # the exact tail is never weaker than Hoeffding-Bentkus, its relaxation
    assert bool((binomial <= hb + 1e-12).all())


def test_bonferroni_min_is_valid_where_the_plain_minimum_is_not():
    assert bonferroni_min(0.03, 0.2) == pytest.approx(0.06)
    assert bonferroni_min(0.7, 0.9) == 1.0
    assert bonferroni_min(0.01, 0.02, 0.5) == pytest.approx(0.03)
    # two independent uniform p-values (both nulls true): P(min <= a) = 1 - (1 - a)^2 > a,
    # P(2 min <= a) = 1 - (1 - a / 2)^2 <= a
    draws = 4000
    u = torch.rand(draws, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    combined = torch.tensor([bonferroni_min(*row) for row in u.tolist()])
    plain = u.min(dim=1).values
    assert int((combined <= 0.1).sum()) <= _allowance(0.1, draws)
    assert int((plain <= 0.1).sum()) > _allowance(0.1, draws)  # 0.19 expected


def test_betting_beats_hoeffding_bentkus_on_a_drop_with_small_variance():
    # The shifted drop loss is 0.5 on most samples: Hoeffding-Bentkus sees a mean near 0.5
    # (its worst case) and cannot reject; betting sees the small variance.
    x = _three_point(200, 2000, 0.005, 0.01, seed=6)  # drop -0.5 pt; test drop > 0.5 pt
    alpha = (1 + 0.005) / 2
    betting = wsr_p_values(x, alpha, 0.1)
    hb = torch.tensor([hoeffding_bentkus_p_value(float(row.mean()), 2000, alpha) for row in x])
    assert int((betting <= 0.1).sum()) > 150 and int((hb <= 0.1).sum()) == 0
