"""Evaluating a class-conditional generator with an independently trained classifier.

Every measure lives in the feature space of a small CNN trained on the real training images
(nothing is downloaded, unlike Inception-based scores), and comes with its value for real data:
a second real sample (the floor draw from the training images) scored like generated images.

- discriminability (AC-GAN paper, section 4.1): the fraction of generated images that the
  classifier assigns to the class they were conditioned on, per class and overall, beside the
  classifier's own accuracy on real test images;
- Frechet distance between the classifier's features of generated and of real test images
  (torchmetrics' `FrechetInceptionDistance` with this network as its feature extractor), beside
  the distance from real training to real test images: the floor a perfect generator reaches;
- intra-class Frechet distance: the same distance within each class (generated class c vs
  real test class c), which sees a class collapse that the overall distance averages away;
- improved precision and recall (Kynkaanniemi et al. 2019, k = 3): how many generated
  samples fall within the real data's k-NN balls, and how much of the real data falls within
  the generated samples' balls;
- classification accuracy score (Ravuri & Vinyals 2019): a fresh classifier trained on the
  generated images only, tested on the real test images, beside the one trained on real data;
- intra-class diversity: the mean pairwise distance between feature vectors of one class,
  generated vs real (the paper used MS-SSIM, which needs images larger than 28 px).

All images are (N, C, H, W) float tensors in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from auxhead.gan._metric_checks import check_finite, check_images, check_labels
from auxhead.gan._metric_classifier import (
    FeatureExtractor,
    SmallCNN,
    batched,
    class_accuracy,
    classification_accuracy_score,
    train_classifier,
)
from auxhead.gan._metric_frechet import (
    GivenFeatures,
    fid_metric,
    frechet_distance,
    intra_class_frechet_distance,
)
from auxhead.gan._metric_knn import KNNBalls, precision_recall, precision_recall_of_balls

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
    num_classes: int,
    *,
    max_per_class: int = 1000,
    seed: int = 0,
) -> list[float | None]:
    """Mean pairwise feature distance within each class: how varied the class's samples are.

    Args:
        features: (N, ...) one feature vector (or image, in pixel space) per sample.
        labels: (N,) classes.
        num_classes: number of classes.
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
    for k in range(num_classes):
        idx = (labels == k).nonzero().flatten()
        if len(idx) > max_per_class:
            idx = idx[torch.randperm(len(idx), generator=rng)[:max_per_class]]
        out.append(
            mean_pairwise_distance(features[idx.to(features.device)]) if len(idx) > 1 else None
        )
    return out


def _ratios(num: Sequence[float | None], den: Sequence[float | None]) -> list[float | None]:
    return [a / b if a is not None and b else None for a, b in zip(num, den, strict=True)]


# Images per step of the evaluator's classifiers: the real-data one (`fit`) and the CAS one.
_CLASSIFIER_BATCH = 128


def _positive_int(value: Any, name: str, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}")


