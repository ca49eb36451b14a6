"""Models for the command line: a small built-in CNN, and any torchvision or timm model by name.

Everything here is built from `torch.nn` classes only, so a model pickled with an exported
fastai learner loads without auxhead installed.
"""

from __future__ import annotations

import difflib
import itertools
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from auxhead._weights import WeightsUnavailable, timm_pretrained, torchvision_pretrained

__all__ = [
    "WeightsUnavailable",
    "build_model",
    "classifier_split",
    "default_taps",
    "load_matching",
    "small_cnn",
]

# Widths of the stem and the three stages of `small_cnn`, and convolutions per stage; chosen
# with benchmarks/fmnist_budget.py so the CLI's default run (3 epochs) fits in 5 CPU minutes.
SMALL_CNN_WIDTHS = (16, 32, 64, 128)
SMALL_CNN_DEPTH = 2


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias: BatchNorm follows) + BatchNorm + ReLU."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
            act=nn.ReLU(inplace=True),
        )
    )


def small_cnn(
    num_classes: int = 10,
    *,
    channels: int = 1,
    size: int = 28,
    widths: Sequence[int] = SMALL_CNN_WIDTHS,
    depth: int = SMALL_CNN_DEPTH,
    channels_last: bool = True,
) -> nn.Sequential:
    """A small, fast CNN for small images, with named stages to attach heads to.

    On Fashion-MNIST, 3 epochs of fit_one_cycle (lr 3e-3, bs 256) with two inception heads reach
    92% test accuracy, at about 45-50 CPU-seconds an epoch (benchmarks/fmnist_budget.py).

    stem (3x3 conv) -> stage1, stage2, stage3 (each halves the resolution with a strided conv,
    then `depth - 1` more convs) -> head (global average pool, linear). Every conv is followed
    by BatchNorm and ReLU, so inputs in [0, 1] need no normalisation. For a 28x28 input the
    stages output 14x14, 7x7 and 4x4 maps; inputs larger than 32 pixels get a strided stem.

    Args:
        num_classes: logits out.
        channels: input channels (1 grayscale, 3 RGB).
        size: input height and width; picks the stem's stride (any size runs).
        widths: channels of the stem and the three stages.
        depth: convolutions per stage (at least 1).
        channels_last: store the conv weights channels-last, which makes the convs run
            channels-last (about 1.3x faster on CPU); the model computes the same function.

    Returns:
        An `nn.Sequential` with children "stem", "stage1", "stage2", "stage3", "head".

    Example:
        >>> model = small_cnn(10, channels=1, size=28)
        >>> aux = auxhead.attach(model, default_taps(model), sample=torch.rand(2, 1, 28, 28))
    """
    if len(widths) != 4:
        raise ValueError(f"widths gives the stem and 3 stages: 4 numbers, got {list(widths)}")
    if depth < 1:
        raise ValueError(f"depth is the number of convs per stage, at least 1; got {depth}")
    stem: nn.Module = _conv_bn(channels, widths[0], stride=1 if size <= 32 else 2)
    if size > 96:  # large inputs: downsample 4x before the stages, as ResNet's stem does
        stem = nn.Sequential(OrderedDict(conv_bn=stem, pool=nn.MaxPool2d(2)))
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=stem)
    for i, (width_in, width) in enumerate(itertools.pairwise(widths), start=1):
        convs = [_conv_bn(width_in, width, stride=2)]
        convs += [_conv_bn(width, width) for _ in range(depth - 1)]
        layers[f"stage{i}"] = nn.Sequential(*convs)
    layers["head"] = nn.Sequential(
        OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(widths[-1], num_classes),
        )
    )
    model = nn.Sequential(layers)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def default_taps(model: nn.Module, sample: torch.Tensor | None = None) -> list[str]:
    """Two sensible layers to attach auxiliary heads to: about a third and two thirds deep.

    Knows `small_cnn` (stage1, stage2), ResNet-style models (layer2, layer3), vision
    transformers (blocks a third and two thirds deep) and timm models (the two feature stages
    before the last). For any other model, given a `sample` batch, it looks at the layers that
    run (`auxhead.list_layers`): the shallowest level with at least three blocks (modules with
    children) whose outputs are batch-first feature maps (N, C, H, W or N, H, W, C) and that
    run once, and picks those a third and two thirds of the way along; this covers every
    torchvision classifier (MobileNet, EfficientNet, DenseNet, GoogLeNet, Inception, RegNet;
    AlexNet and VGG, built of plain layers, get their pooling layers).

    Raises:
        ValueError: for a model it does not know and no `sample` (or no such blocks); pick
            layers with `auxhead.list_layers`.
    """
    children = {name for name, _ in model.named_children()}
    if {"stage1", "stage2", "stage3"} <= children:
        return ["stage1", "stage2"]
    if {"layer2", "layer3", "layer4"} <= children:
        return ["layer2", "layer3"]
    blocks = _block_list(model)
    if blocks is not None:  # transformers: blocks a third and two thirds deep
        prefix, n = blocks
        return [f"{prefix}.{names}" for names in _thirds(model, prefix, n)]
    feature_info = getattr(model, "feature_info", None)  # timm models
    modules = [info.get("module") for info in feature_info or [] if isinstance(info, dict)]
    if len(modules) >= 3 and all(modules):
        return modules[-3:-1]
    if sample is not None:
        found = _feature_blocks(model, sample)
        if len(found) >= 3:
            n = len(found)
            return [found[-(-n // 3) - 1], found[-(-2 * n // 3) - 1]]
    raise ValueError(
        f"no default taps for {type(model).__name__}"
        + ("" if sample is not None else " without a sample batch")
        + "; choose layers from auxhead.list_layers(model, sample)"
    )


def _feature_blocks(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The blocks of the shallowest level that has at least three: modules with children,
    run once, whose output is a 4-D batch-first feature map; in execution order. A model
    built of plain layers (AlexNet, VGG) has none: then its pooling layers, which end stages."""
    from auxhead._probe import list_layers

    modules = dict(model.named_modules())
    batch = sample.shape[0]
    maps = [
        info
        for info in list_layers(model, sample)
        if not info.train_only
        and info.calls == 1
        and info.name
        and info.shape is not None
        and len(info.shape) == 4
        and info.shape[0] == batch
    ]
    blocks = [i.name for i in maps if any(True for _ in modules[i.name].children())]
    pools = [i.name for i in maps if "Pool" in i.type]
    for names in (blocks, pools):
        for depth in range(4):
            level = [name for name in names if name.count(".") == depth]
            if len(level) >= 3:
                return level
    return []


def _block_list(model: nn.Module) -> tuple[str, int] | None:
    """(qualified name, length) of a ViT-style list of blocks: torchvision's `encoder.layers`,
    timm's `blocks`; None for other models."""
    for name in ("encoder.layers", "blocks"):
        try:
            blocks = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) >= 3:
            return name, len(blocks)
    return None


def _thirds(model: nn.Module, prefix: str, n: int) -> list[str]:
    children = [name for name, _ in model.get_submodule(prefix).named_children()]
    return [children[n // 3 - 1], children[2 * n // 3 - 1]]


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)


def _timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _replace_first_conv(model: nn.Module, channels: int) -> None:
    """Swap the first Conv2d for one taking `channels` inputs, same otherwise."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == channels:
                return
            conv = nn.Conv2d(
                channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, conv)
            return
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {channels} channels")


def _adapt_input(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first conv's pretrained (out, c, k, k) weight for `channels` inputs: summed over the
    colour channels for grayscale (a gray image is then seen as the same gray in RGB), repeated
    and rescaled otherwise, as timm's `adapt_input_conv` does."""
    if weight.shape[1] == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :channels] * (weight.shape[1] / channels)


def load_matching(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load the entries of `state_dict` whose names and shapes fit `model`; a first conv with
    another number of input channels is adapted (`_adapt_input`), a classifier with another
    number of classes is left as initialised.

    Returns:
        The names of the model's entries that were not loaded (e.g. the new classifier).

    Raises:
        ValueError: nothing in `state_dict` fits the model.
    """
    own = model.state_dict()
    first_conv = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    loaded = {}
    for key, value in state_dict.items():
        if key not in own or not isinstance(value, torch.Tensor):
            continue
        if first_conv is not None and key == f"{first_conv}.weight" and value.dim() == 4:
            value = _adapt_input(value, own[key].shape[1])
        if value.shape == own[key].shape:
            loaded[key] = value
    if not loaded:
        raise ValueError(
            f"none of the {len(state_dict)} entries fits {type(model).__name__}: is it a "
            "state_dict of this architecture?"
        )
    model.load_state_dict(loaded, strict=False)
    return [key for key in own if key not in loaded]


def build_model(
    arch: str = "small_cnn",
    num_classes: int = 10,
    *,
    channels: int = 1,
    size: int = 28,
    pretrained: bool = False,
) -> nn.Module:
    """A classifier by name, freshly initialised or with pretrained weights.

    Args:
        arch: "small_cnn" (the default), a torchvision classification model ("resnet18",
            "mobilenet_v3_small", ...: `torchvision.models.list_models()`), or a timm model
            ("convnext_atto", ...: `timm.list_models()`). Prefix "timm:" or "torchvision:" to
            choose where a name both know comes from (torchvision wins otherwise).
        num_classes: logits out.
        channels: input channels; a torchvision model's first conv is rebuilt to take them.
        size: input height and width (used by `small_cnn`).
        pretrained: load the library's default pretrained weights through its own cache
            (torchvision: torch.hub's `$TORCH_HOME/hub/checkpoints/`; timm: its hub cache),
            downloading them only if they are not there. The classifier is new (num_classes
            outputs); a first conv for other than 3 channels is adapted from the RGB one.

    Returns:
        The model.

    Raises:
        ValueError: an unknown name; the message lists close names and where to see all.
        WeightsUnavailable: `pretrained` weights neither cached nor downloadable.

    Example:
        >>> model = build_model("resnet18", num_classes=10, channels=1)
    """
    source, _, name = arch.rpartition(":")
    if source not in ("", "timm", "torchvision"):
        raise ValueError(
            f"unknown model source {source!r} in {arch!r}; use 'timm:' or 'torchvision:'"
        )
    if not source and name == "small_cnn":
        if pretrained:
            raise ValueError(
                "small_cnn has no pretrained weights; choose a torchvision or timm model"
            )
        return small_cnn(num_classes, channels=channels, size=size)
    if source in ("", "torchvision") and name in _torchvision_names():
        import torchvision

        kwargs = {"aux_logits": False} if name in ("googlenet", "inception_v3") else {}
        if name == "inception_v3" and pretrained:
            kwargs["init_weights"] = False
        state = torchvision_pretrained(name) if pretrained else None
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        _replace_first_conv(model, channels)
        if state is not None:
            try:
                load_matching(model, state)
            except ValueError as error:
                raise WeightsUnavailable(
                    f"the cached pretrained weights of torchvision's {name} do not fit it "
                    f"({error}); delete the file in {torch.hub.get_dir()}/checkpoints and run "
                    "again to download it again"
                ) from None
        return model
    if source in ("", "timm") and _timm_available():
        import timm

        if timm.is_model(name):
            if pretrained:
                return timm_pretrained(name, num_classes=num_classes, in_chans=channels)
            return timm.create_model(name, num_classes=num_classes, in_chans=channels)
    # Suggestions from where the name was looked for, each once, with the prefix it was given.
    known = [] if source else ["small_cnn"]
    if source in ("", "torchvision"):
        known += _torchvision_names()
    if source in ("", "timm") and _timm_available():
        import timm

        known += timm.list_models()
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=5, cutoff=0.6)
    prefix = f"{source}:" if source else ""
    hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
    raise ValueError(
        f"unknown model {arch!r}.{hint} Use 'small_cnn', a torchvision model "
        "(torchvision.models.list_models()) or a timm model (timm.list_models(); "
        "pip install timm)."
    )


def classifier_split(model: nn.Module) -> list[list[nn.Parameter]]:
    """Two parameter groups for fine-tuning: the body, and the final classifier (the last
    `nn.Linear`, or timm's `get_classifier()`). fastai's `freeze()` trains only the last group
    (and, with auxhead, the heads)."""
    get_classifier = getattr(model, "get_classifier", None)
    classifier = get_classifier() if callable(get_classifier) else None
    if not isinstance(classifier, nn.Module) or not list(classifier.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        classifier = linears[-1] if linears else None
    if classifier is None:
        return [list(model.parameters())]
    head = {id(p) for p in classifier.parameters()}
    body = [p for p in model.parameters() if id(p) not in head]
    return [body, list(classifier.parameters())]
