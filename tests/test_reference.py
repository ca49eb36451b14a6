"""The core checked against torchvision's own auxiliary classifiers, bit for bit."""

import copy

import pytest
import torch
import torchvision
from conftest import hook_count, tiny_cnn
from torch import nn

import auxhead


def _twins(builder, aux_names, **kwargs):
    """torchvision's model with its aux heads, and the same weights without them."""
    with_aux = builder(aux_logits=True, init_weights=True, num_classes=10, **kwargs)
    without = builder(aux_logits=False, init_weights=True, num_classes=10, **kwargs)
    state = {k: v for k, v in with_aux.state_dict().items() if not k.startswith(aux_names)}
    without.load_state_dict(state)
    return with_aux, without


def _dropout_off(*models: nn.Module) -> None:
    """Dropout in eval mode, everything else (BatchNorm) training: a deterministic step."""
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()


def test_googlenet_matches_torchvision_aux_heads():
    reference, model = _twins(torchvision.models.googlenet, ("aux1", "aux2"))
    bare = copy.deepcopy(model)
    x = torch.randn(2, 3, 96, 96)
    y = torch.tensor([3, 7])
    aux = auxhead.attach(
        model,
        {
            "inception4a": copy.deepcopy(reference.aux1),
            "inception4d": copy.deepcopy(reference.aux2),
        },
        sample=x,
    )
    # Same weights, same BatchNorm batch statistics, dropout held still: the same computation.
    reference.train(), aux.train()
    _dropout_off(reference, aux)
    expected = reference(x)
    out = aux(x)
    torch.testing.assert_close(out, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(aux.aux_outputs["inception4a"], expected.aux_logits1, rtol=0, atol=0)
    torch.testing.assert_close(aux.aux_outputs["inception4d"], expected.aux_logits2, rtol=0, atol=0)
    ce = nn.CrossEntropyLoss()
    loss = auxhead.AuxLoss(ce, aux, weights=0.3)(out, y)
    by_hand = ce(expected.logits, y) + 0.3 * (
        ce(expected.aux_logits1, y) + ce(expected.aux_logits2, y)
    )
    torch.testing.assert_close(loss, by_hand, rtol=0, atol=1e-6)

    # With dropout on, torchvision's main output depends on its heads (their dropout draws from
    # the model's stream); auxhead's is the bare model's, at the same seed.
    reference.train(), aux.train(), bare.train()
    torch.manual_seed(1)
    expected_bare = bare(x)
    torch.manual_seed(1)
    torch.testing.assert_close(aux(x), expected_bare, rtol=0, atol=0)
    torch.manual_seed(1)
    assert not torch.equal(reference(x).logits, expected_bare)

    # in eval mode the bare model and the wrapped one agree, and no head runs
    reference.eval(), aux.eval()
    torch.testing.assert_close(aux(x), reference(x), rtol=0, atol=0)
    assert aux.aux_outputs == {}


def test_googlenet_builtin_inception_head_has_torchvisions_shape():
    _, model = _twins(torchvision.models.googlenet, ("aux1", "aux2"))
    x = torch.randn(1, 3, 224, 224)
    aux = auxhead.attach(model, ["inception4a"], sample=x)
    ours = aux.head("inception4a")
    theirs = torchvision.models.googlenet(aux_logits=True, init_weights=True, num_classes=10).aux1
    ours_shapes = [tuple(p.shape) for p in ours.parameters()]
    theirs_shapes = [tuple(p.shape) for p in theirs.parameters()]
    assert ours_shapes == theirs_shapes


@pytest.mark.slow
def test_inception3_matches_torchvision_aux_head():
    reference, model = _twins(torchvision.models.inception_v3, ("AuxLogits",))
    bare = copy.deepcopy(model)
    x = torch.randn(2, 3, 299, 299)
    y = torch.tensor([1, 9])
    aux = auxhead.attach(model, {"Mixed_6e": copy.deepcopy(reference.AuxLogits)}, sample=x)
    reference.train(), aux.train()
    _dropout_off(reference, aux)
    expected = reference(x)
    out = aux(x)
    torch.testing.assert_close(out, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(aux.aux_outputs["Mixed_6e"], expected.aux_logits, rtol=0, atol=0)
    ce = nn.CrossEntropyLoss()
    loss = auxhead.AuxLoss(ce, aux, weights=0.4)(out, y)
    torch.testing.assert_close(loss, ce(expected.logits, y) + 0.4 * ce(expected.aux_logits, y))
    bare.train(), aux.train()
    torch.manual_seed(2)
    expected_bare = bare(x)
    torch.manual_seed(2)
    torch.testing.assert_close(aux(x), expected_bare, rtol=0, atol=0)


def test_timm_resnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    aux = auxhead.attach(model, ["layer2", "layer3"], sample=x).train()
    out = aux(x)
    assert out.shape == (2, 4)
    assert {k: tuple(v.shape) for k, v in aux.aux_outputs.items()} == {
        "layer2": (2, 4),
        "layer3": (2, 4),
    }
    assert hook_count(aux.strip()) == 0


def test_timm_vit_token_taps():
    timm = pytest.importorskip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8
    )
    x = torch.randn(2, 3, 32, 32)
    table = {info.name: info.shape for info in auxhead.list_layers(model, x)}
    assert table["blocks.5"] == (2, 17, 192)  # 16 patches + class token
    for kind in ("inception", "linear", "sdn"):
        aux = auxhead.attach(model, ["blocks.5", "blocks.8"], head=kind, sample=x).train()
        aux(x)
        assert [tuple(v.shape) for v in aux.aux_outputs.values()] == [(2, 3), (2, 3)]
        aux.strip()
    assert hook_count(model) == 0


def test_gradients_reach_layers_below_the_tap_only():
    model = tiny_cnn()
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 5, (4,))
    aux = auxhead.attach(model, ["1"], head="linear", sample=x).train()
    aux(x)
    nn.functional.cross_entropy(aux.aux_outputs["1"], y).backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    for later in (model[2], model[5], model[7]):
        assert later.weight.grad is None
    assert aux.head("1").fc.weight.grad.abs().sum() > 0


def test_each_aux_loss_backpropagates_to_its_own_depth():
    model = tiny_cnn()
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 5, (4,))
    aux = auxhead.attach(model, ["1", "3"], head="linear", sample=x).train()
    aux(x)
    nn.functional.cross_entropy(aux.aux_outputs["3"], y).backward()
    assert model[0].weight.grad.abs().sum() > 0 and model[2].weight.grad.abs().sum() > 0
    assert model[5].weight.grad is None
    assert aux.head("1").fc.weight.grad is None
