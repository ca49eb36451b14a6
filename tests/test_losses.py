import math

import pytest
import torch
from conftest import tiny_cnn
from torch import nn

import auxhead


@pytest.fixture
def setup():
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 5, (6,))
    aux = auxhead.attach(tiny_cnn(), ["1", "3"], head="linear", sample=x).train()
    return aux, x, y


def _by_hand(aux, out, y, w1, w3):
    ce = nn.functional.cross_entropy
    return ce(out, y) + w1 * ce(aux.aux_outputs["1"], y) + w3 * ce(aux.aux_outputs["3"], y)


@pytest.mark.parametrize(
    "weights, expected",
    [(0.3, (0.3, 0.3)), ([0.1, 0.5], (0.1, 0.5)), ({"3": 0.2, "1": 0.7}, (0.7, 0.2))],
)
def test_auxloss_weights_forms(setup, weights, expected):
    aux, x, y = setup
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, weights=weights)
    out = aux(x)
    torch.testing.assert_close(loss_func(out, y), _by_hand(aux, out, y, *expected))
    assert set(loss_func.components) == {"main", "1", "3"}
    assert not loss_func.components["1"].requires_grad


def test_auxloss_schedule_follows_progress(setup):
    aux, x, y = setup
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, weights=0.4, schedule="linear_decay")
    out = aux(x)
    loss_func.progress = 0.25
    torch.testing.assert_close(loss_func(out, y), _by_hand(aux, out, y, 0.3, 0.3))
    loss_func.progress = 1.0
    torch.testing.assert_close(loss_func(out, y), nn.functional.cross_entropy(out, y))
    # a callable works too
    loss_func.schedule = lambda t: 2.0
    torch.testing.assert_close(loss_func(out, y), _by_hand(aux, out, y, 0.8, 0.8))


def test_auxloss_is_main_loss_in_eval_even_with_heads(setup):
    aux, x, y = setup
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)
    aux.eval()
    with aux.heads_enabled():
        out = aux(x)
        assert aux.aux_outputs
        torch.testing.assert_close(loss_func(out, y), nn.functional.cross_entropy(out, y))


def test_zero_weight_still_gives_every_head_a_gradient(setup):
    aux, x, y = setup
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, weights=0.0)
    loss_func(aux(x), y).backward()
    assert all(p.grad is not None for p in aux.heads.parameters())


def test_reduction_none_forwards_for_fastai_get_preds(setup):
    aux, x, y = setup
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, weights=0.5)
    loss_func.reduction = "none"
    assert loss_func.reduction == "none" and loss_func.loss_func.reduction == "none"
    out = aux(x)
    per_sample = loss_func(out, y)
    assert per_sample.shape == (6,)
    loss_func.reduction = "mean"
    torch.testing.assert_close(per_sample.mean(), loss_func(out, y))


def test_activation_and_decodes_forward():
    class Decoding(nn.CrossEntropyLoss):
        def activation(self, x):
            return x.softmax(-1)

        def decodes(self, x):
            return x.argmax(-1)

    x = torch.randn(2, 3, 16, 16)
    aux = auxhead.attach(tiny_cnn(), ["1"], sample=x)
    loss_func = auxhead.AuxLoss(Decoding(), aux)
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    torch.testing.assert_close(loss_func.activation(logits), logits.softmax(-1))
    assert loss_func.decodes(logits).item() == 1
    plain = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)
    assert plain.activation(logits) is logits


def test_head_loss_and_distillation(setup):
    aux, x, y = setup
    out = aux(x)
    loss_func = auxhead.AuxLoss(
        nn.CrossEntropyLoss(), aux, weights=1.0, distill=0.5, temperature=2.0
    )
    ce = nn.functional.cross_entropy
    expected = ce(out, y)
    for name in ("1", "3"):
        s = aux.aux_outputs[name]
        t = 2.0
        p, log_q = (out / t).softmax(-1), (s / t).log_softmax(-1)
        kd = (p * (p.log() - log_q)).sum(-1).mean() * t * t
        expected = expected + 0.5 * ce(s, y) + 0.5 * kd
    torch.testing.assert_close(loss_func(out, y), expected)


@pytest.mark.parametrize("key", ["logits", "out"])
def test_distillation_teacher_from_a_dict_output(setup, key):
    """A Hugging Face ModelOutput's `logits` or torchvision's `{"out": ...}` is the teacher:
    the loss equals the one computed from the bare tensor."""
    aux, x, y = setup
    out = aux(x)
    ce = nn.CrossEntropyLoss()
    kwargs = {"weights": 1.0, "distill": 0.5, "temperature": 2.0}
    from_tensor = auxhead.AuxLoss(ce, aux, **kwargs)(out, y)
    wrapped = auxhead.AuxLoss(lambda o, t: ce(o[key], t), aux, head_loss=ce, **kwargs)
    torch.testing.assert_close(wrapped({key: out}, y), from_tensor, rtol=0, atol=0)


def test_distillation_teacher_is_detached(setup):
    aux, x, _y = setup
    out = aux(x)
    student = aux.aux_outputs["1"]
    kd = auxhead.distillation_loss(student, out, temperature=3.0)
    grads = torch.autograd.grad(kd, [out, student], allow_unused=True)
    assert grads[0] is None and grads[1] is not None


def test_head_output_not_fitting_the_targets_names_the_head():
    x = torch.randn(4, 3, 16, 16)
    aux = auxhead.attach(tiny_cnn(), ["1", "3"], num_classes=3, sample=x).train()
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)
    out = aux(x)
    with pytest.raises(ValueError, match=r"head '1' failed: its output has shape \(4, 3\)"):
        loss_func(out, torch.tensor([4, 4, 4, 4]))


