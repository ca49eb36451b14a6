import warnings

import pytest
import torch
from torch import nn

from auxhead.data import ImageData, dataloaders
from auxhead.gan.learner import acgan_learner
from auxhead.gan.metrics import SmallCNN, mean_pairwise_distance
from auxhead.gan.models import Discriminator, Generator
from auxhead.gan.monitor import ClassCollapse, ClassCollapseWarning, ClassMonitor

LEVELS = torch.tensor([0.2, 0.5, 0.8])  # each class's mean brightness, in [0, 1]


def _real(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = (LEVELS[y].view(-1, 1, 1, 1) + 0.05 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return x, y


class _BrightnessClassifier(nn.Module):
    """Labels an image by the nearest class brightness; its features are the pixels."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(1, 1)  # a parameter, so the monitor can find the device

    def features(self, images):
        return images.flatten(1)

    def forward(self, images):
        return -(images.mean(dim=(1, 2, 3))[:, None] - LEVELS).abs()  # (N, 3)


class _ToyGenerator(Generator):
    """Draws each class at its brightness with noise from z, except that class 1 has
    collapsed to one constant image and class 2 comes out at class 0's brightness."""

    def forward(self, noise, labels):
        spread = torch.tensor([0.05, 0.0, 0.05], device=noise.device)[labels]
        level = LEVELS.to(noise.device)[torch.where(labels == 2, 0, labels)]
        images = level.view(-1, 1, 1, 1) + spread.view(-1, 1, 1, 1) * noise.view(-1, 1, 28, 28)
        # the output depends on a weight, so the generator step has something to move
        return images.clamp(0, 1) * 2 - 1 + 0 * self.embed.weight.sum()


@pytest.fixture
def data():
    x, y = _real()
    return ImageData("toy", ["low", "mid", "high"], x, y, x[:24].clone(), y[:24].clone())


def _learner(data, generator, monitor, **kwargs):
    dls = dataloaders(data, bs=16, device="cpu")
    disc = Discriminator(3, width=4)
    return acgan_learner(dls, generator, disc, cbs=[monitor], **kwargs)


def test_a_collapsed_class_is_named_in_a_warning_columns_and_events(data):
    classifier = _BrightnessClassifier().train()
    real_x, real_y = _real(seed=1)
    monitor = ClassMonitor(classifier, real_x, real_y, n_per_class=20)
    learn = _learner(data, _ToyGenerator(3, latent_dim=28 * 28, width=1), monitor)
    with pytest.warns(ClassCollapseWarning) as caught, learn.no_bar(), learn.no_logging():
        learn.fit(3)
    messages = [str(w.message) for w in caught]
    assert any("class 'mid' (index 1) collapsed at epoch 1: diversity 0.00" in m for m in messages)
    assert any("class 'high' (index 2) collapsed at epoch 1" in m for m in messages)
    assert any("no sample recognised as the class; 0% of its samples" in m for m in messages)
    assert not any("'low'" in m for m in messages)
    # one warning and one event per collapse, not per epoch: both stay collapsed to the end
    assert len(messages) == 2
    assert [(c.epoch, c.last_epoch, c.class_name) for c in monitor.collapses] == [
        (1, 3, "mid"), (1, 3, "high")
    ]  # fmt: skip
    mid = monitor.collapses[0]
    assert isinstance(mid, ClassCollapse) and mid.diversity_ratio == 0 and mid.recognised == 1
    assert mid.as_dict()["reason"].startswith("diversity 0.00 of the real data's (< 0.3)")
    # the Recorder's columns: the worst class's figures
    names = list(learn.recorder.metric_names)
    assert names[-3:] == ["worst_recognised", "worst_diversity", "time"]
    worst_recognised, worst_diversity = learn.recorder.values[-1][-2:]
    assert worst_recognised == 0 and worst_diversity == 0
    # per class: class 0 is as varied as the real data (same noise level), all recognised
    row = monitor.history[-1]
    assert row["epoch"] == 3 and row["recognised"] == [1.0, 1.0, 0.0]
    assert 0.8 < row["diversity_ratio"][0] < 1.25
    # the columns leave with the fit; the classifier is back in training mode
    assert "worst_diversity" not in [getattr(m, "name", "") for m in learn.metrics]
    assert classifier.training


def test_collapses_are_looked_for_once_the_classes_are_drawn_at_all(data):
    # The toy generator draws 2 of 3 classes recognisably: a mean of 0.67
    monitor = ClassMonitor(_BrightnessClassifier(), *_real(seed=1), start_when_recognised=0.9)
    learn = _learner(data, _ToyGenerator(3, latent_dim=28 * 28, width=1), monitor)
    with warnings.catch_warnings(), learn.no_bar(), learn.no_logging():
        warnings.simplefilter("error", ClassCollapseWarning)
        learn.fit(1)
    assert monitor.collapses == [] and monitor.checking_since is None
    assert learn.recorder.values[-1][-2:] == [0, 0]  # the columns are there all the same
    monitor = ClassMonitor(_BrightnessClassifier(), *_real(seed=1), start_when_recognised=0.6)
    learn = _learner(data, _ToyGenerator(3, latent_dim=28 * 28, width=1), monitor)
    with pytest.warns(ClassCollapseWarning), learn.no_bar(), learn.no_logging():
        learn.fit(1)
    assert monitor.checking_since == 1 and len(monitor.collapses) == 2


class _MidFlickers(_ToyGenerator):
    """Class 1 has the real data's variety unless `collapsed`; class 2 is drawn right."""

    collapsed = False

    def forward(self, noise, labels):
        spread = torch.tensor([0.05, 0.0 if self.collapsed else 0.05, 0.05], device=noise.device)
        level = LEVELS.to(noise.device)[labels]
        images = level.view(-1, 1, 1, 1) + spread[labels].view(-1, 1, 1, 1) * noise.view(
            -1, 1, 28, 28
        )
        return images.clamp(0, 1) * 2 - 1 + 0 * self.embed.weight.sum()


def test_a_class_that_recovers_and_collapses_again_warns_again(data):
    monitor = ClassMonitor(_BrightnessClassifier(), *_real(seed=1), class_names=["a", "b", "c"])
    generator = _MidFlickers(3, latent_dim=28 * 28, width=1)
    _learner(data, generator, monitor)
    monitor.before_fit()
    warned = []
    for epoch, collapsed in enumerate([True, True, False, True, True, True], start=1):
        generator.collapsed = collapsed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor.measure(epoch)
        warned += [epoch for w in caught if issubclass(w.category, ClassCollapseWarning)]
    assert warned == [1, 4]
    assert [(c.epoch, c.last_epoch, c.class_name) for c in monitor.collapses] == [
        (1, 2, "b"), (4, 6, "b")
    ]  # fmt: skip


def test_diversity_ratio_by_hand(data):
    classifier = _BrightnessClassifier()
    real_x, real_y = _real(seed=1)
    monitor = ClassMonitor(classifier, real_x, real_y, n_per_class=4, max_real_per_class=5)
    generator = _ToyGenerator(3, latent_dim=28 * 28, width=1)
    learn = _learner(data, generator, monitor)
    monitor.before_fit()
    with pytest.warns(ClassCollapseWarning):
        row = monitor.measure(epoch=7)
    fake = generator.generate(monitor._labels, noise=monitor._noise)
    real0 = real_x[real_y == 0][:5]
    expected = mean_pairwise_distance(fake[:4].flatten(1)) / mean_pairwise_distance(
        real0.flatten(1)
    )
    assert row["diversity_ratio"][0] == pytest.approx(expected)
    assert learn.model.sampler is generator


def test_the_monitor_does_not_change_training(data):
    def trained(with_monitor):
        torch.manual_seed(0)
        generator = Generator(3, latent_dim=8, width=4)
        classifier = SmallCNN(3, 1, width=4, feature_dim=8)
        monitor = ClassMonitor(classifier, *_real(seed=1), n_per_class=3)
        dls = dataloaders(data, bs=16, device="cpu", seed=0)
        cbs = [monitor] if with_monitor else []
        learn = acgan_learner(dls, generator, Discriminator(3, width=4), cbs=cbs, ema_decay=0.9)
        with warnings.catch_warnings(), learn.no_bar(), learn.no_logging():
            warnings.simplefilter("ignore", ClassCollapseWarning)  # an untrained generator
            learn.fit(1)
        return learn.model.state_dict(), monitor

    plain, _ = trained(False)
    monitored, monitor = trained(True)
    assert len(monitor.history) == 1 and len(monitor.history[0]["recognised"]) == 3
    for key in plain:
        torch.testing.assert_close(plain[key], monitored[key])


def test_bad_arguments_are_refused(data):
    real_x, real_y = _real()
    classifier = _BrightnessClassifier()
    with pytest.raises(ValueError, match="n_per_class and max_real_per_class must be >= 2"):
        ClassMonitor(classifier, real_x, real_y, n_per_class=1)
    with pytest.raises(ValueError, match="48 real images but 3 labels"):
        ClassMonitor(classifier, real_x, real_y[:3])
    with pytest.raises(ValueError, match="min_diversity and start_when_recognised must be in"):
        ClassMonitor(classifier, real_x, real_y, min_diversity=2)
    monitor = ClassMonitor(classifier, real_x[:4], torch.tensor([0, 0, 1, 2]))
    learn = _learner(data, Generator(3, latent_dim=8, width=4), monitor)
    with (
        pytest.raises(ValueError, match=r"at least 2 real images .* classes \[1, 2\]"),
        learn.no_bar(),
        learn.no_logging(),
    ):
        learn.fit(1)
