"""Dense outputs (segmentation, deep supervision): matching a head's class map to the targets'
size, and nnU-Net's loss weights by scale.

A dense head predicts at its tap's resolution, (B, K, h, w) or (B, K, L); the targets are at
the input's, (B, H, W) class indices (or (B, K, H, W) per-class maps). Two ways to compare
them, both in `AuxLoss(resize=...)`:

- "logits": upsample the head's logits to the targets' size, bilinear (linear for sequences)
  with `align_corners=False`, as torchvision's segmentation models do with their `aux` output
  and mmsegmentation with its auxiliary heads;
- "targets": downsample the targets to the head's size, nearest neighbour ("nearest-exact",
  the pixel centres, as nnU-Net v2 does), so a label is never blended: the ignore label stays
  the ignore label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["RESIZE_MODES", "deep_supervision_weights", "match_size"]

RESIZE_MODES = (None, "logits", "targets")

_LINEAR = {3: "linear", 4: "bilinear", 5: "trilinear"}


def check_resize(resize: object) -> str | None:
    """`resize` if it is one of `RESIZE_MODES`, else a ValueError naming it."""
    if resize not in RESIZE_MODES:
        raise ValueError(
            f"resize must be one of {list(RESIZE_MODES)}: None (the head's loss sees the logits "
            "as they are), 'logits' (upsample each dense head's logits to the targets' size) or "
            f"'targets' (downsample the targets to each head's size); got {resize!r}"
        )
    return resize


def target_size(target: Any, logits: torch.Tensor) -> tuple[int, ...] | None:
    """The spatial size of `target` if it is a dense target for `logits` (B, K, *size): class
    indices (B, *size) or per-class maps (B, K', *size); None for anything else (a (B,)
    label, a non-tensor)."""
    if not isinstance(target, torch.Tensor) or target.dim() < 2:
        return None
    if target.shape[0] != logits.shape[0]:
        return None
    if target.dim() == logits.dim() - 1:  # class indices (B, H, W)
        return tuple(target.shape[1:])
    if target.dim() == logits.dim():  # per-class maps (B, K, H, W), e.g. for BCE
        return tuple(target.shape[2:])
    return None


def _nearest(target: torch.Tensor, size: tuple[int, ...], indices: bool) -> torch.Tensor:
    """`target` resized to `size` by nearest neighbour, its dtype kept (interpolate takes
    floats only; class indices and the ignore label are exact in float32 below 2**24)."""
    x = target[:, None] if indices else target  # (B, 1, *S) or (B, K, *S)
    x = F.interpolate(x.float(), size=size, mode="nearest-exact")
    return (x[:, 0] if indices else x).to(target.dtype)


def match_size(
    logits: torch.Tensor,
    targets: Sequence[Any],
    resize: str | None,
    *,
    cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[Any, ...]]:
    """A head's logits and the targets, brought to one size as `resize` says.

    Pooled logits (B, K), `resize=None` and sizes that already agree come back as they are.

    Args:
        logits: one head's output, (B, K) or dense (B, K, h, w) / (B, K, L).
        targets: the targets as the loss gets them; the dense ones ((B, H, W) class indices,
            (B, K, H, W) maps) are resized, the others left alone.
        resize: None, "logits" (bilinear upsampling of the logits to the first dense target's
            size, align_corners=False) or "targets" (nearest-neighbour resizing of every dense
            target to the logits' size; labels, the ignore label included, are kept exact).
        cache: optional dict reused across the heads of one step, so a target is resized to a
            given size once.

    Returns:
        `(logits, targets)` for the head's loss.

    Raises:
        ValueError: an unknown `resize`, or "logits" with no dense target to take a size from.

    Example:
        >>> logits, (y,) = auxhead.match_size(aux_model.aux_outputs["layer3"], (y,), "logits")
    """
    resize = check_resize(resize)
    if resize is None or logits.dim() < 3:
        return logits, tuple(targets)
    size = tuple(logits.shape[2:])
    sizes = [target_size(target, logits) for target in targets]
    if resize == "logits":
        wanted = next((s for s in sizes if s is not None), None)
        if wanted is None:
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t) for t in targets]
            raise ValueError(
                f"resize='logits' upsamples dense logits {tuple(logits.shape)} to the targets' "
                f"size, but no target is a map (B, H, W) or (B, K, H, W): got {shapes}"
            )
        if wanted != size:
            mode = _LINEAR.get(logits.dim(), "nearest")
            logits = F.interpolate(logits, size=wanted, mode=mode, align_corners=False)
        return logits, tuple(targets)
    resized = []
    for target, found in zip(targets, sizes, strict=True):
        if found is None or found == size:
            resized.append(target)
            continue
        key = (id(target), size)
        if cache is not None and key in cache:
            resized.append(cache[key])
            continue
        small = _nearest(target, size, indices=target.dim() == logits.dim() - 1)
        if cache is not None:
            cache[key] = small
        resized.append(small)
    return logits, tuple(resized)


def _spatial(name: str, shape: Sequence[int]) -> int:
    if len(shape) < 3:
        raise ValueError(
            f"deep-supervision weights rank dense outputs by resolution, but {name!r} has shape "
            f"{tuple(shape)}, not (B, K, h, w) or (B, K, L): give the logits' shapes of dense "
            "heads (and of the main output)."
        )
    places = 1
    for d in shape[2:]:
        places *= int(d)
    return places


def deep_supervision_weights(shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """nnU-Net's deep-supervision weights for outputs at several resolutions.

    The outputs are ranked by resolution (the number of places they predict at), the largest
    first: the i-th distinct resolution gets 1 / 2**i; the lowest resolution gets 0 (nnU-Net
    lets its coarsest output train no weights of its own); the weights are normalised to sum
    to 1. Outputs of equal resolution share a weight. With one resolution only, all are equal.

    A head weighted 0 still runs and joins the graph in `AuxLoss` (with a zero gradient), so
    `DistributedDataParallel` needs no `find_unused_parameters` (nnU-Net uses a tiny weight
    instead for that reason).

    Args:
        shapes: output name -> logits shape (B, K, h, w) or (B, K, L); include the main output
            (under any name no tap has) to weigh it with the heads, as nnU-Net does.

    Returns:
        name -> weight, in `shapes` order.

    Raises:
        ValueError: an empty mapping or a shape without places (a pooled (B, K) output).

    Example:
        >>> w = auxhead.deep_supervision_weights(
        ...     {"main": (2, 5, 64, 64), "up3": (2, 5, 32, 32), "up2": (2, 5, 16, 16),
        ...      "up1": (2, 5, 8, 8)})
        >>> # {'main': 0.571, 'up3': 0.286, 'up2': 0.143, 'up1': 0.0}
        >>> loss_func = AuxLoss(ce, aux_model, main_weight=w.pop("main"), weights=w,
        ...                     resize="targets")
    """
    if not shapes:
        raise ValueError("deep_supervision_weights needs at least one output's shape")
    places = {name: _spatial(name, shape) for name, shape in shapes.items()}
    ranks = {size: i for i, size in enumerate(sorted(set(places.values()), reverse=True))}
    lowest = len(ranks) - 1
    raw = {
        name: 0.0 if lowest > 0 and ranks[size] == lowest else 0.5 ** ranks[size]
        for name, size in places.items()
    }
    total = sum(raw.values())
    return {name: weight / total for name, weight in raw.items()}
