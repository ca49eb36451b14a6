"""Built-in auxiliary heads, each sized from the shape its tap produces.

A head sees its tap's output in one of three layouts: a feature map (B, C, H, W), a sequence
(B, N, C) or a feature vector (B, C). `AuxModel` puts channels-last maps (B, H, W, C) and
channels-first sequences (B, C, L) into these layouts (a view, not a copy) before the head
sees them. The pooled heads (inception, linear, sdn) accept all three: maps are pooled
spatially, sequences over tokens (over the real ones only when `AuxModel` passes `keep`, the
model's padding mask inverted), and give (B, K). The dense heads (fcn, conv1x1) predict at
every place of a map or sequence, (B, K, H, W) or (B, K, N), and refuse a vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DENSE_HEADS",
    "HEAD_KINDS",
    "Conv1x1Head",
    "FCNHead",
    "InceptionHead",
    "LinearHead",
    "SDNHead",
    "build_head",
]


def check_num_classes(num_classes: object) -> int:
    """`num_classes` as an int, or a ValueError naming it."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes must be a whole number >= 1 (the logits each head predicts), "
            f"got {num_classes!r}"
        )
    return int(num_classes)


def _check_shape(shape: Sequence[int], kind: str) -> None:
    if len(shape) not in (2, 3, 4) or any(int(d) < 1 for d in shape):
        raise ValueError(
            f"a {kind!r} head needs a tap output of 2, 3 or 4 dimensions "
            f"((B, C), (B, N, C) or (B, C, H, W)); got shape {tuple(shape)}. "
            "Pick another layer, pass `select=` to choose a tensor, or bring your own nn.Module."
        )


def _channels(shape: Sequence[int]) -> int:
    # (B, C, H, W) -> C; (B, N, C) -> C; (B, C) -> C
    return shape[1] if len(shape) == 4 else shape[-1]


