"""`auxhead layers`: the layers of an architecture a head can go on (`--at`), with their output
shapes for the data's images, the default taps marked.

`LayersConfig` -> `run_layers` -> `LayersResult` -> `LayersResult.table()` (printed).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from auxhead._format import table
from auxhead._probe import LayerInfo, list_layers
from auxhead.cli._common import (
    IMAGENET_SIZE,
    MIXED_SIZE,
    ManualFormatter,
    UsageError,
    image_size,
    load_images,
    positive_int,
)

__all__ = ["LayersConfig", "LayersResult", "add_parser", "run_layers"]

DEFAULT_SIZE = {"small_cnn": 28}  # without --data or --size; other models: IMAGENET_SIZE
NUM_CLASSES = 10  # the classifier's width does not change which layers exist

DESCRIPTION = """\
List every layer of an architecture that runs on the given images, with its output shape:
the names `auxhead train --at` accepts. The two default taps (what --at is without it) are
marked with *."""

EPILOG = """\
examples:
  auxhead layers                                  # small_cnn on 28x28 grayscale images
  auxhead layers --arch resnet18 --data digits    # the shapes for digits' 8x8 images
  auxhead layers --arch vit_b_16 --size 224 --channels 3
  auxhead layers --arch convnext_atto --size 64   # a timm model

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
    arch: str = "small_cnn"
    data: str | None = None  # the input shape of this data set (with --size: resized)
    size: int | None = None  # None: the data's size, or DEFAULT_SIZE / IMAGENET_SIZE
    channels: int | None = None  # None: the data's, or 1 for small_cnn, 3 otherwise


@dataclass
class LayersResult:
    config: LayersConfig
    input_shape: tuple[int, ...]
    layers: list[LayerInfo]
    default_taps: list[str]

    def table(self) -> str:
        rows = [
            [
                ("* " if info.name in self.default_taps else "  ") + info.name,
                info.type,
                "x".join(map(str, info.shape[1:])) if info.shape else "-",  # per image
            ]
            for info in self.layers
        ]
        shape = "x".join(map(str, self.input_shape))
        return "\n".join(
            [
                f"{self.config.arch} on {shape} inputs (* default taps: "
                f"{', '.join(self.default_taps) or 'none, pass --at'})",
                "",
                table(["  name", "type", "output shape"], rows, align="llr"),
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
    p.add_argument("--arch", default="small_cnn", help="as for `auxhead train --arch`")
    p.add_argument("--data", default=None, help="take the input size and channels from this data")
    p.add_argument("--size", type=image_size, default=None, metavar="N",
                   help="N x N inputs (with --data: resized, as train --size)")  # fmt: skip
    p.add_argument("--channels", type=positive_int, default=None,
                   help="input channels without --data (default 1: small_cnn, else 3)")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> LayersConfig:
    return LayersConfig(arch=args.arch, data=args.data, size=args.size, channels=args.channels)


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
        raise UsageError(f"--arch: {error}") from None
    sample = torch.zeros(2, channels, size, size)
    check_runs(model, sample, config.arch)
    try:
        taps = default_taps(model, sample)
    except ValueError:
        taps = []
    return LayersResult(config, tuple(sample.shape[1:]), list_layers(model, sample), taps)
