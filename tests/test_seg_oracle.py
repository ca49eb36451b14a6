"""The oracle: torchvision's own auxiliary head, rebuilt with auxhead.

torchvision's `fcn_resnet50` and `deeplabv3_resnet50` with `aux_loss=True` run an FCNHead on
`backbone.layer3`, upsample its output to the input size (bilinear, align_corners=False) as
`aux`, and their reference recipe trains on ce(out) + 0.5 * ce(aux) with ignore_index=255.
The same model with `aux_classifier=None` and that head attached at `backbone.layer3` must give
the same `out`, the same upsampled aux logits and the same loss, bit for bit (dropout held
still: the heads draw their masks from a stream of their own, torchvision's from the global
one)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import auxhead

K = 4
IGNORE = 255


def _ce() -> nn.CrossEntropyLoss:
    return nn.CrossEntropyLoss(ignore_index=IGNORE)


def reference_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """torchvision's references/segmentation/train.py `criterion`."""
    losses = {
        name: nn.functional.cross_entropy(x, target, ignore_index=IGNORE)
        for name, x in outputs.items()
    }
    if len(losses) == 1:
        return losses["out"]
    return losses["out"] + 0.5 * losses["aux"]


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    y = torch.randint(0, K, (2, 32, 32), generator=generator)
    y[:, :3] = IGNORE
    return x, y


@pytest.fixture(scope="module", params=["fcn_resnet50", "deeplabv3_resnet50"])
def torchvision_pair(request):
    """(torchvision's model with its aux head, the same model without it, the head)."""
    from torchvision.models import segmentation

    torch.manual_seed(0)
    reference = getattr(segmentation, request.param)(
        weights=None, weights_backbone=None, aux_loss=True, num_classes=K
    )
    return request.param, reference


def _split(reference: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    reference = copy.deepcopy(reference)
    model = copy.deepcopy(reference)
    head = model.aux_classifier
    model.aux_classifier = None
    return reference, model, head


def _hold_dropout_still(*modules: nn.Module) -> None:
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Dropout):
                layer.p = 0.0


def test_attached_head_equals_torchvisions_aux_output_and_loss(torchvision_pair, batch):
    _, reference = torchvision_pair
    reference, model, head = _split(reference)
    _hold_dropout_still(reference, model, head)
    x, y = batch
    aux_model = auxhead.attach(model, {"backbone.layer3": head}, sample=x)
    assert reference.training and aux_model.training

    expected = reference(x)
    out = aux_model(x)
    assert type(out) is type(expected) and list(out) == ["out"]
    assert torch.equal(out["out"], expected["out"])
    logits = aux_model.aux_outputs["backbone.layer3"]
    assert logits.shape == (2, K, 4, 4)  # layer3 of a dilated ResNet-50: 1/8 of the input
    upsampled, _ = auxhead.match_size(logits, (y,), "logits")
    assert torch.equal(upsampled, expected["aux"])

    ce = _ce()
    loss_func = auxhead.AuxLoss(
        lambda output, target: ce(output["out"], target),
        aux_model,
        head_loss=ce,
        weights=0.5,
        resize="logits",
    )
    loss = loss_func(out, y)
    assert torch.equal(loss, reference_loss(expected, y))

    # The gradients agree too: the heads' and the backbone's.
    loss.backward()
    reference_loss(expected, y).backward()
    for (name, mine), theirs in zip(
        aux_model.heads["backbone__layer3"].named_parameters(),
        reference.aux_classifier.parameters(),
        strict=True,
    ):
        assert torch.equal(mine.grad, theirs.grad), name
    theirs = reference.backbone.layer1[0].conv1.weight.grad
    assert torch.equal(model.backbone.layer1[0].conv1.weight.grad, theirs)


def test_fcn_kind_with_dropout_on_keeps_out_and_strips(torchvision_pair, batch):
    """head="fcn" builds torchvision's head; with every dropout on, `out` is the bare model's
    at the same seed; strip() gives the model back."""
    name, reference = torchvision_pair
    _, model, head = _split(reference)
    bare = copy.deepcopy(model)
    x, y = batch
    aux_model = auxhead.attach(model, ["backbone.layer3"], head="fcn", sample=x)  # K from "out"
    built = aux_model.head("backbone.layer3")
    assert isinstance(built, auxhead.FCNHead)
    assert str(built) == str(head)  # torchvision's layers, sized the same: dropout 0.1 on
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in head.state_dict().items()
    }
    assert aux_model.head_shapes == {"backbone.layer3": (2, K, 4, 4)}
    assert aux_model.output_shape == (2, K, 32, 32)

    torch.manual_seed(3)
    out = aux_model(x)
    after = torch.rand(4)
    torch.manual_seed(3)
    expected = bare(x)
    assert torch.equal(out["out"], expected["out"])
    # The head's dropout drew from its own stream: the global one is where the bare model left it.
    assert torch.equal(after, torch.rand(4))

    ce = _ce()
    loss_func = auxhead.AuxLoss(
        lambda output, target: ce(output["out"], target), aux_model, head_loss=ce, resize="logits"
    )
    loss_func(out, y).backward()
    assert built[0].weight.grad.any()
    aux_model.eval()
    with torch.no_grad():
        evaluated = aux_model(x)
    stripped = aux_model.strip()
    assert stripped is model and stripped.aux_classifier is None, name
    assert list(stripped.state_dict()) == list(bare.state_dict())
    with torch.no_grad():
        assert torch.equal(stripped(x)["out"], evaluated["out"])
