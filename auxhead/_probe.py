"""Layer discovery: a dry run that records which named modules run, in what order, with what
output shape and layout. `list_layers` is public; the rest is machinery shared by `attach`,
FLOPs counting and `EarlyExit`.

Where the channels are in a tap's output is read from the layers around it, never guessed
from the sizes alone: the last layer with a channel count that ran up to the tap (a conv's
`out_channels`, a Linear's `out_features`, a norm's features) and the first one that reads
the tap's output afterwards (a conv's `in_channels`, ...). The size they agree on is the
channel count, and its place in the shape gives the layout: (B, C, H, W) or (B, H, W, C) for
maps, (B, C, L) or (B, N, C) for sequences. When they are silent (a concat, an upsample, an
identity between blocks), the whole model tells: a map whose dim 1 is a channel count of a
model where every convolution and norm reads its maps channels first is channels first.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from auxhead._format import table
from auxhead._hooks import HookSet, dry_run_state, training_mode

__all__ = ["LAYOUTS", "LayerInfo", "LayerTable", "list_layers"]

Select = Callable[[Any], torch.Tensor]

# Where the channels are: (B, C, H, W) / (B, C, L), or (B, H, W, C) / (B, N, C).
LAYOUTS = ("channels_first", "channels_last")


@dataclass(frozen=True)
class LayerInfo:
    """One module seen in the dry run."""

    name: str  # qualified name, as in `model.named_modules()`
    type: str  # class name of the module
    shape: tuple[int, ...] | None  # shape of the (first tensor of the) output; None if no tensor
    calls: int  # how many times the module ran in one forward
    layout: str | None = None  # "channels_first"/"channels_last" for 3-D and 4-D outputs, if known
    train_only: bool = False  # runs in training mode only (e.g. GoogLeNet's aux1)


class LayerTable(list[LayerInfo]):
    """The list `list_layers` returns; `print()` shows it as a table."""

    @property
    def names(self) -> list[str]:
        return [info.name for info in self]

    def __str__(self) -> str:
        rows = [
            (
                info.name,
                info.type
                + (" (train only)" if info.train_only else "")
                + (f" (runs {info.calls}x: no head)" if info.calls > 1 else ""),
                "x".join(map(str, info.shape)) if info.shape else "-",
                _LAYOUT_LABELS[info.layout] if info.shape and len(info.shape) > 2 else "",
            )
            for info in self
        ]
        return table(("name", "type", "output shape", "channels"), rows, align="llll")


_LAYOUT_LABELS = {"channels_first": "dim 1", "channels_last": "last dim", None: "?"}


@dataclass
class TapCheck:
    """What the training-mode dry run saw at one watched layer."""

    features: torch.Tensor  # what its head classifies, detached (a copy)
    grad: bool  # gradients were enabled when the layer ran
    modified: bool  # the model changed these features in place after the layer ran


@dataclass
class Probe:
    table: LayerTable
    output: Any  # the model's output on the sample
    checks: dict[str, TapCheck] = field(default_factory=dict)


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


def shape_of(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's shape; for a nested tensor (one (N_i, C) sequence per sample, as
    `nn.TransformerEncoder` passes between its layers in eval), the padded one (B, max N_i, C)."""
    if tensor.is_nested:
        sizes = tensor._nested_tensor_size()  # (B, dims per sample)
        return (tensor.size(0), *(int(d) for d in sizes.amax(dim=0))) if len(sizes) else ()
    return tuple(tensor.shape)


def _tensors(sample: Any) -> list[torch.Tensor]:
    if isinstance(sample, torch.Tensor):
        return [sample]
    if isinstance(sample, dict):
        sample = list(sample.values())
    if isinstance(sample, (tuple, list)):
        return [t for item in sample for t in _tensors(item)]
    return []


def call_model(model: nn.Module, sample: Any) -> Any:
    """Run `model` on `sample`: a tensor, a tuple/list of positional arguments, or a dict of
    keyword arguments."""
    if isinstance(sample, dict):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


def batch_size(sample: Any) -> int:
    """The batch size of a sample: the first dimension of its first tensor."""
    tensor = first_tensor(list(sample.values()) if isinstance(sample, dict) else sample)
    if tensor is None or tensor.dim() == 0:
        raise TypeError(f"cannot tell the batch size of a sample of type {type(sample).__name__}")
    return int(tensor.shape[0])


def eval_mode(model: nn.Module):
    """Eval mode for a dry run, restoring each module's own mode afterwards."""
    return training_mode(model, False)


# Channel counts of the layers that have one: (channels read, channels written, where the
# channels are in the output: 1, -1, or None when the module may permute).
def _channels(module: nn.Module) -> tuple[int, int, int | None] | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels, 1
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, -1
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        n = module.num_features if hasattr(module, "num_features") else module.num_channels
        return n, n, 1
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        shape = module.normalized_shape
        n = shape[-1] if isinstance(shape, Sequence) else int(shape)
        # Subclasses (timm's LayerNorm2d) normalise dim 1 by permuting: their place is unknown.
        return n, n, -1 if type(module) in (nn.LayerNorm, nn.RMSNorm) else None
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim, -1
    return None


