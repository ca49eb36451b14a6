"""PABEE's patience rule (Zhou et al., "BERT Loses Patience", NeurIPS 2020), as a pure function
of the heads' logits: the routing for token models (issue #22, item 3) will call it.

Head by head, in the order they run, each sample keeps a counter: +1 when this head predicts
the same class as the head before it, back to 0 when it does not (the first head starts at 0).
The sample exits at the first head where its counter reaches `patience`, answering with that
head's prediction; a sample that never gets there is answered by the main output. With
patience t an exit needs t + 1 heads in a row that agree, so the first exit possible is head t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["patience_exits", "patience_logits"]


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
    batch = logits[0].shape[0]
    device = logits[0].device
    exits = torch.full((batch,), len(logits), dtype=torch.long, device=device)
    counter = torch.zeros(batch, dtype=torch.long, device=device)
    previous = logits[0].argmax(dim=-1)  # (B,)
    for index in range(1, len(logits)):
        prediction = logits[index].argmax(dim=-1)  # (B,)
        counter = torch.where(prediction == previous, counter + 1, torch.zeros_like(counter))
        leaving = (counter >= patience) & (exits == len(logits))
        exits = torch.where(leaving, torch.full_like(exits, index), exits)
        previous = prediction
    return exits


def patience_logits(
    logits: Sequence[torch.Tensor], main: torch.Tensor, patience: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(answer, exits)`: each sample's logits from the head it exits at under the patience
    rule (`patience_exits`), the main output's `main` (B, K) for those no head lets go."""
    exits = patience_exits(logits, patience)
    stacked = torch.stack([*logits, main])  # (heads + 1, B, K)
    rows = torch.arange(main.shape[0], device=main.device)
    return stacked[exits, rows], exits
