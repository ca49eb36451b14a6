import pytest
import torch

from auxhead.gan.models import CONDITIONINGS, Discriminator, Generator, make_grid

# The outputs each conditioning adds to "source", with their widths (K = 3 classes).
OUTPUTS = {
    "ac": {"class": 3},
    "tac": {"class": 3, "twin": 3},
    "adc": {"class": 3, "fake_class": 3},
    "reacgan": {"class": 3, "embedding": 16},
    "projection": {},
}


def _disc(conditioning="ac", size=28, channels=1, **kwargs):
    return Discriminator(
        3, size=size, channels=channels, width=4, conditioning=conditioning, embed_dim=16,
        **kwargs,
    )  # fmt: skip


def test_every_conditioning_is_covered():
    assert sorted(OUTPUTS) == sorted(CONDITIONINGS)


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_for_every_size(size, channels):
    g = Generator(3, latent_dim=8, size=size, channels=channels, width=4)
    d = _disc("tac", size, channels)
    images = g(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    out = d(images)
    assert out["source"].shape == (5,)
    assert out["class"].shape == (5, 3)
    assert out["twin"].shape == (5, 3)


@pytest.mark.parametrize("conditioning", sorted(OUTPUTS))
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_each_conditioning_has_named_outputs_and_gradients(conditioning, spectral_norm):
    d = _disc(conditioning, spectral_norm=spectral_norm)
    images = (torch.rand(6, 1, 28, 28) * 2 - 1).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = d(images, labels)
    assert sorted(out) == sorted(["source", *OUTPUTS[conditioning]])
    assert out["source"].shape == (6,)
    for key, width in OUTPUTS[conditioning].items():
        assert out[key].shape == (6, width), key
    sum(o.sum() for o in out.values()).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    no_grad = [name for name, p in d.named_parameters() if p.grad is None]
    assert no_grad == []


def test_reacgan_outputs_unit_embeddings_and_cosines_to_the_proxies():
    d = _disc("reacgan")
    out = d(torch.rand(4, 1, 28, 28))
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(4))
    proxies = d.proxies.weight / d.proxies.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out["class"], out["embedding"] @ proxies.T)
    assert out["class"].abs().max() <= 1 + 1e-6


def test_projection_adds_the_class_embedding_inner_product():
    d = _disc("projection").eval()
    images, labels = torch.rand(4, 1, 28, 28), torch.tensor([0, 2, 1, 2])
    h = d.trunk(images)
    expected = d.source(h).squeeze(1) + (d.embed.weight[labels] * h).sum(1)
    torch.testing.assert_close(d(images, labels)["source"], expected)
    # the label changes the source logit
    assert not torch.allclose(d(images, labels)["source"], d(images, labels.flip(0))["source"])
    with pytest.raises(ValueError, match=r"needs the labels: discriminator\(images, labels\)"):
        d(images)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        d(images, torch.tensor([0, 1, 2, 3]))


def test_adc_splits_one_2k_classifier_into_real_and_fake_halves():
    d = _disc("adc")
    assert d.classifier.out_features == 6
    images = torch.rand(2, 1, 28, 28)
    out = d(images)
    logits = d.classifier(d.trunk(images))
    torch.testing.assert_close(torch.cat([out["class"], out["fake_class"]], 1), logits)


def _largest_singular_value(weight):
    return torch.linalg.matrix_norm(weight.reshape(weight.shape[0], -1), ord=2)


def test_spectral_norm_bounds_every_weight_and_drops_batchnorm():
    torch.manual_seed(0)
    d = _disc("projection", spectral_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    normed = [m for m in d.modules() if hasattr(m, "parametrizations")]
    # 2 convolutions, the source head, the projection embedding
    assert len(normed) == 4
    with torch.no_grad():  # weights far from norm 1 (DCGAN's init has them all below 1)
        for module in normed:
            module.parametrizations.weight.original.normal_(0, 1)
    raw = [_largest_singular_value(m.parametrizations.weight.original) for m in normed]
    assert min(raw) > 5  # unnormalised, every largest singular value is well above 1 ...
    d.train()
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8) % 3
    for _ in range(30):  # each training forward runs one power iteration
        d(images, labels)
    for module in normed:  # ... normalised, every one is 1
        sigma = _largest_singular_value(module.weight)
        torch.testing.assert_close(sigma, torch.tensor(1.0), atol=2e-3, rtol=0)


