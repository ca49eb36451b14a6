"""EarlyExit: routing, both modes, FLOPs actually saved, calibration, bad input.

Most tests use a "pass-through" model whose layers are identity Linear layers: each input row
carries the logits of head 0 (columns 0-1), head 1 (2-3) and the main output (4-5), so every
confidence, exit and FLOP count can be worked out by hand. A Linear(6, 6) costs 2*6*6 = 72
FLOPs per sample, a Linear(6, 2) head 24.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import auxhead
from auxhead.exits import EarlyExit, ExitSummary

LN9 = math.log(9.0)  # logits (ln 9, 0): softmax (0.9, 0.1)
LN3 = math.log(3.0)  # logits (ln 3, 0): softmax (0.75, 0.25)


def _identity(n: int = 6) -> nn.Linear:
    layer = nn.Linear(n, n)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(n))
        layer.bias.zero_()
    return layer


def _columns(start: int) -> nn.Linear:
    """Linear(6, 2) that copies columns start, start + 1."""
    layer = nn.Linear(6, 2)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, start] = layer.weight[1, start + 1] = 1.0
        layer.bias.zero_()
    return layer


def pass_through(depth: int = 2) -> auxhead.AuxModel:
    """Sequential(identity x depth, columns 4-5); heads at "0" (columns 0-1), "1" (2-3)."""
    model = nn.Sequential(*[_identity() for _ in range(depth)], _columns(4))
    return auxhead.attach(model, {"0": _columns(0), "1": _columns(2)}, sample=torch.zeros(1, 6))


class PassThroughNet(nn.Module):
    """The same network as `pass_through(2)` with its own forward: staged by torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = _identity(), _identity(), _columns(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b(self.a(x)))


