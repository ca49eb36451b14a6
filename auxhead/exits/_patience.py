"""PABEE's patience rule (Zhou et al., "BERT Loses Patience", NeurIPS 2020): as a pure function
of the heads' logits, as the state `EarlyExit(criterion="patience")` carries through its
forward, and as Learn then Test calibration of the patience.

Head by head, in the order they run, each sample keeps a counter: +1 when this head predicts
the same class as the head before it, back to 0 when it does not (the first head starts at 0).
The sample exits at the first head where its counter reaches `patience`, answering with that
head's prediction; a sample that never gets there is answered by the main output. With
patience t an exit needs t + 1 heads in a row that agree, so the first exit possible is head t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from auxhead.exits._bounds import fixed_sequence, wsr_p_values, wsr_upper_bound

__all__ = ["PatienceChoice", "PatienceRule", "choose_patience", "patience_exits", "patience_logits"]


def _check(logits: Sequence[torch.Tensor], patience: int) -> None:
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(
            f"patience must be a whole number >= 1 (how many heads in a row must agree with the "
            f"one before them), got {patience!r}"
        )
    if not len(logits):
        raise ValueError("patience_exits needs the logits of at least one head")
    shapes = {tuple(t.shape) for t in logits}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"every head's logits must be one (B, K) shape, got {sorted(shapes)}: the heads "
            "must predict the same classes for the same batch"
        )


def patience_exits(logits: Sequence[torch.Tensor], patience: int) -> torch.Tensor:
    """Each sample's exit under PABEE's patience rule.

    Args:
        logits: each head's (B, K) logits, in the order the heads run.
        patience: how many heads in a row must agree with the head before them (PABEE's t).

    Returns:
        (B,) int64: the index of the head each sample exits at, or `len(logits)` for the
        samples no head lets go (the main output answers them).

    Raises:
        ValueError: a `patience` below 1, no heads, or heads of different shapes.

    Example:
        >>> heads = [F.one_hot(torch.tensor([c]), 2).float() for c in (0, 1, 1, 1)]
        >>> patience_exits(heads, patience=2)  # tensor([3]): heads 1, 2, 3 agree
    """
    _check(logits, patience)
    return _exits(torch.stack([t.argmax(dim=-1) for t in logits], dim=1), patience)


def _exits(predictions: torch.Tensor, patience: int) -> torch.Tensor:
    """(B, E) each head's predicted class -> (B,) exit indices under the patience rule."""
    batch, heads = predictions.shape
    exits = torch.full((batch,), heads, dtype=torch.long, device=predictions.device)
    counter = torch.zeros(batch, dtype=torch.long, device=predictions.device)
    for index in range(1, heads):
        counter = _count(predictions[:, index], predictions[:, index - 1], counter)
        leaving = (counter >= patience) & (exits == heads)
        exits = torch.where(leaving, torch.full_like(exits, index), exits)
    return exits


def _count(prediction: torch.Tensor, previous: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """PABEE's counter after one more head: +1 where it predicts what the head before it did,
    back to 0 where it does not."""
    return torch.where(prediction == previous, counter + 1, torch.zeros_like(counter))


class PatienceRule:
    """The patience rule as `EarlyExit`'s forward applies it, head by head, to the samples
    still running: each call gets the logits of the samples that have not exited, in batch
    order, and says which leave; the state of those that stay carries to the next head (the
    forwards drop exactly the samples that leave). One per forward call."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.previous: torch.Tensor | None = None  # (b,) the last head's predictions
        self.counter: torch.Tensor | None = None  # (b,) heads in a row that agreed

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        prediction = logits.argmax(dim=-1)  # (b,)
        if self.previous is None:
            counter = torch.zeros_like(prediction)
        else:
            counter = _count(prediction, self.previous, self.counter)
        leave = counter >= self.patience
        self.previous, self.counter = prediction[~leave], counter[~leave]
        return leave


@dataclass(frozen=True)
class PatienceChoice:
    """What `choose_patience` decided, and the evidence for it."""

    patience: int  # len(heads) when nothing passed: no sample can exit
    fallback: bool
    bound: float | None  # ltt: the (1 - delta) upper bound on the chosen patience's drop
    passed: int  # patiences that passed the test in sequence (ltt) or met the target


def choose_patience(
    predictions: torch.Tensor,
    correct: torch.Tensor,
    costs: Sequence[float],
    *,
    max_accuracy_drop: float,
    confidence: float,
    method: str,
    full: float,
    seed: int = 0,
) -> PatienceChoice:
    """The patience that costs least while the accuracy drop against the main head stays
    within `max_accuracy_drop`: with "ltt" (and "ltt-harm", the same test here), on new data
    with probability >= `confidence`, by Learn then Test along the patiences from the most
    careful (len(heads) - 1: only the last head can let samples go) down to 1, a path fixed
    before the data is seen, each tested with the Waudby-Smith-Ramdas betting test of
    "drop > max_accuracy_drop" and stopping at the first that fails; with "empirical", on
    these samples only.

    Args:
        predictions: (N, E) each head's predicted class.
        correct: (N, E + 1) bool, whether each head, then the main output, is right (or, to
            bound the disagreement, agrees with the main output).
        costs: FLOPs of leaving at each exit, then of the main output, every head running.
        max_accuracy_drop: the accuracy the exits may lose against the main head.
        confidence: 1 - delta, for "ltt".
        method: "ltt" or "ltt-harm" (guaranteed, the same test here) or "empirical".
        full: FLOPs of the model alone: a patience that costs more saves nothing.
        seed: the order the betting test reads the samples in.
    """
    heads = predictions.shape[1]
    path = list(range(heads - 1, 0, -1))
    none = PatienceChoice(heads, True, None, 0)
    if not path:
        return none
    exits = torch.stack([_exits(predictions, p) for p in path])  # (M, N)
    right = correct.T.gather(0, exits).double()  # (M, N)
    main = correct[:, -1].double()
    price = torch.tensor(list(costs), dtype=torch.float64)[exits].mean(dim=1)  # (M,)
    if method == "empirical":
        ok = [i for i in range(len(path)) if float((main - right[i]).mean()) <= max_accuracy_drop]
        passed, bound = len(ok), None
    else:
        order = torch.randperm(main.numel(), generator=torch.Generator().manual_seed(seed))
        shifted = ((main - right + 1) / 2)[:, order]
        delta = 1 - confidence
        eps = max_accuracy_drop
        passed = fixed_sequence(wsr_p_values(shifted, (1 + eps) / 2, delta).tolist(), delta)
        ok = list(range(passed))
    if not ok:
        return none
    pick = min(ok, key=lambda i: float(price[i]))
    if float(price[pick]) >= full:
        return none  # the heads cost more than the samples leaving save
    if method != "empirical":
        bound = 2 * wsr_upper_bound(shifted[pick], 1 - confidence) - 1
    return PatienceChoice(path[pick], False, bound, passed)


def patience_logits(
    logits: Sequence[torch.Tensor], main: torch.Tensor, patience: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(answer, exits)`: each sample's logits from the head it exits at under the patience
    rule (`patience_exits`), the main output's `main` (B, K) for those no head lets go."""
    exits = patience_exits(logits, patience)
    stacked = torch.stack([*logits, main])  # (heads + 1, B, K)
    rows = torch.arange(main.shape[0], device=main.device)
    return stacked[exits, rows], exits
