"""Auxiliary heads under `DistributedDataParallel`: what works as is, and a check for the one
setting that cannot work.

An `AuxModel` goes inside DDP like any model: `DistributedDataParallel(aux_model)`. With the
default `find_unused_parameters=False`, DDP expects a gradient for every parameter in every
step, and `AuxLoss` gives one to every head parameter, also in steps where the heads are
switched off (`set_heads(False)`) or weighted 0 by their schedule. `static_graph=True` works too.

`find_unused_parameters=True` does not: DDP then finds the parameters a step uses by walking
the autograd graph back from what `forward` returns, and an `AuxModel` returns the wrapped
model's output alone, so DDP counts every head parameter unused, and fails in backward when
their gradients arrive ("marked as ready twice"). `check_ddp` says so before the first step.
See docs/distributed.md for launching (torchrun, accelerate, several nodes).
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from auxhead.attach import AuxModel

__all__ = ["check_ddp"]


def check_ddp(model: nn.Module) -> None:
    """Raise if `model` is a `DistributedDataParallel` whose settings break auxiliary heads.

    Call it once after wrapping; anything that is not DDP around an `AuxModel` passes.

    Args:
        model: the model as trained, e.g. `DistributedDataParallel(aux_model)`.

    Raises:
        ValueError: DDP wraps an `AuxModel` with `find_unused_parameters=True` and without
            `static_graph=True`.

    Example:
        >>> ddp = DistributedDataParallel(aux_model, device_ids=[local_rank])
        >>> auxhead.distributed.check_ddp(ddp)
    """
    if not isinstance(model, DistributedDataParallel):
        return
    if not isinstance(model.module, AuxModel):
        return
    if model.find_unused_parameters and not model.static_graph:
        raise ValueError(
            "DistributedDataParallel(find_unused_parameters=True) cannot see an AuxModel's "
            "heads (their outputs are not in what forward returns), so it fails in backward. "
            "Leave find_unused_parameters=False: AuxLoss gives every head parameter a gradient "
            "every step, even with the heads off or weighted 0. If the wrapped model itself "
            "has parameters that go unused, pass static_graph=True instead (the same "
            "parameters unused in every step)."
        )