def test_spectral_norm_is_off_by_default_and_keeps_batchnorm():
    d = _disc()
    assert not any(hasattr(m, "parametrizations") for m in d.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())


def test_discriminator_default_is_ac_with_two_heads():
    out = Discriminator(4, width=4)(torch.rand(2, 1, 28, 28))
    assert sorted(out) == ["class", "source"]


def test_generate_is_in_unit_range_repeatable_and_restores_mode():
    g = Generator(3, latent_dim=8, width=4).train()
    a = g.generate([0, 1, 2, 2], seed=3)
    assert a.shape == (4, 1, 28, 28)
    assert a.min() >= 0 and a.max() <= 1
    assert g.training
    torch.testing.assert_close(a, g.generate(torch.tensor([0, 1, 2, 2]), seed=3))
    noise = torch.randn(4, 8)
    torch.testing.assert_close(
        g.generate([0, 1, 2, 2], noise=noise), (g.eval()(noise, torch.tensor([0, 1, 2, 2])) + 1) / 2
    )


def test_generate_rejects_bad_labels_and_noise():
    g = Generator(3, latent_dim=8, width=4)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\).*\[3\]"):
        g.generate([0, 3])
    with pytest.raises(ValueError, match=r"\[-1\]"):
        g.generate([-1])
    with pytest.raises(ValueError, match="class indices"):
        g.generate(torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"noise must have shape \(2, 8\)"):
        g.generate([0, 1], noise=torch.randn(2, 5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "at least 2 classes"),
        ({"size": 30}, r"size must be one of \[28, 32, 64\], got 30"),
        ({"channels": 2}, "channels must be 1"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    args = {"num_classes": 3, "size": 28, "channels": 1, **kwargs}
    num_classes = args.pop("num_classes")
    with pytest.raises(ValueError, match=match):
        Generator(num_classes, **args)
    with pytest.raises(ValueError, match=match):
        Discriminator(num_classes, **args)


def test_unknown_conditioning_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"conditioning must be one of \['ac', 'adc'.*got 'cgan'"):
        Discriminator(3, conditioning="cgan")


def test_signatures_show_keyword_only_configuration():
    import inspect

    for cls in (Generator, Discriminator):
        params = list(inspect.signature(cls).parameters.values())
        assert params[0].name == "num_classes"
        assert all(p.kind is p.KEYWORD_ONLY for p in params[1:]), cls


def test_from_checkpoint_rebuilds_the_generator(tmp_path):
    g = Generator(3, latent_dim=8, width=4)
    config = {"latent_dim": 8, "num_classes": 3, "size": 28, "channels": 1, "width": 4}
    torch.save({"config": config, "state_dict": g.state_dict()}, tmp_path / "generator.pth")
    loaded = Generator.from_checkpoint(tmp_path / "generator.pth")
    torch.testing.assert_close(loaded.generate([0, 2], seed=1), g.generate([0, 2], seed=1))
    with pytest.raises(ValueError, match=r"lacks \['state_dict'\]"):
        Generator.from_checkpoint({"config": config})


def test_sample_grid_has_one_row_per_class_and_shares_noise_by_column():
    g = Generator(3, latent_dim=8, width=4)
    grid = g.sample_grid(4, seed=0)
    assert grid.shape == (1, 3 * 30 + 2, 4 * 30 + 2)
    # column 0 of row 1 is class 1 drawn with the first noise vector
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    expected = g.generate([1], noise=noise[:1])[0]
    torch.testing.assert_close(grid[:, 32:60, 2:30], expected)


def test_make_grid_places_images_row_by_row():
    images = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    grid = make_grid(images, 3, pad=1, value=-1)
    assert grid.shape == (1, 2 * 3 + 1, 3 * 3 + 1)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 4] == 1 and grid[0, 1, 7] == 2
    assert grid[0, 4, 1] == 3 and grid[0, 4, 4] == 4
    assert grid[0, 4, 7] == -1  # the empty slot
    with pytest.raises(ValueError, match="ncol"):
        make_grid(images, 0)
