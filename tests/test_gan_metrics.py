import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from auxhead.gan.metrics import (
    GANEvaluator,
    SmallCNN,
    class_accuracy,
    frechet_distance,
    intra_class_diversity,
    mean_pairwise_distance,
    train_classifier,
)


class _Flat(nn.Module):
    """Identity features: a (N, 1, 1, d) image is the feature vector itself."""

    num_features = 2

    def forward(self, x):
        return x.flatten(1)


def _reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_frechet_distance_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 1, 1, 2, generator=g, dtype=torch.float64)
    b = (
        torch.randn(300, 1, 1, 2, generator=g, dtype=torch.float64)
        @ torch.tensor([[2.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
        + 3.0
    )
    expected = _reference_fid(a.flatten(1).numpy(), b.flatten(1).numpy())
    assert frechet_distance(_Flat(), a, b) == pytest.approx(expected, rel=1e-5)
    # same covariance, mean shifted by (3, 4): the distance is |shift|^2 = 25
    assert frechet_distance(_Flat(), a, a + torch.tensor([3.0, 4.0], dtype=torch.float64)) == (
        pytest.approx(25.0, rel=1e-6)
    )


def test_mean_pairwise_distance_by_hand():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # distances 5, 4 and 3
    assert mean_pairwise_distance(points) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(points[:1])


def test_intra_class_diversity_per_class():
    features = torch.tensor([[0.0], [2.0], [10.0], [10.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert intra_class_diversity(features, labels, 4) == [2.0, 0.0, None, None]
    # subsampling keeps the value for a class of identical points
    same = torch.ones(50, 3)
    assert intra_class_diversity(same, torch.zeros(50), 1, max_per_class=10) == [0.0]


class _MeanThreshold(nn.Module):
    """Class 1 if the image's mean exceeds 0.5, else class 0."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1)


def test_class_accuracy_by_hand():
    images = torch.tensor([0.1, 0.9, 0.8, 0.2, 0.7]).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    labels = torch.tensor([0, 1, 0, 0, 0])  # right, right, wrong, right, wrong
    acc = class_accuracy(_MeanThreshold(), images, labels, n_classes=3)
    assert acc["overall"] == pytest.approx(3 / 5)
    assert acc["per_class"] == [pytest.approx(2 / 4), 1.0, None]


def _toy_images(n_per_class=40, seed=0):
    # class 0: bright top half, class 1: bright bottom half, with noise
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * n_per_class, 1, 28, 28, generator=g) * 0.3
    x[:n_per_class, :, :14] += 0.6
    x[n_per_class:, :, 14:] += 0.6
    return x.clamp(0, 1), torch.arange(2).repeat_interleave(n_per_class)


def test_train_classifier_learns_a_toy_task_and_is_seeded():
    x, y = _toy_images()
    model = train_classifier(x, y, 2, epochs=3, batch_size=16, seed=0, width=4)
    assert isinstance(model, SmallCNN) and not model.training
    test_x, test_y = _toy_images(seed=1)
    assert class_accuracy(model, test_x, test_y, 2)["overall"] == 1.0
    again = train_classifier(x, y, 2, epochs=3, batch_size=16, seed=0, width=4)
    torch.testing.assert_close(model(test_x), again(test_x))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        train_classifier(x, y + 1, 2)


def test_evaluator_scores_real_test_images_like_the_reference():
    x, y = _toy_images()
    test_x, test_y = _toy_images(seed=1)
    ev = GANEvaluator.fit(x, y, test_x, test_y, 2, epochs=2, floor_samples=40)
    ref = ev.reference()
    out = ev.evaluate(test_x, test_y)  # "generated" = the real test set itself
    assert out["accuracy"] == ref["classifier_test_accuracy"]
    assert out["fid"] == pytest.approx(0.0, abs=1e-3)
    assert out["diversity"] == pytest.approx(ref["diversity"])
    assert out["diversity_ratio"] == pytest.approx([1.0, 1.0])
    assert out["min_diversity_ratio"] == pytest.approx(1.0)
    assert ref["fid_floor"] >= 0 and ref["floor_samples"] == 40
    # a collapsed generator: every sample of a class is the same image
    collapsed = test_x[[0, 40]].repeat_interleave(40, dim=0)
    assert ev.evaluate(collapsed, test_y)["min_diversity_ratio"] == pytest.approx(0.0, abs=1e-6)
