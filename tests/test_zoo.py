"""The zoo checks (benchmarks/zoo.py) on one model per family: same output as the bare model
in eval and, at one seed, in train; (B, K) logits from both heads; a gradient for every head
parameter; `strip()` leaves no hook and the bare model's state_dict. The full sweep over every
torchvision classifier and 138 timm models is `python benchmarks/zoo.py`."""

import importlib.util
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import zoo

TORCHVISION = [
    "resnet18",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",  # channels-last stages, stochastic depth
    "swin_t",  # channels-last maps, window attention
    "densenet121",  # in-place ReLU after the taps, concatenation
    "regnet_x_400mf",
    "googlenet",  # train-only aux branches, tuple output in train
    "squeezenet1_0",
    "shufflenet_v2_x0_5",
]
TORCHVISION_SLOW = ["vit_b_16", "maxvit_t"]  # maxvit_t: 224 px at least
TIMM = [
    "vit_tiny_patch16_224",  # tokens (B, N, C), drop path
    "swin_tiny_patch4_window7_224",  # (B, H, W, C)
    "convnext_atto",
    "efficientnet_b0",
    "levit_128s",
]
TIMM_SLOW = ["maxvit_pico_rw_256", "edgenext_xx_small", "mambaout_femto"]


def _check(spec: zoo.ModelSpec) -> None:
    result = zoo.check_model(spec)
    report = f"{zoo.failure_report([result])}\n{zoo.refusal_report([result])}"
    assert not result.error, report
    assert set(result.kinds) == set(zoo.KINDS)
    assert result.passed, report


def _params(names: list[str], slow: list[str], specs) -> list:
    return [pytest.param(spec, id=spec.label) for spec in specs(names)] + [
        pytest.param(spec, id=spec.label, marks=pytest.mark.slow) for spec in specs(slow)
    ]


@pytest.mark.parametrize("spec", _params(TORCHVISION, TORCHVISION_SLOW, zoo.torchvision_specs))
def test_torchvision(spec, one_thread):
    _check(spec)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
@pytest.mark.parametrize(
    "spec",
    _params(TIMM, TIMM_SLOW, zoo.timm_specs) if importlib.util.find_spec("timm") else [None],
)
def test_timm(spec, one_thread):
    _check(spec)


def test_compare_is_bit_exact():
    Out = namedtuple("Out", ["logits", "aux"])
    a = Out(torch.ones(2, 3), None)
    assert zoo.compare(a, Out(torch.ones(2, 3), None)) == ""
    assert "differs" in zoo.compare(a, Out(torch.ones(2, 3).nextafter(torch.tensor(2.0)), None))
    assert "type" in zoo.compare(a, torch.ones(2, 3))
    nan = torch.tensor([float("nan"), 1.0])
    assert zoo.compare(nan, nan.clone()) == ""


def test_pick_taps():
    assert zoo.pick_taps(list("abcdef")) == [2, 4]
    assert zoo.pick_taps(list("ab")) == [0, 1]
    assert zoo.pick_taps(list("abc"), [0.5, 0.5, 0.5]) == [0, 1, 2]
    with pytest.raises(ValueError, match="usable row"):
        zoo.pick_taps(["a"])
