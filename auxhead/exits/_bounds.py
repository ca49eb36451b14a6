"""Valid p-values and upper confidence bounds for the Learn-then-Test guarantee of
`EarlyExit.calibrate`: the exact binomial tail for a 0/1 loss, Hoeffding-Bentkus for a loss in
[0, 1], and fixed-sequence testing. Plain math and torch, no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "binomial_cdf",
    "binomial_p_value",
    "binomial_upper_bound",
    "fixed_sequence",
    "hb_upper_bound",
    "hoeffding_bentkus_p_value",
]


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