def test_non_finite_aux_loss_names_the_head(setup):
    aux, x, y = setup
    with torch.no_grad():
        aux.head("3").fc.weight.fill_(math.inf)
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)
    with pytest.raises(FloatingPointError, match="head '3' is not finite"):
        loss_func(aux(x), y)


def _host_reads(monkeypatch) -> list[str]:
    """Every reading of a tensor's value on the host (what synchronises with an accelerator),
    recorded by name."""
    reads: list[str] = []
    for method in ("__bool__", "item", "tolist", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, method)

        def counted(self, *args, _original=original, _name=method, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counted)
    return reads


def test_check_finite_reads_the_device_once_per_step_for_all_heads(monkeypatch):
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 5, (6,))
    aux = auxhead.attach(tiny_cnn(), ["1", "3", "5"], head="linear", sample=x).train()
    out = aux(x)
    checked = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)
    unchecked = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, check_finite=False)
    reads = _host_reads(monkeypatch)
    unchecked(out, y)
    assert reads == []
    checked(out, y)
    assert reads == ["__bool__"]  # one, for three heads


def test_check_finite_names_the_head_that_is_not_finite_among_three():
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 5, (6,))
    aux = auxhead.attach(tiny_cnn(), ["1", "3", "5"], head="linear", sample=x).train()
    with torch.no_grad():
        aux.head("5").fc.bias.fill_(math.nan)
    with pytest.raises(FloatingPointError, match="head '5' is not finite"):
        auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)(aux(x), y)


def test_configuration_is_keyword_only(setup):
    aux, _, _ = setup
    with pytest.raises(TypeError, match="positional"):
        auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, 0.3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"weights": [0.1]}, ValueError, "got 1 weights for 2 heads"),
        ({"weights": {"1": 0.1, "9": 0.2}}, ValueError, r"unknown: \['9'\], missing: \['3'\]"),
        ({"weights": -1.0}, ValueError, "must be a finite number >= 0, got -1.0"),
        ({"weights": float("nan")}, ValueError, "weight for '1' must be a finite number"),
        ({"weights": [0.3, float("inf")]}, ValueError, "weight for '3' must be a finite number"),
        ({"schedule": "step"}, ValueError, "unknown schedule 'step'"),
        ({"distill": 2.0}, ValueError, r"distill must be a finite number in \[0.0, 1.0\]"),
        ({"distill": float("nan")}, ValueError, "distill must be a finite number"),
        ({"temperature": 0}, ValueError, "temperature must be a finite number in \\(0.0"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite number"),
    ],
)
def test_auxloss_bad_arguments(setup, kwargs, error, match):
    aux, _, _ = setup
    with pytest.raises(error, match=match):
        auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5, "high"])
def test_a_schedule_that_leaves_finite_numbers_is_refused(setup, value):
    aux, x, y = setup
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, schedule=lambda t: value)
    loss_func.progress = 0.25
    with pytest.raises(ValueError, match=r"schedule <lambda> gave .* at progress 0.250"):
        loss_func(aux(x), y)


def test_auxloss_needs_an_auxmodel():
    with pytest.raises(TypeError, match="needs the AuxModel"):
        auxhead.AuxLoss(nn.CrossEntropyLoss(), tiny_cnn())


# MultiLoss ---------------------------------------------------------------------------------


def test_multiloss_tuple_one_target_weights():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    loss_func = auxhead.MultiLoss(nn.CrossEntropyLoss(), weights=[1.0, 0.5])
    ce = nn.functional.cross_entropy
    torch.testing.assert_close(loss_func((a, b), y), ce(a, y) + 0.5 * ce(b, y))
    assert set(loss_func.components) == {"0", "1"}


def test_multiloss_dict_outputs_per_output_losses_and_targets():
    # a multi-task model: class logits and a box regression, each against its own target
    preds = {"cls": torch.randn(3, 4), "box": torch.randn(3, 2)}
    y_cls, y_box = torch.tensor([0, 1, 3]), torch.randn(3, 2)
    loss_func = auxhead.MultiLoss(
        {"cls": nn.CrossEntropyLoss(), "box": nn.MSELoss()},
        weights={"cls": 1.0, "box": 2.0},
        targets={"cls": 0, "box": 1},
    )
    expected = nn.functional.cross_entropy(preds["cls"], y_cls) + 2.0 * nn.functional.mse_loss(
        preds["box"], y_box
    )
    torch.testing.assert_close(loss_func(preds, y_cls, y_box), expected)


def test_multiloss_yolo_style_scales_each_with_its_target():
    scales = [torch.randn(2, 3, s, s) for s in (8, 4, 2)]
    targets = [torch.randn(2, 3, s, s) for s in (8, 4, 2)]
    loss_func = auxhead.MultiLoss(nn.MSELoss())
    expected = sum(nn.functional.mse_loss(p, t) for p, t in zip(scales, targets, strict=True))
    torch.testing.assert_close(loss_func(scales, *targets), expected)


def test_multiloss_reduction_and_errors():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    loss_func = auxhead.MultiLoss([nn.CrossEntropyLoss(), nn.CrossEntropyLoss()])
    loss_func.reduction = "none"
    assert loss_func((a, b), y).shape == (3,)
    with pytest.raises(ValueError, match="2 outputs .* and 3 targets"):
        auxhead.MultiLoss(nn.MSELoss())((a, b), y, y, y)
    with pytest.raises(TypeError, match="tuple, list or dict"):
        auxhead.MultiLoss(nn.MSELoss())(a, y)
    with pytest.raises(ValueError, match=r"target index \[5\]"):
        auxhead.MultiLoss(nn.CrossEntropyLoss(), targets=[0, 5])((a, b), y)
