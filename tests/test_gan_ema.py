import pickle

import pytest
import torch
from torch import nn

from auxhead.gan.ema import EMADecay, generator_ema
from auxhead.gan.models import Generator


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))


def _set(model, weight, running_mean):
    with torch.no_grad():
        model[0].weight.fill_(weight)
        model[1].weight.fill_(weight)
        model[1].bias.fill_(-weight)
        model[1].running_mean.fill_(running_mean)


def test_decay_warms_up_then_holds():
    decay = EMADecay(0.999)
    assert decay.at(1) == pytest.approx(2 / 11)
    assert decay.at(10) == pytest.approx(11 / 20)
    assert decay.at(100_000) == 0.999
    assert EMADecay(0.9, warmup=False).at(1) == 0.9
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.5"):
        EMADecay(1.5)


@pytest.mark.parametrize("warmup", [True, False])
def test_average_equals_the_hand_computed_one(warmup):
    model = _tiny()
    ema = generator_ema(model, 0.9, warmup=warmup)
    weights = [3.0, -1.0, 2.0, 5.0]
    for step, w in enumerate(weights):
        _set(model, w, running_mean=10 * step)
        ema.update_parameters(model)
    # the first update copies; then e <- d_n * e + (1 - d_n) * w after n earlier updates
    expected = weights[0]
    for n, w in enumerate(weights[1:], start=1):
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        expected = d * expected + (1 - d) * w
    averaged = ema.module
    torch.testing.assert_close(averaged[0].weight, torch.full((1, 2), expected))
    torch.testing.assert_close(averaged[1].weight, torch.full((1,), expected))
    torch.testing.assert_close(averaged[1].bias, torch.full((1,), -expected))
    # buffers are copied, not averaged
    torch.testing.assert_close(averaged[1].running_mean, torch.full((1,), 30.0))
    assert int(ema.n_averaged) == len(weights)
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the original is untouched


def test_ema_of_a_generator_samples_and_pickles():
    g = Generator(3, latent_dim=8, width=4)
    ema = generator_ema(g)
    ema.update_parameters(g)
    torch.testing.assert_close(ema.module.generate([0, 1], seed=0), g.generate([0, 1], seed=0))
    restored = pickle.loads(pickle.dumps(ema))  # a learner holding it can be exported
    assert isinstance(restored.module, Generator)
    assert restored.multi_avg_fn.decay == 0.999
