"""`calibrate(temperature=True)` on a set so small that a head is right on every sample: the
NLL of softmax(logits / T) then falls all the way to the search bound T = 0.02, an artefact of
the bound, not a fit. That head's temperature stays 1.0, with a warning naming it, the bound
and the way out."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import auxhead
from auxhead.exits import EarlyExit
from auxhead.exits._calibrate import TEMPERATURE_BOUNDS, fit_temperature


def _tiny_calibration() -> tuple[EarlyExit, list[tuple[torch.Tensor, torch.Tensor]]]:
    """An EarlyExit over a small MLP and 12 samples labelled by its first head's argmax: that
    head is right on all of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    aux = auxhead.attach(model, ["1", "3"], head="linear", sample=torch.zeros(2, 6)).eval()
    x = torch.randn(12, 6)
    with torch.no_grad(), aux.heads_enabled():
        aux(x)
        y = aux.aux_outputs["1"].argmax(-1)
    return EarlyExit(aux), [(x, y)]


def test_the_tiny_set_pins_the_fit_at_its_bound():
    """The reproduction: the plain fit of head "1" on these samples is the bound itself."""
    early, [(x, y)] = _tiny_calibration()
    with torch.no_grad(), early.aux_model.heads_enabled():
        early.aux_model(x)
        logits = early.aux_model.aux_outputs["1"]
    assert fit_temperature(logits, y) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-6)


@pytest.mark.parametrize("method", ["empirical", "ltt"])
def test_a_pinned_temperature_warns_and_stays_one(method):
    early, data = _tiny_calibration()
    with pytest.warns(UserWarning) as caught:
        summary = early.calibrate(
            data, max_accuracy_drop=0.5, method=method, temperature=True, timing_batches=0
        )
    messages = [str(w.message) for w in caught if "temperature of head" in str(w.message)]
    assert any(
        "head '1' ran to its search bound T=0.02" in m
        and "more held-out data" in m
        and "temperature=False" in m
        for m in messages
    ), messages
    assert early.temperatures[0] == 1.0
    assert summary.thresholds == list(early.thresholds)


def test_an_interior_fit_does_not_warn():
    """Labels the head gets partly wrong: the fit has a minimum inside, no warning."""
    early, [(x, _)] = _tiny_calibration()
    y = torch.arange(len(x)) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        early.calibrate(
            [(x, y)], max_accuracy_drop=0.5, method="empirical", temperature=True,
            timing_batches=0,
        )  # fmt: skip
    assert not [w for w in caught if "temperature of head" in str(w.message)]
    assert all(TEMPERATURE_BOUNDS[0] < t < TEMPERATURE_BOUNDS[1] for t in early.temperatures)
