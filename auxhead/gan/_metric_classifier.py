"""The independent classifier that judges generated images, and the classification accuracy
score (Ravuri & Vinyals, NeurIPS 2019) that trains one on generated images only."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from auxhead.gan._metric_checks import check_images, check_labels


class SmallCNN(nn.Module):
    """The independent classifier: three conv blocks, a `feature_dim` embedding, a linear layer.

    `features(x)` returns the embedding (after ReLU) used for the Frechet distance and diversity.

    Args:
        num_classes: number of classes.
        channels: image channels (1 or 3).
        width: channels of the first conv block (then 2x, 4x).
        feature_dim: size of the embedding.
    """

    def __init__(
        self, num_classes: int, channels: int, *, width: int = 16, feature_dim: int = 128
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
        self.head = nn.Linear(feature_dim, num_classes)
        self.num_features = feature_dim  # torchmetrics reads it instead of probing
        self.num_classes = num_classes

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images * 2 - 1)  # [0, 1] -> [-1, 1]; (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)


class FeatureExtractor(nn.Module):
    """`SmallCNN.features` as a module, in eval mode and without gradients, for torchmetrics."""

    def __init__(self, classifier: SmallCNN) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.eval().features(images.float())


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 3,
    bs: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
) -> SmallCNN:
    """Train a `SmallCNN` on real images with Adam and a one-cycle schedule; returns it in eval.

    Args:
        images: (N, C, H, W) training images in [0, 1].
        labels: (N,) int64 classes in [0, num_classes).
        num_classes: number of classes.
        epochs: passes over the data.
        bs: images per step.
        lr: peak learning rate.
        seed: seed of the initialisation and the shuffling.
        width: the network's width.
    """
    check_images(images, labels, "training images")
    labels = labels.long()
    check_labels(labels, num_classes, "labels")
    rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(num_classes, images.shape[1], width=width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * -(-len(images) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=rng)
        for i in range(0, len(images), bs):
            idx = order[i : i + bs]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def batched(fn: Any, images: torch.Tensor, bs: int = 1000) -> torch.Tensor:
    return torch.cat([fn(images[i : i + bs]) for i in range(0, len(images), bs)])


def class_accuracy(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """How often `classifier` predicts `labels`: overall and per class.

    Args:
        classifier: a module returning (N, num_classes) logits for images in [0, 1].
        images: (N, C, H, W) images in [0, 1].
        labels: (N,) the classes they belong to (or, for generated images, were asked for).
        num_classes: number of classes.

    Returns:
        {"overall": float, "per_class": [float or None (no images of that class)]}.
    """
    check_images(images, labels, "images")
    was_training = classifier.training
    classifier.eval()
    try:
        pred = batched(lambda x: classifier(x).argmax(dim=1), images)
    finally:
        classifier.train(was_training)
    labels = labels.to(pred.device).long()
    correct = (pred == labels).float()
    per_class = [
        correct[labels == k].mean().item() if (labels == k).any() else None
        for k in range(num_classes)
    ]
    return {"overall": correct.mean().item(), "per_class": per_class}


def classification_accuracy_score(
    images: torch.Tensor,
    labels: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 3,
    bs: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 16,
) -> dict[str, Any]:
    """Classification accuracy score (Ravuri & Vinyals 2019): train a fresh classifier on
    generated images only, then test it on real images.

    A generator that draws recognisable but unvaried samples, or samples of the wrong class,
    scores low even where the accuracy on generated samples is high. The recipe is
    `train_classifier`'s; compare the score with the same recipe trained on real images.

    Args:
        images: (N, C, H, W) generated images in [0, 1], the only training data.
        labels: (N,) the classes they were conditioned on.
        test_x: (M, C, H, W) real test images in [0, 1].
        test_y: (M,) their classes.
        num_classes: number of classes.
        epochs: passes over the generated images.
        bs: images per step.
        lr: peak learning rate.
        seed: seed of the classifier's initialisation and shuffling; the score is
            deterministic given it.
        width: the classifier's width.

    Returns:
        A dict with "accuracy", the share of real test images classified correctly;
            "per_class", that share per class (None for a class without test images);
            "epochs" and "n_train", the number of generated training images.

    Example:
        >>> cas = classification_accuracy_score(fake, fake_labels, test_x, test_y, 10)
        >>> cas["accuracy"]  # doctest: +SKIP
    """
    check_images(test_x, test_y, "real test images")
    model = train_classifier(
        images,
        labels,
        num_classes,
        epochs=epochs,
        bs=bs,
        lr=lr,
        seed=seed,
        width=width,
    )
    accuracy = class_accuracy(model, test_x, test_y, num_classes)
    return {
        "accuracy": accuracy["overall"],
        "per_class": accuracy["per_class"],
        "epochs": epochs,
        "n_train": len(images),
    }
