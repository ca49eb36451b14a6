"""Is `EarlyExit` as fast on a ResNet staged by torch.fx as on the ResNet's own modules?

`EarlyExit` cuts a model into stages at its taps: nn.Sequential and torchvision/timm ResNets by
their known forward, running their modules themselves; any other traceable model by splitting
its torch.fx graph into `GraphModule`s. Whether ResNets need their known cut is measured here:
the same torchvision ResNet (the same weights and heads) is staged both ways, the fx way by a
subclass that restates the forward (so auxhead does not recognise it). They route the same
samples the same way; only the stages differ.

Per model, input size and batch size: median seconds per image over --repeats interleaved
runs of the two, random weights (seeded), one torch thread, at three settings: thresholds 1
(no head runs: the stages alone), about a third of the images leaving at each head, and
everyone leaving at the first head.

    OMP_NUM_THREADS=1 python benchmarks/exit_stages.py
    OMP_NUM_THREADS=1 python benchmarks/exit_stages.py --models resnet50 --sizes 128 --repeats 21
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Sequence

import torch
import torchvision

import auxhead

TAPS = ["layer2", "layer3"]


class Traced(torchvision.models.ResNet):
    """torchvision's ResNet, its forward restated: auxhead cuts it from its torch.fx graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def pair(name: str, size: int) -> tuple[auxhead.EarlyExit, auxhead.EarlyExit, torch.Tensor]:
    """(fx-staged EarlyExit, EarlyExit on the ResNet's own modules) with the same weights and
    heads, and images."""
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, name)(num_classes=10).eval()
    images = torch.randn(64, 3, size, size)
    traced = copy.deepcopy(resnet)
    traced.__class__ = Traced
    own = auxhead.attach(resnet, TAPS, head="linear", sample=images[:2]).eval()
    heads = {tap: own.head(tap) for tap in TAPS}  # shared: the same heads on both
    fx_aux = auxhead.attach(traced, heads, sample=images[:2]).eval()
    fx_early, own_early = auxhead.EarlyExit(fx_aux), auxhead.EarlyExit(own)
    assert "torch.fx" in fx_early.mode_reason and "torch.fx" not in own_early.mode_reason
    return fx_early, own_early, images


def thirds(early: auxhead.EarlyExit, images: torch.Tensor) -> list[float]:
    """Thresholds midway between neighbouring scores that send a third of `images` out at
    each head (the rest to the main head)."""
    aux = early.aux_model
    with torch.no_grad(), aux.heads_enabled():
        aux(images)
        scores = [aux.aux_outputs[tap].softmax(-1).amax(-1).sort().values for tap in TAPS]
    aux.clear_aux()
    n = len(images)
    first = scores[0]
    t0 = (first[2 * n // 3 - 1] + first[2 * n // 3]).item() / 2
    return [t0, 0.5 * (scores[1][n // 2 - 1] + scores[1][n // 2]).item()]


def seconds_per_image(fn, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return (time.perf_counter() - start) / sum(len(b) for b in batches)


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=11)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"median of {args.repeats} interleaved repeats, one torch thread; ms per image, "
        "fx stages / the modules' own stages (ratio > 1: fx slower)\n"
    )
    print("| model | px | batch | setting | fx ms | modules ms | fx / modules |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        for size in args.sizes:
            fx_early, seq_early, images = pair(name, size)
            settings = {
                "thresholds 1": [1.0, 1.0],
                "a third per exit": thirds(fx_early, images),
                "all at head 1": [0.0, 1.0],
            }
            for bs in args.batch_sizes:
                count = 16 if bs == 1 else len(images)
                batches = [images[i : i + bs] for i in range(0, count, bs)]
                for setting, thresholds in settings.items():
                    fx_early.thresholds = seq_early.thresholds = thresholds
                    with torch.no_grad():
                        torch.testing.assert_close(fx_early(images), seq_early(images))
                        seconds_per_image(fx_early, batches[:2])  # warm-up
                        seconds_per_image(seq_early, batches[:2])
                        pairs = [
                            (
                                seconds_per_image(fx_early, batches),
                                seconds_per_image(seq_early, batches),
                            )
                            for _ in range(args.repeats)
                        ]
                    fx_s = statistics.median(p[0] for p in pairs)
                    seq_s = statistics.median(p[1] for p in pairs)
                    ratio = statistics.median(p[0] / p[1] for p in pairs)
                    print(
                        f"| {name} | {size} | {bs} | {setting} | {fx_s * 1e3:.3f} | "
                        f"{seq_s * 1e3:.3f} | {ratio:.3f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
