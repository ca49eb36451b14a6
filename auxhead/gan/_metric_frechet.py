"""Frechet distance between Gaussians fitted to feature vectors: over a whole image set
(torchmetrics' `FrechetInceptionDistance` with any feature extractor) and within each class."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from auxhead.gan._metric_checks import check_finite, check_images, check_labels


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
    extractor: nn.Module, real: torch.Tensor, fake: torch.Tensor, *, bs: int = 1000
) -> float:
    """Frechet distance between Gaussians fitted to `extractor`'s features of two image sets.

    ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)), computed by torchmetrics'
    `FrechetInceptionDistance` with `extractor` in place of Inception v3.

    Args:
        extractor: a module mapping (B, C, H, W) images to (B, d) features; give it a
            `num_features` attribute to spare torchmetrics a probing call.
        real: (N, C, H, W) real images, N >= 2.
        fake: (M, C, H, W) generated images, M >= 2.
        bs: images per feature pass.
    """
    check_images(real, None, "real images")
    check_images(fake, None, "generated images")
    metric = fid_metric(extractor, keep_real=False)
    for i in range(0, len(real), bs):
        metric.update(real[i : i + bs], real=True)
    for i in range(0, len(fake), bs):
        metric.update(fake[i : i + bs], real=False)
    return float(metric.compute())


class GivenFeatures(nn.Module):
    """The Frechet machinery on features computed beforehand: (N, d) feature vectors passed
    as (N, d, 1, 1) images (`as_images`) come out as they went in."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    @staticmethod
    def as_images(features: torch.Tensor) -> torch.Tensor:
        return features.reshape(len(features), -1, 1, 1)  # (N, d, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (N, d)


def _frechet_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    extractor = GivenFeatures(real.shape[1])
    return frechet_distance(extractor, extractor.as_images(real), extractor.as_images(fake))


def intra_class_frechet_distance(
    real_features: torch.Tensor,
    real_labels: torch.Tensor,
    fake_features: torch.Tensor,
    fake_labels: torch.Tensor,
    num_classes: int,
    *,
    min_samples: int = 2,
) -> dict[str, Any]:
    """Frechet distance within each class: fake class c against real class c, and their mean.

    Each value is `frechet_distance` between the two sets' vectors of one class. Like the
    overall distance it is biased upwards by small sets (here, the per-class counts), so
    compare it with the same computation on a second real sample of the same size.

    Args:
        real_features: (N, d) feature vectors of real images (further dimensions are
            flattened).
        real_labels: (N,) their classes.
        fake_features: (M, d) feature vectors of the images to score.
        fake_labels: (M,) the classes they were conditioned on.
        num_classes: number of classes.
        min_samples: a class with fewer vectors than this in either set gets no value; the
            distance needs at least 2.

    Returns:
        A dict with "per_class", one distance per class (None where a set has fewer than
            `min_samples` vectors of the class); "mean", the mean of the per-class values
            that exist (None if none does); "why_none", per class None or the reason the
            class has no value.

    Raises:
        ValueError: min_samples below 2, labels out of [0, num_classes), mismatched lengths or
            vector sizes, NaN or infinite features.
    """
    if not isinstance(min_samples, int) or isinstance(min_samples, bool) or min_samples < 2:
        raise ValueError(
            f"min_samples must be an integer of at least 2 (a covariance needs two samples), "
            f"got {min_samples!r}"
        )
    sets = {}
    for name, features, labels in [
        ("real_features", real_features, real_labels),
        ("fake_features", fake_features, fake_labels),
    ]:
        if len(features) != len(labels):
            raise ValueError(f"{name}: {len(features)} feature vectors but {len(labels)} labels")
        check_finite(features, name)
        check_labels(labels, num_classes, f"the labels of {name}")
        sets[name] = (features.reshape(len(features), -1), labels.to(features.device).long())
    (real, real_y), (fake, fake_y) = sets["real_features"], sets["fake_features"]
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real feature vectors have {real.shape[1]} values, fake ones {fake.shape[1]}; "
            "extract both with the same network"
        )
    per_class: list[float | None] = []
    why_none: list[str | None] = []
    for c in range(num_classes):
        real_c, fake_c = real[real_y == c], fake[fake_y == c]
        if min(len(real_c), len(fake_c)) < min_samples:
            per_class.append(None)
            why_none.append(
                f"class {c}: {len(fake_c)} vector(s) in fake_features and {len(real_c)} in "
                f"real_features; the distance needs at least {min_samples} in each (score "
                "more samples per class)"
            )
        else:
            per_class.append(_frechet_of_features(real_c, fake_c.to(real_c.device)))
            why_none.append(None)
    known = [v for v in per_class if v is not None]
    return {
        "per_class": per_class,
        "mean": sum(known) / len(known) if known else None,
        "why_none": why_none,
    }
