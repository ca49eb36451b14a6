import pytest
import torch
from conftest import hook_count
from torch import nn

import auxhead


def test_list_layers_order_shapes_and_modes(cnn, x):
    cnn.train()
    cnn[5].eval()  # a frozen sub-module keeps its own mode
    table = auxhead.list_layers(cnn, x)
    assert table.names == ["0", "1", "1.0", "1.1", "2", "3", "3.0", "3.1", "4", "5", "6", "7"]
    # a block starts before its children
    assert table.names.index("1") < table.names.index("1.0") < table.names.index("1.1")
    shapes = {info.name: info.shape for info in table}
    assert shapes["1"] == (4, 8, 8, 8)
    assert shapes["3"] == (4, 16, 4, 4)
    assert shapes["5"] == (4, 32)
    assert cnn.training and not cnn[5].training
    assert hook_count(cnn) == 0


def test_list_layers_prints_a_table(cnn, x):
    text = str(auxhead.list_layers(cnn, x))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "type", "output", "shape", "channels"]
    assert any(line.split() == ["3", "Sequential", "4x16x4x4", "dim", "1"] for line in lines)
    assert any(line.split() == ["5", "Linear", "4x32"] for line in lines)


def test_list_layers_counts_reused_modules():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    calls = {i.name: i.calls for i in auxhead.list_layers(model, torch.randn(2, 3))}
    assert calls["1"] == 2  # "3" is the same module, named once by named_modules


def test_list_layers_sample_forms():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, u, v=None):
            return self.a(u) + (0 if v is None else v)

    model = TwoInputs()
    u = torch.randn(1, 2)
    assert auxhead.list_layers(model, (u, u)).names == ["a"]
    assert auxhead.list_layers(model, {"u": u, "v": u}).names == ["a"]


def test_list_layers_does_not_update_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    before = model[1].running_mean.clone()
    auxhead.list_layers(model, torch.randn(2, 1, 3, 3) * 10)
    torch.testing.assert_close(model[1].running_mean, before)


def test_layout_inside_a_layer_with_channels_comes_from_that_layer():
    class Square(nn.Module):  # (B, 4, 4, 4): every dimension could be the channels
        def forward(self, x):
            return x.reshape(-1, 4, 4, 4)

    class BatchNormAct(nn.BatchNorm2d):  # timm's BatchNormAct2d: its act runs on its output
        def __init__(self, channels):
            super().__init__(channels)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    model = nn.Sequential(Square(), BatchNormAct(4), nn.Flatten(), nn.Linear(64, 3))
    layouts = {i.name: i.layout for i in auxhead.list_layers(model, torch.randn(2, 64))}
    # "0" is read by the BatchNorm as (B, C, H, W); "1.act" has no neighbour but its parent
    assert layouts == {"0": "channels_first", "1": "channels_first", "1.act": "channels_first",
                       "2": None, "3": None}  # fmt: skip


def test_list_layers_marks_shared_modules_and_names_a_bad_sample():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    assert "ReLU (runs 2x: no head)" in str(auxhead.list_layers(model, torch.randn(2, 3)))
    with pytest.raises(ValueError, match=r"Sequential failed on the sample \[\(2, 5\)\]"):
        auxhead.list_layers(model, torch.randn(2, 5))