class UntraceableNet(PassThroughNet):
    """The same again, with control flow on the data: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if bool(h.isnan().any()):
            raise ValueError("NaN input")
        return self.out(self.b(h))


def row(head0, head1, main=(LN9, 0.0)) -> list[float]:
    return [*head0, *head1, *main]


# thresholds (0.8, 0.5): confidences by hand, and where each sample leaves
MIXED = torch.tensor(
    [
        row((LN9, 0), (0, 0)),  # 0.9 > 0.8: exit 0
        row((0, 0), (0, LN9)),  # 0.5, then 0.9 > 0.5: exit 1
        row((LN3, 0), (0, 0)),  # 0.75, then 0.5 (not > 0.5): main
        row((0, LN9), (0, 0)),  # 0.9 > 0.8: exit 0, predicting class 1
    ]
)
MIXED_EXITS = [0, 1, 2, 0]


def count(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def tap_hooks(aux: auxhead.AuxModel) -> list[int]:
    return [len(module._forward_hooks) for module in (aux.model.get_submodule(t) for t in aux.taps)]


# ---- routing ----


@pytest.mark.parametrize("mode", ["staged", "generic"])
def test_mixed_batch_takes_each_samples_logits_from_its_exit(mode):
    early = EarlyExit(pass_through(), thresholds=[0.8, 0.5], mode=mode, return_exits=True)
    logits, exits = early(MIXED)
    assert exits.tolist() == MIXED_EXITS
    expected = torch.stack([MIXED[0, 0:2], MIXED[1, 2:4], MIXED[2, 4:6], MIXED[3, 0:2]])
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["staged", "generic"])
def test_thresholds_zero_send_everything_to_the_first_head(mode):
    early = EarlyExit(pass_through(), thresholds=0.0, mode=mode, return_exits=True)
    logits, exits = early(MIXED)
    assert exits.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(logits, MIXED[:, 0:2], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["staged", "generic"])
def test_thresholds_one_give_exactly_the_main_models_logits(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))
    aux = auxhead.attach(model, ["1"], head="linear", sample=torch.randn(2, 4))
    early = EarlyExit(aux, thresholds=1.0, mode=mode, return_exits=True)
    x = torch.randn(5, 4)
    logits, exits = early(x)
    assert exits.tolist() == [1] * 5
    assert torch.equal(logits, model.eval()(x))
    early.return_exits = False  # the logits alone, the same tensor
    assert torch.equal(early(x), logits)


def test_confidence_equal_to_the_threshold_does_not_exit():
    early = EarlyExit(pass_through(), thresholds=[0.5, 0.5], return_exits=True)
    _, exits = early(torch.tensor([row((0, 0), (0, 0))]))  # both heads exactly 0.5
    assert exits.tolist() == [2]


def test_entropy_criterion():
    # (0.9, 0.1): 1 - H / ln 2 with H = -(0.9 ln 0.9 + 0.1 ln 0.1)
    score = 1 - -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)  # 0.531
    x = torch.tensor([row((LN9, 0), (0, 0))])
    early = EarlyExit(
        pass_through(), thresholds=[score - 0.01, 1.0], criterion="entropy", return_exits=True
    )
    assert early(x)[1].tolist() == [0]
    early.thresholds = [score + 0.01, 0.5]  # a uniform head scores 0
    assert early(x)[1].tolist() == [2]
    early.thresholds = [score + 0.01, 0.0]  # ... but a threshold of 0 lets everyone out
    assert early(x)[1].tolist() == [1]


def test_callable_criterion():
    early = EarlyExit(
        pass_through(),
        thresholds=0.5,
        criterion=lambda logits: logits[:, 1].sigmoid(),
        return_exits=True,
    )
    _, exits = early(MIXED)  # exits where the class-1 logit > 0: sample 1 (head 1), 3 (head 0)
    assert exits.tolist() == [2, 1, 2, 0]


def test_modes_are_chosen_and_reported():
    assert EarlyExit(pass_through()).mode == "staged"
    net = PassThroughNet()
    aux = auxhead.attach(net, {"a": _columns(0), "b": _columns(2)}, sample=torch.zeros(1, 6))
    assert EarlyExit(aux).mode == "staged"
    assert "3 stages split from the torch.fx graph" in EarlyExit(aux).mode_reason
    net = UntraceableNet()
    aux = auxhead.attach(net, {"a": _columns(0), "b": _columns(2)}, sample=torch.zeros(1, 6))
    early = EarlyExit(aux)
    assert early.mode == "generic"
    assert "torch.fx cannot trace UntraceableNet (TraceError" in early.mode_reason
    with pytest.raises(ValueError, match="cannot route samples through UntraceableNet"):
        EarlyExit(aux, mode="staged")


@pytest.mark.parametrize("net", [PassThroughNet, UntraceableNet])
def test_own_forward_routes_like_the_sequential(net):
    aux = auxhead.attach(net(), {"a": _columns(0), "b": _columns(2)}, sample=torch.zeros(1, 6))
    for mode in ("auto", "generic"):
        early = EarlyExit(aux, thresholds={"a": 0.8, "b": 0.5}, mode=mode, return_exits=True)
        logits, exits = early(MIXED)
        assert exits.tolist() == MIXED_EXITS
        reference = EarlyExit(pass_through(), thresholds=[0.8, 0.5])(MIXED)
        torch.testing.assert_close(logits, reference)


def test_runs_in_eval_without_grad_and_restores_modes():
    aux = pass_through()
    aux.train()
    aux.model[1].eval()  # a frozen layer stays frozen
    logits = EarlyExit(aux, thresholds=[0.8, 0.5])(MIXED)
    assert not logits.requires_grad
    assert aux.training and aux.heads.training and aux.model[0].training
    assert not aux.model[1].training


def test_generic_stop_leaves_no_hooks_behind():
    aux = pass_through()
    before = tap_hooks(aux)
    early = EarlyExit(aux, thresholds=0.0, mode="generic")
    early(MIXED)  # stops at the first tap with an exception
    assert tap_hooks(aux) == before
    with pytest.raises(RuntimeError):
        early(torch.zeros(2, 5))  # the model itself fails
    assert tap_hooks(aux) == before
    assert aux.aux_outputs == {}


def test_taps_out_of_run_order_are_refused():
    model = nn.Sequential(_identity(), _identity(), _columns(4))
    aux = auxhead.attach(model, {"1": _columns(2), "0": _columns(0)}, sample=torch.zeros(1, 6))
    with pytest.raises(ValueError, match=r"order they run: attach with at=\['0', '1'\]"):
        EarlyExit(aux)
    early = EarlyExit(aux, thresholds=0.5, mode="generic")
    with pytest.raises(ValueError, match="order they run"):
        early(MIXED)


def test_tuple_output_tap_uses_select():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x.sum()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.out = Pair(), _columns(4)

        def forward(self, x):
            return self.out(self.pair(x)[0])

    aux = auxhead.attach(
        Net(), {"pair": _columns(0)}, sample=torch.zeros(1, 6), select=lambda out: out[0]
    )
    early = EarlyExit(aux, thresholds=0.8, return_exits=True)
    logits, exits = early(MIXED)
    torch.testing.assert_close(logits[0], MIXED[0, 0:2])
    assert exits.tolist() == [0, 1, 1, 0]


# ---- real compute saving ----


def test_staged_flops_follow_each_sample():
    early = EarlyExit(pass_through(), thresholds=[0.8, 0.5], mode="staged")
    # layer a on 4 (288) + head 0 on 4 (96) + layer b on 2 (144) + head 1 on 2 (48) + out on 1
    assert count(early, MIXED) == 288 + 96 + 144 + 48 + 24
    full = count(early.aux_model.model, MIXED)
    assert full == 4 * (72 + 72 + 24)
    early.thresholds = [0.0, 1.0]
    assert count(early, MIXED) == 288 + 96 < full
    early.thresholds = 1.0  # no head runs
    assert count(early, MIXED) == full


def test_generic_flops_stop_when_the_batch_has_exited():
    early = EarlyExit(pass_through(), thresholds=[0.8, 0.5], mode="generic")
    # the whole model on 4 + head 0 on 4 + head 1 on the 2 undecided
    assert count(early, MIXED) == 4 * 168 + 96 + 48
    assert count(early, MIXED[2:3]) == 168 + 24 + 24  # a batch of 1 that reaches main
    assert count(early, MIXED[0:1]) == 72 + 24  # a batch of 1 that leaves at the first tap
    early.thresholds = [0.0, 0.5]
    assert count(early, MIXED) == 288 + 96  # the whole batch left at the first tap


# ---- ResNet-style models ----


def _resnet_input() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _resnet10(num_classes: int = 1000) -> torchvision.models.ResNet:
    # torchvision's ResNet class with one block per stage: resnet18's code, a quarter the size
    return torchvision.models.ResNet(
        torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes
    )


def midway(scores: torch.Tensor, stay: range) -> float:
    """A threshold midway between two neighbouring sorted `scores`, the k lowest staying for
    the k in `stay` with the widest gap; refuses a gap that float noise (other kernels, other
    batch sizes: about 1e-8) could cross."""
    ordered = scores.sort().values.tolist()
    k = max(stay, key=lambda k: ordered[k] - ordered[k - 1])
    assert ordered[k] - ordered[k - 1] > 1e-6, f"no gap between scores {ordered}"
    return (ordered[k - 1] + ordered[k]) / 2


def _check_stages(aux: auxhead.AuxModel, x: torch.Tensor, how: str) -> None:
    early = EarlyExit(aux, thresholds=1.0, return_exits=True)
    assert early.mode == "staged" and (how in early.mode_reason), early.mode_reason
    assert torch.equal(early(x)[0], aux.model.eval()(x))
    aux.eval()
    with aux.heads_enabled(), torch.no_grad():
        aux(x)
        first, second = aux.aux_outputs.values()
    # about half the batch leaves at the first exit, the rest at the second (threshold 0)
    confidence = first.softmax(-1).amax(-1)
    threshold = midway(confidence, range(2, len(x) - 1))
    early.thresholds = [threshold, 0.0]
    logits, exits = early(x)
    leave = confidence > threshold
    assert exits.tolist() == [0 if flag else 1 for flag in leave.tolist()]
    torch.testing.assert_close(logits, torch.where(leave[:, None], first, second))
    generic = EarlyExit(aux, thresholds=early.thresholds, mode="generic")
    torch.testing.assert_close(generic(x), logits)


def test_torchvision_resnet_is_staged():
    torch.manual_seed(0)
    model = _resnet10(num_classes=5)
    sample = _resnet_input()
    aux = auxhead.attach(model, ["layer1", "layer3"], head="linear", sample=sample)
    _check_stages(aux, sample, " stages, samples leave")  # by its known forward, not fx


def test_timm_resnet_is_staged():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)  # a deep stem: conv1 is a Sequential
    sample = _resnet_input()
    aux = auxhead.attach(model, ["layer2", "layer4"], head="linear", sample=sample)
    _check_stages(aux, sample, " stages, samples leave")


def test_fastai_style_body_and_head_is_staged():
    # What fastai's vision_learner builds: Sequential(body = resnet children, head).
    torch.manual_seed(0)
    resnet = _resnet10()
    body = nn.Sequential(*list(resnet.children())[:-2])
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(512), nn.Linear(512, 5)
    )
    sample = _resnet_input()
    aux = auxhead.attach(nn.Sequential(body, head), ["0.5", "0.6"], head="linear", sample=sample)
    _check_stages(aux, sample, " stages, samples leave")  # its children, no tracing


def test_tap_inside_a_block_falls_back_to_generic():
    model = _resnet10(num_classes=5)
    sample = _resnet_input()[:2]
    aux = auxhead.attach(model, ["layer1.0.conv1"], head="linear", sample=sample)
    early = EarlyExit(aux)
    assert early.mode == "generic"
    # the block's input (maxpool's output) goes around conv1 to the residual add
    assert "needs 'maxpool', computed before the previous tap" in early.mode_reason
    assert torch.equal(early(sample), model.eval()(sample))


# ---- calibration ----


def _calibration_data(groups, batch_size=4) -> DataLoader:
    """groups: (count, head-0 confidence, head 0 right?, head-1 confidence, head 1 right?,
    main right?); the label is always class 0."""

    def logits(p: float, right: bool) -> tuple[float, float]:
        logit = math.log(p / (1 - p))
        return (logit, 0.0) if right else (0.0, logit)

    rows = []
    for n, p0, ok0, p1, ok1, ok_main in groups:
        rows += [row(logits(p0, ok0), logits(p1, ok1), logits(0.9, ok_main))] * n
    inputs = torch.tensor(rows)
    return DataLoader(TensorDataset(inputs, torch.zeros(len(rows), dtype=torch.long)), batch_size)


# per-sample FLOPs of pass_through(4): backbone 72 per layer, heads 24, main out 24
GROUPS = [
    (4, 0.9, True, 0.9, True, True),  # A: head 0 is sure and right
    (4, 0.6, False, 0.8, True, True),  # B: head 0 unsure and wrong, head 1 sure and right
    (2, 0.7, False, 0.6, False, True),  # C: only the main head is right
]


def test_calibrate_finds_the_cheapest_thresholds_within_the_drop():
    early = EarlyExit(pass_through(depth=4))
    summary = early.calibrate(
        _calibration_data(GROUPS), max_accuracy_drop=0.0, method="empirical", timing_batches=2
    )
    # A leaves at exit 0, B at exit 1, C reaches main; nothing cheaper keeps 100%:
    # (4 * 96 + 4 * 192 + 2 * 360) / 10 = 187.2 (head 1 alone: 201.6, head 0 alone: 240)
    assert summary is early.summary
    assert 0.7 - 1e-6 <= early.thresholds[0] < 0.9
    assert 0.6 - 1e-6 <= early.thresholds[1] < 0.8
    assert summary.share == pytest.approx([0.4, 0.4, 0.2])
    assert summary.exit_accuracy == [1.0, 1.0, 1.0]
    assert summary.accuracy == summary.main_accuracy == 1.0
    assert summary.flops == [96, 192, 360]
    assert summary.mean_flops == pytest.approx(187.2)
    assert summary.full_flops == 4 * 72 + 24
    assert summary.saving == pytest.approx(1 - 187.2 / 312)
    # oracle, running only the head it leaves at: A at 0 (96), B at 1 (144 + 24), C main (312)
    assert summary.oracle_flops == pytest.approx((4 * 96 + 4 * 168 + 2 * 312) / 10)
    assert summary.oracle_accuracy == 1.0
    assert summary.seconds_per_sample > 0 and summary.full_seconds_per_sample > 0
    assert not summary.fallback
    # the forward agrees with the summary on the same data
    inputs = torch.cat([x for x, _ in _calibration_data(GROUPS)])
    early.return_exits = True
    assert early(inputs)[1].tolist() == [0] * 4 + [1] * 4 + [2] * 2


def test_calibrate_with_a_large_drop_sends_everyone_to_the_first_exit():
    early = EarlyExit(pass_through(depth=4))
    summary = early.calibrate(
        _calibration_data(GROUPS), max_accuracy_drop=1.0, method="empirical", timing_batches=0
    )
    assert early.thresholds == (0.0, 1.0)  # exit 1 is unused, so its head is off
    assert summary.share == [1.0, 0.0, 0.0]
    assert summary.mean_flops == 96
    assert summary.accuracy == pytest.approx(0.4)
    assert summary.seconds_per_sample is None


def test_calibrate_falls_back_to_the_main_head_with_a_warning():
    wrong = [(6, 0.9, False, 0.9, False, True)]  # confident heads that are always wrong
    early = EarlyExit(pass_through(depth=4), thresholds=0.0)
    with pytest.warns(UserWarning, match="every sample goes to the main head"):
        summary = early.calibrate(_calibration_data(wrong), max_accuracy_drop=0.1)
    assert early.thresholds == (1.0, 1.0)
    assert summary.fallback and summary.share == [0.0, 0.0, 1.0]
    assert summary.mean_flops == summary.full_flops == 312
    assert "every sample goes to the main head" in str(summary)


def test_calibrate_guarantees_the_drop_by_learn_then_test():
    # 900 samples head 0 gets right at 0.9; 100 it gets wrong at 0.6, which head 1 gets right
    # at 0.8; the main head right on all. 300 order the path, 700 test it.
    groups = [(900, 0.9, True, 0.9, True, True), (100, 0.6, False, 0.8, True, True)]
    early = EarlyExit(pass_through(depth=4))
    summary = early.calibrate(
        _calibration_data(groups, batch_size=100),
        max_accuracy_drop=0.05,
        method="ltt-harm",
        timing_batches=0,
    )
    # Sending everyone to exit 0 harms 10% > 5%: the test refuses it; the sure ones leave at
    # 0, the others at 1, harming none: the bound is Clopper-Pearson's for 0 of 700.
    assert 0.6 - 1e-6 <= early.thresholds[0] < 0.9 and early.thresholds[1] < 0.8
    assert summary.share == pytest.approx([0.9, 0.1, 0.0])
    assert summary.method == "ltt-harm" and summary.confidence == 0.9
    assert summary.calibration_samples == (300, 700)
    assert summary.bound == pytest.approx(1 - 0.1 ** (1 / 700), rel=1e-6)
    assert summary.drop == 0.0 and summary.harm == 0.0 and summary.drop_interval == (0.0, 0.0)
    text = str(summary)
    assert "with 90% confidence on new data exchangeable with these" in text
    assert "path from 300 samples, tested on 700" in text
    # The empirical fit sends everyone to exit 0: exactly the 5% drop on these samples.
    point = early.calibrate(
        _calibration_data(groups, batch_size=100),
        max_accuracy_drop=0.1,
        method="empirical",
        timing_batches=0,
    )
    assert point.share == [1.0, 0.0, 0.0] and point.drop == pytest.approx(0.1)
    assert point.harm == pytest.approx(0.1) and point.bound is None
    low, high = point.drop_interval  # 0.1 +- 1.96 * sd / sqrt(1000), sd of 100 ones in 1000
    half = 1.959964 * math.sqrt(0.1 * 0.9 * 1000 / 999) / math.sqrt(1000)
    assert (low, high) == pytest.approx((0.1 - half, 0.1 + half), rel=1e-5)
    assert "met on these samples (empirical: no guarantee on new data)" in str(point)


def test_calibrate_within_a_flops_budget():
    # full model 312 FLOPs; a budget of 50% (156) allows 80% accuracy at best (C, which only
    # the main head gets right, cannot reach it): A leaves at exit 0 (96), B and C at exit 1
    # (192), 153.6 FLOPs; or, cheaper for the same 80%, A and C at exit 0, B at exit 1: 134.4.
    early = EarlyExit(pass_through(depth=4))
    summary = early.calibrate_budget(
        _calibration_data(GROUPS), max_flops=0.5, method="empirical", timing_batches=0
    )
    assert summary.mean_flops == pytest.approx(134.4) and summary.accuracy == pytest.approx(0.8)
    assert summary.max_flops == 0.5 and "at most 50% of the full model's FLOPs" in str(summary)
    with pytest.raises(TypeError, match="max_flops"):
        early.calibrate(_calibration_data(GROUPS), max_flops=0.5)  # that is calibrate_budget
    with pytest.raises(ValueError, match="max_flops is a share of the full model's FLOPs"):
        early.calibrate_budget(_calibration_data(GROUPS), max_flops=-1)


def test_calibrate_holds_a_flops_budget_by_learn_then_test():
    # 900 samples sure at exit 0 (96 FLOPs), 100 unsure everywhere (main: 360 with both heads)
    groups = [(900, 0.9, True, 0.9, True, True), (100, 0.6, False, 0.6, False, True)]
    early = EarlyExit(pass_through(depth=4))
    summary = early.calibrate_budget(
        _calibration_data(groups, batch_size=100), max_flops=0.5, timing_batches=0
    )
    assert summary.method == "ltt" and summary.max_flops == 0.5
    assert summary.mean_flops <= 0.5 * summary.full_flops
    assert summary.bound is not None and summary.mean_flops / 312 <= summary.bound <= 0.5
    assert "of FLOPs" in str(summary) and "with 90% confidence" in str(summary)


def test_calibrate_fits_temperatures_and_the_forward_uses_them():
    early = EarlyExit(pass_through(depth=4))
    summary = early.calibrate(
        _calibration_data(GROUPS), max_accuracy_drop=0.0, method="empirical",
        temperature=True, timing_batches=0,
    )  # fmt: skip
    assert all(t != 1.0 for t in early.temperatures)
    assert summary.temperatures == list(early.temperatures)
    inputs = torch.cat([x for x, _ in _calibration_data(GROUPS)])
    early.return_exits = True
    _, exits = early(inputs)  # routed with the scaled scores exactly as the summary counted
    counts = exits.bincount(minlength=3) / len(inputs)
    assert counts.tolist() == pytest.approx(summary.share)
    assert early.evaluate(_calibration_data(GROUPS), timing_batches=0).share == summary.share
    other = EarlyExit(copy.deepcopy(early.aux_model))
    other.load_state_dict(early.state_dict())
    assert other.temperatures == early.temperatures
    with pytest.raises(ValueError, match="temperature for '0' must be a number > 0"):
        early.temperatures = [0.0, 1.0]


def test_evaluate_keeps_the_thresholds():
    early = EarlyExit(pass_through(depth=4), thresholds=[0.8, 0.7])
    summary = early.evaluate(_calibration_data(GROUPS), timing_batches=0)
    assert early.thresholds == (0.8, 0.7)
    assert summary.share == pytest.approx([0.4, 0.4, 0.2])
    assert summary.max_accuracy_drop is None


def test_summary_table_and_dict():
    early = EarlyExit(pass_through(depth=4))
    summary = early.calibrate(
        _calibration_data(GROUPS), max_accuracy_drop=0.0, method="empirical", timing_batches=1
    )
    assert isinstance(summary, ExitSummary)
    text = str(summary)
    assert text.splitlines()[0] == "early exits on 10 samples (criterion: confidence)"
    assert "exit  threshold" in text and "main" in text and "saved vs the full model" in text
    as_dict = summary.as_dict()
    assert as_dict["exits"] == ["0", "1", "main"]
    assert as_dict["saving"] == pytest.approx(summary.saving)
    assert as_dict["share"] == summary.share


# ---- state ----


def test_thresholds_travel_with_the_state_dict_and_copies_run():
    aux = pass_through()
    early = EarlyExit(aux, thresholds=[0.8, 0.5], return_exits=True)
    other = EarlyExit(copy.deepcopy(aux), return_exits=True)
    other.load_state_dict(early.state_dict())
    assert other.thresholds == (0.8, 0.5)
    clone = copy.deepcopy(early)
    with torch.no_grad():
        aux.model[0].weight.zero_()  # the copy's stages must use the copy's layers
    (logits, exits), (expected, _) = clone(MIXED), other(MIXED)
    torch.testing.assert_close(logits, expected)
    assert exits.tolist() == MIXED_EXITS


# ---- bad input ----


def test_bad_thresholds():
    aux = pass_through()
    with pytest.raises(ValueError, match=r"got 3 thresholds for 2 exits \['0', '1'\]"):
        EarlyExit(aux, thresholds=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"threshold for '1' is 1.5; thresholds lie in \[0, 1\]"):
        EarlyExit(aux, thresholds=[0.5, 1.5])
    with pytest.raises(ValueError, match="threshold for '0' is -0.1"):
        EarlyExit(aux, thresholds=-0.1)
    with pytest.raises(ValueError, match="threshold for '0' is nan"):
        EarlyExit(aux, thresholds=float("nan"))
    with pytest.raises(ValueError, match=r"unknown: \['2'\], missing: \['1'\]"):
        EarlyExit(aux, thresholds={"0": 0.5, "2": 0.5})
    with pytest.raises(TypeError, match="thresholds must be a number, a list"):
        EarlyExit(aux, thresholds="high")
    early = EarlyExit(aux)
    with pytest.raises(ValueError, match="thresholds lie in"):
        early.thresholds = [0.5, 2]
    assert early.thresholds == (1.0, 1.0)


def test_bad_arguments():
    aux = pass_through()
    with pytest.raises(TypeError, match="needs the AuxModel that auxhead.attach returned"):
        EarlyExit(aux.model)
    with pytest.raises(
        ValueError, match=r"unknown criterion 'margin'; choose one of \['confidence'"
    ):
        EarlyExit(aux, criterion="margin")
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        EarlyExit(aux, mode="fast")
    with pytest.raises(TypeError, match="one input tensor"):
        EarlyExit(aux)([MIXED])
    with pytest.raises(TypeError, match="positional argument"):
        EarlyExit(aux, [0.8, 0.5])  # configuration is keyword-only
    with pytest.raises(TypeError, match="thresholds must be a number, a list"):
        EarlyExit(aux, thresholds=None)  # 1.0 (the default) turns every exit off
    with pytest.raises(TypeError, match="temperatures must be a number, a list"):
        EarlyExit(aux).temperatures = None  # 1.0 is unscaled
    with pytest.raises(TypeError, match="positional argument"):
        EarlyExit(aux).calibrate([(MIXED, torch.zeros(4, dtype=torch.long))], 0.01)


def test_defaults_are_the_values_they_stand_for():
    early = EarlyExit(pass_through())
    assert early.thresholds == (1.0, 1.0) and early.temperatures == (1.0, 1.0)
    assert not early.return_exits and isinstance(early(MIXED), torch.Tensor)
    data = _calibration_data(GROUPS)
    default = early.calibrate(data, method="empirical", timing_batches=0)
    assert default.max_accuracy_drop == 0.005
    explicit = EarlyExit(pass_through()).calibrate(
        data, max_accuracy_drop=0.005, method="empirical", timing_batches=0
    )
    assert explicit.as_dict() == default.as_dict()


def test_bad_calibration_data():
    early = EarlyExit(pass_through())
    unlabelled = DataLoader(TensorDataset(MIXED), batch_size=2)
    with pytest.raises(
        ValueError, match=r"needs labelled batches \(inputs, targets\), got a list of length 1"
    ):
        early.calibrate(unlabelled)
    with pytest.raises(ValueError, match="got a Tensor"):
        early.calibrate([MIXED])
    soft = DataLoader(TensorDataset(MIXED, torch.rand(4, 2)), batch_size=2)
    with pytest.raises(ValueError, match=r"class indices of shape \(B,\)"):
        early.calibrate(soft)
    beyond = DataLoader(TensorDataset(MIXED, torch.tensor([0, 1, 1, 2])), batch_size=2)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\) .* outputs, got 2"):
        early.calibrate(beyond)
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\) .* outputs, got -100"):
        early.calibrate([(MIXED, torch.tensor([0, -100, 1, 1]))])
    with pytest.raises(ValueError, match="yielded no batches"):
        early.calibrate([])
    with pytest.raises(ValueError, match=r"max_accuracy_drop is a fraction in \[0, 1\]"):
        early.calibrate(unlabelled, max_accuracy_drop=5)
    with pytest.raises(ValueError, match=r"unknown method 'normal'; choose one of \['ltt'"):
        early.calibrate(unlabelled, method="normal")
    for bad in (1.0, 0, True, "0.9"):
        with pytest.raises(ValueError, match=rf"confidence is a probability in \(0, 1\).*{bad!r}"):
            early.calibrate(unlabelled, confidence=bad)
    assert early.thresholds == (1.0, 1.0)


def test_heads_with_other_classes_are_refused():
    model = nn.Sequential(_identity(), _columns(4))
    with pytest.raises(ValueError, match=r"outputs \(2, 3\) on its tap's output, not \(2, 2\)"):
        auxhead.attach(model, {"0": nn.Linear(6, 3)}, sample=torch.zeros(1, 6))
    aux = auxhead.attach(model, {"0": nn.Linear(6, 3)})  # no sample: attach checks nothing
    early = EarlyExit(aux, thresholds=0.99)
    with pytest.raises(ValueError, match=r"exit 'main' outputs \(4, 2\), but the first head"):
        early(MIXED)  # no sample exits, but the head ran
    with pytest.raises(ValueError, match="heads that predict the model's classes"):
        early.calibrate([(MIXED, torch.zeros(4, dtype=torch.long))])


@pytest.mark.parametrize("method", ["ltt", "ltt-harm", "empirical"])
def test_calibrating_the_disagreement_is_calibrating_against_the_main_heads_answers(method):
    """risk="disagreement" equals risk="drop" on labels replaced by the main head's answers
    (a second way to compute the same thing); against these random labels, on which the main
    head is right about half the time, the drop is a different calibration."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(600, 6, generator=g) * 2
    labels = torch.randint(0, 2, (600,), generator=g)
    main_answers = inputs[:, 4:6].argmax(dim=1)

    def thresholds(targets, risk):
        early = EarlyExit(pass_through(depth=4))
        data = DataLoader(TensorDataset(inputs, targets), batch_size=100)
        early.calibrate(data, max_accuracy_drop=0.05, method=method, risk=risk, timing_batches=0)
        return early.thresholds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a fallback is a result here too
        by_agreement = thresholds(labels, "disagreement")
        assert by_agreement == thresholds(main_answers, "drop")
        assert by_agreement == thresholds(main_answers, "disagreement")  # labels unused
        assert by_agreement != thresholds(labels, "drop")


def test_an_unknown_risk_is_refused_before_the_data_is_read():
    def never():
        raise AssertionError("read the data")
        yield

    with pytest.raises(ValueError, match=r"unknown risk 'harm'; choose one of \['drop', 'dis"):
        EarlyExit(pass_through()).calibrate(never(), risk="harm")
