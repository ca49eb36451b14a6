"""`auxhead.exits.exit_timing` and `auxhead layers --time`: the table's arithmetic on a fake clock
(layers and heads that advance it by known costs, so every figure is known by hand; no real
time is asserted on), the FLOPs beside it against `exit_flops`, the choice of candidate taps,
and the command's output shape and its refusals (one line)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import auxhead
from auxhead.cli import main
from auxhead.cli.layers import head_shapes
from auxhead.exits import exit_timing
from auxhead.exits._timing import candidate_taps, time_saved


class Clock:
    """A clock that only the `Tick` modules move."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Tick(nn.Module):
    """A linear layer that advances `clock` by `cost` seconds per image it runs on."""

    def __init__(self, clock: Clock, cost: float, width: int = 4, out: int = 4) -> None:
        super().__init__()
        self.clock, self.cost, self.linear = clock, cost, nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):  # not while torch.fx traces the model to cut it
            self.clock.now += self.cost * x.shape[0]
        return self.linear(x)


class Skip(nn.Module):
    """A skip connection around the tap "b": it cannot be cut there, so it is timed by
    hooks on the whole forward."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.a, self.b, self.c = Tick(clock, 1.0), Tick(clock, 2.0), Tick(clock, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.c(self.b(a)) + a


def test_the_table_is_the_stated_formula_on_the_measured_times():
    clock = Clock()
    model = nn.Sequential(Tick(clock, 1.0), Tick(clock, 2.0), Tick(clock, 3.0), Tick(clock, 4.0))
    heads = {"0": Tick(clock, 0.5), "2": Tick(clock, 0.25)}
    aux = auxhead.attach(model, heads, num_classes=4, sample=torch.zeros(2, 4))
    timing = exit_timing(aux, torch.zeros(8, 4), shares=(0.25, 0.5), clock=clock)
    assert timing.method == "staged" and timing.batch_size == 8
    # Per image: the model up to "0" costs 1, up to "2" 1 + 2 + 3, all of it 10.
    assert timing.seconds == 10.0
    assert [(t.tap, t.seconds, t.head_seconds) for t in timing.taps] == [
        ("0", 1.0, 0.5),
        ("2", 6.0, 0.25),
    ]
    # saved = (share * (T - t) - h) / T, by hand:
    assert timing.saved("0", 0.5) == pytest.approx((0.5 * 9 - 0.5) / 10)  # 0.4
    assert timing.saved("2", 0.25) == pytest.approx((0.25 * 4 - 0.25) / 10)  # 0.075
    assert time_saved(0.0, 10.0, 6.0, 0.25) == pytest.approx(-0.025)  # the head, for nothing
    # The FLOPs beside it: the same formula on exit_flops' counts (backbone + head per exit).
    flops = auxhead.exit_flops(aux, torch.zeros(2, 4))
    head = {tap: t.head_flops for tap, t in zip(["0", "2"], timing.taps, strict=True)}
    for t in timing.taps:
        assert t.flops + t.head_flops == flops[t.tap]
        expected = (0.5 * (flops["main"] - t.flops) - head[t.tap]) / flops["main"]
        assert timing.saved_flops(t.tap, 0.5) == pytest.approx(expected)
    lines = str(timing).splitlines()
    assert lines[0].startswith("full model: 10000.000 ms and")
    assert "saved, 25% leave" in lines[2] and "saved, 50% leave" in lines[2]
    assert lines[4].split()[:4] == ["0", "25%", "10%", "500.000"]
    assert lines[4].split()[-2:] == ["40%", f"({timing.saved_flops('0', 0.5):.0%})"]
    assert lines[5].split()[2] == "60%"


def test_a_model_that_cannot_be_cut_is_timed_by_hooks():
    clock = Clock()
    model = Skip(clock)
    heads = {"b": Tick(clock, 0.5)}
    aux = auxhead.attach(model, heads, num_classes=4, sample=torch.zeros(2, 4))
    timing = exit_timing(aux, torch.zeros(4, 4), repeats=3, clock=clock)
    assert timing.method == "hooks"
    assert (timing.seconds, timing.tap("b").seconds, timing.tap("b").head_seconds) == (6, 3, 0.5)
    assert timing.saved("b", 0.75) == pytest.approx((0.75 * 3 - 0.5) / 6)


def test_a_plain_model_gets_heads_for_the_timing_and_is_left_as_it_was():
    clock = Clock()
    model = nn.Sequential(Tick(clock, 1.0), Tick(clock, 2.0), Tick(clock, 3.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timing = exit_timing(model, torch.zeros(2, 4), ["0", "1"], head="linear", clock=clock)
    assert [t.tap for t in timing.taps] == ["0", "1"]
    assert [t.seconds for t in timing.taps] == [1.0, 3.0] and timing.seconds == 6.0
    assert not any(m._forward_hooks for m in model.modules())  # the heads are gone
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_candidate_taps_are_the_blocks_of_the_model():
    torchvision = pytest.importorskip("torchvision")
    resnet = torchvision.models.resnet18(num_classes=10)
    assert candidate_taps(resnet, torch.zeros(2, 3, 32, 32)) == [f"layer{i}" for i in range(1, 5)]
    mobilenet = torchvision.models.mobilenet_v3_small(num_classes=10)
    taps = candidate_taps(mobilenet, torch.zeros(2, 3, 32, 32))
    assert taps == [f"features.{i}" for i in range(13)]


def test_exit_timing_refuses_bad_arguments():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"shares are fractions in \[0, 1\].*got \[1.5\]"):
        exit_timing(model, x, ["0"], shares=[1.5])
    with pytest.raises(ValueError, match="repeats must be a whole number >= 1, got 0"):
        exit_timing(model, x, ["0"], repeats=0)
    with pytest.raises(ValueError, match=r"sample batch \(B, ...\), B >= 1, got \(0, 4\)"):
        exit_timing(model, x[:0], ["0"])
    aux = auxhead.attach(model, ["0"], head="linear", num_classes=4, sample=x)
    with pytest.raises(ValueError, match=r"timed at its own taps \['0'\], got taps=\['1'\]"):
        exit_timing(aux, x, ["1"])


def test_head_shapes_by_output():
    from auxhead._probe import LayerInfo

    def info(shape, layout=None):
        return LayerInfo("x", "T", shape, 1, layout)

    assert head_shapes(info((2, 8, 4, 4), "channels_first")) == "pooled,dense"
    assert head_shapes(info((2, 4, 4, 8), "channels_last")) == "pooled,dense"
    assert head_shapes(info((2, 16, 8), "channels_last")) == "pooled,token"
    assert head_shapes(info((2, 8, 16), "channels_first")) == "pooled,dense"
    assert head_shapes(info((2, 10))) == "pooled"
    assert head_shapes(info(None)) == "-"


def test_layers_time_prints_one_row_per_candidate_tap(capsys):
    argv = ["layers", "--time", "--bs", "2", "--repeats", "1", "--share", "0.5", "0.9"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "small_cnn on 1x28x28 inputs"
    assert lines[1].startswith("full model: ") and "at batch size 2 (staged)" in lines[1]
    assert lines[3].split()[:2] == ["tap", "FLOPs"] and lines[3].rstrip().endswith("90% leave")
    assert [line.split()[0] for line in lines[5:]] == ["stem", "stage1", "stage2", "stage3"]
    # tap, FLOPs and time shares, head ms; two savings, each "time% (FLOPs%)"
    assert all(len(line.split()) == 4 + 2 * 2 for line in lines[5:])
    assert main([*argv, "--at", "stage2"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[5:]] == ["stage2"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--time", "--share", "1.5"], "argument --share: must be in [0, 1], got 1.5"),
        (["--time", "--bs", "0"], "argument --bs: must be at least 1, got 0"),
        (["--bs", "8"], "--bs only applies with --time; add --time"),
        (["--time", "--at", "nope"], "--at: ['nope'] are not layers of small_cnn"),
    ],
)
def test_layers_time_refuses_bad_options_in_one_line(argv, message, capsys):
    assert main(["layers", *argv]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert message in last, err
    assert "Traceback" not in err
