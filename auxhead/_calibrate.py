"""Threshold search for `EarlyExit.calibrate`, and the `ExitSummary` it returns.

Everything here works on what one pass over held-out data keeps: each head's score (N, E) and
whether each exit, then the main output, is right (N, E + 1). No forwards run here.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from auxhead._flops import FlopProfile

__all__ = ["ExitSummary", "check_targets"]


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
        raise ValueError(
            f"{names[1]} is a probability in (0, 1) such as 0.9 (None: no margin), "
            f"got {confidence!r}"
        )


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """(N, E) bool -> (N,) index of the first True in each row, E where there is none."""
    found = mask.any(dim=1)
    first = mask.to(torch.uint8).argmax(dim=1)  # argmax gives the first of equal maxima
    return torch.where(found, first, mask.shape[1])


def _leaves(scores: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
    """Which samples leave at an exit: a score strictly above the threshold, or a threshold of
    0 (everyone), never a threshold of 1. Scores (b,) against a float, or (N, E) against (E,);
    compared in the scores' dtype either way."""
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.to(scores.device, scores.dtype)
    return ((scores > thresholds) | (thresholds <= 0)) & (thresholds < 1)


def _exit_indices(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(N, E) scores, (E,) thresholds -> (N,) exit of each sample, E for the main head: the
    first exit it leaves at, by the forward's rule."""
    return _first_true(_leaves(scores, thresholds))


def _candidates(scores: torch.Tensor, limit: int = 64) -> list[float]:
    """Thresholds worth trying: observed scores (a sample exits above its own score's
    predecessor), thinned to `limit` quantiles, plus 0 and 1."""
    values = scores.flatten().unique()  # sorted
    if values.numel() > limit:
        values = values.quantile(torch.linspace(0, 1, limit, dtype=values.dtype))
    return sorted({0.0, 1.0, *values.clamp(0.0, 1.0).tolist()})


def _search(
    scores: torch.Tensor,
    correct: torch.Tensor,
    profile: FlopProfile,
    drop: float,
    confidence: float | None = None,
) -> tuple[float, ...]:
    """Thresholds with the least mean FLOPs whose accuracy is at most `drop` below the main
    head's; all 1 (the main head alone) if no exit helps.

    With `confidence`, the drop's one-sided upper confidence bound must be within `drop`
    too: the mean of the paired per-sample differences (main right - exit right) plus
    z(confidence) standard errors, the normal approximation to their distribution.
    """
    n, n_exits = scores.shape
    main = correct[:, -1]
    # Counted in samples, so the comparison is exact: at most floor(drop * N) fewer correct.
    need = int(main.sum()) - math.floor(drop * n + 1e-9)
    z = statistics.NormalDist().inv_cdf(confidence) if confidence is not None else None

    def judge(thresholds: torch.Tensor) -> tuple[float, int, bool]:
        exits = _exit_indices(scores, thresholds)
        costs = torch.tensor(profile.exit_costs((thresholds < 1).tolist()), dtype=torch.float64)
        right = correct.gather(1, exits[:, None]).squeeze(1)
        hits = int(right.sum())
        allowed = hits >= need
        if allowed and z is not None:
            differences = main.to(torch.float64) - right.to(torch.float64)
            spread = differences.std().item() if n > 1 else math.inf
            allowed = differences.mean().item() + z * spread / math.sqrt(n) <= drop + 1e-12
        return costs[exits].mean().item(), hits, allowed

    best = torch.ones(n_exits, dtype=scores.dtype)
    best_cost, best_hits, _ = judge(best)

    def consider(thresholds: torch.Tensor) -> bool:
        nonlocal best, best_cost, best_hits
        cost, hits, allowed = judge(thresholds)
        tie = math.isclose(cost, best_cost, rel_tol=1e-12)
        if allowed and ((cost < best_cost and not tie) or (tie and hits > best_hits)):
            best, best_cost, best_hits = thresholds, cost, hits
            return True
        return False

    for value in _candidates(scores):  # one threshold shared by every exit
        consider(torch.full((n_exits,), value, dtype=scores.dtype))
    per_exit = [_candidates(scores[:, index]) for index in range(n_exits)]
    for _ in range(10):  # then one exit at a time, until nothing improves
        improved = False
        for index in range(n_exits):
            for value in per_exit[index]:
                trial = best.clone()
                trial[index] = value
                improved = consider(trial) or improved
        if not improved:
            break
    # An exit no sample leaves at only costs its head: turn it off (nothing else changes).
    used = _exit_indices(scores, best).bincount(minlength=n_exits + 1)[:n_exits] > 0
    return tuple(torch.where(used, best, 1.0).tolist())


def _si(flops: float) -> str:
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if flops >= factor:
            return f"{flops / factor:.2f}{unit}"
    return f"{flops:.0f}"


@dataclass(frozen=True)
class ExitSummary:
    """How the early exits do on a data set; `print()` shows a table, `as_dict()` a dict."""

    exits: list[str]  # the taps in `at` order, then "main"
    thresholds: list[float]  # one per tap; 1 means the exit is off
    criterion: str
    samples: int
    accuracy: float  # with early exits
    main_accuracy: float  # the main head alone
    max_accuracy_drop: float | None  # the calibration target; None from `evaluate`
    fallback: bool  # calibration found no usable exit: every sample goes to the main head
    share: list[float]  # share of the samples leaving at each exit (sums to 1)
    exit_accuracy: list[float | None]  # accuracy of the samples leaving there; None: none did
    flops: list[int]  # per-sample FLOPs of leaving at each exit, heads run on the way included
    mean_flops: float  # per sample, with early exits
    full_flops: int  # per sample, the wrapped model alone
    oracle_flops: float  # per sample, exiting at the first correct head, running only that head
    oracle_accuracy: float  # share of samples some exit gets right
    seconds_per_sample: float | None  # wall-clock with early exits; None if not timed
    full_seconds_per_sample: float | None  # wall-clock of the wrapped model alone
    confidence: float | None = None  # calibration: the drop's bound held at this confidence

    @property
    def saving(self) -> float:
        """Share of the full model's FLOPs the early exits save."""
        return 1.0 - self.mean_flops / self.full_flops if self.full_flops else 0.0

    @property
    def oracle_saving(self) -> float:
        """Share of the full model's FLOPs saved by exiting at the first correct head."""
        return 1.0 - self.oracle_flops / self.full_flops if self.full_flops else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saving": self.saving, "oracle_saving": self.oracle_saving}

    def __str__(self) -> str:
        rows = [("exit", "threshold", "share", "accuracy", "FLOPs/sample")]
        for index, name in enumerate(self.exits):
            threshold = self.thresholds[index] if index < len(self.thresholds) else None
            accuracy = self.exit_accuracy[index]
            rows.append(
                (
                    name,
                    "-" if threshold is None else "off" if threshold >= 1 else f"{threshold:.4f}",
                    f"{self.share[index]:.1%}",
                    "-" if accuracy is None else f"{accuracy:.2%}",
                    _si(self.flops[index]),
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        lines = [
            "  ".join(
                cell.ljust(w) if c == 0 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(0, f"early exits on {self.samples} samples (criterion: {self.criterion})")
        target = ""
        if self.max_accuracy_drop is not None:
            target = f", allowed drop {self.max_accuracy_drop:.2%}"
            if self.confidence is not None:
                target += f" at {self.confidence:.0%} confidence"
        lines.append(
            f"accuracy {self.accuracy:.2%} (main head alone {self.main_accuracy:.2%}{target})"
        )
        lines.append(
            f"FLOPs/sample {_si(self.mean_flops)}: {self.saving:.1%} saved vs the full model "
            f"({_si(self.full_flops)}); the oracle saves {self.oracle_saving:.1%} "
            f"({_si(self.oracle_flops)}, accuracy {self.oracle_accuracy:.2%})"
        )
        if self.seconds_per_sample is not None and self.full_seconds_per_sample is not None:
            speedup = self.full_seconds_per_sample / max(self.seconds_per_sample, 1e-12)
            lines.append(
                f"wall-clock/sample {self.seconds_per_sample * 1e3:.3f} ms vs "
                f"{self.full_seconds_per_sample * 1e3:.3f} ms for the full model ({speedup:.2f}x)"
            )
        if self.fallback:
            lines.append("no exit met the accuracy target: every sample goes to the main head")
        return "\n".join(line.rstrip() for line in lines)
