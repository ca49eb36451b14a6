"""Hook and mode plumbing shared by `attach`, the dry run, FLOPs counting and early exits.

Three promises, kept in one place: hooks registered together are removed together (also when
registering one of them fails), every module gets its own training flag back after a block
that switched modes, and a dry run leaves no trace (BatchNorm running statistics, counters and
the random number generators are as they were).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookSet", "dry_run_state", "training_mode"]


class HookSet:
    """Forward hooks that live and die together.

    As a context manager, every hook is removed when the block ends, however it ends. Picklable
    and deep-copyable (the handles are), so an `AuxModel` that holds one can be copied.

    Example:
        >>> with HookSet() as hooks:
        ...     hooks.forward(model.layer2, record)
        ...     model(x)
        # no hook left on model.layer2
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(
        self,
        module: nn.Module,
        hook: Callable[..., Any],
        *,
        pre: bool = False,
        with_kwargs: bool = False,
    ) -> RemovableHandle:
        """Register `hook` on `module` (a forward pre-hook with `pre=True`; given the keyword
        arguments too with `with_kwargs=True`, as torch's own `with_kwargs`)."""
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook of the set; a second call does nothing."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.remove()


def _all_in_mode(model: nn.Module, mode: bool) -> bool:
    """Whether every module is in `mode`: a plain walk over the children, about 4x quicker than
    `model.modules()` (no names, no memo), which matters at batch size 1 (early exits). A
    child set to None (`model.aux_classifier = None`) is skipped, as `modules()` skips it."""
    stack = [model]
    while stack:
        module = stack.pop()
        if module.training != mode:
            return False
        stack.extend(child for child in module._modules.values() if child is not None)
    return True


@contextmanager
def training_mode(model: nn.Module, mode: bool) -> Iterator[None]:
    """Train (`mode=True`) or eval mode for the block; afterwards each module gets back its own
    flag (a frozen sub-module left in eval inside a training model stays so).

    Nothing is switched, and nothing restored, when every module is already in `mode`: the
    early-exit hot path pays nothing.
    """
    if _all_in_mode(model, mode):
        yield
        return
    saved = [(module, module.training) for module in model.modules()]
    model.train(mode)
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def _cuda_devices(modules: Iterable[nn.Module]) -> list[int]:
    devices = {
        tensor.device.index or 0
        for module in modules
        for tensor in (*module.parameters(), *module.buffers())
        if tensor.device.type == "cuda"
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices.add(torch.cuda.current_device())
    return sorted(devices)


@contextmanager
def dry_run_state(*modules: nn.Module) -> Iterator[None]:
    """Undo, when the block ends, what a training-mode dry run changes: every buffer of
    `modules` (BatchNorm running statistics and batch counters) and the state of the random
    number generators (CPU, and the CUDA devices the modules are on)."""
    saved = [(buffer, buffer.clone()) for module in modules for buffer in module.buffers()]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(modules)):
            yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
