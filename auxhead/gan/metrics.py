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
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GANEvaluator",
    "SmallCNN",
    "class_accuracy",
    "frechet_distance",
    "intra_class_diversity",
    "mean_pairwise_distance",
    "train_classifier",
]


class SmallCNN(nn.Module):
    """The independent classifier: three conv blocks, a `feature_dim` embedding, a linear layer.

    `features(x)` returns the embedding (after ReLU) used for the Frechet distance and diversity.

    Args:
        n_classes: number of classes.
        channels: image channels (1 or 3).
        width: channels of the first conv block (then 2x, 4x).
        feature_dim: size of the embedding.
    """

    def __init__(
        self, n_classes: int, channels: int, *, width: int = 16, feature_dim: int = 128
    ) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.body = nn.Sequential(
            *block(channels, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * width, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, n_classes)
        self.num_features = feature_dim  # torchmetrics reads it instead of probing
        self.n_classes = n_classes

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)  # [0, 1] -> [-1, 1]; (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, n_classes)


class _FeatureExtractor(nn.Module):
    """`SmallCNN.features` as a module, in eval mode and without gradients, for torchmetrics."""

    def __init__(self, classifier: SmallCNN) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.eval().features(images.float())


def _check_images(images: torch.Tensor, labels: torch.Tensor | None, what: str) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"{what} must be float (N, C, H, W) images in [0, 1], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{what}: {len(images)} images but {len(labels)} labels")
    _check_finite(images, what)


def _check_finite(values: torch.Tensor, what: str) -> None:
    """Refuse NaN or infinite values before any linear algebra sees them (a matrix square
    root of a NaN covariance can crash the process rather than raise)."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(
            f"{what} hold {bad} NaN or infinite value(s); a generator whose training diverged "
            "produces them (lower the learning rate or the loss weights)"
        )


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
) -> SmallCNN:
    """Train a `SmallCNN` on real images with Adam and a one-cycle schedule; returns it in eval.

    Args:
        images: (N, C, H, W) training images in [0, 1].
        labels: (N,) int64 classes in [0, n_classes).
        n_classes: number of classes.
        epochs: passes over the data.
        batch_size: images per step.
        lr: peak learning rate.
        seed: seed of the initialisation and the shuffling.
        width: the network's width.
    """
    _check_images(images, labels, "training images")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"labels must be in [0, {n_classes}), got [{labels.min()}, {labels.max()}]"
        )
    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(n_classes, images.shape[1], width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=rng)
        for i in range(0, len(images), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def _batched(fn: Any, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def class_accuracy(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> dict[str, Any]:
    """How often `classifier` predicts `labels`: overall and per class.

    Args:
        classifier: a module returning (N, n_classes) logits for images in [0, 1].
        images: (N, C, H, W) images in [0, 1].
        labels: (N,) the classes they belong to (or, for generated images, were asked for).
        n_classes: number of classes.

    Returns:
        {"overall": float, "per_class": [float or None (no images of that class)]}.
    """
    _check_images(images, labels, "images")
    was_training = classifier.training
    classifier.eval()
    try:
        pred = _batched(lambda x: classifier(x).argmax(dim=1), images)
    finally:
        classifier.train(was_training)
    labels = labels.to(pred.device).long()
    correct = (pred == labels).float()
    per_class = [
        correct[labels == k].mean().item() if (labels == k).any() else None
        for k in range(n_classes)
    ]
    return {"overall": correct.mean().item(), "per_class": per_class}


def _fid_metric(extractor: nn.Module, keep_real: bool) -> Any:
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
    _check_images(real, None, "real images")
    _check_images(fake, None, "generated images")
    metric = _fid_metric(extractor, keep_real=False)
    for i in range(0, len(real), batch_size):
        metric.update(real[i : i + batch_size], real=True)
    for i in range(0, len(fake), batch_size):
        metric.update(fake[i : i + batch_size], real=False)
    return float(metric.compute())


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all pairs i < j of the rows of `features` (flattened)."""
    _check_finite(features, "features")
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
    _check_finite(features, "features")
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
        _check_images(train_x, train_y, "real training images")
        _check_images(test_x, test_y, "real test images")
        if len(test_x) < 2:
            raise ValueError(f"need at least 2 real test images, got {len(test_x)}")
        self.classifier = classifier.eval()
        self.n_classes = classifier.n_classes
        self.test_x, self.test_y = test_x, test_y.long()
        self.seed = seed
        rng = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_x), generator=rng)[: max(2, floor_samples)]
        self.floor_x = train_x[pick]
        self.extractor = _FeatureExtractor(self.classifier)
        # One metric holds the real test features; each evaluation resets only the fakes.
        self._fid = _fid_metric(self.extractor, keep_real=True)
        for i in range(0, len(test_x), 1000):
            self._fid.update(test_x[i : i + 1000], real=True)
        self.test_features = _batched(self.extractor, test_x)
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
        _check_finite(images, "images")
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
        _check_images(images, labels, "generated images")
        if len(images) < 2:
            raise ValueError(f"need at least 2 generated images, got {len(images)}")
        labels = labels.long().cpu()
        reference = self.reference()
        diversity = intra_class_diversity(
            _batched(self.extractor, images), labels, self.n_classes, seed=self.seed
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
