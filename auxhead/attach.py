"""`attach`: hang auxiliary heads off named layers of any model, with forward hooks.

The wrapped model's `forward` is never rewritten. A forward hook at each tap passes the tap's
output to its head and keeps the logits in `aux_outputs`; the hook returns nothing, so the
model's own output is exactly what it would have been without heads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from auxhead._probe import Select, first_tensor, probe, resolve
from auxhead.heads import HeadFactory, build_head

__all__ = ["AuxModel", "attach"]

HeadSpec = nn.Module | str | HeadFactory


def _key(name: str) -> str:
    # nn.ModuleDict keys cannot contain '.', qualified names do.
    return name.replace(".", "__")


class AuxModel(nn.Module):
    """A model with auxiliary heads at named layers. Build it with `auxhead.attach`.

    `AuxModel(x)` returns exactly what the wrapped model returns, in train and eval mode. The
    heads run in training mode (or inside `heads_enabled()`) and leave their logits in
    `aux_outputs`, a dict keyed by tap name in `at` order.

    Attributes:
        model: the wrapped model, unchanged but for forward hooks on the tapped layers.
        heads: the heads, an `nn.ModuleDict` (keys are tap names with '.' written '__').
        taps: the tap names, in `at` order.
        aux_outputs: the heads' logits from the last forward, or {} if the heads did not run.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Mapping[str, nn.Module],
        select: Mapping[str, Select | None] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict({_key(name): head for name, head in heads.items()})
        self.taps: list[str] = list(heads)
        self._select = dict(select or {})
        self.aux_outputs: dict[str, torch.Tensor] = {}
        self._pending: dict[str, torch.Tensor] | None = None  # filled by the hooks in forward
        self._heads_on: bool | None = None  # None: heads follow self.training
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._hooked = False  # a plain bool torch.compile can read (the handles it cannot)
        self._register_hooks()

    def _register_hooks(self) -> None:
        """Put a `_RunHead` hook on every tap; on failure, none stays."""
        modules = resolve(self.model, self.taps)
        self._tapped = modules  # to tell a tap that did not run from one that was replaced
        try:
            for name, module in modules.items():
                self._handles.append(module.register_forward_hook(_RunHead(self, name)))
        except BaseException:
            self._remove_hooks()
            raise
        self._hooked = True

    def head_input(self, name: str, output: Any) -> torch.Tensor:
        """What the head at `name` classifies, given that layer's output: the tensor its
        `select` picks, or the first tensor."""
        select = self._select.get(name)
        features = select(output) if select is not None else first_tensor(output)
        if not isinstance(features, torch.Tensor):
            raise TypeError(
                f"layer {name!r} outputs no tensor for its head; pass `select=` to attach"
            )
        return features

    def _run_head(self, name: str, output: Any) -> None:
        if self._active:
            self._pending[name] = self.heads[_key(name)](self.head_input(name, output))

    @property
    def _active(self) -> bool:
        # The hooks only act inside AuxModel.forward: calling `aux_model.model(x)` directly
        # runs the plain model.
        on = self.training if self._heads_on is None else self._heads_on
        return on and self._pending is not None

    @property
    def heads_active(self) -> bool:
        """Whether a forward now would run the heads."""
        return self.training if self._heads_on is None else self._heads_on

    def head(self, name: str) -> nn.Module:
        """The head at tap `name`."""
        if name not in self.taps:
            raise KeyError(f"no head at {name!r}; taps are {self.taps}")
        return self.heads[_key(name)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._hooked:
            raise RuntimeError("this AuxModel was stripped; use the model strip() returned instead")
        self.aux_outputs = {}  # the previous step's outputs (and any graph they hold) go now
        self._pending = {}
        try:
            output = self.model(*args, **kwargs)
            pending = self._pending
        finally:
            self._pending = None
        if len(pending) < len(self.taps) and self.heads_active:
            self._check_replaced(pending)
        # `at` order, whatever order the taps ran in.
        self.aux_outputs = {name: pending[name] for name in self.taps if name in pending}
        return output

    def _check_replaced(self, ran: Mapping[str, torch.Tensor]) -> None:
        replaced = [
            name
            for name in self.taps
            if name not in ran and self.model.get_submodule(name) is not self._tapped[name]
        ]
        if replaced:
            raise RuntimeError(
                f"layer(s) {replaced} were replaced after attach (for example by "
                "nn.SyncBatchNorm.convert_sync_batchnorm), so their heads no longer run. "
                "Convert the model before attach, or tap the block around them."
            )

    def forward_with_aux(self, *args: Any, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """`(output, aux_outputs)` in one call, for plain training loops."""
        output = self(*args, **kwargs)
        return output, self.aux_outputs

    @contextmanager
    def heads_enabled(self, enabled: bool = True) -> Iterator[AuxModel]:
        """Run the heads (or not, with `enabled=False`) whatever the mode, inside the block.

        Example:
            >>> aux_model.eval()
            >>> with aux_model.heads_enabled():
            ...     out = aux_model(x)
            >>> per_head = aux_model.aux_outputs  # {tap name: logits}
        """
        previous = self._heads_on
        self._heads_on = enabled
        try:
            yield self
        finally:
            self._heads_on = previous

    def set_heads(self, enabled: bool | None) -> None:
        """Run heads always (True), never (False), or in training mode only (None, the default)."""
        self._heads_on = enabled

    def clear_aux(self) -> None:
        """Drop the stored head outputs (and the graph they hold)."""
        self.aux_outputs = {}

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._hooked = False

    def strip(self) -> nn.Module:
        """Remove every hook and return the original model, as it was before `attach`.

        The `AuxModel` cannot run afterwards; its heads are still reachable as `.heads`.
        """
        self._remove_hooks()
        self.aux_outputs = {}
        return self.model

    def extra_repr(self) -> str:
        return f"taps={self.taps}"

    def __getstate__(self) -> dict[str, Any]:
        # Head outputs hold an autograd graph, which cannot be copied or pickled. The hooks
        # are `_RunHead` objects, so deepcopy and pickle carry them (and their handles) over.
        state = self.__dict__.copy()
        state["aux_outputs"] = {}
        state["_pending"] = None
        return state


class _RunHead:
    """The forward hook at one tap: a picklable callable rather than a closure, so that
    `copy.deepcopy` and `torch.save` of an AuxModel work and the copy's hooks point at the
    copy."""

    def __init__(self, aux_model: AuxModel, name: str) -> None:
        self.aux_model = aux_model
        self.name = name

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self.aux_model._run_head(self.name, output)


def _normalise_at(at: Sequence[str] | Mapping[str, HeadSpec], default: HeadSpec):
    if isinstance(at, str):
        at = [at]
    if isinstance(at, Mapping):
        pairs = list(at.items())
    elif isinstance(at, Sequence):
        pairs = [(name, default) for name in at]
    else:
        raise TypeError(
            f"`at` must be a list of layer names or a dict name -> head, got {type(at).__name__}"
        )
    if not pairs:
        raise ValueError("`at` is empty: name at least one layer (see auxhead.list_layers)")
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"layer(s) {repeated} appear more than once in `at`; one head per layer")
    return pairs


def _infer_num_classes(output: Any) -> int | None:
    tensor = first_tensor(output)
    if tensor is not None and tensor.dim() == 2:
        return int(tensor.shape[1])
    return None


def attach(
    model: nn.Module,
    at: Sequence[str] | Mapping[str, HeadSpec],
    *,
    num_classes: int | None = None,
    head: HeadSpec = "inception",
    sample: Any = None,
    select: Select | Mapping[str, Select] | None = None,
) -> AuxModel:
    """Attach auxiliary classifier heads to `model` at the named layers.

    Built-in heads are sized by a dry run on `sample`, so every head parameter exists before an
    optimizer is built. On any error nothing is left attached.

    Args:
        model: any `nn.Module`; its code is not touched.
        at: qualified layer names (as `model.named_modules()` and `auxhead.list_layers` give
            them), or a dict name -> head, where a head is an `nn.Module`, a kind name
            ("inception", "linear", "sdn") or a callable `(tap_shape, num_classes) -> nn.Module`.
        num_classes: logits per head. If omitted, taken from the model's output on `sample`
            when that is a (B, K) tensor.
        head: the head for names given as a list.
        sample: an input batch (tensor, tuple of args or dict of kwargs) for the dry run. Needed
            by built-in heads and factories; with only `nn.Module` heads it still checks that
            every tap runs.
        select: for taps whose output is a tuple, list or dict, a function picking the tensor to
            classify (one for all taps, or a dict by name). Default: the first tensor.

    Returns:
        An `AuxModel` wrapping `model`.

    Raises:
        ValueError: unknown or repeated layer names, a tap that does not run on `sample`, or a
            built-in head without `num_classes`/`sample`.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> aux = auxhead.attach(model, ["layer2", "layer3"], sample=torch.randn(2, 3, 64, 64))
        >>> out = aux(x); aux.aux_outputs  # {'layer2': (B, 10) logits, 'layer3': ...}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, AuxModel):
        raise TypeError("this model already has heads; pass aux_model.model or strip() it first")
    pairs = _normalise_at(at, head)
    resolve(model, [name for name, _ in pairs])  # unknown names fail before any dry run
    selects = select if isinstance(select, Mapping) else {name: select for name, _ in pairs}
    unknown = sorted(set(selects) - {name for name, _ in pairs})
    if unknown:
        raise ValueError(f"`select` names {unknown}, which are not in `at`")

    needs_sizing = [name for name, spec in pairs if not isinstance(spec, nn.Module)]
    shapes: dict[str, tuple[int, ...]] = {}
    if sample is None and needs_sizing:
        raise ValueError(
            f"heads at {needs_sizing} are sized from the tap's output: pass `sample=` (an input "
            "batch) so auxhead can do a dry run, or give an nn.Module for each layer."
        )
    if sample is not None:
        table, output = probe(model, sample, selects)
        ran = {info.name: info for info in table}
        for name, _ in pairs:
            if name not in ran:
                raise ValueError(
                    f"layer {name!r} exists but did not run on the sample, so it has no output "
                    "to classify. See auxhead.list_layers(model, sample) for the layers that run."
                )
            if ran[name].calls > 1:
                raise ValueError(
                    f"layer {name!r} runs {ran[name].calls} times per forward (a shared module); "
                    "a head needs a layer that runs once. Pick a distinct layer."
                )
            if ran[name].shape is None and name in needs_sizing:
                raise TypeError(
                    f"layer {name!r} outputs no tensor to classify; pass `select=` to pick one"
                )
            shapes[name] = ran[name].shape
        if num_classes is None and needs_sizing:
            num_classes = _infer_num_classes(output)
    if needs_sizing and num_classes is None:
        raise ValueError(
            "pass `num_classes=`: the built-in heads need it, and the model's output on the "
            "sample is not a (batch, classes) tensor to read it from."
        )

    reference = next(iter(model.parameters()), None)
    heads: dict[str, nn.Module] = {}
    for name, spec in pairs:
        if isinstance(spec, nn.Module):
            heads[name] = spec
            continue
        built = build_head(spec, shapes[name], num_classes)
        if reference is not None:
            built = built.to(device=reference.device, dtype=reference.dtype)
        heads[name] = built
    return AuxModel(model, heads, select=selects)
