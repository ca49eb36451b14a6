"""Stages: a model as steps run one after the other, cut at its taps, so `EarlyExit` can run
later stages on only the samples that have not exited yet.

Here the cut of an `nn.Sequential` (nested ones too: fastai's vision learners are a Sequential
of body and head), whose stages are its children themselves, so it needs no tracing and works
whatever the children do. Any other model is cut from its torch.fx graph (`_fx`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["NotStageable", "Plan", "Stage", "cut"]


class NotStageable(Exception):
    """The model cannot be cut into stages at these taps; the message says why."""


@dataclass(frozen=True)
class Stage:
    """One step of the cut model: `output = run(input)`."""

    name: str  # the qualified name of the module, or the tap a traced stage ends at
    run: nn.Module


@dataclass(frozen=True)
class Plan:
    """A model as stages run one after the other; the last stage's output is the model's."""

    stages: tuple[Stage, ...]
    ends: tuple[int, ...]  # per tap, in `at` order: the stage whose output is the tap's output
    traced: bool = False  # stages split from a torch.fx graph hold copies of the model's tensors


def _flatten(module: nn.Module, prefix: str, taps: Sequence[str]) -> list[Stage]:
    inside = [tap for tap in taps if tap.startswith(f"{prefix}.") or not prefix]
    if not inside:
        return [Stage(prefix, module)]
    if not (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward):
        where = f"{prefix!r} ({type(module).__name__})" if prefix else type(module).__name__
        raise NotStageable(f"taps {inside} lie inside {where}, which is not an nn.Sequential")
    stages = []
    for name, child in module.named_children():
        stages += _flatten(child, f"{prefix}.{name}" if prefix else name, taps)
    return stages


def cut(model: nn.Module, taps: Sequence[str]) -> Plan:
    """Cut `model` into stages such that every tap's output is some stage's output.

    Raises:
        NotStageable: a tap lies inside a module that is not an nn.Sequential.
        ValueError: the taps are not listed in the order they run.
    """
    stages = _flatten(model, "", taps)
    ends = []
    for tap in taps:
        # A tap is a stage, or a container cut into stages: its output is its last stage's.
        hits = [i for i, s in enumerate(stages) if s.name == tap or s.name.startswith(f"{tap}.")]
        assert hits, f"tap {tap!r} is in no stage"  # _flatten cuts at every tap
        ends.append(hits[-1])
    if ends != sorted(ends):
        in_order = [tap for _, tap in sorted(zip(ends, taps, strict=True), key=lambda p: p[0])]
        raise ValueError(
            f"early exits need the taps in the order they run: attach with at={in_order}, "
            f"not {list(taps)}"
        )
    return Plan(tuple(stages), tuple(ends))
