import pytest
import torch

from auxhead.gan.augment import AUGMENTATIONS, DiffAugment

POLICIES = ["color", "translation", "cutout", "translation,cutout", "color,translation,cutout"]


def _seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# A plain, loop-by-loop reading of the paper's operations (Zhao et al. 2020, their
# DiffAugment_pytorch.py), drawing its random numbers from the global stream in the same order
# and shapes as that code does: the reference the vectorised module is checked against.


def _reference(x, policy, translation_ratio=0.125, cutout_ratio=0.5):
    for op in policy.split(","):
        b, _, h, w = x.shape
        if op == "color":
            x = x + (torch.rand(b, 1, 1, 1) - 0.5)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (torch.rand(b, 1, 1, 1) * 2) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (torch.rand(b, 1, 1, 1) + 0.5) + mean
        elif op == "translation":
            sh, sw = int(h * translation_ratio + 0.5), int(w * translation_ratio + 0.5)
            dy = torch.randint(-sh, sh + 1, (b, 1, 1))
            dx = torch.randint(-sw, sw + 1, (b, 1, 1))
            out = torch.zeros_like(x)
            for n in range(b):
                for i in range(h):
                    for j in range(w):
                        si, sj = i + int(dy[n]), j + int(dx[n])
                        if 0 <= si < h and 0 <= sj < w:
                            out[n, :, i, j] = x[n, :, si, sj]
            x = out
        else:
            ch, cw = int(h * cutout_ratio + 0.5), int(w * cutout_ratio + 0.5)
            oy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1))
            ox = torch.randint(0, w + (1 - cw % 2), (b, 1, 1))
            mask = torch.ones(b, h, w)
            for n in range(b):
                for i in range(ch):
                    for j in range(cw):
                        r = min(max(i + int(oy[n]) - ch // 2, 0), h - 1)
                        c = min(max(j + int(ox[n]) - cw // 2, 0), w - 1)
                        mask[n, r, c] = 0
            x = x * mask[:, None]
    return x


@pytest.mark.parametrize("policy", POLICIES)
def test_matches_the_papers_operations(policy):
    x = torch.rand(4, 3, 12, 10) * 2 - 1
    torch.manual_seed(3)
    expected = _reference(x, policy)
    torch.manual_seed(3)
    torch.testing.assert_close(DiffAugment(policy)(x), expected)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3), (64, 3)])
def test_keeps_shapes_and_is_repeatable_with_a_seed(policy, size, channels):
    x = torch.rand(5, channels, size, size) * 2 - 1
    augment = DiffAugment(policy)
    a = augment(x, generator=_seeded(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, augment(x, generator=_seeded(1)))
    assert not torch.equal(a, augment(x, generator=_seeded(2)))


@pytest.mark.parametrize("policy", POLICIES)
def test_is_differentiable(policy):
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    augment = DiffAugment(policy)
    # with the random draws fixed, each operation is affine in the images
    assert torch.autograd.gradcheck(lambda t: augment(t, generator=_seeded(0)), (x,))
    augment(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_shifts_each_image_within_the_limit_and_fills_zeros():
    x = torch.rand(16, 1, 16, 16) + 1  # all pixels > 0, so zeros mark the fill
    out = DiffAugment("translation")(x, generator=_seeded(0))
    shifts = set()
    for n in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)  # int(16 / 8 + 0.5) = 2
            if torch.equal(out[n], _shifted(x[n], dy, dx))
        ]
        assert len(found) == 1, n
        shifts.add(found[0])
    assert len(shifts) > 3  # drawn per image


def _shifted(image, dy, dx):
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = image[:, i + dy, j + dx]
    return out


def test_cutout_zeroes_one_square_of_half_the_side_clipped_at_the_edges():
    x = torch.ones(32, 1, 16, 16)
    out = DiffAugment("cutout")(x, generator=_seeded(0))
    for image in out[:, 0]:
        rows = (image == 0).any(dim=1).nonzero().flatten()
        cols = (image == 0).any(dim=0).nonzero().flatten()
        zeros = image == 0
        assert zeros[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # a block
        assert int(zeros.sum()) == len(rows) * len(cols)
        assert 4 <= len(rows) <= 8 and 4 <= len(cols) <= 8  # 8 x 8, at worst half off the edge
    assert (out == 1).float().mean() > 0.7


def test_policy_is_validated():
    assert DiffAugment(" color , cutout").policy == "color,cutout"
    for bad in ("", "flip", "translation,rotate"):
        with pytest.raises(ValueError, match=r"policy must name operations from \['color'"):
            DiffAugment(bad)
    with pytest.raises(ValueError, match="cutout_ratio must be in"):
        DiffAugment(cutout_ratio=2.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        DiffAugment()(torch.rand(3, 8, 8))
    assert set(AUGMENTATIONS) == {"color", "translation", "cutout"}
