"""Dense heads on segmentation models nobody here wrote: torchvision, segmentation_models_pytorch,
fastai's DynamicUnet and timm `features_only` backbones, at random init on small inputs.

Each family: attach dense heads (tap names found with `auxhead.list_layers`), check the model's
output in training mode is the bare model's, bit for bit and of the same type, train one step
with `AuxLoss`, then `strip()` gives back the model with the same state_dict and outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import auxhead
from auxhead.attach import _RunHead

K = 5  # classes
IGNORE = 255
SIZE = 32  # the smallest input every model here takes (smp's U-Net: a multiple of 32)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    y = torch.randint(0, K, (2, SIZE, SIZE), generator=generator)
    y[:, :3] = IGNORE  # a band of void pixels
    return x, y


def _assert_same(a, b) -> None:
    """Bit for bit, and of the same type: a tensor, a dict of tensors or a list of them."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for left, right in zip(a, b, strict=True):
            assert torch.equal(left, right)
    else:
        assert torch.equal(a, b)


def _run_family(build, at, batch, *, main_loss=None, **loss_kwargs) -> auxhead.AuxModel:
    """Attach `at` to build(), train one step, strip; checked against the bare model at the
    same seed on a copy of it. Returns the stripped AuxModel."""
    x, y = batch
    torch.manual_seed(0)
    model = build()
    bare = copy.deepcopy(model)
    aux_model = auxhead.attach(model, at, sample=x)  # num_classes read off the output
    assert model.training and aux_model.training

    torch.manual_seed(1)
    out = aux_model(x)
    torch.manual_seed(1)
    reference = bare(x)
    _assert_same(out, reference)
    assert list(aux_model.aux_outputs) == list(at)
    for name, logits in aux_model.aux_outputs.items():
        assert logits.dim() == 4 and logits.shape[:2] == (2, K), name

    ce = nn.CrossEntropyLoss(ignore_index=IGNORE)
    loss_func = auxhead.AuxLoss(main_loss or ce, aux_model, head_loss=ce, **loss_kwargs)
    loss = loss_func(out, y)
    assert torch.isfinite(loss)
    optimizer = torch.optim.SGD(aux_model.parameters(), lr=1e-3)
    loss.backward()
    for name, param in aux_model.heads.named_parameters():
        assert param.grad is not None, name
    optimizer.step()

    aux_model.eval()
    with torch.no_grad():
        evaluated = aux_model(x)
    assert aux_model.aux_outputs == {}
    trained = {
        key.removeprefix("model."): value
        for key, value in aux_model.state_dict().items()
        if key.startswith("model.")
    }
    stripped = aux_model.strip()
    assert stripped is model and type(stripped) is type(bare)
    state = stripped.state_dict()
    assert list(state) == list(bare.state_dict())
    for key, value in state.items():
        assert torch.equal(value, trained[key]), key
    assert not any(
        isinstance(h, _RunHead) for m in stripped.modules() for h in m._forward_hooks.values()
    )
    with torch.no_grad():
        _assert_same(stripped(x), evaluated)
    return aux_model


def _out(loss):
    return lambda output, y: loss(output["out"], y)


@pytest.mark.parametrize(
    ("builder", "at"),
    [
        ("deeplabv3_mobilenet_v3_large", {"backbone.4": "fcn", "backbone.13": "conv1x1"}),
        ("lraspp_mobilenet_v3_large", {"backbone.6": "fcn", "classifier.cbr": "conv1x1"}),
    ],
)
def test_torchvision_segmentation_models(builder, at, batch):
    from torchvision.models import segmentation

    def build():
        return getattr(segmentation, builder)(weights=None, weights_backbone=None, num_classes=K)

    ce = nn.CrossEntropyLoss(ignore_index=IGNORE)
    _run_family(build, at, batch, main_loss=_out(ce), weights=0.4, resize="logits")


