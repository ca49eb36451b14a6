import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from auxhead.gan import _metric_knn
from auxhead.gan.metrics import (
    GANEvaluator,
    SmallCNN,
    class_accuracy,
    classification_accuracy_score,
    frechet_distance,
    intra_class_diversity,
    intra_class_frechet_distance,
    mean_pairwise_distance,
    precision_recall,
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
    acc = class_accuracy(_MeanThreshold(), images, labels, num_classes=3)
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
    model = train_classifier(x, y, 2, epochs=3, bs=16, seed=0, width=4)
    assert isinstance(model, SmallCNN) and not model.training
    test_x, test_y = _toy_images(seed=1)
    assert class_accuracy(model, test_x, test_y, 2)["overall"] == 1.0
    again = train_classifier(x, y, 2, epochs=3, bs=16, seed=0, width=4)
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


# improved precision and recall ---------------------------------------------------------------


def _reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple:
    """Brute force: every pairwise distance, each vector's k-th nearest other vector."""

    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(x):
        d = distances(x, x)
        np.fill_diagonal(d, np.inf)  # a vector is not its own neighbour
        return np.sort(d, axis=1)[:, k - 1]

    def covered(points, centres):
        return (distances(points, centres) <= radii(centres)[None, :]).any(axis=1).mean()

    return covered(fake, real), covered(real, fake)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_recall_matches_brute_force_knn(seed, k, monkeypatch):
    # tiny chunks: the radii and ball tests run in several row blocks with offsets
    monkeypatch.setattr(_metric_knn, "_CHUNK_ELEMENTS", 64)
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(60, 3))
    fake = rng.normal(size=(45, 3)) * 0.7 + 1.0  # narrower and shifted: neither is 0 or 1
    precision, recall = _reference_precision_recall(real, fake, k)
    assert 0 < precision < 1 and 0 < recall < 1
    got = precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), k=k)
    assert got == {"precision": pytest.approx(precision), "recall": pytest.approx(recall)}


def _clusters(centres, n, seed, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + spread * torch.randn(n, 2, generator=g) for c in torch.tensor(centres)])


def test_precision_recall_hand_built_cases():
    corners = [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]]
    real = _clusters(corners, 50, seed=0)
    assert precision_recall(real, real.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    far = real + 1000.0
    assert precision_recall(real, far, k=3) == {"precision": 0.0, "recall": 0.0}
    # the fake set is two of the four clusters: all of it looks real, half the real is covered
    assert precision_recall(real, real[:100], k=3) == {"precision": 1.0, "recall": 0.5}
    # new samples of the same two clusters: a few fall outside every ball at a cluster's edge
    got = precision_recall(real, _clusters(corners[:2], 50, seed=1), k=3)
    assert got["precision"] > 0.9
    assert got["recall"] == pytest.approx(0.5, abs=0.05)


def test_precision_recall_refuses_bad_input():
    real, fake = torch.randn(10, 4), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"k=3 needs at least 4 generated feature vectors.*got 3"):
        precision_recall(real, fake[:3], k=3)
    with pytest.raises(ValueError, match=r"k=10 needs at least 11 real"):
        precision_recall(real, fake, k=10)
    with pytest.raises(ValueError, match="k must be a positive integer.*got 0"):
        precision_recall(real, fake, k=0)
    with pytest.raises(ValueError, match="4 values, generated ones 3"):
        precision_recall(real, fake[:, :3])
    fake[2, 1] = float("nan")
    with pytest.raises(ValueError, match="generated features hold 1 NaN"):
        precision_recall(real, fake)


# intra-class Frechet distance ----------------------------------------------------------------


def test_intra_class_frechet_distance_is_frechet_distance_per_class():
    g = torch.Generator().manual_seed(0)
    real_y = torch.arange(3).repeat_interleave(60)
    fake_y = torch.arange(3).repeat_interleave(40)
    real = torch.randn(180, 2, generator=g, dtype=torch.float64) + real_y[:, None]
    fake = torch.randn(120, 2, generator=g, dtype=torch.float64) * 1.3 + 2 * fake_y[:, None]
    out = intra_class_frechet_distance(real, real_y, fake, fake_y, 3)
    for c in range(3):
        r, f = real[real_y == c], fake[fake_y == c]
        by_hand = frechet_distance(_Flat(), r.view(-1, 1, 1, 2), f.view(-1, 1, 1, 2))
        assert out["per_class"][c] == pytest.approx(by_hand, rel=1e-6)
        assert out["per_class"][c] == pytest.approx(_reference_fid(r.numpy(), f.numpy()), rel=1e-5)
    assert out["per_class"][1] > 0.5  # the classes really differ
    assert out["mean"] == pytest.approx(sum(out["per_class"]) / 3)
    assert out["why_none"] == [None, None, None]