class GANEvaluator:
    """Scores generated samples against real data with an independent classifier.

    Build it with `GANEvaluator.fit` (trains the classifier) or from a trained `SmallCNN`.
    `reference()` describes the real data (the classifier's test accuracy, and every measure
    of a second real sample: real training images scored against the real test images like
    generated ones); `evaluate(images, labels)` scores a generated set against the real test
    images.

    Args:
        classifier: a trained `SmallCNN`, or any module with `features(images)`,
            `num_features` and `num_classes`.
        train_x, train_y: real training images and labels (for the floors).
        test_x, test_y: real held-out images and labels: the reference distribution.
        floor_samples: real training images drawn for the floors; match it to the number of
            generated images you will score, since the distances (and precision and recall)
            depend on sample size.
        k: the neighbour that sets the k-NN balls of precision and recall.
        classifier_epochs: the epochs `classifier` was trained for with `train_classifier`
            over `train_x` (`fit` passes its own). The classification accuracy score's
            classifier gets as many optimisation steps unless `cas_epochs` is given.
        cas_epochs: epochs of the classification accuracy score's classifier over the
            generated images; None: the real classifier's number of steps.
        seed: seed of the draws and of the classification accuracy score's classifier.

    Example:
        >>> ev = GANEvaluator.fit(train_x, train_y, test_x, test_y, num_classes=10)
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
        k: int = 3,
        classifier_epochs: int = 3,
        cas_epochs: int | None = None,
        seed: int = 0,
    ) -> None:
        check_images(train_x, train_y, "real training images")
        check_images(test_x, test_y, "real test images")
        _positive_int(k, "k", "precision and recall use k=3")
        _positive_int(classifier_epochs, "classifier_epochs", "pass the epochs it trained for")
        if cas_epochs is not None:
            _positive_int(cas_epochs, "cas_epochs", "or None to match the real classifier")
        for name, n in [("test", len(test_x)), ("training", len(train_x))]:
            if n <= k:
                raise ValueError(
                    f"need more than k={k} real {name} images for precision and recall, got "
                    f"{n}; pass more images or a smaller k"
                )
        self.classifier = classifier.eval()
        self.num_classes = classifier.num_classes
        self.test_x, self.test_y = test_x, test_y.long()
        self.k = k
        self.seed = seed
        self.n_train = len(train_x)
        self.cas_epochs = cas_epochs
        self.classifier_steps = classifier_epochs * -(-len(train_x) // _CLASSIFIER_BATCH)
        rng = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(train_x), generator=rng)[: max(k + 1, floor_samples)]
        self.floor_x, self.floor_y = train_x[pick], train_y[pick].long()
        self.extractor = FeatureExtractor(self.classifier)
        self.test_features = batched(self.extractor, test_x)
        # One metric holds the real test features; each evaluation resets only the fakes.
        self._fid = fid_metric(GivenFeatures(self.test_features.shape[1]), keep_real=True)
        self._fid.update(GivenFeatures.as_images(self.test_features), real=True)
        self._test_balls: KNNBalls | None = None  # built on first use: N^2 distances
        self._reference: dict[str, Any] | None = None

    @classmethod
    def fit(
        cls,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        test_x: torch.Tensor,
        test_y: torch.Tensor,
        num_classes: int,
        *,
        epochs: int = 3,
        floor_samples: int = 5000,
        k: int = 3,
        cas_epochs: int | None = None,
        seed: int = 0,
    ) -> GANEvaluator:
        """Train the classifier on (train_x, train_y) for `epochs`, then build the evaluator;
        the other arguments are the constructor's."""
        classifier = train_classifier(
            train_x, train_y, num_classes, epochs=epochs, bs=_CLASSIFIER_BATCH, seed=seed
        )
        return cls(
            classifier,
            train_x,
            train_y,
            test_x,
            test_y,
            floor_samples=floor_samples,
            k=k,
            classifier_epochs=epochs,
            cas_epochs=cas_epochs,
            seed=seed,
        )

    def _distance_to_test(self, features: torch.Tensor) -> float:
        check_finite(features, "features")
        self._fid.reset()  # keeps the real test features
        self._fid.update(GivenFeatures.as_images(features), real=False)
        return float(self._fid.compute())

    def _precision_recall(self, features: torch.Tensor, what: str) -> dict[str, float]:
        if self._test_balls is None:
            self._test_balls = KNNBalls(self.test_features, self.k, "real test")
        return precision_recall_of_balls(self._test_balls, KNNBalls(features, self.k, what))

    def _intra_fid(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        return intra_class_frechet_distance(
            self.test_features, self.test_y, features, labels, self.num_classes
        )

    def reference(self) -> dict[str, Any]:
        """The real data's figures: what generated samples are compared with.

        The floors score `floor_samples` real training images against the real test images
        exactly as `evaluate` scores generated ones.

        Returns:
            A dict with these keys; the `*_floor` keys, `precision` and `recall` score
                the real training draw as `evaluate` scores generated images: what a
                perfect generator gets.

                - `classifier_test_accuracy`: `{"overall", "per_class"}`, the classifier's
                    accuracy on the real test images.
                - `fid_floor`: Frechet distance from the real training draw to the real test
                    images.
                - `floor_samples`: the number of real training images drawn for the floors.
                - `diversity`: per class, the mean pairwise feature distance of the real test
                    images (None for a class with fewer than 2).
                - `intra_fid_floor`: `{"per_class", "mean", "why_none"}`, the intra-class
                    Frechet distance from the real training draw to the real test images
                    (see `intra_class_frechet_distance`).
                - `precision`, `recall`: improved precision and recall of the real training
                    draw against the real test images.
                - `n_train`: the number of real training images.
        """
        if self._reference is None:
            floor_features = batched(self.extractor, self.floor_x)
            real = self._precision_recall(floor_features, "real training")
            self._reference = {
                "classifier_test_accuracy": class_accuracy(
                    self.classifier, self.test_x, self.test_y, self.num_classes
                ),
                "fid_floor": self._distance_to_test(floor_features),
                "floor_samples": len(self.floor_x),
                "diversity": intra_class_diversity(
                    self.test_features, self.test_y, self.num_classes, seed=self.seed
                ),
                "intra_fid_floor": self._intra_fid(floor_features, self.floor_y),
                "precision": real["precision"],
                "recall": real["recall"],
                "n_train": self.n_train,
            }
        return self._reference

    def _cas_epochs(self, n_images: int) -> int:
        if self.cas_epochs is not None:
            return self.cas_epochs
        # The real classifier's recipe and budget: as many optimisation steps as it had.
        return max(1, -(-self.classifier_steps // -(-n_images // _CLASSIFIER_BATCH)))

    def evaluate(
        self, images: torch.Tensor, labels: torch.Tensor, *, cas: bool = True
    ) -> dict[str, Any]:
        """Score generated images conditioned on `labels`.

        Args:
            images: (N, C, H, W) generated images in [0, 1], N > k.
            labels: (N,) the classes they were conditioned on.
            cas: compute the classification accuracy score, the one costly measure (it
                trains a classifier: about as long as the real one took).

        Returns:
            A dict with the keys below. Distances are in the classifier's feature space;
                each `*_floor` and `real_*` key is the same measure of the real training
                draw (from `reference()`), what a perfect generator gets.

                - `n_samples`: the number of generated images.
                - `accuracy`: `{"overall", "per_class"}`, the share of generated images the
                    classifier assigns to their conditioning class.
                - `fid`: Frechet distance from the generated to the real test images.
                - `fid_floor`: the same for the real training draw.
                - `intra_fid`: `{"per_class", "mean", "why_none"}`, the Frechet distance
                    from each class's generated images to its real test images (None for a
                    class with fewer than 2 of either), the mean of those that exist, and
                    per class the reason it has no value (None when it has one).
                - `intra_fid_floor`: the same for the real training draw.
                - `precision`: improved precision (k-NN balls, `k` neighbours): the share
                    of generated images inside the real test images' balls.
                - `recall`: the share of real test images inside the generated images'
                    balls.
                - `real_precision`, `real_recall`: the same for the real training draw.
                - `cas`: None with `cas=False`, else the classification accuracy score,
                    `{"accuracy", "per_class", "epochs", "n_train", "real_accuracy",
                    "real_n_train"}`: the real test accuracy of a classifier trained for
                    `epochs` on the `n_train` generated images only, beside the accuracy of
                    the evaluator's classifier, trained on `real_n_train` real images.
                - `diversity`: per class, the mean pairwise feature distance of the
                    generated images (None for a class with fewer than 2).
                - `diversity_ratio`: per class, generated diversity / real diversity.
                - `min_diversity_ratio`: the smallest of those (None if none exists).

        Raises:
            ValueError: N is k or less, labels out of range or mismatched, non-finite images.
        """
        check_images(images, labels, "generated images")
        if len(images) <= self.k:
            raise ValueError(
                f"need more than k={self.k} generated images (precision and recall), got "
                f"{len(images)}; generate more"
            )
        labels = labels.long().cpu()
        check_labels(labels, self.num_classes, "generated labels")
        reference = self.reference()
        features = batched(self.extractor, images)
        diversity = intra_class_diversity(features, labels, self.num_classes, seed=self.seed)
        ratios = _ratios(diversity, reference["diversity"])
        known = [r for r in ratios if r is not None]
        pr = self._precision_recall(features, "generated")
        return {
            "n_samples": len(images),
            "accuracy": class_accuracy(self.classifier, images, labels, self.num_classes),
            "fid": self._distance_to_test(features),
            "fid_floor": reference["fid_floor"],
            "intra_fid": self._intra_fid(features, labels),
            "intra_fid_floor": reference["intra_fid_floor"],
            "precision": pr["precision"],
            "recall": pr["recall"],
            "real_precision": reference["precision"],
            "real_recall": reference["recall"],
            "cas": self._cas(images, labels) if cas else None,
            "diversity": diversity,
            "diversity_ratio": ratios,
            "min_diversity_ratio": min(known) if known else None,
        }

    def _cas(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        score = classification_accuracy_score(
            images,
            labels,
            self.test_x,
            self.test_y,
            self.num_classes,
            epochs=self._cas_epochs(len(images)),
            bs=_CLASSIFIER_BATCH,
            seed=self.seed,
        )
        real = self.reference()["classifier_test_accuracy"]["overall"]
        return {**score, "real_accuracy": real, "real_n_train": self.n_train}