# Encoder stages and decoder blocks, per smp architecture and encoder (from list_layers).
SMP_TAPS = {
    ("Unet", "resnet18"): ["encoder.layer3", "decoder.blocks.1", "decoder.blocks.2"],
    ("FPN", "resnet18"): ["encoder.layer3", "decoder.p4", "decoder.p2"],
    ("DeepLabV3Plus", "resnet18"): ["encoder.layer3", "decoder.aspp", "decoder.block2"],
    ("PSPNet", "resnet18"): ["encoder.layer2", "decoder.psp"],
    ("Unet", "tu-mobilenetv3_small_100"): [
        "encoder.model.blocks.2",
        "decoder.blocks.1",
        "decoder.blocks.3",
    ],
    ("FPN", "tu-mobilenetv3_small_100"): ["encoder.model.blocks.2", "decoder.p3"],
    ("DeepLabV3Plus", "tu-mobilenetv3_small_100"): ["encoder.model.blocks.1", "decoder.aspp"],
    ("PSPNet", "tu-mobilenetv3_small_100"): ["encoder.model.blocks.1", "decoder.psp"],
}


# One encoder per architecture in the default run, the other under --slow.
SMP_DEFAULT = {("Unet", "resnet18"), ("FPN", "tu-mobilenetv3_small_100")}
SMP_DEFAULT |= {("DeepLabV3Plus", "tu-mobilenetv3_small_100"), ("PSPNet", "resnet18")}


@pytest.mark.parametrize(
    ("arch", "encoder"),
    [
        pair if pair in SMP_DEFAULT else pytest.param(*pair, marks=pytest.mark.slow)
        for pair in SMP_TAPS
    ],
)
def test_smp_models(arch, encoder, batch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    taps = SMP_TAPS[arch, encoder]
    at = {taps[0]: "fcn", **dict.fromkeys(taps[1:], "conv1x1")}  # FCN on the encoder

    def build():
        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=K)

    # Deep supervision on U-Nets, nnU-Net's way; the others torchvision's.
    if arch == "Unet":
        _run_family(build, at, batch, weights="nnunet", resize="targets")
    else:
        _run_family(build, at, batch, weights=0.4, resize="logits")


def test_smp_refuses_a_dense_head_on_its_pooled_classification_head(batch):
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("resnet18", encoder_weights=None, classes=K, aux_params={"classes": 3})
    with pytest.raises(auxhead.AttachError, match=r"layer 'classification_head.2'.*'fcn'"):
        auxhead.attach(model, ["classification_head.2"], head="fcn", num_classes=K, sample=batch[0])


def test_fastai_dynamic_unet(batch):
    pytest.importorskip("fastai")
    from fastai.vision.learner import create_body
    from fastai.vision.models.unet import DynamicUnet
    from torchvision.models import resnet18

    def build():
        return DynamicUnet(create_body(resnet18(), pretrained=False), K, (SIZE, SIZE))

    # layers.4 ... layers.7 are the decoder's UnetBlocks, at 1/16 ... 1/2 of the input size.
    at = dict.fromkeys(["layers.5", "layers.6", "layers.7"], "conv1x1")
    _run_family(build, at, batch, weights="nnunet", resize="targets")


class _TimmSegmenter(nn.Module):
    """A features_only timm backbone under a 1x1 classifier, upsampled: the usual way to build
    a segmenter on one."""

    def __init__(self, name: str) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(name, features_only=True, pretrained=False)
        self.classifier = nn.Conv2d(self.backbone.feature_info.channels()[-1], K, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)  # a list of maps, highest resolution first
        logits = self.classifier(features[-1])
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    ("name", "taps"),
    [
        ("resnet18", ["layer2", "layer3"]),
        pytest.param("efficientnet_b0", ["blocks.2", "blocks.4"], marks=pytest.mark.slow),
    ],
)
def test_timm_features_only_backbones(name, taps, batch):
    pytest.importorskip("timm")
    at = {f"backbone.{taps[0]}": "fcn", f"backbone.{taps[1]}": "conv1x1"}
    _run_family(lambda: _TimmSegmenter(name), at, batch, weights=0.4, resize="logits")


def test_timm_features_only_model_keeps_its_list_of_maps(batch):
    timm = pytest.importorskip("timm")
    x = batch[0]
    torch.manual_seed(0)
    backbone = timm.create_model("resnet18", features_only=True, pretrained=False)
    # Its output is a list of features, not logits: num_classes is not guessed from it.
    with pytest.raises(auxhead.AttachError, match="num_classes"):
        auxhead.attach(backbone, ["layer2"], head="conv1x1", sample=x)
    aux_model = auxhead.attach(backbone, ["layer2"], head="conv1x1", num_classes=K, sample=x)
    out = aux_model(x)
    assert isinstance(out, list) and len(out) == 5
    assert aux_model.aux_outputs["layer2"].shape == (2, K, SIZE // 8, SIZE // 8)
