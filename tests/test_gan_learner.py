import pytest
import torch

from auxhead.data import ImageData, dataloaders
from auxhead.gan.augment import DiffAugment
from auxhead.gan.learner import ACGANLearner, acgan_learner
from auxhead.gan.losses import ACGANLoss
from auxhead.gan.models import Discriminator, Generator


def _data(n=48, size=28, channels=1, classes=("a", "b", "c")):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, channels, size, size, generator=g)
    y = torch.arange(n) % len(classes)
    return ImageData("toy", list(classes), x, y, x[:16].clone(), y[:16].clone())


def _nets(num_classes=3, size=28, channels=1, conditioning="ac", **disc):
    return (
        Generator(num_classes, latent_dim=8, size=size, channels=channels, width=4),
        Discriminator(
            num_classes, size=size, channels=channels, width=4, conditioning=conditioning,
            embed_dim=8, **disc,
        ),
    )  # fmt: skip


@pytest.fixture
def dls():
    return dataloaders(_data(), bs=16, device="cpu")


@pytest.mark.parametrize(("tac", "mode_seeking"), [(False, 0.0), (True, 0.2)])
def test_learner_trains_end_to_end(dls, tmp_path, tac, mode_seeking):
    g, d = _nets(conditioning="tac" if tac else "ac")
    loss = ACGANLoss(conditioning="tac" if tac else "ac", mode_seeking=mode_seeking)
    learn = acgan_learner(dls, g, d, loss_func=loss, grid_dir=tmp_path / "grids", grid_per_class=2)
    assert isinstance(learn, ACGANLearner) and learn.loss_func.tac == tac
    g_before = [p.detach().clone() for p in g.parameters()]
    d_before = [p.detach().clone() for p in d.parameters()]
    with learn.no_bar(), learn.no_logging():
        learn.fit(2)
    names = list(learn.recorder.metric_names)
    assert names[:3] == ["epoch", "train_loss", "valid_loss"]
    assert names[3:7] == ["d_loss", "g_loss", "acc_real", "acc_fake"]
    assert len(learn.recorder.values) == 2
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values)
    assert all(0 <= acc <= 1 for acc in learn.recorder.values[-1][4:6])
    assert any(not torch.equal(a, p) for a, p in zip(g_before, g.parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(d_before, d.parameters(), strict=True))
    assert all(p.requires_grad for p in d.parameters())  # unfrozen after the generator step
    pngs = sorted(p.name for p in (tmp_path / "grids").iterdir())
    assert pngs == ["grid_epoch_001.png", "grid_epoch_002.png"]


def test_each_step_moves_only_its_own_network(dls):
    g, d = _nets()
    learn = acgan_learner(dls, g, d)
    learn.create_opt()
    learn.opt.set_hypers(lr=1e-3)
    learn.model.train()
    snapshots = [([p.clone() for p in g.parameters()], [p.clone() for p in d.parameters()])]
    step = learn.opt.step

    def step_and_snapshot():
        step()
        snapshots.append(([p.clone() for p in g.parameters()], [p.clone() for p in d.parameters()]))

    learn.opt.step = step_and_snapshot
    x, y = dls.one_batch()
    learn.acgan_trainer._train_step(
        x.as_subclass(torch.Tensor) * 2 - 1, y.as_subclass(torch.Tensor)
    )
    (g0, d0), (g1, d1), (g2, d2) = snapshots  # before, after the D step, after the G step

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    assert same(g0, g1) and not same(d0, d1)  # discriminator step
    assert same(d1, d2) and not same(g1, g2)  # generator step
    stats = learn.acgan_trainer.stats
    assert stats["d_loss"] > 0 and 0 <= stats["acc_real"] <= 1 and 0 <= stats["acc_fake"] <= 1


def test_save_load_roundtrip_and_sampling(dls, tmp_path):
    g, d = _nets()
    learn = acgan_learner(dls, g, d, path=tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    learn.save("gan")
    images = learn.generate([0, 1, 2], seed=1)
    assert images.shape == (3, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert learn.sample_grid(2).shape == (1, 3 * 30 + 2, 2 * 30 + 2)

    g2, d2 = _nets()
    other = acgan_learner(dls, g2, d2, path=tmp_path)
    other.load("gan")
    torch.testing.assert_close(other.generate([0, 1, 2], seed=1), images)
    for a, b in zip(d.state_dict().values(), d2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        learn.generate([3])


def test_mismatches_are_clear_errors(dls):
    with pytest.raises(ValueError, match="the data has 3 classes but the networks have 4"):
        acgan_learner(dls, *_nets(num_classes=4))
    with pytest.raises(ValueError, match="disagree on size: 28 vs 32"):
        acgan_learner(dls, Generator(3, size=28), Discriminator(3, size=32))
    with pytest.raises(
        ValueError, match=r"ACGANLoss\(conditioning='tac'\) does not fit .* conditioning='ac'"
    ):
        acgan_learner(dls, *_nets(), loss_func=ACGANLoss(conditioning="tac"))
    one_class = dataloaders(_data(classes=("a",)), bs=16, device="cpu")
    with pytest.raises(ValueError, match="1 class"):
        acgan_learner(one_class, *_nets())
    learn = acgan_learner(dls, *_nets(size=32))
    with (
        pytest.raises(
            ValueError, match=r"images are \(1, 28, 28\) but the networks make \(1, 32, 32\)"
        ),
        learn.no_bar(),
        learn.no_logging(),
    ):
        learn.fit(1)
    rgb = acgan_learner(dls, *_nets(channels=3))
    with pytest.raises(ValueError, match="channels=1"), rgb.no_bar(), rgb.no_logging():
        rgb.fit(1)


# The options: conditioning variants, spectral norm, hinge loss, DiffAugment, EMA ----------------


@pytest.mark.parametrize(
    ("conditioning", "options"),
    [
        ("ac", {"spectral_norm": True, "adversarial": "hinge"}),
        ("tac", {"augment": "color,translation,cutout"}),
        ("adc", {"ema_decay": 0.99}),
        ("reacgan", {"spectral_norm": True, "adversarial": "hinge", "augment": "translation"}),
        ("projection", {"spectral_norm": True, "ema_decay": 0.9, "augment": "cutout"}),
    ],
)
def test_every_variant_trains_end_to_end(dls, conditioning, options):
    options = dict(options)
    g, d = _nets(conditioning=conditioning, spectral_norm=options.pop("spectral_norm", False))
    loss = ACGANLoss(conditioning=conditioning, adversarial=options.pop("adversarial", "bce"))
    learn = acgan_learner(dls, g, d, loss_func=loss, **options)
    d_before = [p.detach().clone() for p in d.parameters()]
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    names = list(learn.recorder.metric_names)
    if conditioning == "projection":  # no classifier, so no class accuracy columns
        assert names[3:] == ["d_loss", "g_loss", "time"]
    else:
        assert names[3:7] == ["d_loss", "g_loss", "acc_real", "acc_fake"]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in learn.recorder.values)
    assert any(not torch.equal(a, p) for a, p in zip(d_before, d.parameters(), strict=True))
    assert learn.generate([0, 1, 2]).shape == (3, 1, 28, 28)


def test_default_loss_follows_the_discriminator(dls):
    learn = acgan_learner(dls, *_nets(conditioning="reacgan"))
    assert learn.loss_func == ACGANLoss(conditioning="reacgan")


class _CountingAugment(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images):
        self.calls.append(images.requires_grad)
        return images.flip(-1)


def test_augment_sees_every_discriminator_input_in_training_only(dls):
    augment = _CountingAugment()
    learn = acgan_learner(dls, *_nets(), augment=augment)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
    batches = len(dls.train)
    # per training batch: real, generated (detached) for D, generated (with graph) for G
    assert augment.calls == [False, False, True] * batches
    by_policy = acgan_learner(dls, *_nets(), augment="cutout").acgan_trainer.augment
    assert isinstance(by_policy, DiffAugment) and by_policy.policy == "cutout"


def test_ema_samples_updates_once_per_generator_step_and_saves(dls, tmp_path):
    g, d = _nets()
    learn = acgan_learner(dls, g, d, ema_decay=0.9, path=tmp_path)
    ema = learn.model.generator_ema
    assert learn.sampler is ema.module and learn.sampler is not g
    with learn.no_bar(), learn.no_logging():
        learn.fit(2)
    assert int(ema.n_averaged) == 2 * len(dls.train)
    images = learn.generate([0, 1, 2], seed=1)
    torch.testing.assert_close(images, ema.module.generate([0, 1, 2], seed=1))
    assert not torch.allclose(images, g.generate([0, 1, 2], seed=1))  # not the raw generator
    learn.save("gan")
    other = acgan_learner(dls, *_nets(), ema_decay=0.9, path=tmp_path)
    other.load("gan")
    torch.testing.assert_close(other.generate([0, 1, 2], seed=1), images)
    assert int(other.model.generator_ema.n_averaged) == 2 * len(dls.train)
    # without an EMA the learner samples from the generator itself
    plain = acgan_learner(dls, *_nets())
    assert plain.sampler is plain.generator and plain.model.generator_ema is None


def test_save_image_replaces_the_file_whole(tmp_path, monkeypatch):
    """An interrupted save leaves the previous PNG and no temporary file."""
    from PIL import Image

    from auxhead.gan.learner import save_image

    path = save_image(torch.zeros(1, 4, 4), tmp_path / "grid.png")
    assert Image.open(path).size == (4, 4)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(torch.ones(1, 8, 8), path)
    monkeypatch.undo()
    assert Image.open(path).size == (4, 4) and sorted(p.name for p in tmp_path.iterdir()) == [
        "grid.png"
    ]
