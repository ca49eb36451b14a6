"""Layer discovery: a dry run that records which named modules run, in what order, with what
output shape. `list_layers` is public; the rest is machinery shared by `attach` and `EarlyExit`."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LayerInfo", "LayerTable", "list_layers"]

Select = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class LayerInfo:
    """One module seen in the dry run."""

    name: str  # qualified name, as in `model.named_modules()`
    type: str  # class name of the module
    shape: tuple[int, ...] | None  # shape of the (first tensor of the) output; None if no tensor
    calls: int  # how many times the module ran in one forward


class LayerTable(list[LayerInfo]):
    """The list `list_layers` returns; `print()` shows it as a table."""

    @property
    def names(self) -> list[str]:
        return [info.name for info in self]

    def __str__(self) -> str:
        rows = [("name", "type", "output shape")]
        rows += [(i.name, i.type, "x".join(map(str, i.shape)) if i.shape else "-") for i in self]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in lines)


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in a module output: the tensor itself, or the first one found in a
    tuple, list, dict or dataclass-like namedtuple, depth first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def call_model(model: nn.Module, sample: Any) -> Any:
    """Run `model` on `sample`: a tensor, a tuple/list of positional arguments, or a dict of
    keyword arguments."""
    if isinstance(sample, dict):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for a dry run, restoring each module's own mode afterwards (a frozen
    sub-module in eval inside a training model stays so)."""
    modes = [(m, m.training) for m in model.modules() if m.training]
    if not modes:  # already all in eval (the early-exit hot path): nothing to switch
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def probe(
    model: nn.Module, sample: Any, selects: Mapping[str, Select | None] | None = None
) -> tuple[LayerTable, Any]:
    """Dry-run `model` on `sample` (eval mode, no grad, modes restored) and record every named
    module that runs. `selects` picks the tensor whose shape is recorded for some layers
    (default: the first tensor of the output). Returns the table and the model's output."""
    seen: dict[str, list[Any]] = {}
    names = {module: name for name, module in model.named_modules() if name}
    selects = selects or {}

    def start(module: nn.Module, _args: Any) -> None:
        # Rows are ordered by when a module starts, so a block comes before its children.
        name = names[module]
        if name in seen:
            seen[name][1] += 1
        else:
            seen[name] = [LayerInfo(name, type(module).__name__, None, 1), 1]

    def record(module: nn.Module, _args: Any, output: Any) -> None:
        name = names[module]
        info = seen[name][0]
        if info.shape is None:
            select = selects.get(name)
            tensor = select(output) if select is not None else first_tensor(output)
            if isinstance(tensor, torch.Tensor):
                seen[name][0] = LayerInfo(name, info.type, tuple(tensor.shape), 1)

    handles = [module.register_forward_pre_hook(start) for module in names]
    handles += [module.register_forward_hook(record) for module in names]
    try:
        with eval_mode(model), torch.no_grad():
            output = call_model(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    table = LayerTable(
        LayerInfo(info.name, info.type, info.shape, calls) for info, calls in seen.values()
    )
    return table, output


def list_layers(model: nn.Module, sample: Any) -> LayerTable:
    """Every named module that runs when `model` sees `sample`, in execution order.

    These are the names `auxhead.attach` accepts. The dry run uses eval mode and no grad and puts
    every module back in the mode it found it in.

    Args:
        model: any `nn.Module`.
        sample: an input batch: a tensor, a tuple of positional arguments or a dict of keyword
            arguments.

    Returns:
        A list of `LayerInfo(name, type, shape, calls)`; `print()` shows it as a table.

    Example:
        >>> print(auxhead.list_layers(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)))
    """
    return probe(model, sample)[0]


def resolve(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map qualified names to modules, failing with the closest valid names."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    resolved = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r} ({type(name).__name__})")
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(
                f"no layer named {name!r} in {type(model).__name__}.{hint} "
                "See auxhead.list_layers(model, sample) for every valid name."
            )
        resolved[name] = modules[name]
    return resolved