@dataclass
class _Evidence:
    """Channel counts seen around one module's output."""

    # (C, where the layer puts/reads its channels: 1, -1 or None, the shape it wrote/read)
    produced: tuple[int, int | None, tuple[int, ...]] | None = None  # last layer that wrote
    consumed: tuple[int, int | None, tuple[int, ...]] | None = None  # first layer that read


def infer_layout(shape: tuple[int, ...], evidence: _Evidence | None) -> str | None:
    """ "channels_first" or "channels_last" for a 3-D or 4-D output of `shape`, from the channel
    counts around it; None if they do not tell (or `shape` has another rank)."""
    if evidence is None or len(shape) not in (3, 4):
        return None
    counts = [e[0] for e in (evidence.produced, evidence.consumed) if e is not None]
    first = any(shape[1] == c for c in counts)
    last = any(shape[-1] == c for c in counts)
    if first != last:
        return "channels_first" if first else "channels_last"
    # Both ends fit (C == H, say) or neither does: a layer that reads (or else writes) exactly
    # this shape, with its channels at a known place, decides.
    for seen in (evidence.consumed, evidence.produced):
        if seen is not None and seen[2] == shape and seen[1] is not None:
            c, dim, _ = seen
            if shape[dim] == c:
                return "channels_first" if dim == 1 else "channels_last"
    return None


def _channels_first_model(
    rows: Mapping[str, list[Any]], modules: Mapping[str, nn.Module]
) -> set[int]:
    """The channel counts of a model whose maps are all channels first, or an empty set.

    All channels first: some layer with a channel count outputs a 4-D map, and every such
    layer keeps its channels in dim 1 (convolutions, BatchNorm, GroupNorm; not a Linear or
    LayerNorm on (B, H, W, C), nor timm's permuting LayerNorm2d). The counts are those these
    layers read and write (a concat's is read whole by the next block), and those read by
    layers that output a vector (the classifier after the last map is pooled).
    """
    counts: set[int] = set()
    maps = False
    for name, (_type, shape, _calls) in rows.items():
        channels = _channels(modules[name])
        if channels is None or shape is None:
            continue
        if len(shape) == 2:
            counts.add(channels[0])
        elif len(shape) == 4:
            if channels[2] != 1:
                return set()
            maps = True
            counts.update(channels[:2])
    return counts if maps else set()


