"""The two eager forwards of `EarlyExit`: staged (a sample that exits leaves the batch; later
stages run on the undecided only) and generic (the model runs whole with hooks at the taps, and
stops once every sample has exited).

Both take `decide(index, features, keep) -> (logits (b, K), leave (b,))`, which runs exit `index`'s
head on the features of the b samples still running and applies the routing rule, and
`active`, which exits can take samples at all (threshold < 1: only their heads run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from auxhead._hooks import HookSet
from auxhead._probe import batch_size, first_tensor, resolve
from auxhead.attach import AuxModel
from auxhead.exits._route import MAIN, check_logits, model_logits
from auxhead.exits._stages import Plan

__all__ = ["Decide", "forward_generic", "forward_staged", "head_copy"]

# (exit index, features (b, ...), real tokens (b, N) or None) -> (logits (b, K), leave (b,))
Decide = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class _BatchExited(BaseException):
    # Raised from a tap's hook to stop the forward once every sample has exited. A
    # BaseException, so that an `except Exception` in the user's forward cannot swallow it.
    pass


def _take(output: Any, keep: torch.Tensor) -> Any:
    """The samples `keep` (a bool mask over the batch) of a stage's output."""
    if isinstance(output, torch.Tensor):
        if output.dim() == 0 or output.shape[0] != keep.shape[0]:
            raise ValueError(
                f"a stage outputs shape {tuple(output.shape)}, whose first dimension is not the "
                f"batch ({keep.shape[0]}); use EarlyExit(..., mode='generic')"
            )
        return output[keep]
    if isinstance(output, (tuple, list)):
        return type(output)(_take(item, keep) for item in output)
    raise TypeError(
        f"a stage outputs {type(output).__name__}, which cannot be split by sample; "
        "use EarlyExit(..., mode='generic')"
    )


def head_copy(aux_model: AuxModel, tap: str, output: Any) -> torch.Tensor:
    """What the head at `tap` classifies, as a copy: the stage output goes on to the next
    stage, and a head that changes its input in place (`ReLU(inplace=True)` first) must not
    change what the rest of the model computes (the generic forward's row selection copies
    too)."""
    return aux_model.head_input(tap, output).clone()


def _exits_by_stage(plan: Plan, active: Sequence[bool]) -> dict[int, list[int]]:
    """stage position -> the active exits (tap indices) decided after it."""
    at_stage: dict[int, list[int]] = {}
    for index, end in enumerate(plan.ends):
        if active[index]:
            at_stage.setdefault(end, []).append(index)
    return at_stage


