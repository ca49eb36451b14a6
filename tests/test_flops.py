"""FLOP counts of exits, against hand-computed numbers: a Linear(i, o) costs 2 * i * o FLOPs per
sample (FlopCounterMode counts a multiply-add as 2); activations and norms count zero."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import auxhead
from auxhead.exits import exit_flops, flop_profile
from auxhead.exits._flops import count_flops


def mlp() -> auxhead.AuxModel:
    # backbone: 4 -> 8 -> 8 -> 3; linear heads 8 -> 3 at both ReLUs
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    return auxhead.attach(model, ["1", "3"], head="linear", sample=torch.randn(2, 4))


def test_count_flops():
    layer = nn.Linear(4, 8)
    flops, output = count_flops(layer, torch.randn(5, 4))
    assert flops == 2 * 5 * 4 * 8
    assert output.shape == (5, 8)


@pytest.mark.parametrize("batch", [1, 7])
def test_exit_flops_by_hand(batch):
    flops = exit_flops(mlp(), torch.randn(batch, 4))
    assert flops == {
        "1": 2 * 4 * 8 + 2 * 8 * 3,  # first Linear + head
        "3": 2 * (4 * 8 + 8 * 8) + 2 * 8 * 3,  # two Linears + head
        "main": 2 * (4 * 8 + 8 * 8 + 8 * 3),  # the whole model, no heads
    }


def test_profile_and_exit_costs():
    profile = flop_profile(mlp(), torch.randn(3, 4))
    assert profile.backbone == {"1": 64, "3": 192}
    assert profile.heads == {"1": 48, "3": 48}
    assert profile.full == 240
    # leaving at an exit pays for every head that ran on the way
    assert profile.exit_costs([True, True]) == [64 + 48, 192 + 96, 240 + 96]
    assert profile.exit_costs([False, True]) == [64, 192 + 48, 240 + 48]
    assert profile.exit_costs([False, False]) == [64, 192, 240]
    assert profile.direct_costs() == [64 + 48, 192 + 48, 240]


def test_counting_leaves_the_model_as_it_was():
    aux = mlp()
    aux.train()
    hooks = [len(module._forward_hooks) for module in aux.model]
    exit_flops(aux, torch.randn(2, 4))
    assert aux.training and all(module.training for module in aux.modules())
    assert [len(module._forward_hooks) for module in aux.model] == hooks
    assert aux.aux_outputs == {}


def test_resnet_exits_cost_less_than_the_model():
    torch.manual_seed(0)
    model = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], 5)
    x = torch.randn(2, 3, 32, 32)
    aux = auxhead.attach(model, ["layer1", "layer2", "layer3"], head="linear", sample=x)
    flops = exit_flops(aux, x)
    assert list(flops) == ["layer1", "layer2", "layer3", "main"]
    with torch.no_grad():
        assert flops["main"] == count_flops(model.eval(), x)[0] // 2
    assert flops["layer1"] < flops["layer2"] < flops["layer3"] < flops["main"]
    # a linear head on 64 channels: 2 * 64 * 5
    assert flops["layer1"] == flop_profile(aux, x).backbone["layer1"] + 2 * 64 * 5


def test_a_tap_named_main_is_refused():
    model = nn.Sequential()
    model.add_module("main", nn.Linear(4, 3))
    aux = auxhead.attach(model, ["main"], head="linear", sample=torch.randn(2, 4))
    with pytest.raises(ValueError, match="a tap is named 'main'"):
        exit_flops(aux, torch.randn(2, 4))
    with pytest.raises(TypeError, match="exit_flops needs an AuxModel"):
        exit_flops(model, torch.randn(2, 4))
