"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training",
NeurIPS 2020): random, differentiable augmentations applied to every image the discriminator
sees, real and generated alike, in both the discriminator's and the generator's step.

Augmenting only the real images would teach the generator to draw augmented images; augmenting
both, with operations the generator's gradient can pass through, keeps the discriminator from
memorising a small training set without changing what the generator is asked to match.

Operations, each drawn independently per image (the paper's):

- "color": brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5);
- "translation": shift by up to 1/8 of the side in each direction, filling with zeros;
- "cutout": zero a square of half the side at a random place.

Torch only. Images are (B, C, H, W) in the networks' [-1, 1] range (zero fill is mid grey).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AUGMENTATIONS", "DiffAugment", "split_policy"]

AUGMENTATIONS = ("color", "translation", "cutout")


def split_policy(policy: str) -> tuple[list[str], list[str]]:
    """(the operations a comma-separated policy names, those not in `AUGMENTATIONS`)."""
    ops = [op.strip() for op in policy.split(",") if op.strip()]
    return ops, [op for op in ops if op not in AUGMENTATIONS]


def _rand(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, 1, 1, 1) uniform [0, 1) draws, one per image, from `generator`'s device."""
    device = x.device if generator is None else generator.device
    draw = torch.rand(len(x), 1, 1, 1, generator=generator, device=device, dtype=x.dtype)
    return draw.to(x.device)


def _randint(
    low: int, high: int, n: int, x: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """(n, 1) integers in [low, high), from `generator`'s device."""
    device = x.device if generator is None else generator.device
    return torch.randint(low, high, (n, 1), generator=generator, device=device).to(x.device)


def _color(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    x = x + (_rand(x, generator) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, generator) * 2) + mean  # saturation (none for one channel)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator) + 0.5) + mean  # contrast


def _shift_index(size: int, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, 1) shifts: the source index of each output position and whether it is inside."""
    source = torch.arange(size, device=shift.device)[None, :] + shift  # (B, size)
    inside = (source >= 0) & (source < size)
    return source.clamp(0, size - 1), inside


def _translation(x: torch.Tensor, generator: torch.Generator | None, ratio: float) -> torch.Tensor:
    b, c, h, w = x.shape
    max_h, max_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    rows, rows_in = _shift_index(h, _randint(-max_h, max_h + 1, b, x, generator))  # (B, H)
    cols, cols_in = _shift_index(w, _randint(-max_w, max_w + 1, b, x, generator))  # (B, W)
    # out[b, :, i, j] = x[b, :, i + dy, j + dx], zero where that falls outside the image
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    x = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    inside = rows_in[:, None, :, None] & cols_in[:, None, None, :]  # (B, 1, H, W)
    return x * inside.to(x.dtype)


def _cutout(x: torch.Tensor, generator: torch.Generator | None, ratio: float) -> torch.Tensor:
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    # the square's centre; as in the paper's code, an even side may also centre one past the edge
    top = _randint(0, h + (1 - size_h % 2), b, x, generator) - size_h // 2  # (B, 1)
    left = _randint(0, w + (1 - size_w % 2), b, x, generator) - size_w // 2
    i = torch.arange(h, device=x.device)[None, :]
    j = torch.arange(w, device=x.device)[None, :]
    in_rows = (i >= top) & (i < top + size_h)  # (B, H)
    in_cols = (j >= left) & (j < left + size_w)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return x * keep[:, None].to(x.dtype)


class DiffAugment(nn.Module):
    """Differentiable augmentation of a batch, the same policy for real and generated images.

    Each call draws new random parameters per image. `acgan_learner(..., augment=...)`
    applies it to every discriminator input during training.

    Args:
        policy: comma-separated operations from `AUGMENTATIONS`, applied in that order:
            "color", "translation", "cutout" (the paper uses "translation,cutout" for small
            sets, adding "color" for CIFAR).
        translation_ratio: largest shift, as a share of the side (1/8 in the paper).
        cutout_ratio: side of the cut-out square, as a share of the image's (1/2).

    Raises:
        ValueError: for an empty policy or an unknown operation.

    Example:
        >>> augment = DiffAugment("translation,cutout")
        >>> out = augment(images)  # same shape, differentiable in images
        >>> again = augment(images, generator=torch.Generator().manual_seed(0))  # repeatable
    """

    def __init__(
        self,
        policy: str = "translation,cutout",
        *,
        translation_ratio: float = 0.125,
        cutout_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        ops, unknown = split_policy(policy)
        if not ops or unknown:
            raise ValueError(
                f"policy must name operations from {list(AUGMENTATIONS)}, comma-separated, "
                f"got {policy!r}; for no augmentation pass augment=None"
            )
        if not 0 <= translation_ratio <= 1 or not 0 <= cutout_ratio <= 1:
            raise ValueError(
                f"translation_ratio and cutout_ratio must be in [0, 1], got "
                f"{translation_ratio}, {cutout_ratio}"
            )
        self.ops = ops
        self.translation_ratio = translation_ratio
        self.cutout_ratio = cutout_ratio

    @property
    def policy(self) -> str:
        """The operations, comma-separated."""
        return ",".join(self.ops)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"

    def forward(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The augmented (B, C, H, W) batch.

        Args:
            images: (B, C, H, W) images.
            generator: random stream for the draws; default torch's global one.
        """
        if images.dim() != 4:
            raise ValueError(f"need (B, C, H, W) images, got shape {tuple(images.shape)}")
        for op in self.ops:
            if op == "color":
                images = _color(images, generator)
            elif op == "translation":
                images = _translation(images, generator, self.translation_ratio)
            else:
                images = _cutout(images, generator, self.cutout_ratio)
        return images
