"""`auxhead layers`: the layers of an architecture a head can go on (`--at`), with their output
shapes for the data's images and the head shapes that fit each, the default taps marked; with
`--time`, where an early exit would save wall-clock on this machine (`auxhead.exits.exit_timing`).

`LayersConfig` -> `run_layers` -> `LayersResult` -> `LayersResult.table()` (printed).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from auxhead._format import table
from auxhead._probe import LayerInfo, list_layers
from auxhead.cli._common import (
    IMAGENET_SIZE,
    MIXED_SIZE,
    ManualFormatter,
    UsageError,
    fraction,
    image_size,
    load_images,
    positive_int,
)

if TYPE_CHECKING:
    from auxhead.exits import ExitTiming

__all__ = ["LayersConfig", "LayersResult", "add_parser", "run_layers"]

DEFAULT_SIZE = {"small_cnn": 28}  # without --data or --size; other models: IMAGENET_SIZE
SEGMENT_SIZE = 128  # --task segment without --data or --size
TASKS = ("classify", "segment")
NUM_CLASSES = 10  # the classifier's width does not change which layers exist

DESCRIPTION = """\
List every layer of an architecture that runs on the given images, with its output shape and
the head shapes that fit it (pooled: a classifier on (B, K); dense: per-position logits on a
4-D or 3-D map; token: per-token logits on (B, N, C)): the names `auxhead train --at` accepts.
The two default taps (what --at is without it) are marked with *.

With --task segment, list a segmentation model of `auxhead train --task segment` (--arch unet,
a torchvision segmentation model, or smp-unet, smp-fpn, smp-deeplabv3plus, smp-pspnet with
--encoder): * marks the tap of `--heads fcn` and + the taps of `--heads deep` (the decoder
blocks that get a deep-supervision head).

With --time, time the model instead, on this machine at --bs images of --size: up to each
candidate tap (the blocks of the model, or --at), and an "sdn" head there, and print the
wall-clock an early exit there would save with --share of the images leaving, beside what the
FLOPs predict: saved = (share x (T - t) - h) / T, with T the model's time, t the time up to the
tap, h the head's."""

EPILOG = """\
examples:
  auxhead layers                                  # small_cnn on 28x28 grayscale images
  auxhead layers --arch resnet18 --data digits    # the shapes for digits' 8x8 images
  auxhead layers --arch vit_b_16 --size 224 --channels 3
  auxhead layers --arch convnext_atto --size 64   # a timm model
  auxhead layers --arch resnet50 --size 128 --time --bs 64   # where exits save time
  auxhead layers --task segment --arch smp-unet --encoder mobilenet_v2 --size 64

No files are written.

exit codes:
  0    the table was printed
  2    bad input (an unknown --arch, data that cannot be loaded, images the architecture
       cannot take); one line on stderr names the option
  130  interrupted (Ctrl-C)
  1    a bug in auxhead: the traceback, and a line asking to report it
"""


@dataclass(kw_only=True)
class LayersConfig:
    arch: str = "small_cnn"  # with task "segment": a segmentation model (default "unet")
    task: str = "classify"  # or "segment": a model of `auxhead train --task segment`
    encoder: str | None = None  # segment: unet's and the smp models' encoder (resnet18)
    data: str | None = None  # the input shape of this data set (with --size: resized)
    size: int | None = None  # None: the data's size, or DEFAULT_SIZE / IMAGENET_SIZE
    channels: int | None = None  # None: the data's, or 1 for small_cnn, 3 otherwise
    time: bool = False  # time the model up to each candidate tap instead of listing layers
    at: list[str] | None = None  # the taps to time; None: `candidate_taps`
    bs: int = 64  # images per timed batch
    shares: tuple[float, ...] = (0.25, 0.5, 0.75)  # shares leaving, for the savings
    repeats: int = 5  # timed runs per figure (the median is shown)


def head_shapes(info: LayerInfo) -> str:
    """The head shapes that fit a layer's output: "pooled" (a classifier, (B, K)) on any
    batch-first output; "dense" (per-position logits) on a 4-D map or a 3-D (B, C, L) one;
    "token" (per-token logits) on a (B, N, C) sequence."""
    if info.shape is None or len(info.shape) < 2:
        return "-"
    if len(info.shape) == 4 or (len(info.shape) == 3 and info.layout == "channels_first"):
        return "pooled,dense"
    if len(info.shape) == 3 and info.layout == "channels_last":
        return "pooled,token"
    return "pooled"


