"""Valid p-values and upper confidence bounds for the Learn-then-Test guarantee of
`EarlyExit.calibrate`: the exact binomial tail for a 0/1 loss, Hoeffding-Bentkus and
Waudby-Smith-Ramdas betting for a loss in [0, 1], their Bonferroni combination, and
fixed-sequence testing. Plain math and torch, no scipy.

A p-value p for a null hypothesis H0 is valid when P(p <= a) <= a for every a in [0, 1]
whenever H0 is true; every p-value here is, for n i.i.d. losses (`tests/test_bounds.py`
checks it by simulation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "binomial_cdf",
    "binomial_p_value",
    "binomial_upper_bound",
    "bonferroni_min",
    "fixed_sequence",
    "hb_upper_bound",
    "hoeffding_bentkus_p_value",
    "wsr_p_values",
    "wsr_upper_bound",
]

WSR_CAP = 0.75  # a bet never stakes more than this share of the capital (Waudby-Smith, Ramdas)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), exact (a log-sum-exp of the probability mass, in float64)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = torch.arange(k + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1)
        - torch.lgamma(i + 1)
        - torch.lgamma(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    return min(1.0, torch.logsumexp(log_pmf, dim=0).exp().item())


def binomial_p_value(k: int, n: int, eps: float) -> float:
    """Valid p-value for H0: rate > eps, having seen k events in n Bernoulli draws: the largest
    P(Bin(n, p) <= k) over p >= eps, which is at p = eps."""
    return binomial_cdf(k, n, eps)


def binomial_upper_bound(k: int, n: int, delta: float) -> float:
    """Clopper-Pearson one-sided upper bound on a rate, k events in n draws: the largest p with
    P(Bin(n, p) <= k) >= delta; the rate is below it with probability >= 1 - delta."""
    if n == 0 or k >= n:
        return 1.0
    low, high = k / n, 1.0
    for _ in range(60):  # bisection to ~1e-18
        mid = (low + high) / 2
        if binomial_cdf(k, n, mid) > delta:
            low = mid
        else:
            high = mid
    return high


def hoeffding_bentkus_p_value(mean: float, n: int, alpha: float) -> float:
    """Valid p-value for H0: E[loss] > alpha from the mean of n losses in [0, 1] (Bates et al.
    2021): min(exp(-n h(min(mean, alpha), alpha)), e * P(Bin(n, alpha) <= ceil(n mean)))."""
    if alpha >= 1.0:  # a loss in [0, 1] cannot have a mean above 1
        return 0.0
    if alpha <= 0.0:  # a loss in [0, 1] with mean > 0 cannot be refuted
        return 1.0

    def h(a: float, b: float) -> float:  # KL divergence between Bernoulli(a) and Bernoulli(b)
        out = (1 - a) * math.log((1 - a) / (1 - b))
        return out + (a * math.log(a / b) if a > 0 else 0.0)

    hoeffding = math.exp(-n * h(min(mean, alpha), alpha))
    bentkus = math.e * binomial_cdf(math.ceil(n * mean - 1e-9), n, alpha)
    return min(1.0, hoeffding, bentkus)


def fixed_sequence(p_values: Sequence[float], delta: float) -> int:
    """How many hypotheses fixed-sequence testing rejects at level delta: it walks them in
    order and stops at the first p-value above delta (family-wise error <= delta)."""
    passed = 0
    for p in p_values:
        if p > delta:
            break
        passed += 1
    return passed


def hb_upper_bound(mean: float, n: int, delta: float) -> float:
    """The smallest alpha whose Hoeffding-Bentkus p-value is <= delta (bisection)."""
    low, high = mean, 1.0
    if hoeffding_bentkus_p_value(mean, n, high) > delta:
        return 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if hoeffding_bentkus_p_value(mean, n, mid) <= delta:
            high = mid
        else:
            low = mid
    return high


def wsr_p_values(losses: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """Valid p-values for H0: E[loss] >= alpha, one per row of `losses` (M, n) in [0, 1], from
    the Waudby-Smith-Ramdas betting test with the predictable plug-in bet (Waudby-Smith and
    Ramdas 2024, "Estimating means of bounded random variables by betting"; as in Bates et
    al.'s RCPS and Angelopoulos et al.'s Learn then Test).

    A gambler who starts with 1 and at each loss x_t stakes lambda_t (chosen from x_1 ..
    x_{t-1} only) on it being below alpha holds K_t = prod (1 + lambda_t (alpha - x_t)). Under
    H0, K is a non-negative supermartingale, so by Ville's inequality P(max_t K_t >= 1 / a)
    <= a, and 1 / max_t K_t is a valid p-value at every level a. The bet is sized for the
    level `delta` and for the variance seen so far: lambda_t = min(sqrt(2 log(1 / delta) /
    (n var_{t-1})), 0.75 / (1 - alpha)); a loss with small variance (mostly the same value)
    lets the capital grow fast, which is where this beats Hoeffding-Bentkus. The losses must
    come in an order fixed without looking at them (a seeded shuffle).
    """
    x = losses.double()
    x = x[None] if x.dim() == 1 else x
    m, n = x.shape
    if n == 0:
        return torch.ones(m, dtype=torch.float64)
    if alpha >= 1.0:  # a loss in [0, 1] cannot have a mean above 1
        return torch.where(
            (x == 1).all(dim=1),
            torch.ones(m, dtype=torch.float64),
            torch.zeros(m, dtype=torch.float64),
        )
    if alpha <= 0.0:
        return torch.ones(m, dtype=torch.float64)
    t = torch.arange(1, n + 1, dtype=torch.float64)
    mean = (0.5 + x.cumsum(dim=1)) / (t + 1)
    var = (0.25 + ((x - mean) ** 2).cumsum(dim=1)) / (t + 1)
    previous = torch.cat([torch.full((m, 1), 0.25, dtype=torch.float64), var[:, :-1]], dim=1)
    bet = torch.sqrt(2 * math.log(1 / delta) / (n * previous)).clamp(max=WSR_CAP / (1 - alpha))
    log_capital = torch.log1p(bet * (alpha - x)).cumsum(dim=1)
    best = log_capital.max(dim=1).values.clamp(min=0.0)
    return torch.exp(-best)


def wsr_upper_bound(losses: torch.Tensor, delta: float) -> float:
    """The smallest alpha whose betting p-value (`wsr_p_values`) is <= delta, by bisection: a
    (1 - delta) upper confidence bound on the mean of the i.i.d. `losses` (n,) in [0, 1]."""
    x = losses.double()[None]
    low, high = float(x.mean()), 1.0
    if float(wsr_p_values(x, high - 1e-12, delta)[0]) > delta:
        return 1.0
    for _ in range(50):
        mid = (low + high) / 2
        if float(wsr_p_values(x, mid, delta)[0]) <= delta:
            high = mid
        else:
            low = mid
    return high


def bonferroni_min(*p_values: float) -> float:
    """One valid p-value from k valid p-values for the same hypothesis: min(1, k * min).
    (The plain minimum is not valid: it rejects more often than its level.)"""
    return min(1.0, len(p_values) * min(p_values))
