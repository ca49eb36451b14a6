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

__all__ = ["SEGMENT_ARCHS", "SegmentArch", "build_segmenter", "segment_taps", "smp_fcn_tap"]

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
FCN_STRIDE = 16  # torchvision's FCN head: on layer3, the stride-16 stage of an undilated ResNet
PROBE_SIZE = 64  # the blank image an smp encoder is probed with (a multiple of 32)
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

    if encoder not in smp.encoders.get_encoder_names() and not _timm_encoder(encoder):
        close = difflib.get_close_matches(encoder, smp.encoders.get_encoder_names(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(
            f"unknown smp encoder {encoder!r}{hint}; "
            "segmentation_models_pytorch.encoders.get_encoder_names() lists them, and "
            "tu-NAME takes timm's model NAME"
        )
    cls = getattr(smp, SMP_SEGMENTERS[arch])
    return cls(encoder_name=encoder, encoder_weights=None, classes=num_classes)


def _timm_encoder(encoder: str) -> bool:
    """Whether `encoder` is smp's "tu-NAME" for a timm model NAME (smp builds it with timm)."""
    if not encoder.startswith("tu-"):
        return False
    import timm

    return timm.is_model(encoder[3:])


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
        {"fcn": [the encoder's third stage (`smp_fcn_tap` for smp)]} and/or {"deep": [decoder
        blocks, coarsest first]}.

    Raises:
        ValueError: the preset does not fit this model (deep supervision on a model without
            a decoder of several scales; an smp encoder whose stage features no layer
            returns), naming `--at`.
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
        else:
            stage = smp_fcn_tap(model)
        if stage is not None and stage not in names:  # a model that is not the arch's
            raise ValueError(f"no {stage!r} in {arch} for the FCN head; name the layer with --at")
        if stage is None:
            raise ValueError(
                f"{arch} with this encoder has no layer whose output is the encoder's stage "
                f"feature at stride {FCN_STRIDE} (it is computed inside a forward, not by a layer) "
                "for the FCN head; name the layer with --at"
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


def smp_fcn_tap(model: nn.Module) -> str | None:
    """Where the FCN head goes on an smp model, for any smp encoder: the outermost layer of
    `model.encoder` whose output is the feature the encoder returns at stride 16 (torchvision's
    `layer3`; `features.13` of mobilenet_v2, `model.s3` of timm's regnets), or its deepest
    feature when the encoder stops earlier (PSPNet's, at stride 8). None when no layer returns
    that feature as it is (mit_b0 reshapes tokens inside its forward).

    Found by running the encoder once on a blank PROBE_SIZE image with a hook on every layer
    and matching the tensors the encoder returns to the hooks' outputs by identity.
    """
    import torch

    encoder = model.encoder
    calls: list[tuple[str, object]] = []
    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: calls.append((name, out)))
        for name, module in encoder.named_modules()
        if name
    ]
    channels = getattr(encoder, "_in_channels", 3)
    was_training = encoder.training
    try:
        with torch.no_grad():
            features = encoder.eval()(torch.zeros(1, channels, PROBE_SIZE, PROBE_SIZE))
    finally:
        for hook in hooks:
            hook.remove()
        encoder.train(was_training)
    stages = [f for f in features[1:] if f.ndim == 4 and f.shape[1] > 0]
    at_stride = [f for f in stages if PROBE_SIZE // f.shape[-1] == FCN_STRIDE]
    feature = (at_stride or stages)[0 if at_stride else -1]
    # the outermost layer that returned it; of those, the last to run (an in-place ReLU after
    # a BatchNorm returns the same tensor, as the BatchNorm saw it before the ReLU)
    found = [(name.count("."), -i, name) for i, (name, out) in enumerate(calls) if out is feature]
    return f"encoder.{min(found)[2]}" if found else None