def _pool_tokens(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, C) -> (B, C): the mean over the tokens, or over the real ones where `keep` (B, N)
    says which are (the model's padding mask, inverted). (B, C) stays as it is."""
    if x.dim() != 3:
        return x
    if keep is None:
        return x.mean(dim=1)
    kept = keep.unsqueeze(-1)  # (B, N, 1)
    count = kept.sum(dim=1).clamp(min=1).to(x.dtype)  # (B, 1)
    return x.masked_fill(~kept, 0).sum(dim=1) / count


def _max_tokens(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, C) -> (B, C): the max over the (real) tokens."""
    if keep is None:
        return x.amax(dim=1)
    return x.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)


class _BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU, as torchvision's GoogLeNet builds it."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionHead(nn.Module):
    """GoogLeNet's auxiliary classifier (Szegedy et al. 2015), scaled to the tap.

    Maps: average-pool to 4x4, 1x1 conv to `width` channels, FC to `8 * width`, dropout 0.7,
    FC to the classes. GoogLeNet's heads sit on 512-channel taps with width 128 and 1024 hidden
    units; here `width` keeps that ratio, a quarter of the tap's channels (at least 8, at most
    128), so a head on a narrow layer of a small CNN stays small next to the backbone.
    Sequences and vectors skip the pooling and conv: token mean, then the same two FC layers.
    """

    def __init__(self, shape: Sequence[int], num_classes: int, *, dropout: float = 0.7) -> None:
        super().__init__()
        _check_shape(shape, "inception")
        channels = _channels(shape)
        width = min(128, max(8, channels // 4))
        if len(shape) == 4:
            self.pool: nn.Module = nn.AdaptiveAvgPool2d((4, 4))
            self.conv: nn.Module = _BasicConv2d(channels, width)
            features = width * 16
        else:
            self.pool = self.conv = nn.Identity()
            features = channels
        self.fc1 = nn.Linear(features, 8 * width)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv(self.pool(x)) if x.dim() == 4 else _pool_tokens(x, keep)
        x = torch.flatten(x, 1)  # (B, features)
        x = self.dropout(F.relu(self.fc1(x), inplace=True))
        return self.fc2(x)  # (B, num_classes)


class LinearHead(nn.Module):
    """Global average pool (or token mean) and one Linear layer: the cheapest probe."""

    def __init__(self, shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        _check_shape(shape, "linear")
        self.fc = nn.Linear(_channels(shape), num_classes)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x.mean(dim=(2, 3)) if x.dim() == 4 else _pool_tokens(x, keep)  # (B, C)
        return self.fc(x)


def _adaptive_max_pool2d(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """`F.adaptive_max_pool2d(x, grid)`, value for value, in operators ONNX has (its exporter
    has none for adaptive max pooling): one max_pool2d when the grid divides the map; else,
    while `torch.export` traces (for ONNX), the same windows (rows floor(i*H/g) to
    ceil((i+1)*H/g)) taken one by one, and in eager torch's own, one operator."""
    (height, width), (rows, cols) = x.shape[-2:], grid
    if height % rows == 0 and width % cols == 0:
        return F.max_pool2d(x, (height // rows, width // cols))
    if not torch.compiler.is_exporting():
        return F.adaptive_max_pool2d(x, grid)

    def spans(size: int, n: int) -> list[tuple[int, int]]:
        return [((i * size) // n, -(-((i + 1) * size) // n)) for i in range(n)]

    cells = [
        [x[..., r0:r1, c0:c1].amax(dim=(-2, -1)) for c0, c1 in spans(width, cols)]
        for r0, r1 in spans(height, rows)
    ]
    return torch.stack([torch.stack(row, dim=-1) for row in cells], dim=-2)


class SDNHead(nn.Module):
    """Shallow-Deep Networks internal classifier (Kaya et al., ICML 2019).

    A learned mix of max and average pooling, alpha * max + (1 - alpha) * avg, down to a small
    grid, then one Linear layer. The grid keeps at most ~4096 features, as in the paper's
    reduction of large maps. Sequences mix the max and the mean over tokens the same way;
    vectors have nothing to pool, so their head is the Linear layer alone (no `alpha`, which
    would never get a gradient).
    """

    def __init__(self, shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        _check_shape(shape, "sdn")
        channels = _channels(shape)
        self.grid: tuple[int, int] | None = None
        features = channels
        if len(shape) == 4:
            side = max(1, min(4, shape[2], shape[3], int((4096 / channels) ** 0.5)))
            self.grid = (side, side)
            features = channels * side * side
        # sigmoid(0) = 0.5: an even mix to start
        self.alpha = nn.Parameter(torch.zeros(())) if len(shape) > 2 else None
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() == 4:
            mix = torch.sigmoid(self.alpha)
            x = mix * _adaptive_max_pool2d(x, self.grid) + (1 - mix) * F.adaptive_avg_pool2d(
                x, self.grid
            )
            x = torch.flatten(x, 1)  # (B, C * side * side)
        elif x.dim() == 3:
            mix = torch.sigmoid(self.alpha)
            x = mix * _max_tokens(x, keep) + (1 - mix) * _pool_tokens(x, keep)  # (B, C)
        return self.fc(x)


def _check_dense_shape(shape: Sequence[int], kind: str) -> None:
    if len(shape) not in (3, 4) or any(int(d) < 1 for d in shape):
        raise ValueError(
            f"a {kind!r} head predicts a class map, so it needs a tap output with places to "
            f"predict at: (B, C, H, W) or a sequence (B, C, L) / (B, N, C); got shape "
            f"{tuple(shape)}. Tap a layer before the pooling, or use a pooled head "
            "(head='linear')."
        )


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    # Sequences reach the heads as (B, N, C); the convolutions read (B, C, N).
    return x.transpose(1, 2) if x.dim() == 3 else x


class FCNHead(nn.Sequential):
    """torchvision's FCNHead (the auxiliary head of its FCN and DeepLabV3 models, and
    mmsegmentation's usual `auxiliary_head`), sized by the tap: 3x3 conv to C // 4 channels
    (no bias), BatchNorm, ReLU, dropout 0.1, 1x1 conv to the classes.

    Dense: (B, C, H, W) -> (B, K, H, W) at the tap's resolution (upsample it, or downsample
    the targets, with `AuxLoss(resize=...)`); a sequence (B, N, C) -> (B, K, N) with the 1-D
    convolutions. Its modules and state_dict keys are torchvision's ("0.weight" ... "4.bias"),
    so a torchvision aux_classifier's weights load into it.
    """

    def __init__(self, shape: Sequence[int], num_classes: int, *, dropout: float = 0.1) -> None:
        _check_dense_shape(shape, "fcn")
        channels = _channels(shape)
        inter = max(1, channels // 4)
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if len(shape) == 4 else (nn.Conv1d, nn.BatchNorm1d)
        super().__init__(
            conv(channels, inter, 3, padding=1, bias=False),
            norm(inter),
            nn.ReLU(),
            nn.Dropout(dropout),
            conv(inter, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_channels_first(x))  # (B, K, H, W) or (B, K, N)


class Conv1x1Head(nn.Module):
    """One 1x1 convolution to the classes: nnU-Net's and U-Net++'s deep-supervision output on
    a decoder block. (B, C, H, W) -> (B, K, H, W); a sequence (B, N, C) -> (B, K, N)."""

    def __init__(self, shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        _check_dense_shape(shape, "conv1x1")
        conv = nn.Conv2d if len(shape) == 4 else nn.Conv1d
        self.conv = conv(_channels(shape), num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(_channels_first(x))  # (B, K, H, W) or (B, K, N)


# Heads that predict a class map at their tap's resolution: (B, K, H, W) or (B, K, N).
DENSE_HEADS = (FCNHead, Conv1x1Head)


def dense_size(features: torch.Tensor) -> tuple[int, ...]:
    """Where a dense head on `features` (as heads get them) predicts: (H, W) of a map, (N,) of
    a sequence (B, N, C)."""
    return tuple(features.shape[2:]) if features.dim() == 4 else (features.shape[1],)


# The heads whose `forward(x, keep)` pools a sequence over the real tokens `keep` marks.
MASKABLE_HEADS = (InceptionHead, LinearHead, SDNHead)

HeadFactory = Callable[[tuple[int, ...], int], nn.Module]

HEAD_KINDS: dict[str, HeadFactory] = {
    "conv1x1": Conv1x1Head,
    "fcn": FCNHead,
    "inception": InceptionHead,
    "linear": LinearHead,
    "sdn": SDNHead,
}
DENSE_KINDS = ("conv1x1", "fcn")


def build_head(kind: str | HeadFactory, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a head for a tap of output `shape` from a kind name or a factory.

    Args:
        kind: one of `HEAD_KINDS` ("inception", "linear", "sdn" pool to (B, K); "fcn",
            "conv1x1" predict a class map (B, K, H, W) or (B, K, N)) or a callable
            `(tap_shape, num_classes) -> nn.Module`.
        shape: the tap's output shape, batch dimension first.
        num_classes: the number of logits the head predicts.

    Raises:
        ValueError: for an unknown kind name, a shape the head cannot take, or a
            `num_classes` that is not a whole number >= 1.
        TypeError: if a factory returns something that is not an `nn.Module`.
    """
    num_classes = check_num_classes(num_classes)
    if isinstance(kind, str):
        if kind not in HEAD_KINDS:
            raise ValueError(
                f"unknown head kind {kind!r}; choose one of {sorted(HEAD_KINDS)}, "
                "an nn.Module, or a callable (tap_shape, num_classes) -> nn.Module."
            )
        return HEAD_KINDS[kind](shape, num_classes)
    if callable(kind):
        head = kind(shape, num_classes)
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"head factory {kind!r} returned {type(head).__name__}, not an nn.Module"
            )
        return head
    raise TypeError(
        f"a head must be an nn.Module, a kind name or a factory; got {type(kind).__name__}"
    )
