"""Early exits answer with exactly the chosen head's output, the head run on the tap's output
as the tap produced it, on models that change a tap's output in place afterwards (in eval
only, as torchvision's MBConv does with `result += input` when stochastic depth is the
identity; or always, as `ReLU(inplace=True)` after the tap does), and a head that changes its
own input in place leaves the rest of the model alone."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import auxhead
from auxhead.exits import EarlyExit


class Block(nn.Module):
    """torchvision's MBConv in small: `body`'s output gets `+= x` in place, in eval only (in
    training, stochastic depth scales it into a new tensor first)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.body(x)
        if self.training:
            result = result * 1.0
        result += x
        return result


class EvalInPlaceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = Block(), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(self.a(x))))


def _as_tapped(aux: auxhead.AuxModel, tap: str, x: torch.Tensor) -> torch.Tensor:
    """The head at `tap` on a copy of the tap's output taken the moment the tap returns: the
    reference, independent of EarlyExit and of the AuxModel's forward."""
    seen = {}
    module = aux.model.get_submodule(tap)
    hook = module.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o.clone()))
    try:
        with torch.no_grad():
            aux.model(x)
            return aux.head(tap)(aux.head_input(tap, seen["o"]))
    finally:
        hook.remove()


def _check_first_head_answers(aux: auxhead.AuxModel, x: torch.Tensor, mode: str) -> None:
    early = EarlyExit(aux, thresholds=[0.0, 1.0], mode=mode, return_exits=True)
    for batch in (x[:1], x):
        logits, exits = early(batch)
        assert exits.eq(0).all()
        expected = _as_tapped(aux, aux.taps[0], batch)
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["generic", "auto"])
def test_a_tap_changed_in_place_in_eval_answers_with_its_output_as_produced(mode):
    torch.manual_seed(0)
    aux = auxhead.attach(
        EvalInPlaceNet(), ["a.body", "b"], head="linear", sample=torch.zeros(2, 6)
    ).eval()
    _check_first_head_answers(aux, torch.randn(8, 6), mode)


@pytest.mark.parametrize("mode", ["generic", "auto"])
def test_a_tap_changed_in_place_always_answers_with_its_output_as_produced(mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 6), nn.ReLU(inplace=True),
        nn.Linear(6, 3),
    )  # fmt: skip
    aux = auxhead.attach(model, ["0", "2"], head="linear", sample=torch.zeros(2, 6)).eval()
    x = torch.randn(8, 6)
    _check_first_head_answers(aux, x, mode)
    with torch.no_grad(), aux.heads_enabled():  # the AuxModel copies this tap: it agrees
        aux(x)
        torch.testing.assert_close(aux.aux_outputs["0"], _as_tapped(aux, "0", x), rtol=0, atol=0)


def test_the_aux_model_in_eval_sees_the_tap_as_produced():
    torch.manual_seed(0)
    aux = auxhead.attach(
        EvalInPlaceNet(), ["a.body", "b"], head="linear", sample=torch.zeros(2, 6)
    ).eval()
    x = torch.randn(8, 6)
    with torch.no_grad(), aux.heads_enabled():
        aux(x)
    torch.testing.assert_close(aux.aux_outputs["a.body"], _as_tapped(aux, "a.body", x))


@pytest.mark.parametrize("mode", ["generic", "staged"])
def test_a_head_that_changes_its_input_leaves_the_model_alone(mode):
    """Samples that stay get the model's own output, though the head ran ReLU in place on
    what it was given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)).eval()
    head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 3))
    aux = auxhead.attach(model, {"0": head}, sample=torch.zeros(2, 6)).eval()
    early = EarlyExit(aux, thresholds=[0.999], mode=mode, return_exits=True)
    x = torch.randn(8, 6)
    with torch.no_grad():
        main = model(x)
    for batch in (slice(0, 1), slice(0, 8)):
        logits, exits = early(x[batch])
        assert exits.eq(1).all()
        # `main` ran at batch 8: at batch 1 other kernels may sum in another order (1e-8 apart
        # under ATEN_CPU_CAPABILITY=default); the bug this guards against moved them by 0.16.
        torch.testing.assert_close(logits, main[batch], rtol=1e-5, atol=1e-6)


def test_efficientnet_v2_first_exit_is_its_head_on_the_tap_as_produced():
    """The model of the report: MBConv block taps that the model changes in place in eval."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_v2_s(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    aux = auxhead.attach(model, ["features.4.5.block", "features.6.2.block.1"], sample=x).eval()
    _check_first_head_answers(aux, x, "auto")


def test_calibration_scores_the_heads_as_the_forward_runs_them():
    """`evaluate` (and `calibrate`, the same pass) counts each exit's share from the head on
    the tap as produced, so its shares are the forward's, on a tap changed in place in eval."""
    torch.manual_seed(0)
    aux = auxhead.attach(
        EvalInPlaceNet(), ["a.body", "b"], head="linear", sample=torch.zeros(2, 6)
    ).eval()
    x = torch.randn(64, 6) * 3
    y = torch.zeros(64, dtype=torch.long)
    scores = _as_tapped(aux, "a.body", x).softmax(-1).amax(-1).sort().values
    gaps = scores[24:40].diff()
    k = 24 + int(gaps.argmax())  # the widest gap near the median: far from float noise
    assert gaps.max() > 1e-4
    early = EarlyExit(
        aux, thresholds=[float(scores[k] + scores[k + 1]) / 2, 1.0], return_exits=True
    )
    _, exits = early(x)
    summary = early.evaluate([(x, y)], timing_batches=0)
    assert summary.share == pytest.approx((exits.bincount(minlength=3) / len(x)).tolist())
