"""Segmentation models for `auxhead train --task segment`, and where their heads go.

Three families, each built with random weights (nothing is downloaded):

- fastai's U-Net (`DynamicUnet` on a torchvision ResNet body, as `unet_learner` makes it):
  `--arch unet --encoder resnet18`;
- torchvision's segmentation models, by their function name (`fcn_resnet50`,
  `deeplabv3_mobilenet_v3_large`, `lraspp_mobilenet_v3_large`, ...), built without their
  own `aux_classifier` (auxhead attaches one instead); they return torchvision's dict;
- segmentation_models_pytorch (the `smp` extra): `--arch smp-unet`, `smp-fpn`,
  `smp-deeplabv3plus`, `smp-pspnet` with `--encoder` any smp encoder name.

Two head presets, as the field uses them: "fcn", torchvision's and mmsegmentation's FCN head
on the encoder's third stage (weight 0.4, its logits upsampled to the labels); "deep",
nnU-Net's deep supervision, a 1x1-conv head on each decoder block but the last (weights
halving per scale, the coarsest zero; the labels downsampled to each head).

The libraries are imported inside the functions: the core imports only torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

__all__ = ["SEGMENT_ARCHS", "SegmentArch", "build_segmenter", "segment_taps"]

DEFAULT_ENCODER = "resnet18"
TORCHVISION_SEGMENTERS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)
SMP_SEGMENTERS = {  # --arch -> smp's class name
    "smp-unet": "Unet",
    "smp-fpn": "FPN",
    "smp-deeplabv3plus": "DeepLabV3Plus",
    "smp-pspnet": "PSPNet",
}
HEAD_PRESETS = ("fcn", "deep", "both")
DEEP_SUPERVISED = ("unet", "smp-unet", "smp-fpn")  # a decoder with one block per scale


@dataclass(frozen=True)
class SegmentArch:
    """One `--arch` of the segment task: its family and whether it takes `--encoder`."""

    name: str
    family: str  # "fastai", "torchvision" or "smp"

    @property
    def takes_encoder(self) -> bool:
        return self.family != "torchvision"


SEGMENT_ARCHS: dict[str, SegmentArch] = {
    "unet": SegmentArch("unet", "fastai"),
    **{name: SegmentArch(name, "torchvision") for name in TORCHVISION_SEGMENTERS},
    **{name: SegmentArch(name, "smp") for name in SMP_SEGMENTERS},
}


def segment_arch(name: str) -> SegmentArch:
    """The `SegmentArch` called `name`, or a ValueError listing them."""
    if name not in SEGMENT_ARCHS:
        close = difflib.get_close_matches(name, list(SEGMENT_ARCHS), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"unknown segmentation model {name!r}{hint}; choose one of {', '.join(SEGMENT_ARCHS)}"
        )
    return SEGMENT_ARCHS[name]


def build_segmenter(
    arch: str, num_classes: int, *, encoder: str = DEFAULT_ENCODER, size: tuple[int, int]
) -> nn.Module:
    """A segmentation model with random weights predicting `num_classes` per pixel.

    Args:
        arch: a name of `SEGMENT_ARCHS`.
        num_classes: output channels (void not among them).
        encoder: the body of `unet` (a torchvision ResNet name) and the smp models (an smp
            encoder name); torchvision's models name theirs in `arch`.
        size: (height, width) of the images: fastai's U-Net is sized for it.

    Raises:
        ValueError: an unknown arch or encoder, naming the valid ones.
    """
    spec = segment_arch(arch)
    if spec.family == "fastai":
        return _fastai_unet(encoder, num_classes, size)
    if spec.family == "torchvision":
        from torchvision.models import segmentation

        builder = getattr(segmentation, arch)
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    import segmentation_models_pytorch as smp

    if encoder not in smp.encoders.get_encoder_names():
        close = difflib.get_close_matches(encoder, smp.encoders.get_encoder_names(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(
            f"unknown smp encoder {encoder!r}{hint}; "
            "segmentation_models_pytorch.encoders.get_encoder_names() lists them"
        )
    cls = getattr(smp, SMP_SEGMENTERS[arch])
    return cls(encoder_name=encoder, encoder_weights=None, classes=num_classes)


def _fastai_unet(encoder: str, num_classes: int, size: tuple[int, int]) -> nn.Module:
    import torchvision.models
    from fastai.vision.learner import create_unet_model

    bodies = ("resnet18", "resnet34", "resnet50", "resnet101")
    if encoder not in bodies:
        raise ValueError(f"--arch unet takes a torchvision ResNet encoder, one of {bodies}")
    body = getattr(torchvision.models, encoder)
    return create_unet_model(body, num_classes, size, pretrained=False)


def deep_refusal(arch: str) -> str:
    return (
        f"deep supervision needs a decoder with one block per scale ({', '.join(DEEP_SUPERVISED)}"
        f"); {arch} has none: use --heads fcn"
    )


def segment_taps(arch: str, model: nn.Module, heads: str) -> dict[str, list[str]]:
    """Where the preset heads go on `model` (built by `build_segmenter(arch, ...)`).

    Args:
        heads: "fcn", "deep" or "both".

    Returns:
        {"fcn": [the encoder's third stage]} and/or {"deep": [decoder blocks, coarsest
        first]}.

    Raises:
        ValueError: the preset does not fit this model (deep supervision on a model without
            a decoder of several scales; an encoder without a `layer3`), naming `--at`.
    """
    if heads not in HEAD_PRESETS:
        raise ValueError(f"heads must be one of {HEAD_PRESETS}, got {heads!r}")
    spec = segment_arch(arch)
    names = {name for name, _ in model.named_modules()}
    taps: dict[str, list[str]] = {}
    if heads in ("fcn", "both"):
        if spec.family == "fastai":
            stage = "layers.0.6"  # the ResNet body's layer3
        elif spec.family == "torchvision":
            # torchvision's own aux_classifier: on layer3 of a ResNet, on the MobileNet's
            # fourth-last stage (features 4) for deeplabv3_mobilenet_v3_large.
            stage = "backbone.layer3" if "resnet" in arch else "backbone.4"
        elif arch == "smp-pspnet":
            stage = "encoder.layer2"  # smp's PSPNet stops its encoder there (depth 3)
        else:
            stage = "encoder.layer3"
        if stage not in names:
            raise ValueError(
                f"no {stage!r} in {arch} with this encoder for the FCN head; name the layer "
                f"with --at (`auxhead layers` lists them)"
            )
        taps["fcn"] = [stage]
    if heads in ("deep", "both"):
        if spec.family == "fastai":
            blocks = [n for n, m in model.named_modules() if type(m).__name__ == "UnetBlock"]
        elif arch == "smp-unet":
            blocks = [f"decoder.blocks.{i}" for i in range(len(model.decoder.blocks))][:-1]
        elif arch == "smp-fpn":
            blocks = ["decoder.p5", "decoder.p4", "decoder.p3", "decoder.p2"]
        else:
            raise ValueError(deep_refusal(arch))
        taps["deep"] = blocks
    return taps