@dataclass
class LayersResult:
    config: LayersConfig
    input_shape: tuple[int, ...]
    layers: list[LayerInfo]
    default_taps: list[str]  # segment: the tap of --heads fcn
    timing: ExitTiming | None = None  # with --time
    deep_taps: list[str] = field(default_factory=list)  # segment: those of --heads deep
    encoder: str | None = None  # segment: the encoder built (--encoder or the default)

    def title(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.config.task != "segment":
            return (
                f"{self.config.arch} on {shape} inputs (* default taps: "
                f"{', '.join(self.default_taps) or 'none, pass --at'})"
            )
        encoder = f" (encoder {self.encoder})" if self.encoder else ""
        deep = ", ".join(self.deep_taps) or "none, this model has no decoder blocks"
        return (
            f"{self.config.arch}{encoder} on {shape} inputs (* the --heads fcn tap: "
            f"{', '.join(self.default_taps) or 'none, pass --at'}; + the --heads deep taps: "
            f"{deep})"
        )

    def mark(self, name: str) -> str:
        if name in self.default_taps:
            return "* "
        return "+ " if name in self.deep_taps else "  "

    def table(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.timing is not None:
            return "\n".join([f"{self.config.arch} on {shape} inputs", str(self.timing)])
        rows = [
            [
                self.mark(info.name) + info.name,
                info.type,
                head_shapes(info),
                "x".join(map(str, info.shape[1:])) if info.shape else "-",  # per image
            ]
            for info in self.layers
        ]
        return "\n".join(
            [
                self.title(),
                "",
                table(["  name", "type", "heads", "output shape"], rows, align="lllr"),
            ]
        )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "layers",
        help="list the layers a head can go on (the names --at accepts)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=ManualFormatter,
    )
    p.add_argument("--arch", default=None,
                   help="as for `auxhead train --arch` (default small_cnn; unet with --task "
                   "segment)")  # fmt: skip
    p.add_argument("--task", default="classify", choices=TASKS,
                   help="'segment': a segmentation model of `auxhead train --task segment`, "
                   "its --heads fcn and deep taps marked")  # fmt: skip
    p.add_argument("--encoder", default=None,
                   help="with --task segment: the encoder of unet and of the smp models, as "
                   "for `auxhead train --encoder` (default resnet18)")  # fmt: skip
    p.add_argument("--data", default=None, help="take the input size and channels from this data")
    p.add_argument("--size", type=image_size, default=None, metavar="N",
                   help="N x N inputs (with --data: resized, as train --size)")  # fmt: skip
    p.add_argument("--channels", type=positive_int, default=None,
                   help="input channels without --data (default 1: small_cnn, else 3)")  # fmt: skip
    p.add_argument("--time", action="store_true",
                   help="time the model up to each candidate tap and a head there, and print "
                   "the wall-clock an exit would save (see above)")  # fmt: skip
    p.add_argument("--at", nargs="+", default=None, metavar="LAYER",
                   help="with --time: the taps to time (default: the model's blocks)")  # fmt: skip
    p.add_argument("--bs", type=positive_int, default=64,
                   help="with --time: images per timed batch (random, --size)")  # fmt: skip
    p.add_argument("--share", type=fraction, nargs="+", default=[0.25, 0.5, 0.75], metavar="P",
                   help="with --time: shares of images leaving at an exit")  # fmt: skip
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="with --time: timed runs per figure (the median is shown)")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> LayersConfig:
    if not args.time:
        given = [
            option
            for option, value, default in (
                ("--at", args.at, None),
                ("--bs", args.bs, 64),
                ("--share", args.share, [0.25, 0.5, 0.75]),
                ("--repeats", args.repeats, 5),
            )
            if value != default
        ]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(f"{', '.join(given)} only {verb} with --time; add --time")
    if args.task == "segment" and args.time:
        raise UsageError("--time is for --task classify (early exits)")
    if args.task != "segment" and args.encoder is not None:
        raise UsageError("--encoder is for --task segment; add --task segment")
    return LayersConfig(
        arch=args.arch or ("unet" if args.task == "segment" else "small_cnn"),
        task=args.task,
        encoder=args.encoder,
        data=args.data,
        size=args.size,
        channels=args.channels,
        time=args.time,
        at=args.at,
        bs=args.bs,
        shares=tuple(args.share),
        repeats=args.repeats,
    )


