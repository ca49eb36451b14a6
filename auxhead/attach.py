"""`attach`: hang auxiliary heads off named layers of any model, with forward hooks.

The wrapped model's `forward` is never rewritten. A forward hook at each tap passes the tap's
output to its head and keeps the logits in `aux_outputs`; the hook returns nothing, so the
model's own output is exactly what it would have been without heads.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from auxhead._hooks import HookSet, dry_run_state, training_mode
from auxhead._probe import LAYOUTS, Probe, Select, batch_size, first_tensor, probe, resolve
from auxhead._rng import RngStream, generator_state, stream_seed
from auxhead._tokens import POOLS, MaskFn, ModelMask, pool_tokens, takes_attention_mask
from auxhead.heads import (
    DENSE_HEADS,
    DENSE_KINDS,
    MASKABLE_HEADS,
    HeadFactory,
    build_head,
    check_num_classes,
    dense_size,
)

__all__ = ["AttachError", "AuxModel", "attach"]


class AttachError(ValueError):
    """`attach` refuses a layer, a head or an argument: the message names it and the way out.

    A `ValueError`, so code that catches those keeps working; anything else `attach` raises
    (the model's own error on the sample, say) is not an `AttachError`.
    """


HeadSpec = nn.Module | str | HeadFactory


def _key(name: str) -> str:
    # nn.ModuleDict keys cannot contain '.', qualified names do.
    return name.replace(".", "__")


class AuxModel(nn.Module):
    """A model with auxiliary heads at named layers. Build it with `auxhead.attach`.

    `AuxModel(x)` returns exactly what the wrapped model returns, in train and eval mode, bit
    for bit at the same seed: each head draws its random numbers (dropout) from a stream of its
    own, and a tap whose output the model later changes in place is copied for its head. The
    heads run in training mode (or inside `heads_enabled()`) and leave their logits in
    `aux_outputs`, a dict keyed by tap name in `at` order. Inside a batch-first
    `nn.TransformerEncoder` run with a padding mask, the built-in heads pool over each sample's
    real tokens, in train and eval alike; in eval, where torch's fast path passes nested
    tensors between the layers, every head does (the samples of each length run together).
    Likewise on any model called with an `attention_mask` (Hugging Face's), or given `mask=`
    at attach; with `pool=` ("cls" or "mean") a head gets one vector per sample, whatever it is.

    Attributes:
        model: the wrapped model, unchanged but for forward hooks on the tapped layers.
        heads: the heads, an `nn.ModuleDict` (keys are tap names with '.' written '__').
        taps: the tap names, in `at` order.
        aux_outputs: the heads' logits from the last forward, or {} if the heads did not run.
        head_shapes: each head's output shape in the dry run on `attach`'s sample, by tap name
            ({} when attached without a sample): `AuxLoss(weights="nnunet")` ranks dense heads
            by their resolution from these.
        output_shape: the shape of the model's output (its first tensor) on that sample, or
            None.
    """

    def __init__(
        self,
        model: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        select: Mapping[str, Select | None] | None = None,
        permute: Mapping[str, tuple[int, ...] | None] | None = None,
        copy: Collection[str] | None = None,
        random: Collection[str] | None = None,
        pool: Mapping[str, str | None] | None = None,
        mask: MaskFn | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict({_key(name): head for name, head in heads.items()})
        self.taps: list[str] = list(heads)
        self._select = dict(select or {})
        # Per tap: the permutation that puts its output in the head's layout (channels-last
        # maps to (B, C, H, W), channels-first sequences to (B, N, C)), or None.
        self._permute = {name: dims for name, dims in (permute or {}).items() if dims}
        # Taps whose output the model changes in place after the tap (or whose head changes its
        # input): the head, which runs when the forward returns, and autograd need the tap's
        # output as it was, so the head gets a copy. None: all of them.
        self._copy = set(self.taps if copy is None else copy)
        # Heads that draw random numbers (dropout) draw them from a stream of their own; the
        # others leave the generators alone, and pay nothing. None: all of them may.
        random = self.taps if random is None else random
        self._streams = {name: RngStream(stream_seed(name)) for name in random}
        self.aux_outputs: dict[str, torch.Tensor] = {}
        self.head_shapes: dict[str, tuple[int, ...]] = {}  # filled by attach's dry run
        self.output_shape: tuple[int, ...] | None = None
        self._pending: dict[str, torch.Tensor] | None = None  # filled by the hooks in forward
        self._keep: dict[str, torch.Tensor] = {}  # tap -> its real tokens (B, N), in forward
        self._heads_on: bool | None = None  # None: heads follow self.training
        self._hooks = HookSet()
        self._hooked = False  # a plain bool torch.compile can read (the handles it cannot)
        # The padding mask each batch-first nn.TransformerEncoder(Layer) around a tap got in
        # this forward, as "keep" (True at real tokens): filled by pre-hooks, by owner name.
        self._padding: dict[str, torch.Tensor | None] = {}
        # Per tap: how its (B, N, C) output is pooled to (B, C) before its head ("cls", "mean").
        self._pool = {name: how for name, how in (pool or {}).items() if how}
        # The user's (args, kwargs) -> real tokens (B, N); None: the model's `attention_mask`.
        self._mask_fn = mask
        self._register_hooks()
        # The mode the model is in (a model in eval stays so; its heads follow it).
        self.training = model.training
        self.heads.train(model.training)

    def _register_hooks(self) -> None:
        """Put a `_RunHead` hook on every tap, and a `_KeepPadding` pre-hook on the transformer
        around a tap whose head pools over real tokens; on failure, none stays."""
        modules = resolve(self.model, self.taps)
        self._tapped = modules  # to tell a tap that did not run from one that was replaced
        maskable = [
            name
            for name in self.taps
            if isinstance(self.head(name), MASKABLE_HEADS) or name in self._pool
        ]
        self._masked = set(maskable)  # taps whose pooling reads which tokens are real
        self._mask_owner = _padding_owners(self.model, maskable)
        try:
            for name, module in modules.items():
                self._hooks.forward(module, _RunHead(self, name))
            for owner in sorted(set(self._mask_owner.values())):
                module = self.model.get_submodule(owner)
                self._hooks.forward(module, _KeepPadding(self, owner), pre=True, with_kwargs=True)
            if maskable and (self._mask_fn is not None or takes_attention_mask(self.model)):
                # The model's own inputs say which tokens are real (Hugging Face's
                # `attention_mask`): kept under the owner name "", the whole model.
                hook = ModelMask(self.model, self._mask_fn, functools.partial(_keep_model, self))
                self._hooks.forward(self.model, hook, pre=True, with_kwargs=True)
        except BaseException:
            self._remove_hooks()
            raise
        self._hooked = True

    def head_input(self, name: str, output: Any) -> torch.Tensor:
        """What the head at `name` classifies, given that layer's output: the tensor its
        `select` picks, or the first tensor (`tap_tensor`), laid out as the head reads it
        (`arrange`)."""
        return self.arrange(name, self.tap_tensor(name, output))

    def tap_tensor(self, name: str, output: Any) -> torch.Tensor:
        """The tensor of the layer `name`'s output that its head classifies: the one its
        `select` picks, or the first."""
        select = self._select.get(name)
        features = select(output) if select is not None else first_tensor(output)
        if not isinstance(features, torch.Tensor):
            raise TypeError(
                f"layer {name!r} outputs no tensor for its head; pass `select=` to attach"
            )
        return features

    def arrange(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """`tap_tensor`'s tensor laid out as the head at `name` reads it (channels-last taps
        permuted to channels first)."""
        dims = self._permute.get(name)
        if dims is None or features.is_nested:  # nested: permuted sample by sample (_run_head)
            return features
        return features.permute(*dims)

    def _keep_input(self, name: str, output: Any) -> None:
        """The hook's work: keep what the head at `name` will classify. The head itself runs
        after the model's forward (`_run_head`): inside an activation-checkpointed block it
        would save tensors the recomputation in backward does not."""
        if self._active:
            features = self.head_input(name, output)
            # The dry run finds in-place changes in training mode; in eval a model may change
            # a tap in place where training does not (torchvision's MBConv: `result += input`
            # once stochastic depth is off), so in eval every head gets a copy.
            if name in self._copy or not self.training:
                features = features.clone()
            self._pending[name] = features
            keep = self._keep_for(name, features, self._padding.get(self._mask_owner.get(name, "")))
            if keep is not None:
                self._keep[name] = keep

    def run_head(
        self, name: str, features: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The head at `name` on `features` as `head_input` gives them, as the forward runs
        it: with its own random stream, and on a nested tensor (a masked
        `nn.TransformerEncoder` in eval) sample by sample, over the real tokens only. On a
        sequence (b, N, C), `keep` (b, N) (`real_tokens`, True at real tokens) is what its
        pooling reads; None: every token."""
        if name not in self.taps:
            raise KeyError(f"no head at {name!r}; taps are {self.taps}")
        return self._run_head(name, features, self._keep_for(name, features, keep))

    @property
    def reads_padding(self) -> bool:
        """Whether calls of the wrapped model say which tokens are real (`real_tokens`): it
        takes an `attention_mask`, or attach was given `mask=`."""
        return self._mask_fn is not None or takes_attention_mask(self.model)

    def real_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The real tokens (B, N) of a call `model(*args, **kwargs)`, as the heads' pooling
        reads them from the model's inputs: from `attach(mask=...)`, else from the
        `attention_mask` the model takes; None when it takes none."""
        if not self.reads_padding:
            return None
        return ModelMask(self.model, self._mask_fn).find(args, kwargs)

    @contextmanager
    def padding_recorded(self) -> Iterator[Callable[[str], torch.Tensor | None]]:
        """Inside the block, calls of the wrapped model record which tokens are real, as its
        forward does for the heads (the model's `attention_mask`, the padding mask of a
        `nn.TransformerEncoder` around a tap) without running the heads; yields
        `tap -> keep (B, N)` of the latest call, or None."""
        if self._pending is not None:
            raise RuntimeError("padding_recorded inside a forward of this AuxModel")
        self._pending, self._padding = {}, {}
        previous, self._heads_on = self._heads_on, False
        try:
            yield lambda name: self._padding.get(self._mask_owner.get(name, ""))
        finally:
            self._pending, self._keep, self._padding = None, {}, {}
            self._heads_on = previous

    def _keep_for(
        self, name: str, features: torch.Tensor, keep: torch.Tensor | None
    ) -> torch.Tensor | None:
        """`keep` if the head at `name` pools over real tokens and it fits `features`."""
        if (
            name in self._masked
            and keep is not None
            and not features.is_nested
            and features.dim() == 3
            and features.shape[:2] == keep.shape
        ):
            return keep
        return None

    def head_logits(
        self, name: str, features: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The head at `name` on dense `features` (as `head_input` gives them), pooled over
        `keep` as the forward pools them, without its random stream: what an exported
        program of the heads runs (in eval, where heads draw no random numbers)."""
        head = self.heads[_key(name)]
        keep = self._keep_for(name, features, keep)
        if name in self._pool:
            return head(pool_tokens(features, keep, self._pool[name]))
        return head(features) if keep is None else head(features, keep=keep)

    def _run_head(
        self, name: str, features: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        head = self.heads[_key(name)]
        stream = self._streams.get(name)
        if name in self._pool:
            features, keep = pool_tokens(features, keep, self._pool[name]), None  # (B, C)
        if features.is_nested:
            return _per_length(head, features, self._permute.get(name))
        run = head if keep is None else functools.partial(head, keep=keep)
        if stream is None:
            return run(features)
        with stream.on(features.device):
            return run(features)

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
        self._pending, self._keep = {}, {}
        try:
            output = self.model(*args, **kwargs)
            pending, keep = self._pending, self._keep
        finally:
            self._pending, self._keep, self._padding = None, {}, {}
        if len(pending) < len(self.taps) and self.heads_active:
            self._check_replaced(pending)
        # `at` order, whatever order the taps ran in.
        self.aux_outputs = {
            name: self._run_head(name, pending[name], keep.get(name))
            for name in self.taps
            if name in pending
        }
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
        self._hooks.remove()
        self._hooked = False

    @contextmanager
    def hooks_removed(self) -> Iterator[nn.Module]:
        """The bare model inside the block: no hooks on it (to export or pickle it), put back
        afterwards. Yields `self.model`.

        Example:
            >>> with aux_model.hooks_removed() as bare:
            ...     torch.save(bare, "model.pt")  # loads without auxhead
        """
        hooked = self._hooked
        self._remove_hooks()
        try:
            yield self.model
        finally:
            if hooked:
                self.reattach()

    def get_extra_state(self) -> torch.Tensor:
        # The heads' random streams, so that a resumed run draws the masks it would have drawn.
        # Serialised into one uint8 tensor: code that treats every state_dict entry as a tensor
        # (cloning, averaging, moving it) keeps working.
        buffer = io.BytesIO()
        torch.save({name: stream.state_dict() for name, stream in self._streams.items()}, buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        data = bytes(state.detach().cpu().tolist())
        streams = torch.load(io.BytesIO(data), weights_only=True)
        for name, stream_state in streams.items():
            if name in self._streams:
                self._streams[name].load_state_dict(stream_state)

    def strip(self) -> nn.Module:
        """Remove every hook and return the original model, as it was before `attach`.

        The `AuxModel` cannot run afterwards (until `reattach()`); its heads are still
        reachable as `.heads`.
        """
        self._remove_hooks()
        self.aux_outputs = {}
        return self.model

    def reattach(self) -> AuxModel:
        """Put the hooks back after `strip()`: the same heads, at the same taps, run again.
        Does nothing if the hooks are on. Returns self."""
        if not self._hooked:
            self._register_hooks()
        return self

    @property
    def hooked(self) -> bool:
        """Whether the heads' hooks are on the model (False after `strip()`)."""
        return self._hooked

    def extra_repr(self) -> str:
        return f"taps={self.taps}"

    def __getstate__(self) -> dict[str, Any]:
        # Head outputs hold an autograd graph, which cannot be copied or pickled. The hooks
        # are `_RunHead` objects, so deepcopy and pickle carry them (and their handles) over.
        state = self.__dict__.copy()
        state["aux_outputs"] = {}
        state["_pending"], state["_keep"], state["_padding"] = None, {}, {}
        return state


def _keep_model(aux_model: AuxModel, keep: torch.Tensor | None) -> None:
    """Where `ModelMask` leaves the real tokens of the wrapped model's call (in a forward)."""
    if aux_model._pending is not None:
        aux_model._padding[""] = keep


class _KeepPadding:
    """A forward pre-hook on a batch-first `nn.TransformerEncoder(Layer)` around a tap: keeps
    its padding mask, inverted, so the heads inside pool over the real tokens alone. (Its own
    layers get the mask canonicalised to floats, 0 at real tokens; in eval on torch's fast
    path they get none, and nested tensors, which `_per_length` unpads.)"""

    def __init__(self, aux_model: AuxModel, owner: str) -> None:
        self.aux_model = aux_model
        self.owner = owner

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        aux_model = self.aux_model
        if aux_model._pending is None:
            return
        mask = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
        keep = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            keep = ~mask if mask.dtype == torch.bool else mask == 0  # (B, N), True: real
            keep = keep | ~keep.any(dim=1, keepdim=True)  # all padding: pool over all
        aux_model._padding[self.owner] = keep


def _padding_owners(model: nn.Module, taps: Sequence[str]) -> dict[str, str]:
    """For each tap inside (or at) a batch-first `nn.TransformerEncoder` or
    `nn.TransformerEncoderLayer`, the name of the innermost one: its padding mask says which
    of the tap's tokens are real."""
    owners = {}
    for tap in taps:
        parts = tap.split(".")
        for end in range(len(parts), 0, -1):
            name = ".".join(parts[:end])
            module = model.get_submodule(name)
            if isinstance(module, nn.TransformerEncoder):
                layer = module.layers[0] if len(module.layers) else None
            elif isinstance(module, nn.TransformerEncoderLayer):
                layer = module
            else:
                continue
            if layer is not None and layer.self_attn.batch_first:
                owners[tap] = name
            break
    return owners


def _per_length(
    head: nn.Module, features: torch.Tensor, dims: tuple[int, ...] | None
) -> torch.Tensor:
    """`head` on a nested tensor, one row per sample. `nn.TransformerEncoder` with a padding
    mask hands its layers one (N_i, C) sequence per sample in eval (torch's nested-tensor fast
    path), the padding dropped. The samples of each length run as one dense batch, so every
    head pools over the real tokens alone, as on that sample without padding; the rows come
    back in sample order. Only in eval, under no grad: no dropout, no batch statistics."""
    samples = features.unbind()  # (N_i, C) each
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, sample in enumerate(samples):
        by_shape.setdefault(tuple(sample.shape), []).append(index)
    rows: list[torch.Tensor | None] = [None] * len(samples)
    for indices in by_shape.values():
        batch = torch.stack([samples[i] for i in indices])  # (k, N_i, C)
        logits = head(batch if dims is None else batch.permute(*dims))
        for row, index in zip(logits, indices, strict=True):
            rows[index] = row
    return torch.stack(rows)


class _RunHead:
    """The forward hook at one tap: a picklable callable rather than a closure, so that
    `copy.deepcopy` and `torch.save` of an AuxModel work and the copy's hooks point at the
    copy."""

    def __init__(self, aux_model: AuxModel, name: str) -> None:
        self.aux_model = aux_model
        self.name = name

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self.aux_model._keep_input(self.name, output)


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
        raise AttachError("`at` is empty: name at least one layer (see auxhead.list_layers)")
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise AttachError(f"layer(s) {repeated} appear more than once in `at`; one head per layer")
    _refuse_shared_modules(pairs)
    return pairs


def _refuse_shared_modules(pairs: Sequence[tuple[str, HeadSpec]]) -> None:
    """One `nn.Module` instance at several taps would be one head with one set of weights,
    trained on every tap's features: almost never what was meant, so it is refused."""
    taps_of: dict[int, list[str]] = {}
    for name, spec in pairs:
        if isinstance(spec, nn.Module):
            taps_of.setdefault(id(spec), []).append(name)
    for taps in taps_of.values():
        if len(taps) > 1:
            module = type(dict(pairs)[taps[0]]).__name__
            raise AttachError(
                f"one {module} instance is given as the head of the taps {taps}: they would "
                "share it and its weights. Give one module per tap (at={tap: module, ...}), a "
                "head kind name (head='inception'), or a factory that builds one per tap "
                "(head=lambda tap_shape, num_classes: ...)."
            )


def _infer_num_classes(output: Any, *, dense: bool = False) -> int | None:
    """K from a (B, K) output, or from the first tensor of a tuple (torchvision's
    GoogLeNet/Inception3 return (logits, aux, ...) in training). Not from a dict of several
    tensors: which of its entries are the logits is not for auxhead to guess.

    With `dense` (dense heads asked for), also K from a class map (B, K, H, W) or (B, K, L)
    that is the whole output, or the one tensor of a dict (torchvision's segmentation models
    without their aux_classifier return {"out": (B, K, H, W)}); not from a list of maps (a
    timm `features_only` backbone's), which are features, not logits."""
    if isinstance(output, Mapping):
        tensors = [value for value in output.values() if isinstance(value, torch.Tensor)]
        if not dense or len(output) != 1 or len(tensors) != 1:
            return None
        output = tensors[0]
    if dense and isinstance(output, torch.Tensor) and output.dim() in (3, 4):
        return int(output.shape[1])
    tensor = first_tensor(output)
    if tensor is not None and tensor.dim() == 2:
        return int(tensor.shape[1])
    return None


def _check_keys(names: Sequence[str]) -> None:
    by_key: dict[str, str] = {}
    for name in names:
        other = by_key.setdefault(_key(name), name)
        if other != name:
            raise AttachError(
                f"layers {other!r} and {name!r} would share one head: heads are stored under "
                f"the name with '.' written '__' ({_key(name)!r}). Attach at one of them, or "
                "at the block around them."
            )


def _per_tap(value: Any, names: Sequence[str], what: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise AttachError(f"`{what}` names {unknown}, which are not in `at`")
        return {name: value.get(name) for name in names}
    return dict.fromkeys(names, value)


def _is_batchnorm_batch_of_one(model: nn.Module, error: Exception) -> bool:
    """Whether `error` is BatchNorm refusing one value per channel in training mode."""
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return has_batchnorm and "Expected more than 1 value per channel when training" in str(error)


# The permutation that puts an output of this rank and layout into the heads' layout.
_PERMUTE = {(4, "channels_last"): (0, 3, 1, 2), (3, "channels_first"): (0, 2, 1)}


def _check_tap(name: str, run: Probe, batch: int, sample: Any, model: nn.Module) -> None:
    """Refuse, naming the tap and the way out, a tap whose head could not train."""
    rows = {info.name: info for info in run.table}
    if name not in rows:
        eval_only = name in {info.name for info in probe(model, sample).table}
        where = "runs in eval mode only" if eval_only else "exists but did not run on the sample"
        children = [info.name for info in run.table if info.name.startswith(name + ".")]
        if children and not eval_only:
            where += (
                f" (its children ran, e.g. {children[0]!r}: the model calls them one by one, "
                "as timm's activation checkpointing does: tap one of them)"
            )
        raise AttachError(
            f"layer {name!r} {where}, so a head there would never train. See "
            "auxhead.list_layers(model, sample) for the layers that run."
        )
    info = rows[name]
    if info.calls > 1:
        raise AttachError(
            f"layer {name!r} runs {info.calls} times per forward (a shared module); "
            "a head needs a layer that runs once. Pick a distinct layer (a model that reuses one "
            "layer for its whole depth, such as ALBERT, has none: tap the module that runs it, "
            "e.g. the encoder, or the embeddings)."
        )
    if info.shape is None:
        raise AttachError(
            f"layer {name!r} outputs no tensor to classify; pass `select=` to pick one"
        )
    if not info.shape or info.shape[0] != batch:
        per_sample = [
            other.name
            for other in run.table
            if name.startswith(other.name + ".") and other.shape and other.shape[0] == batch
        ]
        hint = f" (the innermost is {per_sample[-1]!r})" if per_sample else ""
        raise AttachError(
            f"layer {name!r} outputs shape {info.shape}, whose first dimension is not the "
            f"batch ({batch}): it folds something else into the batch (window attention, "
            f"say) or puts the sequence first (nn.LSTM without batch_first=True), so its rows "
            f"are not samples. Tap a block around it whose output is one row per sample{hint}."
        )
    if not run.checks[name].grad:
        raise AttachError(
            f"layer {name!r} runs with gradients off (under torch.no_grad() in the model, or "
            "inside a reentrant activation checkpoint: use checkpoint(..., "
            "use_reentrant=False)), so a head there would never train. Tap a layer that runs "
            "with gradients."
        )


def _dry_run_head(
    name: str, head: nn.Module, features: torch.Tensor, num_classes: int | None, *, sized: bool
) -> tuple[bool, bool]:
    """Run a head once in training mode on its tap's features (nothing it changes stays).
    Returns whether it changed its input in place and whether it drew random numbers.

    Refuses an output that does not fit: a head auxhead sized must give (B, num_classes); the
    user's own module one row per sample, and num_classes columns if it gives a matrix and
    num_classes is known (other shapes are left to the user's head_loss)."""
    version = features._version
    with dry_run_state(head), training_mode(head, True), torch.enable_grad():
        try:
            rng = generator_state(features.device)
            logits = head(features)
            random = not torch.equal(rng, generator_state(features.device))
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            raise AttachError(
                f"the head at {name!r} failed on its tap's output {tuple(features.shape)}: "
                f"{error}. Give a head that takes this shape (or a kind name, sized for it)."
            ) from error
    batch = features.shape[0]
    if sized:
        # Pooled heads give (B, K); dense ones a class map at the tap's resolution.
        shape = (batch, num_classes)
        if isinstance(head, DENSE_HEADS):
            shape = (batch, num_classes, *dense_size(features))
        fits = isinstance(logits, torch.Tensor) and tuple(logits.shape) == shape
        expected = f"{shape} logits"
    else:
        fits = isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[0] == batch
        expected = f"one row per sample ({batch}, ...)"
        if fits and logits.dim() == 2 and num_classes is not None:
            fits = logits.shape[1] == num_classes
            expected = f"({batch}, {num_classes}) logits, num_classes being {num_classes}"
    if not fits:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise AttachError(
            f"the head at {name!r} outputs {got} on its tap's output, not {expected}. "
            "Check num_classes, or give a head that fits the tap."
        )
    return features._version != version, random, tuple(logits.shape)


def attach(
    model: nn.Module,
    at: Sequence[str] | Mapping[str, HeadSpec],
    *,
    num_classes: int | None = None,
    head: HeadSpec = "inception",
    sample: Any = None,
    select: Select | Mapping[str, Select] | None = None,
    layout: str | Mapping[str, str] | None = None,
    pool: str | Mapping[str, str] | None = None,
    mask: MaskFn | None = None,
) -> AuxModel:
    """Attach auxiliary classifier heads to `model` at the named layers.

    A dry run on `sample`, in training mode as a training step would run (BatchNorm
    statistics and random generators are put back afterwards), sizes the built-in heads, so
    every head parameter exists before an optimizer is built, and checks every tap: it must run
    once per forward, with gradients, with one row per sample; where the channels are in its
    output is read from the layers around it; a tap whose output the model later changes in
    place (`ReLU(inplace=True)`, `out += identity`) is copied for its head, the others are not
    (in eval, where a model may change a tap in place that training leaves alone, every head
    gets a copy). On any error nothing is left attached.

    Each head draws its random numbers (init and dropout) from its own stream, seeded from
    `torch.initial_seed()` and the tap's name, so the model's own random numbers (its dropout
    masks, the data order) are the same with heads as without.

    Args:
        model: any `nn.Module`; its code is not touched.
        at: qualified layer names (as `model.named_modules()` and `auxhead.list_layers` give
            them), or a dict name -> head, where a head is an `nn.Module`, a kind name or a
            callable `(tap_shape, num_classes) -> nn.Module`. Kinds: "inception", "linear",
            "sdn" pool to (B, num_classes); "fcn" (torchvision's FCNHead) and "conv1x1" predict
            a class map at the tap's resolution, (B, num_classes, h, w) or, on a sequence,
            (B, num_classes, L), for segmentation and deep supervision (see `AuxLoss(resize=)`).
        num_classes: logits per head. If omitted, taken from the model's output on `sample`
            when that is a (B, K) tensor, or for dense kinds a (B, K, H, W) tensor or a dict
            holding one (torchvision's segmentation models).
        head: the head for names given as a list.
        sample: an input batch (tensor, tuple of args or dict of kwargs; at least 2 samples
            for models with BatchNorm) for the dry run. Needed by built-in heads and factories;
            without it (`nn.Module` heads only) nothing is checked and every tap is copied.
        select: for taps whose output is a tuple, list or dict, a function picking the tensor to
            classify (one for all taps, or a dict by name). Default: the first tensor.
        layout: where the channels are in a tap's 3-D or 4-D output, when the dry run cannot
            tell: "channels_first" ((B, C, H, W), (B, C, L)) or "channels_last" ((B, H, W, C),
            (B, N, C)); one for all taps or a dict by name. Built-in heads and factories get
            maps as (B, C, H, W) and sequences as (B, N, C); an `nn.Module` head gets the
            output as the layer gives it.
        pool: for taps whose output is a sequence (B, N, C): "cls" gives the head the first
            token (B, C) (BERT's [CLS]), "mean" the mean over the real tokens (B, C); one for
            all taps or a dict by name. None (the default): the head gets (B, N, C), and the
            built-in heads pool it themselves over the real tokens.
        mask: which tokens are real, for the pooling: a callable `(args, kwargs) -> (B, N)`
            given the model's call, True (or 1) at real tokens. None: the `attention_mask`
            argument of a model that takes one (Hugging Face models), and the
            `src_key_padding_mask` given to a batch-first `nn.TransformerEncoder` around the
            tap. Either way padding never changes a head's logits.

    Returns:
        An `AuxModel` wrapping `model`.

    Raises:
        AttachError: (a `ValueError`) unknown or repeated layer names; a tap that does not
            run in training, runs twice, runs without gradients or folds other things into the
            batch; a layout that cannot be told; a tap a built-in kind cannot take (a (B, C)
            vector for a dense kind); a head whose output is not (B, num_classes) (a dense
            kind: (B, num_classes, *the tap's size)); one `nn.Module` given for several taps;
            a sample of one for a model with BatchNorm (a tensor sample of one is doubled, a
            tuple or dict is not); `pool` on a tap whose output is not a sequence.
        ValueError: a `num_classes` that is not a whole number >= 1.
        Exception: whatever the model itself raises on `sample`, as it is, with a note that
            the dry run raised it.

    Example:
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> aux = auxhead.attach(model, ["layer2", "layer3"], sample=torch.randn(2, 3, 64, 64))
        >>> out = aux(x); aux.aux_outputs  # {'layer2': (B, 10) logits, 'layer3': ...}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, AuxModel):
        raise TypeError("this model already has heads; pass aux_model.model or strip() it first")
    if any(isinstance(h, _RunHead) for m in model.modules() for h in m._forward_hooks.values()):
        raise AttachError(
            "this model already has auxiliary heads from an earlier attach (a notebook cell run "
            "twice?): strip() that AuxModel first, or attach to a fresh model."
        )
    pairs = _normalise_at(at, head)
    names = [name for name, _ in pairs]
    try:
        resolve(model, names)  # unknown names fail before any dry run
    except ValueError as error:
        raise AttachError(str(error)) from None
    _check_keys(names)
    if num_classes is not None:
        num_classes = check_num_classes(num_classes)
    selects = _per_tap(select, names, "select")
    layouts = _per_tap(layout, names, "layout")
    bad = {name: value for name, value in layouts.items() if value not in (None, *LAYOUTS)}
    if bad:
        got = bad if isinstance(layout, Mapping) else repr(layout)
        raise AttachError(f"layout must be one of {list(LAYOUTS)}; got {got}")
    pools = _per_tap(pool, names, "pool")
    bad = {name: value for name, value in pools.items() if value not in (None, *POOLS)}
    if bad:
        got = bad if isinstance(pool, Mapping) else repr(pool)
        raise AttachError(f"pool must be one of {list(POOLS)} (or None); got {got}")
    if mask is not None and not callable(mask):
        raise TypeError(
            f"mask must be a callable (args, kwargs) -> (B, N) real tokens, got {mask!r}"
        )

    needs_sizing = [name for name, spec in pairs if not isinstance(spec, nn.Module)]
    if sample is None:
        if needs_sizing:
            raise AttachError(
                f"heads at {needs_sizing} are sized from the tap's output: pass `sample=` (an "
                "input batch) so auxhead can do a dry run, or give an nn.Module for each layer."
            )
        if any(pools.values()):
            raise AttachError("`pool=` needs `sample=`, to check that each tap is a sequence")
        return AuxModel(model, dict(pairs), select=selects, mask=mask)

    if isinstance(sample, torch.Tensor) and sample.dim() > 0 and sample.shape[0] == 1:
        # A training step sees batches: BatchNorm refuses a batch of one in training mode.
        sample = torch.cat([sample, sample])
    batch = batch_size(sample)
    try:
        run = probe(model, sample, selects, train=True, watch=names)
    except Exception as error:
        if _is_batchnorm_batch_of_one(model, error):
            raise AttachError(
                f"the dry run of {type(model).__name__} in training mode failed on the sample: "
                f"{error}. BatchNorm needs at least 2 samples per batch in training: pass a "
                "sample of 2 or more."
            ) from error
        # Whatever else failed is the model's own error on the sample: raised as it is.
        error.add_note(
            f"(raised while auxhead.attach ran {type(model).__name__} on the sample in training "
            "mode, to size and check the heads)"
        )
        raise
    rows = {info.name: info for info in run.table}
    for name in names:
        _check_tap(name, run, batch, sample, model)
    if num_classes is None:
        dense = any(isinstance(spec, str) and spec in DENSE_KINDS for _, spec in pairs)
        num_classes = _infer_num_classes(run.output, dense=dense)
        if num_classes is None and needs_sizing:
            raise AttachError(
                "pass `num_classes=`: the built-in heads need it, and the model's output on "
                "the sample is not a (batch, classes) tensor to read it from."
            )

    reference = next(iter(model.parameters()), None)
    heads: dict[str, nn.Module] = {}
    permute: dict[str, tuple[int, ...] | None] = {}
    copy, random = set(), set()
    head_shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in pairs:
        shape = rows[name].shape
        if pools[name] and isinstance(spec, str) and spec in DENSE_KINDS:
            raise AttachError(
                f"layer {name!r}: head {spec!r} predicts a class per token, so it needs the "
                f"sequence itself, not pool={pools[name]!r}; drop pool for this tap, or use a "
                "pooled head kind (inception, linear, sdn)"
            )
        if pools[name]:
            # A sequence pooled before its head: the head sees (B, C), whatever it is.
            dims = _sequence_dims(name, shape, layouts[name] or rows[name].layout)
            shape = (shape[0], shape[1] if dims else shape[2])
        if isinstance(spec, nn.Module):
            built = spec
            if not pools[name]:
                dims = _PERMUTE.get((len(shape), layouts[name])) if layouts[name] else None
        else:
            found = layouts[name] or rows[name].layout
            if len(shape) in (3, 4) and found is None:
                raise AttachError(
                    f"layer {name!r} outputs {shape}, and the layers around it do not tell "
                    "where its channels are: pass layout='channels_first' ((B, C, H, W) or "
                    "(B, C, L)) or 'channels_last' ((B, H, W, C) or (B, N, C)) for it, or tap "
                    "another layer."
                )
            if not pools[name]:
                dims = _PERMUTE.get((len(shape), found))
                if dims is not None:
                    shape = tuple(shape[d] for d in dims)
            try:
                with RngStream(stream_seed(f"init:{name}")).on(torch.device("cpu")):
                    built = build_head(spec, shape, num_classes)
            except ValueError as error:  # a shape the head kind cannot take
                raise AttachError(f"layer {name!r}: {error}") from None
            if reference is not None:
                built = built.to(device=reference.device, dtype=reference.dtype)
        heads[name] = built
        permute[name] = dims
        features = run.checks[name].features
        if dims is not None:
            features = features.permute(*dims)
        if pools[name]:
            features = pool_tokens(features, None, pools[name])  # (B, C)
        sized = not isinstance(spec, nn.Module)
        changes_input, draws, head_shapes[name] = _dry_run_head(
            name, built, features, num_classes, sized=sized
        )
        if changes_input or run.checks[name].modified:
            copy.add(name)
        if draws:
            random.add(name)
    aux_model = AuxModel(
        model,
        heads,
        select=selects,
        permute=permute,
        copy=copy,
        random=random,
        pool=pools,
        mask=mask,
    )
    aux_model.head_shapes = head_shapes
    output = first_tensor(run.output)
    aux_model.output_shape = tuple(output.shape) if output is not None else None
    return aux_model


def _sequence_dims(name: str, shape: tuple[int, ...], layout: str | None) -> tuple | None:
    """The permutation that puts a sequence tap's output in (B, N, C) (None: it is), or an
    AttachError naming the tap when its output is no sequence for `pool=`."""
    if len(shape) != 3:
        raise AttachError(
            f"pool= needs a sequence (B, N, C) at {name!r}, which outputs shape {shape}. "
            "Leave pool unset for this tap (pool={tap: 'cls', ...} names the taps it is for)."
        )
    if layout is None:
        raise AttachError(
            f"layer {name!r} outputs {shape}, and the layers around it do not tell where its "
            "channels are: pass layout='channels_last' ((B, N, C)) or 'channels_first' "
            "((B, C, L)) for it."
        )
    return _PERMUTE.get((3, layout))
