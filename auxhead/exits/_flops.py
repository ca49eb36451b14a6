"""FLOPs of an `AuxModel`'s exits, counted with `torch.utils.flop_counter.FlopCounterMode`.

FlopCounterMode counts matrix multiplies and convolutions (2 FLOPs per multiply-add); norms,
activations and pooling count zero. All counts here are per sample: counted on a batch and
divided by its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from auxhead._hooks import HookSet
from auxhead._probe import batch_size, call_model, eval_mode, resolve
from auxhead.attach import AuxModel
from auxhead.exits._route import MAIN

__all__ = ["FlopProfile", "count_flops", "exit_flops", "exit_params", "flop_profile"]


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """`(flops, output)` of one call `fn(*args, **kwargs)`, as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        output = fn(*args, **kwargs)
    return counter.get_total_flops(), output


@dataclass(frozen=True)
class FlopProfile:
    """Per-sample FLOPs of the pieces an early exit pays for."""

    backbone: dict[str, int]  # the wrapped model up to and including each tap, in `at` order
    heads: dict[str, int]  # each head on its tap's output
    full: int  # the wrapped model alone, without heads

    def exit_costs(self, active: Sequence[bool]) -> list[int]:
        """Per-sample FLOPs of leaving at each tap, then of reaching the main output, when the
        heads marked `active` (one flag per tap, `at` order) run: the backbone so far plus every
        active head on the way."""
        costs, heads = [], 0
        for name, on in zip(self.backbone, active, strict=True):
            heads += self.heads[name] if on else 0
            costs.append(self.backbone[name] + heads)
        return [*costs, self.full + heads]

    def direct_costs(self) -> list[int]:
        """Per-sample FLOPs of leaving at each tap having run only that tap's head, then of the
        main output alone: what an exit costs when one knows in advance where to leave."""
        return [*(self.backbone[name] + self.heads[name] for name in self.backbone), self.full]


def flop_profile(aux_model: AuxModel, sample: Any) -> FlopProfile:
    """Count the backbone up to each tap, each head, and the whole model on `sample`.

    One forward of the wrapped model (eval mode, no grad, modes restored) under
    FlopCounterMode; a hook at each tap reads the running total and keeps the tap's features,
    and each head is counted on its own afterwards.
    """
    taps = list(aux_model.taps)
    batch = batch_size(sample)
    marks: dict[str, int] = {}
    features: dict[str, torch.Tensor] = {}
    heads: dict[str, int] = {}

    with eval_mode(aux_model), torch.no_grad(), FlopCounterMode(display=False) as counter:

        def mark(name: str):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                marks[name] = counter.get_total_flops()
                # A clone: a later in-place op (ReLU(inplace=True)) must not change them.
                features[name] = aux_model.head_input(name, output).clone()

            return hook

        with HookSet() as hooks, aux_model.padding_recorded() as real_tokens:
            for name, module in resolve(aux_model.model, taps).items():
                hooks.forward(module, mark(name))
            call_model(aux_model.model, sample)
            keep = {name: real_tokens(name) for name in taps}
        full = counter.get_total_flops()
        missing = [name for name in taps if name not in marks]
        if missing:
            raise ValueError(f"taps {missing} did not run on the sample, so they have no cost")
        for name in taps:
            # The outer counter keeps counting; the head's FLOPs are the difference.
            before = counter.get_total_flops()
            aux_model.run_head(name, features[name], keep[name])  # pooled as it runs
            heads[name] = counter.get_total_flops() - before

    def per_sample(flops: int) -> int:
        return round(flops / batch)

    return FlopProfile(
        backbone={name: per_sample(marks[name]) for name in taps},
        heads={name: per_sample(heads[name]) for name in taps},
        full=per_sample(full),
    )


def exit_flops(aux_model: AuxModel, sample: Any) -> dict[str, int]:
    """Per-sample FLOPs of each exit: the backbone up to the tap plus that head, and of the
    whole model (key "main").

    Args:
        aux_model: an `AuxModel`.
        sample: an input batch (tensor, tuple of args or dict of kwargs); counts are divided by
            its batch size.

    Returns:
        `{tap: flops, ..., "main": flops}`, taps in `at` order.

    Raises:
        ValueError: a tap is called "main", or a tap does not run on `sample`.

    Example:
        >>> aux = auxhead.attach(resnet18(), ["layer2", "layer3"], sample=torch.randn(2, 3, 64, 64))
        >>> auxhead.exit_flops(aux, torch.randn(1, 3, 64, 64))  # doctest: +SKIP
        {'layer2': ..., 'layer3': ..., 'main': ...}  # increasing, per sample
    """
    if not isinstance(aux_model, AuxModel):
        raise TypeError(
            f"exit_flops needs an AuxModel (auxhead.attach), got {type(aux_model).__name__}"
        )
    if MAIN in aux_model.taps:
        raise ValueError(f"a tap is named {MAIN!r}, the key exit_flops keeps for the full model")
    costs = flop_profile(aux_model, sample).direct_costs()
    return dict(zip([*aux_model.taps, MAIN], costs, strict=True))


def exit_params(aux_model: AuxModel, sample: Any) -> dict[str, int]:
    """Parameters that take part in each exit: those of every module that has started running
    when the tap's output is ready, plus that head's; and of the whole model (key "main").

    Args:
        aux_model: an `AuxModel`.
        sample: an input batch for one dry run (eval mode, no grad, modes restored).

    Returns:
        `{tap: params, ..., "main": params}`, taps in `at` order.
    """
    model = aux_model.model
    started: list[nn.Module] = []
    counts: dict[str, int] = {}

    def own(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters(recurse=False))

    def start(module: nn.Module, _args: Any) -> None:
        started.append(module)

    def finish(name: str):
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            seen = {id(m): m for m in started}  # a module that runs twice counts once
            head = sum(p.numel() for p in aux_model.head(name).parameters())
            counts[name] = sum(own(m) for m in seen.values()) + head

        return hook

    with HookSet() as hooks, eval_mode(model), torch.no_grad():
        for module in model.modules():
            hooks.forward(module, start, pre=True)
        for name, module in resolve(model, aux_model.taps).items():
            hooks.forward(module, finish(name))
        call_model(model, sample)
    seen = {id(m): m for m in started}
    return {**{name: counts[name] for name in aux_model.taps},
            MAIN: sum(own(m) for m in seen.values())}  # fmt: skip
