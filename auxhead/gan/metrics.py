"""Evaluating a class-conditional generator with an independently trained classifier.

Three measures, all in the feature space of a small CNN trained on the real training images
(nothing is downloaded, unlike Inception-based scores):

- discriminability (AC-GAN paper, section 4.1): the fraction of generated images that the
  classifier assigns to the class they were conditioned on, per class and overall, beside the
  classifier's own accuracy on real test images;
- Frechet distance between the classifier's features of generated and of real test images
  (torchmetrics' `FrechetInceptionDistance` with this network as its feature extractor), beside
  the distance from real training to real test images: the floor a perfect generator reaches;
- intra-class diversity: the mean pairwise distance between feature vectors of one class,
  generated vs real (the paper used MS-SSIM, which needs images larger than 28 px).

All images are (N, C, H, W) float tensors in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from auxhead.gan._metric_checks import check_finite, check_images
from auxhead.gan._metric_classifier import (
    FeatureExtractor,
    SmallCNN,
    batched,
    class_accuracy,
    classification_accuracy_score,
    train_classifier,
)
from auxhead.gan._metric_frechet import fid_metric, frechet_distance, intra_class_frechet_distance
from auxhead.gan._metric_knn import precision_recall

__all__ = [
    "GANEvaluator",
    "SmallCNN",
    "class_accuracy",
    "classification_accuracy_score",
    "frechet_distance",
    "intra_class_diversity",
    "intra_class_frechet_distance",
    "mean_pairwise_distance",
    "precision_recall",
    "train_classifier",
]


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j of the rows of `features` (flattened)."""
    check_finite(features, "features")
    x = features.reshape(len(features), -1).double()
    n = len(x)
    if n < 2:
        raise ValueError(f"need at least 2 samples for a pairwise distance, got {n}")
    return (torch.pdist(x).sum() / (n * (n - 1) / 2)).item()


def intra_class_diversity(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    max_per_class: int = 1000,
    seed: int = 0,
) -> list[float | None]:
    """Mean pairwise feature distance within each class: how varied the class's samples are.

    Args:
        features: (N, ...) one feature vector (or image, in pixel space) per sample.
        labels: (N,) classes.
        n_classes: number of classes.
        max_per_class: at most this many samples per class, drawn at random, to bound the
            quadratic cost.
        seed: seed of that draw.

    Returns:
        One value per class; None for a class with fewer than 2 samples.
    """
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature vectors but {len(labels)} labels")
    check_finite(features, "features")
    rng = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    out: list[float | None] = []
    for k in range(n_classes):
        idx = (labels == k).nonzero().flatten()
        if len(idx) > max_per_class:
            idx = idx[torch.randperm(len(idx), generator=rng)[:max_per_class]]
        out.append(
            mean_pairwise_distance(features[idx.to(features.device)]) if len(idx) > 1 else None
        )
    return out


def _ratios(num: Sequence[float | None], den: Sequence[float | None]) -> list[float | None]:
    return [a / b if a is not None and b else None for a, b in zip(num, den, strict=True)]


class GANEvaluator:
    """Scores generated samples against real data with an independent classifier.

    Build it with `GANEvaluator.fit` (trains the classifier) or from a trained `SmallCNN`.
    `reference()` describes the real data (the classifier's test accuracy, the real train vs
    real test Frechet distance, the real per-class diversity); `evaluate(images, labels)` scores
    a generated set against it.

    Args:
        classifier: a trained `SmallCNN`, or any module with `features(images)`,
            `num_features` and `n_classes`.
        train_x, train_y: real training images and labels (for the Frechet floor).
        test_x, test_y: real held-out images and labels: the reference distribution.
        floor_samples: real training images drawn for the floor; match it to the number of
            generated images you will score, since the distance is biased by sample size.
        seed: seed of the draws.

    Example:
        >>> ev = GANEvaluator.fit(train_x, train_y, test_x, test_y, n_classes=10)
        >>> ev.reference()["fid_floor"]
        >>> ev.evaluate(generator.generate(labels), labels)["accuracy"]["overall"]
    """

    def __init__(
        self,
        classifier: nn.Module,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        *,
        floor_samples: int = 5000,
        seed: int = 0,
    ) -> None:
        check_images(train_x, train_y, "real training images")
        check_images(test_x, test_y, "real test images")
        if len(test_x) < 2:
            raise ValueError(f"need at least 2 real test images, got {len(test_x)}")
        self.classifier = classifier.eval()
        self.n_classes = classifier.n_classes
        self.test_x, self.test_y = test_x, test_y.long()
        self.seed = seed
        rng = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_x), generator=rng)[: max(2, floor_samples)]
        self.floor_x = train_x[pick]
        self.extractor = FeatureExtractor(self.classifier)
        # One metric holds the real test features; each evaluation resets only the fakes.
        self._fid = fid_metric(self.extractor, keep_real=True)
        for i in range(0, len(test_x), 1000):
            self._fid.update(test_x[i : i + 1000], real=True)
        self.test_features = batched(self.extractor, test_x)
        self._reference: dict[str, Any] | None = None

    @classmethod
    def fit(
        cls,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        n_classes: int,
        *,
        epochs: int = 3,
        floor_samples: int = 5000,
        seed: int = 0,
    ) -> GANEvaluator:
        """Train the classifier on (train_x, train_y), then build the evaluator."""
        classifier = train_classifier(train_x, train_y, n_classes, epochs=epochs, seed=seed)
        return cls(
            classifier, train_x, train_y, test_x, test_y, floor_samples=floor_samples, seed=seed
        )

    def _distance_to_test(self, images: torch.Tensor) -> float:
        check_finite(images, "images")
        self._fid.reset()  # keeps the real test features
        for i in range(0, len(images), 1000):
            self._fid.update(images[i : i + 1000], real=False)
        return float(self._fid.compute())

    def reference(self) -> dict[str, Any]:
        """The real data's figures: what generated samples are compared with.

        Returns:
            {"classifier_test_accuracy": {"overall", "per_class"}, "fid_floor": real train vs
            real test distance, "floor_samples": int, "diversity": per-class list}.
        """
        if self._reference is None:
            self._reference = {
                "classifier_test_accuracy": class_accuracy(
                    self.classifier, self.test_x, self.test_y, self.n_classes
                ),
                "fid_floor": self._distance_to_test(self.floor_x),
                "floor_samples": len(self.floor_x),
                "diversity": intra_class_diversity(
                    self.test_features, self.test_y, self.n_classes, seed=self.seed
                ),
            }
        return self._reference

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Score generated images conditioned on `labels`.

        Returns:
            {"n_samples", "accuracy": {"overall", "per_class"} (classified as their
            conditioning class), "fid": distance to the real test images, "fid_floor",
            "diversity": per class, "diversity_ratio": per class, generated / real,
            "min_diversity_ratio"}.
        """
        check_images(images, labels, "generated images")
        if len(images) < 2:
            raise ValueError(f"need at least 2 generated images, got {len(images)}")
        labels = labels.long().cpu()
        reference = self.reference()
        diversity = intra_class_diversity(
            batched(self.extractor, images), labels, self.n_classes, seed=self.seed
        )
        ratios = _ratios(diversity, reference["diversity"])
        known = [r for r in ratios if r is not None]
        return {
            "n_samples": len(images),
            "accuracy": class_accuracy(self.classifier, images, labels, self.n_classes),
            "fid": self._distance_to_test(images),
            "fid_floor": reference["fid_floor"],
            "diversity": diversity,
            "diversity_ratio": ratios,
            "min_diversity_ratio": min(known) if known else None,
        }
