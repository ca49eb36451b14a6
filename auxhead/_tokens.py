"""Token taps: which tokens of a (B, N, C) tap are real, and pooling them to one row per sample.

A model that pads its sequences says which tokens are real in its inputs: Hugging Face models
take an `attention_mask` keyword (1 at real tokens, 0 at padding); `nn.TransformerEncoder`
takes a `src_key_padding_mask` (True at padding), read in `attach`. Here: the mask of the
wrapped model's own inputs, read by a forward pre-hook, and the two poolings a head can ask for
(`attach(..., pool=...)`): the first token (BERT's [CLS], RoBERTa's <s>) or the mean over the
real tokens. Either way a sample's pooled features, so its head's logits, do not depend on how
much padding its batch added (right padding: the real tokens keep their positions).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["POOLS", "MaskFn", "ModelMask", "keep_from", "pool_tokens"]

# How a head on a (B, N, C) tap pools it to (B, C): the first token, or the mean of the real ones.
POOLS = ("cls", "mean")

# The user's own way to find the real tokens: (args, kwargs) of the model's call -> (B, N)
# mask, True (or 1) at real tokens.
MaskFn = Callable[[tuple, dict], torch.Tensor | None]

# The keyword Hugging Face models take their padding mask by (1: real token, 0: padding).
ATTENTION_MASK = "attention_mask"


def keep_from(mask: Any) -> torch.Tensor | None:
    """A (B, N) mask, True or nonzero at real tokens, as a bool tensor; a row with no real token
    keeps them all (its mean is then over every token, not a division by zero). Anything that
    is not a 2-D tensor: None (no mask)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.is_nested:
        return None
    keep = mask if mask.dtype == torch.bool else mask != 0  # (B, N)
    return keep | ~keep.any(dim=1, keepdim=True)


def pool_tokens(features: torch.Tensor, keep: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, N, C) -> (B, C): the first token ("cls") or the mean over the tokens `keep` (B, N)
    marks real ("mean"; every token without `keep`). A nested tensor (one (N_i, C) sequence per
    sample, the padding already dropped, as `nn.TransformerEncoder` passes them in eval) pools
    each sample's own tokens."""
    if features.is_nested:
        samples = features.unbind()  # (N_i, C) each
        if how == "cls":
            return torch.stack([sample[0] for sample in samples])
        return torch.stack([sample.mean(dim=0) for sample in samples])
    if how == "cls":
        return features[:, 0]  # (B, C)
    if keep is None:
        return features.mean(dim=1)
    kept = keep.unsqueeze(-1)  # (B, N, 1)
    count = kept.sum(dim=1).clamp(min=1).to(features.dtype)  # (B, 1)
    return features.masked_fill(~kept, 0).sum(dim=1) / count


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature of `model.forward` (bound: no `self`), or None when it has none; looked
    up once per forward function (early exits read it on every call)."""
    forward = model.forward
    function = getattr(forward, "__func__", None)
    if function is None or getattr(forward, "__self__", None) is not model:
        return _signature(forward)  # a forward set on the instance: not cached
    bound = _function_signature(function)
    if bound is None:
        return None
    return bound.replace(parameters=list(bound.parameters.values())[1:])


@functools.lru_cache(maxsize=256)
def _function_signature(function: Callable[..., Any]) -> inspect.Signature | None:
    return _signature(function)


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def _position(model: nn.Module, name: str) -> int | None:
    """Where `name` stands among the positional parameters of `model.forward`, or None."""
    signature = forward_signature(model)
    if signature is None:
        return None
    parameters = list(signature.parameters.values())
    positional = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return positional.index(name) if name in positional else None


def takes_attention_mask(model: nn.Module) -> bool:
    """Whether `model.forward` has an `attention_mask` parameter (Hugging Face models do)."""
    signature = forward_signature(model)
    return signature is not None and ATTENTION_MASK in signature.parameters


class ModelMask:
    """A forward pre-hook on the wrapped model: the real tokens of this call, as `keep` (B, N),
    from `mask(args, kwargs)` when the user gave one, else from the `attention_mask` argument
    (by keyword or at its place among the positional ones). `store(keep)` receives it, or None.
    A plain class, not a closure, so an `AuxModel` holding it can be pickled and deep-copied."""

    def __init__(
        self, model: nn.Module, mask: MaskFn | None, store: Callable[[Any], None] | None = None
    ):
        self.mask = mask
        self.store = store
        self.position = None if mask is not None else _position(model, ATTENTION_MASK)

    def find(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The real tokens (B, N) of the call `model(*args, **kwargs)`, or None."""
        if self.mask is not None:
            found = self.mask(args, kwargs)
        elif ATTENTION_MASK in kwargs:
            found = kwargs[ATTENTION_MASK]
        elif self.position is not None and len(args) > self.position:
            found = args[self.position]
        else:
            found = None
        return keep_from(found)

    def __call__(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.store is not None:
            self.store(self.find(args, kwargs))
