"""Input checks shared by the GAN metrics: they refuse bad input before any linear algebra."""

from __future__ import annotations

import torch


def check_images(images: torch.Tensor, labels: torch.Tensor | None, what: str) -> None:
    """Float (N, C, H, W) images, as many labels as images (if given), all values finite."""
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"{what} must be float (N, C, H, W) images in [0, 1], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")
    check_finite(images, what)


def check_finite(values: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite values before any linear algebra sees them (a matrix square
    root of a NaN covariance can crash the process rather than raise)."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(
            f"{what} hold {bad} NaN or infinite value(s); a generator whose training diverged "
            "produces them (lower the learning rate or the loss weights)"
        )


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Integer classes in [0, num_classes)."""
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what} must be in [0, {num_classes}), got [{int(labels.min())}, "
            f"{int(labels.max())}]; pass the data's class count as num_classes"
        )
