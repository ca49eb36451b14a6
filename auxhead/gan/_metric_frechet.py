"""Frechet distance between Gaussians fitted to the features of two image sets (torchmetrics'
`FrechetInceptionDistance` with any feature extractor in place of Inception v3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from auxhead.gan._metric_checks import check_images


def fid_metric(extractor: nn.Module, keep_real: bool) -> Any:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Frechet distance needs torchmetrics: pip install 'auxhead[fastai]'"
        ) from err
    # A module as `feature` replaces Inception v3: nothing is downloaded, images are passed
    # as they are (float in [0, 1]); num_features on the module spares a probing call.
    return FrechetInceptionDistance(
        feature=extractor, reset_real_features=not keep_real, normalize=True
    )


def frechet_distance(
    extractor: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, batch_size: int = 1000
) -> float:
    """Frechet distance between Gaussians fitted to `extractor`'s features of two image sets.

    ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), computed by torchmetrics'
    `FrechetInceptionDistance` with `extractor` in place of Inception v3.

    Args:
        extractor: a module mapping (B, C, H, W) images to (B, d) features; give it a
            `num_features` attribute to spare torchmetrics a probing call.
        real: (N, C, H, W) real images, N >= 2.
        fake: (M, C, H, W) generated images, M >= 2.
        batch_size: images per feature pass.
    """
    check_images(real, None, "real images")
    check_images(fake, None, "generated images")
    metric = fid_metric(extractor, keep_real=False)
    for i in range(0, len(real), batch_size):
        metric.update(real[i : i + batch_size], real=True)
    for i in range(0, len(fake), batch_size):
        metric.update(fake[i : i + batch_size], real=False)
    return float(metric.compute())