def _forward_one(
    x: torch.Tensor, plan: Plan, aux_model: AuxModel, active: Sequence[bool], decide: Decide
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch size 1: the decisions of `forward_staged`, without the masks and index copies a
    batch needs (about 0.1 ms an exit on a CPU): the sample leaves at the first exit it
    passes, with that head's logits."""
    taps, first = aux_model.taps, None
    at_stage = _exits_by_stage(plan, active)
    h: Any = x
    for position, stage in enumerate(plan.stages):
        h = stage.run(h)
        for index in at_stage.get(position, ()):
            logits, leave = decide(index, head_copy(aux_model, taps[index], h))
            first = logits if first is None else first
            logits = check_logits(logits, first, taps[index])
            if bool(leave[0]):
                return logits, torch.full((1,), index, dtype=torch.long, device=x.device)
    exits = torch.full((1,), len(taps), dtype=torch.long, device=x.device)
    if first is None:  # no head ran: the model's own output, untouched
        return h, exits
    return check_logits(h, first, MAIN).to(first.dtype), exits


def forward_staged(
    x: torch.Tensor, plan: Plan, aux_model: AuxModel, active: Sequence[bool], decide: Decide
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) inputs -> (B, K) logits and (B,) exit indices, stage by stage."""
    taps, batch = aux_model.taps, x.shape[0]
    if batch == 1:
        return _forward_one(x, plan, aux_model, active, decide)
    exits = torch.full((batch,), len(taps), dtype=torch.long, device=x.device)
    rows = torch.arange(batch, device=x.device)  # batch index of each sample still running
    out: torch.Tensor | None = None  # (B, K), filled as samples exit
    at_stage = _exits_by_stage(plan, active)
    h: Any = x
    for position, stage in enumerate(plan.stages):
        h = stage.run(h)
        for index in at_stage.get(position, ()):
            logits, leave = decide(index, head_copy(aux_model, taps[index], h))
            if out is None:
                out = logits.new_empty((batch, *logits.shape[1:]))
            logits = check_logits(logits, out, taps[index])
            if not bool(leave.any()):
                continue
            out[rows[leave]] = logits[leave]
            exits[rows[leave]] = index
            rows, h = rows[~leave], _take(h, ~leave)
            if rows.numel() == 0:
                return out, exits
    if out is None:  # no head ran: the model's own output, untouched
        return h, exits
    out[rows] = check_logits(h, out, MAIN).to(out.dtype)
    return out, exits


def _rows(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The samples `rows` of a tap's output: a dense tensor, or a nested one (one sequence of
    real tokens per sample, as `nn.TransformerEncoder` passes them in eval)."""
    if not features.is_nested:
        return features[rows]
    samples = features.unbind()
    return torch.nested.nested_tensor([samples[i] for i in rows.tolist()])


def forward_generic(
    inputs: tuple[tuple, dict], aux_model: AuxModel, active: Sequence[bool], decide: Decide
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) inputs, as `(args, kwargs)` of the model's call -> (B, K) logits and (B,) exit
    indices, the model run whole. On a token model each head pools over the real tokens of
    the samples still running (the rows of the padding mask the model's forward records)."""
    args, kwargs = inputs
    taps, batch = aux_model.taps, batch_size((*args, *kwargs.values()))
    device = first_tensor((*args, *kwargs.values())).device
    exits = torch.full((batch,), len(taps), dtype=torch.long, device=device)
    decided = torch.zeros(batch, dtype=torch.bool, device=device)
    state: dict[str, Any] = {"out": None, "last": -1}

    def decide_at(index: int, real_tokens: Callable[[str], torch.Tensor | None]):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if index < state["last"]:
                in_order = [taps[state["last"]], taps[index]]
                raise ValueError(
                    f"taps {in_order} run in this order, but `at` lists them the other "
                    "way; early exits need the taps in the order they run: attach again"
                )
            state["last"] = index
            features = aux_model.head_input(taps[index], output)
            if features.size(0) != batch:
                shape = "nested" if features.is_nested else tuple(features.shape)
                raise ValueError(
                    f"tap {taps[index]!r} outputs shape {shape}, whose first dimension is "
                    f"not the batch ({batch}); early exits need batch-first taps"
                )
            rows = (~decided).nonzero().squeeze(1)
            keep = real_tokens(taps[index])
            logits, leave = decide(
                index, _rows(features, rows), None if keep is None else keep[rows]
            )
            if state["out"] is None:
                state["out"] = logits.new_empty((batch, *logits.shape[1:]))
            state["out"][rows[leave]] = check_logits(logits, state["out"], taps[index])[leave]
            exits[rows[leave]] = index
            decided[rows[leave]] = True
            if bool(decided.all()):
                raise _BatchExited

        return hook

    modules = resolve(aux_model.model, taps)
    try:
        with HookSet() as hooks, aux_model.padding_recorded() as real_tokens:
            for index, tap in enumerate(taps):
                if active[index]:
                    hooks.forward(modules[tap], decide_at(index, real_tokens))
            main = model_logits(aux_model.model(*args, **kwargs))
    except _BatchExited:
        return state["out"], exits
    out = state["out"]
    if out is None:
        return main, exits
    rows = (~decided).nonzero().squeeze(1)
    out[rows] = check_logits(main, out, MAIN)[rows].to(out.dtype)
    return out, exits