def run_layers(
    config: LayersConfig, say: Callable[[str], None] = lambda line: None
) -> LayersResult:
    """Build the architecture, probe it with two blank images, and list its layers.

    Raises:
        UsageError: an unknown architecture, data that cannot be loaded, or images it cannot
            take.
    """
    from auxhead.cli.train import check_runs
    from auxhead.models import build_model, default_taps

    if config.task == "segment":
        return _segment_layers(config, say)
    if config.data is not None:
        data = load_images(config.data, size=config.size, fallback=MIXED_SIZE, say=say)
        channels, size, n_classes = data.channels, data.size, data.c
    else:
        channels = config.channels or (1 if config.arch == "small_cnn" else 3)
        size = config.size or DEFAULT_SIZE.get(config.arch, IMAGENET_SIZE)
        n_classes = NUM_CLASSES
    try:
        model = build_model(config.arch, n_classes, channels=channels, size=size)
    except ValueError as error:
        from auxhead._segmodels import SEGMENT_ARCHS

        if config.arch in SEGMENT_ARCHS:
            raise UsageError(
                f"--arch {config.arch} is a segmentation model: add --task segment"
            ) from None
        raise UsageError(f"--arch: {error}") from None
    sample = torch.zeros(2, channels, size, size)
    check_runs(model, sample, config.arch)
    try:
        taps = default_taps(model, sample)
    except ValueError:
        taps = []
    if config.time:
        timing = _timing(model, config, channels, size)
        return LayersResult(config, tuple(sample.shape[1:]), [], taps, timing)
    return LayersResult(config, tuple(sample.shape[1:]), list_layers(model, sample), taps)


def _segment_layers(config: LayersConfig, say: Callable[[str], None]) -> LayersResult:
    """A model of `auxhead train --task segment`, its --heads fcn and deep taps marked as that
    command chooses them."""
    from auxhead._segmodels import DEFAULT_ENCODER, build_segmenter, segment_arch, segment_taps
    from auxhead.cli.segment import nnunet_weights
    from auxhead.cli.train import check_runs

    if config.data is not None:
        data = _segmentation_data(config, say)
        channels, (height, width), n_classes = data.train_x.shape[1], data.size, data.c
    else:
        channels, n_classes = config.channels or 3, NUM_CLASSES
        height = width = config.size or SEGMENT_SIZE
    encoder = config.encoder or DEFAULT_ENCODER
    try:
        spec = segment_arch(config.arch)
    except ValueError as error:
        raise UsageError(f"--arch: {error}") from None
    if config.encoder is not None and not spec.takes_encoder:
        raise UsageError(f"--encoder: {config.arch} names its encoder itself; drop --encoder")
    try:
        model = build_segmenter(config.arch, n_classes, encoder=encoder, size=(height, width))
    except ValueError as error:
        raise UsageError(f"--arch/--encoder: {error}") from None
    sample = torch.zeros(2, channels, height, width)
    check_runs(model, sample, config.arch)
    taps = {}
    for preset in ("fcn", "deep"):
        with contextlib.suppress(ValueError):  # no FCN tap (--at), or no decoder blocks
            taps.update(segment_taps(config.arch, model, preset))
    deep = list(nnunet_weights(model, sample, taps.get("deep", [])))  # the coarsest: none
    layers = list_layers(model, sample)
    return LayersResult(
        config,
        tuple(sample.shape[1:]),
        layers,
        taps.get("fcn", []),
        deep_taps=deep,
        encoder=encoder if spec.takes_encoder else None,
    )


def _segmentation_data(config: LayersConfig, say: Callable[[str], None]):
    from auxhead.data import MixedSizes, load_segmentation

    try:
        return load_segmentation(config.data, size=config.size)
    except MixedSizes as error:
        say(f"{error} -- resizing every image to {MIXED_SIZE}x{MIXED_SIZE} (--size N chooses)")
        return load_segmentation(config.data, size=MIXED_SIZE)


def _timing(model: torch.nn.Module, config: LayersConfig, channels: int, size: int) -> ExitTiming:
    """`exit_timing` on --bs random images, one "sdn" head per tap."""
    from auxhead._probe import list_layers as layers_of
    from auxhead.exits import exit_timing

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(config.bs, channels, size, size, generator=generator)
    if config.at is not None:
        known = set(layers_of(model, images[:2]).names)
        unknown = [name for name in config.at if name not in known]
        if unknown:
            raise UsageError(
                f"--at: {unknown} are not layers of {config.arch}; "
                f"`auxhead layers --arch {config.arch}` lists them"
            )
    try:
        return exit_timing(
            model,
            images,
            config.at,
            head="sdn",
            num_classes=NUM_CLASSES,
            shares=config.shares,
            repeats=config.repeats,
        )
    except ValueError as error:  # taps that cannot take a head, in the wrong order, ...
        raise UsageError(f"--at: {error}") from None