def test_intra_class_frechet_distance_names_a_class_too_small():
    g = torch.Generator().manual_seed(0)
    real, real_y = torch.randn(30, 2, generator=g), torch.arange(3).repeat_interleave(10)
    fake, fake_y = torch.randn(11, 2, generator=g), torch.tensor([0] * 10 + [2])
    out = intra_class_frechet_distance(real, real_y, fake, fake_y, 4)
    assert out["per_class"][0] is not None and out["per_class"][1:] == [None, None, None]
    assert out["mean"] == out["per_class"][0]
    assert out["why_none"][0] is None
    assert "class 1: 0 vector(s) in fake_features and 10 in real_features" in out["why_none"][1]
    assert "class 2: 1 vector(s) in fake_features" in out["why_none"][2]
    assert "at least 2" in out["why_none"][3]
    with pytest.raises(ValueError, match=r"labels of fake_features must be in \[0, 2\)"):
        intra_class_frechet_distance(real, real_y % 2, fake, fake_y, 2)
    with pytest.raises(ValueError, match="min_samples must be an integer of at least 2"):
        intra_class_frechet_distance(real, real_y, fake, fake_y, 4, min_samples=1)
    fake[0, 0] = float("inf")
    with pytest.raises(ValueError, match="fake_features hold 1 NaN or infinite"):
        intra_class_frechet_distance(real, real_y, fake, fake_y, 4)


# classification accuracy score ---------------------------------------------------------------


def _band_images(n_per_class=40, seed=0):
    # three classes: a bright band at the top, the middle or the bottom, with noise
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3 * n_per_class, 1, 28, 28, generator=g) * 0.4
    for c in range(3):
        x[c * n_per_class : (c + 1) * n_per_class, :, 9 * c : 9 * c + 10] += 0.5
    return x.clamp(0, 1), torch.arange(3).repeat_interleave(n_per_class)


def test_classification_accuracy_score_on_hand_built_generators():
    x, y = _band_images()
    test_x, test_y = _band_images(seed=1)
    options = {"epochs": 3, "bs": 16, "width": 4, "seed": 0}
    real = class_accuracy(train_classifier(x, y, 3, **options), test_x, test_y, 3)["overall"]
    assert real > 0.9
    # a generator that returns real training images of the right class: CAS = real accuracy
    faithful = classification_accuracy_score(x, y, test_x, test_y, 3, **options)
    assert faithful["accuracy"] == pytest.approx(real)
    assert faithful["n_train"] == 120 and faithful["epochs"] == 3
    assert len(faithful["per_class"]) == 3
    # one that draws class c + 1 when asked for class c: a classifier trained on it is wrong
    swapped = classification_accuracy_score(x, (y + 1) % 3, test_x, test_y, 3, **options)
    assert swapped["accuracy"] < 0.1
    assert classification_accuracy_score(x, (y + 1) % 3, test_x, test_y, 3, **options) == swapped


# the evaluator --------------------------------------------------------------------------------


def test_evaluator_reports_the_new_measures_against_their_references():
    x, y = _band_images()
    test_x, test_y = _band_images(seed=1)
    ev = GANEvaluator.fit(x, y, test_x, test_y, 3, epochs=10, floor_samples=60)  # 10 steps
    ref = ev.reference()
    assert ref["classifier_test_accuracy"]["overall"] > 0.9
    assert ref["n_train"] == 120 and len(ref["intra_fid_floor"]["per_class"]) == 3
    floor_features = ev.extractor(ev.floor_x)
    assert ref["intra_fid_floor"] == intra_class_frechet_distance(
        ev.test_features, test_y, floor_features, ev.floor_y, 3
    )
    assert (ref["precision"], ref["recall"]) == tuple(
        precision_recall(ev.test_features, floor_features, k=3).values()
    )
    # "generated" = the real test set: no distance, full precision and recall
    out = ev.evaluate(test_x, test_y, cas=False)
    assert out["cas"] is None
    assert out["intra_fid"]["per_class"] == pytest.approx([0.0] * 3, abs=1e-3)
    assert (out["precision"], out["recall"]) == (1.0, 1.0)
    assert out["intra_fid_floor"] == ref["intra_fid_floor"]
    assert (out["real_precision"], out["real_recall"]) == (ref["precision"], ref["recall"])
    # "generated" = the real training set: the CAS classifier gets the real one's recipe and
    # number of steps, so it is the same network
    cas = ev.evaluate(x, y)["cas"]
    assert cas["accuracy"] == pytest.approx(ref["classifier_test_accuracy"]["overall"])
    assert cas["real_accuracy"] == ref["classifier_test_accuracy"]["overall"]
    assert (cas["n_train"], cas["real_n_train"], cas["epochs"]) == (120, 120, 10)
    assert ev.evaluate(x, (y + 1) % 3)["cas"]["accuracy"] < 0.1


def test_evaluator_survives_a_missing_class_and_refuses_too_few_images():
    x, y = _band_images()
    test_x, test_y = _band_images(seed=1)
    ev = GANEvaluator.fit(x, y, test_x, test_y, 3, epochs=1, floor_samples=60, cas_epochs=1)
    only_two = ev.evaluate(x[y < 2], y[y < 2])  # the generator never drew class 2
    assert only_two["intra_fid"]["per_class"][2] is None
    assert "class 2: 0 vector(s) in fake_features" in only_two["intra_fid"]["why_none"][2]
    assert only_two["cas"]["epochs"] == 1 and only_two["diversity"][2] is None
    too_few = r"need more than k=3 generated images \(precision and recall\), got 3"
    with pytest.raises(ValueError, match=too_few):
        ev.evaluate(x[:3], y[:3])
    with pytest.raises(ValueError, match=r"generated labels must be in \[0, 3\)"):
        ev.evaluate(x, y + 1)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        GANEvaluator(ev.classifier, x, y, test_x, test_y, k=0)
    with pytest.raises(ValueError, match="need more than k=3 real test images"):
        GANEvaluator(ev.classifier, x, y, test_x[:3], test_y[:3])