def probe(
    model: nn.Module,
    sample: Any,
    selects: Mapping[str, Select | None] | None = None,
    *,
    train: bool = False,
    watch: Sequence[str] = (),
) -> Probe:
    """Dry-run `model` on `sample` and record every named module that runs.

    In eval mode (the default) the run is under no grad. With `train=True` it is in training
    mode with gradients on, as a training step would run; buffers (BatchNorm statistics) and
    the random generators are put back afterwards. Every module's mode is restored either way.

    `selects` picks, for some layers, the tensor whose shape is recorded (default: the first
    tensor of the output). For each name in `watch`, the result's `checks` say whether
    gradients were on when it ran and whether the model changed its output in place later.
    """
    names = {module: name for name, module in model.named_modules() if name}
    selects = selects or {}
    watch = set(watch)
    rows: dict[str, list[Any]] = {}  # name -> [type, shape, calls]
    evidence: dict[str, _Evidence] = {}
    seen_output: dict[str, torch.Tensor] = {}
    last_channels: list[Any] = [None]  # (C, dim, shape) of the last channel layer that finished
    awaiting: dict[int, list[tuple[str, torch.Tensor]]] = {}  # storage -> outputs with no reader
    watched: dict[str, tuple[torch.Tensor, int, bool]] = {}

    def storage(tensor: torch.Tensor) -> int | None:
        if tensor.is_nested:
            return None
        try:
            return tensor.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # no storage (nested, meta, ...)
            return None

    def start(module: nn.Module, args: Any) -> None:
        # Rows are ordered by when a module starts, so a block comes before its children.
        name = names[module]
        if name in rows:
            rows[name][2] += 1
        else:
            rows[name] = [type(module).__name__, None, 1]
        channels = _channels(module)
        if channels is not None:
            tensor = first_tensor(args)
            if tensor is not None and tensor.numel() and storage(tensor) is not None:
                for reader_of, _output in awaiting.pop(storage(tensor), []):
                    # Kept alive until read, so its memory cannot be reused by another tensor.
                    evidence[reader_of].consumed = (channels[0], channels[2], tuple(tensor.shape))

    def finish(module: nn.Module, _args: Any, output: Any) -> None:
        name = names[module]
        channels = _channels(module)
        tensor = first_tensor(output)
        if channels is not None and isinstance(tensor, torch.Tensor):
            last_channels[0] = (channels[1], channels[2], shape_of(tensor))
        select = selects.get(name)
        if select is not None:
            tensor = select(output)
        if not isinstance(tensor, torch.Tensor) or rows[name][1] is not None:
            return
        rows[name][1] = shape_of(tensor)
        evidence[name] = _Evidence(produced=last_channels[0])
        if tensor.dim() in (3, 4) and tensor.numel() and storage(tensor) is not None:
            awaiting.setdefault(storage(tensor), []).append((name, tensor))
        if name in watch:
            watched[name] = (tensor, tensor._version, torch.is_grad_enabled())
            seen_output[name] = tensor.detach().clone()

    with HookSet() as hooks:
        for module in names:
            hooks.forward(module, start, pre=True)
            hooks.forward(module, finish)
        if train:
            with dry_run_state(model), training_mode(model, True), torch.enable_grad():
                output = call_model(model, sample)
        else:
            with training_mode(model, False), torch.no_grad():
                output = call_model(model, sample)
    awaiting.clear()

    modules = {name: module for module, name in names.items()}
    model_channels = _channels_first_model(rows, modules)

    def layout(name: str, shape: tuple[int, ...]) -> str | None:
        found = infer_layout(shape, evidence.get(name))
        parts = name.split(".")
        # Inside a layer with a channel count (timm's BatchNormAct2d runs its `act` and `drop`
        # children on its own output): that layer's place for them, if the shape is its own.
        while found is None and len(parts) > 1:
            parts.pop()
            parent = ".".join(parts)
            channels = _channels(modules[parent])
            if (
                channels
                and channels[2]
                and rows.get(parent, [None, None])[1] == shape
                and shape[channels[2]] == channels[1]
            ):
                found = "channels_first" if channels[2] == 1 else "channels_last"
        # Still silent (a concat, an identity, an upsample between blocks): the whole model
        # tells, when every convolution and norm in it reads its maps channels first.
        if found is None and len(shape) == 4 and shape[1] in model_channels:
            found = "channels_first"
        return found

    table = LayerTable(
        LayerInfo(name, type_name, shape, calls, layout=layout(name, shape) if shape else None)
        for name, (type_name, shape, calls) in rows.items()
    )
    checks = {
        name: TapCheck(
            features=seen_output[name],
            grad=grad,
            modified=tensor._version != version,
        )
        for name, (tensor, version, grad) in watched.items()
    }
    return Probe(table, output, checks)


def list_layers(model: nn.Module, sample: Any) -> LayerTable:
    """Every named module that runs when `model` sees `sample`, in execution order, with its
    output shape and where the channels are in it.

    These are the names `auxhead.attach` accepts. The dry run is in eval mode with no grad,
    then (to find layers that run only in training, like GoogLeNet's `aux1`) in training mode;
    every module's mode, the BatchNorm statistics and the random generators are put back.

    Args:
        model: any `nn.Module`.
        sample: an input batch: a tensor, a tuple of positional arguments or a dict of keyword
            arguments.

    Returns:
        A list of `LayerInfo(name, type, shape, calls, layout, train_only)`; `print()` shows it
        as a table. A layer that runs more than once per forward (a shared module) is listed
        but cannot carry a head.

    Raises:
        ValueError: the model fails on `sample`.

    Example:
        >>> print(auxhead.list_layers(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64)))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"list_layers needs an nn.Module, got {type(model).__name__}")
    try:
        table = probe(model, sample).table
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        shapes = [tuple(t.shape) for t in _tensors(sample)]
        raise ValueError(
            f"{type(model).__name__} failed on the sample {shapes or type(sample).__name__}: "
            f"{error}. list_layers runs the model once: pass an input batch it accepts."
        ) from error
    try:
        trained = probe(model, sample, train=True).table
    except Exception:  # e.g. BatchNorm on a batch of one: the eval rows are still right
        return table
    known = set(table.names)
    table.extend(
        LayerInfo(i.name, i.type, i.shape, i.calls, i.layout, train_only=True)
        for i in trained
        if i.name not in known
    )
    return table


def resolve(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """Map qualified names to modules, failing with the closest valid names."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    resolved = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r} ({type(name).__name__})")
        parent, _, child = name.rpartition(".")
        owner = modules.get(parent) if parent else model
        if name not in modules and owner is not None and child in owner._modules:
            raise ValueError(  # registered, but set to None (`model.aux_classifier = None`)
                f"layer {name!r} of {type(model).__name__} is None: it never runs. "
                "See auxhead.list_layers(model, sample) for every valid name."
            )
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise ValueError(
                f"no layer named {name!r} in {type(model).__name__}.{hint} "
                "See auxhead.list_layers(model, sample) for every valid name."
            )
        resolved[name] = modules[name]
    return resolved
