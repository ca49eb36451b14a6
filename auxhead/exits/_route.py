"""The routing rule every part of early exits shares: the criteria that score a head's logits,
which samples leave at an exit, and where each sample leaves given all its scores.

A sample leaves at the first exit (in `at` order) whose score is strictly above its threshold;
a threshold of 0 lets every sample out, a threshold of 1 none (and its head does not run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from auxhead._probe import first_tensor

__all__ = [
    "CRITERIA",
    "MAIN",
    "Criterion",
    "check_logits",
    "confidence",
    "entropy_confidence",
    "exit_indices",
    "first_true",
    "leaves",
    "model_logits",
    "score_logits",
]

MAIN = "main"  # the name of the wrapped model's own output among the exits

Criterion = Callable[[torch.Tensor], torch.Tensor]


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability, (B, K) -> (B,), in [0, 1]."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    """1 - H(p) / log K, (B, K) -> (B,): 1 for a one-hot prediction, 0 for a uniform one."""
    log_p = logits.float().log_softmax(dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return 1.0 - entropy / math.log(logits.shape[-1])


CRITERIA: dict[str, Criterion] = {"confidence": confidence, "entropy": entropy_confidence}


def score_logits(criterion: Criterion, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K) logits -> (B,) scores by `criterion`, of logits / temperature; refuses a
    criterion that does not give one score per sample."""
    scores = criterion(logits if temperature == 1.0 else logits / temperature)
    if not isinstance(scores, torch.Tensor) or scores.shape != logits.shape[:1]:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(
            f"the criterion gave {got} for logits of shape {tuple(logits.shape)}; it must "
            "give one score per sample, shape (B,)"
        )
    return scores


def check_logits(logits: Any, like: torch.Tensor, name: str) -> torch.Tensor:
    """`logits`, checked to be a tensor of (B, K) logits like `like` (the first head's)."""
    if not isinstance(logits, torch.Tensor) or logits.shape[1:] != like.shape[1:]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        first = f"(B, {', '.join(map(str, like.shape[1:]))})"
        raise ValueError(
            f"exit {name!r} outputs {got}, but the first head running gives {first} logits; "
            "early exits need heads that predict the model's classes, and a (B, K) output"
        )
    return logits


def first_true(mask: torch.Tensor) -> torch.Tensor:
    """(..., E) bool -> (...) index of the first True along the last dim, E where there is none."""
    found = mask.any(dim=-1)
    first = mask.to(torch.uint8).argmax(dim=-1)  # argmax gives the first of equal maxima
    return torch.where(found, first, mask.shape[-1])


def leaves(scores: torch.Tensor, thresholds: torch.Tensor | float) -> torch.Tensor:
    """Which samples leave at an exit: a score strictly above the threshold, or a threshold of
    0 (everyone), never a threshold of 1. Scores (b,) against a float, or (..., E) against
    (..., E) thresholds that broadcast; compared in the scores' dtype either way (calibration
    puts thresholds on values that dtype represents, so the comparison is the same in both)."""
    if isinstance(thresholds, torch.Tensor):
        thresholds = thresholds.to(scores.device, scores.dtype)
    return ((scores > thresholds) | (thresholds <= 0)) & (thresholds < 1)


def exit_indices(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Where each sample leaves: (N, E) scores and (E,) thresholds -> (N,) exit indices, E for
    the main head, by the rule of `EarlyExit`'s forward.

    Example:
        >>> exit_indices(torch.tensor([[0.9, 0.2], [0.5, 0.8]]), torch.tensor([0.7, 0.6]))
        tensor([0, 1])
    """
    return first_true(leaves(scores, thresholds))


def model_logits(output: Any) -> torch.Tensor:
    """The (B, K) logits of a model's output: the tensor itself, the `logits` of a Hugging Face
    `ModelOutput` (or a dict), or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    tensor = first_tensor(output)
    if tensor is None:
        raise ValueError(f"the model returns {type(output).__name__}, with no logits tensor in it")
    return tensor
