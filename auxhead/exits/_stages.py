"""Stages: a model as steps run one after the other, cut at its taps, so `EarlyExit` can run
later stages on only the samples that have not exited yet.

Here the cut of models whose forward is known, which runs their modules themselves:
`nn.Sequential` (nested ones too: fastai's vision learners are a Sequential of body and head),
torchvision's and timm's `ResNet`. Any other model is cut from its torch.fx graph (`_fx`).
ResNets keep their known cut because torch.fx traces the residual `out += identity` as an
out-of-place add, a new activation-sized tensor per block: at large activations (resnet50,
128 px, batch 32) the traced stages ran about 5% slower (`benchmarks/exit_stages.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["NotStageable", "Plan", "Stage", "cut"]


class NotStageable(Exception):
    """The model cannot be cut into stages at these taps; the message says why."""


@dataclass(frozen=True)
class Stage:
    """One step of the cut model: `output = run(input)`."""

    name: str  # qualified module name ("<parent>.(flatten)" for a functional step), or the
    # tap a traced stage ends at
    run: Callable[[Any], Any]


@dataclass(frozen=True)
class Plan:
    """A model as stages run one after the other; the last stage's output is the model's."""

    stages: tuple[Stage, ...]
    ends: tuple[int, ...]  # per tap, in `at` order: the stage whose output is the tap's output
    traced: bool = False  # stages split from a torch.fx graph hold copies of the model's tensors


Part = tuple[str, Callable[[Any], Any]]


def _defined_by(module: nn.Module, module_name: str, class_name: str, methods: Sequence[str]):
    """The class `module_name.class_name` if `module` is one and does not override `methods`
    (the forward we cut must be the one we know), else None."""
    for cls in type(module).__mro__:
        if cls.__module__ == module_name and cls.__name__ == class_name:
            same = all(getattr(type(module), m) is getattr(cls, m) for m in methods)
            return cls if same else None
    return None


def _parts(module: nn.Module) -> list[Part] | None:
    """The children of `module` in the order its forward runs them, with functional steps
    (flatten, timm's `forward_head`) in between; None for a forward we do not know."""
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        return list(module.named_children())
    if _defined_by(module, "torchvision.models.resnet", "ResNet", ["forward", "_forward_impl"]):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        parts: list[Part] = [(name, getattr(module, name)) for name in names]
        # torchvision's forward flattens between avgpool and fc.
        parts += [("avgpool", module.avgpool), ("(flatten)", partial(torch.flatten, start_dim=1))]
        return [*parts, ("fc", module.fc)]
    if _defined_by(module, "timm.models.resnet", "ResNet", ["forward", "forward_features"]):
        names = ["conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        parts = [(name, getattr(module, name)) for name in names]
        # Pooling, dropout and fc stay one step: taps inside the head are not cut.
        return [*parts, ("(forward_head)", module.forward_head)]
    return None


def _flatten(module: nn.Module, prefix: str, taps: Sequence[str]) -> list[Stage]:
    inside = [tap for tap in taps if tap.startswith(f"{prefix}.") or not prefix]
    if not inside:
        return [Stage(prefix, module)]
    parts = _parts(module)
    if parts is None:
        where = f"{prefix!r} ({type(module).__name__})" if prefix else type(module).__name__
        raise NotStageable(
            f"taps {inside} lie inside {where}, whose forward auxhead cannot cut "
            "(it cuts nn.Sequential and torchvision/timm ResNets)"
        )
    stages = []
    for name, part in parts:
        qualified = f"{prefix}.{name}" if prefix else name
        if isinstance(part, nn.Module):
            stages += _flatten(part, qualified, taps)
        else:
            stages.append(Stage(qualified, part))
    return stages


def cut(model: nn.Module, taps: Sequence[str]) -> Plan:
    """Cut `model` into stages such that every tap's output is some stage's output.

    Raises:
        NotStageable: the model's forward (or that of a module around a tap) is not one auxhead
            knows how to cut.
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
