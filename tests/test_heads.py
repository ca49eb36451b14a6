from unittest.mock import patch

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxhead import HEAD_KINDS, InceptionHead, LinearHead, SDNHead, build_head
from auxhead.heads import DENSE_KINDS

SHAPES = [(2, 32, 7, 7), (2, 17, 48), (2, 64)]
POOLED_KINDS = sorted(set(HEAD_KINDS) - set(DENSE_KINDS))


@pytest.mark.parametrize("kind", POOLED_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_every_kind_takes_maps_sequences_and_vectors(kind, shape):
    head = build_head(kind, shape, 10)
    assert head(torch.randn(shape)).shape == (2, 10)


def test_inception_head_is_scaled_to_the_tap():
    small = InceptionHead((1, 64, 8, 8), 10)
    assert small.conv.conv.out_channels == 16 and small.fc1.out_features == 128
    assert InceptionHead((1, 16, 8, 8), 10).conv.conv.out_channels == 8
    big = InceptionHead((1, 512, 14, 14), 10)
    assert big.conv.conv.out_channels == 128 and big.fc1.in_features == 2048
    assert big.fc1.out_features == 1024 and big.dropout.p == 0.7


def test_linear_head_is_global_average_pool_then_linear():
    head = LinearHead((1, 3, 4, 4), 2)
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(head(x), head.fc(x.mean(dim=(2, 3))))


def test_sdn_head_mixes_max_and_average_pooling():
    head = SDNHead((1, 4, 8, 8), 3)
    assert head.grid == (4, 4)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        head.alpha.fill_(50.0)  # sigmoid -> 1: pure max pooling
    expected = head.fc(torch.flatten(nn.functional.adaptive_max_pool2d(x, 4), 1))
    torch.testing.assert_close(head(x), expected)
    # a wide map keeps at most ~4096 features
    assert SDNHead((1, 1024, 16, 16), 3).grid == (2, 2)


def test_build_head_errors():
    with pytest.raises(ValueError, match="unknown head kind 'mlp'"):
        build_head("mlp", (1, 4), 2)
    with pytest.raises(ValueError, match=r"2, 3 or 4 dimensions .* got shape \(2, 3, 4, 5, 6\)"):
        build_head("linear", (2, 3, 4, 5, 6), 2)
    with pytest.raises(TypeError, match="returned int"):
        build_head(lambda shape, n: 3, (1, 4), 2)


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (5, 3), (13, 6), (4, 4), (1, 1)])
def test_sdn_max_pooling_equals_adaptive_max_pool2d(size):
    """The sdn head pools in ONNX-exportable operators, value for value as torch's own."""
    from auxhead.heads import _adaptive_max_pool2d

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    for grid in [(1, 1), (2, 3), (3, 3), (4, 4)]:
        if grid[0] <= size[0] and grid[1] <= size[1]:
            expected = F.adaptive_max_pool2d(x, grid)
            assert torch.equal(_adaptive_max_pool2d(x, grid), expected)
            with patch("torch.compiler.is_exporting", return_value=True):  # the traced path
                assert torch.equal(_adaptive_max_pool2d(x, grid), expected)
