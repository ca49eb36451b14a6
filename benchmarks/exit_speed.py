"""Does the wall-clock of `EarlyExit` track the FLOPs it saves?

For a model with two heads, the thresholds are set so that a given share of the images leave
at the first head (the second off), then batch-size-1 latency and batch-64/256 throughput of
the `EarlyExit` are measured against the bare model (heads stripped) side by side, with
interleaved repeats, next to the speed-up the FLOPs predict (full FLOPs / mean FLOPs with
exits). Routing does not depend on accuracy, so the weights are random (seeded): only the
share of images leaving matters.

Also: the fixed overhead of one exit, the `EarlyExit` with thresholds 1 (every image to the
main head, no head runs) and with the first head running but nobody leaving (threshold 0.999
above every score), against the bare model.

Each batch size gets a table, with the speed-up of routing that costs nothing beside the
measured one (from the measured time of the model up to the first tap and of the head); with
--onnx, the exported .onnx file in onnxruntime against the bare model's own ONNX export, and
with --pt2 the exported torch.export program against the bare eager model, at each batch size;
then a table of the exported speed-ups against eager's (the exported programs narrow the batch
as the eager forward does, so their speed-up should follow it).

    OMP_NUM_THREADS=1 python benchmarks/exit_speed.py --onnx               # Fashion-MNIST CNN
    OMP_NUM_THREADS=1 python benchmarks/exit_speed.py --model resnet50 --size 128 --images 128

CPU timings on a shared machine are noisy: each figure is the median of --repeats interleaved
runs, one torch thread.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import deep_supervision as ds

import auxhead


def build(name: str, size: int, count: int = 256) -> tuple[auxhead.AuxModel, torch.Tensor]:
    """(AuxModel with 2 sdn heads, `count` random input images)."""
    torch.manual_seed(0)
    if name == "fmnist_cnn":
        model: nn.Module = ds.resnet_cnn()
        images = torch.randn(count, 1, 28, 28)
        taps = ["stage1", "stage2"]
    else:
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=10)
        images = torch.randn(count, 3, size, size)
        # ResNets: after stages 2 and 3; EfficientNet/MobileNet: after the 3rd and 5th block
        taps = ["layer2", "layer3"] if name.startswith("resnet") else ["features.3", "features.5"]
    aux_model = auxhead.attach(model, taps, head="sdn", sample=images[:2])
    return aux_model.eval(), images


def timed(fn, batches: list[torch.Tensor]) -> float:
    """Seconds per image over `batches`."""
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return (time.perf_counter() - start) / sum(len(b) for b in batches)


class OnnxPair:
    """The bare model and the routed `EarlyExit` exported to ONNX, run in onnxruntime on one
    thread."""

    def __init__(self, bare: nn.Module, sample: torch.Tensor, folder: Path) -> None:
        import onnxruntime

        self.folder, self.ort = folder, onnxruntime
        path = folder / "bare.onnx"
        batch = torch.export.Dim("batch", min=1, max=65536)
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                bare, (sample,), dynamo=True, dynamic_shapes=({0: batch},), input_names=["x"]
            ).save(str(path))
        self.bare = self._session(path)

    def _session(self, path: Path):
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        return self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def routed(self, early: auxhead.EarlyExit, sample: torch.Tensor):
        with contextlib.redirect_stderr(io.StringIO()):
            return self._session(early.export(self.folder / "early.onnx", sample))

    @staticmethod
    def timed(session, batches: list) -> float:
        """Seconds per image over `batches` (numpy arrays)."""
        start = time.perf_counter()
        for batch in batches:
            session.run(None, {"x": batch})
        return (time.perf_counter() - start) / sum(len(b) for b in batches)


def exported_pt2(early: auxhead.EarlyExit, sample: torch.Tensor, folder: Path):
    """The routed `EarlyExit` as a torch.export program, loaded back (`.module()`)."""
    return torch.export.load(early.export(folder / "early.pt2", sample)).module()


class _AtTap(Exception):
    """Raised by a hook at the first tap: the model has run up to it."""


def prefix_and_head(early, images, bs, repeats) -> tuple[float, float]:
    """Median seconds per image of the model up to the first tap (a forward hook stops it
    there), and of the first head on that output: what leaving there costs with no routing."""
    if early.mode != "staged":
        return math.nan, math.nan
    aux, tap = early.aux_model, early.taps[0]
    head = aux.head(tap)
    count = 64 if bs == 1 else len(images)
    batches = [images[i : i + bs] for i in range(0, count, bs)]
    bare = copy.deepcopy(aux).strip().eval()

    def stop(_module, _args, output):
        raise _AtTap(output)

    hook = bare.get_submodule(tap).register_forward_hook(stop)

    def prefix(h):
        try:
            bare(h)
        except _AtTap as reached:
            return reached.args[0]
        raise AssertionError(f"tap {tap!r} did not run")

    with torch.no_grad():
        features = [prefix(b) for b in batches]
        timed(prefix, batches[:2]), timed(lambda f: head(aux.head_input(tap, f)), features[:2])
        prefix_s = statistics.median(timed(prefix, batches) for _ in range(repeats))
        head_s = statistics.median(
            timed(lambda f: head(aux.head_input(tap, f)), features) for _ in range(repeats)
        )
    hook.remove()
    return prefix_s, head_s


def no_overhead(full_s: float, prefix_s: float, head_s: float, leaving: float | None) -> float:
    """The speed-up of routing that costs nothing: every image pays the prefix and (when the
    head runs) the head, and those that stay pay the rest of the bare model."""
    if leaving is None:  # no head runs
        return 1.0
    return full_s / (prefix_s + head_s + (1 - leaving) * max(full_s - prefix_s, 0.0))


def measure(early, bare, images, batch_sizes, repeats) -> dict[int, tuple[float, float]]:
    """Per batch size: (median s/image of the EarlyExit, of the bare model), interleaved."""
    out = {}
    with torch.no_grad():
        for bs in batch_sizes:
            count = 64 if bs == 1 else len(images)
            batches = [images[i : i + bs] for i in range(0, count, bs)]
            timed(early, batches[:2])
            timed(bare, batches[:2])
            pairs = [(timed(early, batches), timed(bare, batches)) for _ in range(repeats)]
            out[bs] = (
                statistics.median(p[0] for p in pairs),
                statistics.median(p[1] for p in pairs),
            )
    return out


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist_cnn")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.95])
    parser.add_argument(
        "--images", type=int, default=256, help="random images timed (bs 1 times the first 64)"
    )
    parser.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the two settings where nobody leaves (thresholds 1; head 1 running)",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also the exported .onnx in onnxruntime at each batch size, against the bare "
        "model's .onnx (needs auxhead[onnx])",
    )
    parser.add_argument(
        "--pt2",
        action="store_true",
        help="also the exported torch.export program at each batch size, against the bare model",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    aux_model, images = build(args.model, args.size, args.images)
    bare = copy.deepcopy(aux_model).strip().eval()
    early = auxhead.EarlyExit(aux_model)
    labels = torch.zeros(len(images), dtype=torch.long)
    with torch.no_grad(), aux_model.heads_enabled():
        aux_model(images)
        first = aux_model.aux_outputs[aux_model.taps[0]].softmax(-1).amax(-1)
    aux_model.clear_aux()
    print(
        f"{args.model}{'' if args.model == 'fmnist_cnn' else f' at {args.size} px'}, mode "
        f"{early.mode}, one torch thread, median of {args.repeats} interleaved repeats\n"
    )
    sizes: list[object] = list(args.batch_sizes)
    if args.onnx:
        onnx = OnnxPair(bare, images[:2], Path(tempfile.mkdtemp(prefix="exit-speed-")))
        sizes += [f"ONNX {bs}" for bs in args.batch_sizes]
    if args.pt2:
        sizes += [f"pt2 {bs}" for bs in args.batch_sizes]
    bound = {bs: prefix_and_head(early, images, bs, args.repeats) for bs in args.batch_sizes}
    settings = []
    if not args.no_baselines:
        settings.append(("thresholds 1 (no head runs)", [1.0, 1.0]))
        nobody = [min(0.9999, first.max().item() + 1e-4), 1.0]
        settings.append(("head 1 runs, nobody leaves", nobody))
    for share in args.shares:
        threshold = 0.0 if share >= 1 else torch.quantile(first, 1 - share).item()
        settings.append((f"{share:.0%} leave at head 1", [max(threshold, 0.0), 1.0]))
    rows: dict[object, list[str]] = {bs: [] for bs in sizes}
    speedups: dict[object, list[float]] = {bs: [] for bs in sizes}
    for name, thresholds in settings:
        early.thresholds = thresholds
        summary = early.evaluate([(images, labels)], timing_batches=0)
        predicted = summary.full_flops / summary.mean_flops
        leaving = summary.share[0] if thresholds[0] < 1 else None
        times = measure(early, bare, images, args.batch_sizes, args.repeats)
        if args.onnx or args.pt2:
            times |= measure_exported(early, bare, onnx if args.onnx else None, images, args)
        for bs in sizes:
            early_s, bare_s = times[bs]
            measured = bare_s / early_s
            speedups[bs].append(measured)
            ideal = "" if bs not in bound else f"{no_overhead(bare_s, *bound[bs], leaving):.2f}x"
            rows[bs].append(
                f"| {name} | {summary.saving:.1%} | {measured:.2f}x | {predicted:.2f}x | "
                f"{measured / predicted:.2f} | {ideal} | {early_s * 1e3:.3f} / {bare_s * 1e3:.3f} |"
            )
        print(f"  {name}: done", flush=True)
    for bs in sizes:
        if isinstance(bs, int):
            where = f"eager, batch size {bs}"
        elif bs.startswith("ONNX"):
            where = f"onnxruntime, batch size {bs.split()[1]} (against the bare model's .onnx)"
        else:
            where = f"torch.export program, batch size {bs.split()[1]} (against the bare model)"
        print(f"\n{where}\n")
        print(
            "| setting | FLOPs saved | measured speed-up | FLOPs-predicted | measured / predicted "
            "| routing with no overhead | ms per image, early / bare |"
        )
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows[bs]), flush=True)
    exported = [bs for bs in sizes if not isinstance(bs, int)]
    if exported:
        print("\nexported speed-up against eager's (target: >= 0.8 of eager's)\n")
        print(f"| setting | {' | '.join(f'eager {bs}' for bs in args.batch_sizes)} | "
              + " | ".join(f"{bs} (/ eager)" for bs in exported) + " |")  # fmt: skip
        print("|---|" + "---|" * (len(args.batch_sizes) + len(exported)))
        for row, (name, _) in enumerate(settings):
            cells = [f"{speedups[bs][row]:.2f}x" for bs in args.batch_sizes]
            for bs in exported:
                eager = speedups[int(str(bs).split()[1])][row]
                cells.append(f"{speedups[bs][row]:.2f}x ({speedups[bs][row] / eager:.2f})")
            print(f"| {name} | {' | '.join(cells)} |", flush=True)


def measure_exported(early, bare, onnx, images, args) -> dict[object, tuple[float, float]]:
    """Per batch size, for the .onnx (against the bare model's .onnx) and the .pt2 (against
    the bare eager model): median seconds per image, exported / bare, interleaved."""
    out: dict[object, tuple[float, float]] = {}
    folder = Path(tempfile.mkdtemp(prefix="exit-speed-"))
    with contextlib.redirect_stderr(io.StringIO()):
        routed = onnx.routed(early, images[:2]) if onnx is not None else None
        program = exported_pt2(early, images[:2], folder) if args.pt2 else None
    for bs in args.batch_sizes:
        count = 64 if bs == 1 else len(images)
        batches = [images[i : i + bs] for i in range(0, count, bs)]
        if routed is not None:
            arrays = [b.numpy() for b in batches]
            onnx.timed(routed, arrays[:2]), onnx.timed(onnx.bare, arrays[:2])  # warm-up
            pairs = [
                (onnx.timed(routed, arrays), onnx.timed(onnx.bare, arrays))
                for _ in range(args.repeats)
            ]
            out[f"ONNX {bs}"] = (
                statistics.median(p[0] for p in pairs),
                statistics.median(p[1] for p in pairs),
            )
        if program is not None:
            with torch.no_grad():
                timed(program, batches[:2]), timed(bare, batches[:2])
                pairs = [
                    (timed(program, batches), timed(bare, batches)) for _ in range(args.repeats)
                ]
            out[f"pt2 {bs}"] = (
                statistics.median(p[0] for p in pairs),
                statistics.median(p[1] for p in pairs),
            )
    return out


if __name__ == "__main__":
    main()
