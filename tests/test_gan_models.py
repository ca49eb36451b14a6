import pytest
import torch

from auxhead.gan.models import Discriminator, Generator, make_grid


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_for_every_size(size, channels):
    g = Generator(8, 3, size, channels, width=4)
    d = Discriminator(3, size, channels, width=4, twin=True)
    images = g(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    out = d(images)
    assert out["source"].shape == (5,)
    assert out["class"].shape == (5, 3)
    assert out["twin"].shape == (5, 3)


def test_discriminator_without_twin_has_two_heads():
    out = Discriminator(4, 28, 1, width=4)(torch.rand(2, 1, 28, 28))
    assert sorted(out) == ["class", "source"]


def test_generate_is_in_unit_range_repeatable_and_restores_mode():
    g = Generator(8, 3, 28, 1, width=4).train()
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
    g = Generator(8, 3, 28, 1, width=4)
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
        ({"n_classes": 1}, "at least 2 classes"),
        ({"img_size": 30}, r"img_size must be one of \[28, 32, 64\], got 30"),
        ({"channels": 2}, "channels must be 1"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    args = {"n_classes": 3, "img_size": 28, "channels": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        Generator(8, args["n_classes"], args["img_size"], args["channels"])
    with pytest.raises(ValueError, match=match):
        Discriminator(args["n_classes"], args["img_size"], args["channels"])


def test_sample_grid_has_one_row_per_class_and_shares_noise_by_column():
    g = Generator(8, 3, 28, 1, width=4)
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
