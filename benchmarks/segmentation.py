"""Auxiliary heads for segmentation on CamVid: does an FCN auxiliary head or nnU-Net-style deep
supervision help a small U-Net trained at equal steps, and what do the heads cost?

Two parts, each a markdown table (printed, and written to DIR/results.md and DIR/results.json
with --out DIR):

    train  An smp `Unet` on a ResNet-18 encoder (random init: nothing is downloaded) trained
           from the same initial weights on the same batches (frames resized to --train-size,
           128x96 by default, random flips), for the same number of AdamW steps, three ways,
           for each seed:
             - no heads;
             - an FCN auxiliary head on the third encoder stage (`encoder.layer3`, stride 16),
               torchvision's recipe: `head="fcn"`, weight 0.5, `resize="logits"` (the head's
               logits upsampled, bilinear, to the labels' size), void ignored;
             - nnU-Net-style deep supervision: a 1x1-conv head (`head="conv1x1"`) on each
               decoder block but the last (strides 16, 8, 4, 2; the last block feeds smp's
               own segmentation head), nnU-Net's weights (halving per scale, the lowest scale
               zero, normalised), `resize="targets"` (the labels downsampled, nearest, to each
               head's size).
           Test-split mean IoU (void ignored) as the mean over seeds with a 95% t-interval,
           the paired gain against no heads (same seed, same init, same batches) with its
           t-interval, pixel accuracy, per-class IoU, and the training time against no heads.
           IoU and accuracy come from torchmetrics (`MulticlassJaccardIndex(average=None,
           ignore_index=11)`, `MulticlassAccuracy(average="micro")`) over the whole test split
           at its own 240x180 (the frames resized to the training size, the logits upsampled,
           bilinear, to the labels'); the model evaluated is the stripped one.
    steps  Step-time ratios on torchvision's `fcn_resnet50` and `deeplabv3_resnet50` (random
           init): a training step (forward, loss, backward, SGD step) of the model built with
           `aux_loss=None` plus auxhead's FCN head at `backbone.layer3` (a copy of torchvision's
           own `aux_classifier`, `AuxLoss(weights=0.5, resize="logits")`) against
           `aux_loss=True` with its reference loss (`out + 0.5 * aux`, ignore_index 255), target
           <= 1.03; inference of the stripped model against the bare `aux_loss=None` model with
           the same weights, target <= 1.01. Medians of interleaved repeats.

Commands:

    OMP_NUM_THREADS=1 python benchmarks/segmentation.py --threads 1     # both parts, defaults
    OMP_NUM_THREADS=1 python benchmarks/segmentation.py --part train --steps 100 --seeds 0 1 2
    OMP_NUM_THREADS=1 python benchmarks/segmentation.py --part steps --repeats 30

CamVid is read from ../shared/data/camvid (the SegNet split at 240x180; its README describes
it) or --data PATH; without it the script says so in one line and exits. docs/benchmarks/
segmentation.md has the measured tables and the command that produced them.

Wall-clock numbers are noisy on a shared CPU: training time is reported as CPU seconds of
this process as well, the three configurations of a seed run one after the other, and step
times are medians over interleaved repeats (A B C, C B A, ...).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import auxhead
from auxhead.data import CAMVID_CODES, CAMVID_VOID

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"
CLASSES = CAMVID_CODES  # the 11 classes of the SegNet split
VOID = CAMVID_VOID  # "Unlabelled": ignored in the loss and the metrics
FCN_WEIGHT = 0.5  # torchvision's reference recipe: out + 0.5 * aux
FCN_TAP = "encoder.layer3"
DECODER_TAPS = ["decoder.blocks.0", "decoder.blocks.1", "decoder.blocks.2", "decoder.blocks.3"]
CONFIGS = ("no heads", "FCN head, layer3", "deep supervision, 4 decoder blocks")


# ---- data --------------------------------------------------------------------------------


def load_camvid(root: Path, size: tuple[int, int]) -> dict[str, Any]:
    """The train split resized to `size` (width, height), the test split's images resized and
    its labels as they are, and the train split's channel means and deviations. Exits with one
    line when the data is not there or not CamVid-shaped."""
    from auxhead.data import DataError, load_segmentation

    if not root.is_dir():
        sys.exit(f"no CamVid at {root}: pass --data PATH (the SegNet split, see the docstring)")
    try:
        camvid = load_segmentation(root, codes=CAMVID_CODES, void=CAMVID_VOID)
    except DataError as error:
        sys.exit(f"{root}: {error}")
    if camvid.test_y is None:
        sys.exit(f"{root} has no test/ split; this benchmark reports test-split IoU")
    x, y = resize(camvid.train_x, camvid.train_y, size)
    pixels = x.transpose(0, 1).reshape(3, -1)
    return {
        "train": (x, y),
        "test": (resize(camvid.test_x, camvid.test_y, size)[0], camvid.test_y),
        "mean": pixels.mean(1).view(1, 3, 1, 1),
        "std": pixels.std(1).view(1, 3, 1, 1),
    }


def resize(x: torch.Tensor, y: torch.Tensor, size: tuple[int, int]):
    """Images bilinear (antialiased) and labels nearest to `size` = (width, height)."""
    width, height = size
    x = F.interpolate(x, (height, width), mode="bilinear", antialias=True).clamp(0, 1)
    y = F.interpolate(y[:, None].float(), (height, width), mode="nearest")[:, 0]
    return x, y.long()


class Batches:
    """Shuffled batches with random horizontal flips, drawn from a generator of their own: the
    same seed gives the same batches whatever the model does with the global generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int, seed: int) -> None:
        self.x, self.y, self.bs = x, y, bs
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = []
        for _ in range(self.bs):
            if not self.order:  # one pass over the frames in a fresh order, then another
                self.order = torch.randperm(len(self.y), generator=self.generator).tolist()
            index.append(self.order.pop())
        x, y = self.x[index], self.y[index]
        flip = torch.rand(self.bs, generator=self.generator) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        return x, y


def normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean) / std


# ---- models and heads --------------------------------------------------------------------


def unet() -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=len(CLASSES))


def with_heads(config: str, model: nn.Module, sample: torch.Tensor):
    """(model to train, loss) for one configuration. The heads are attached to `model`."""
    criterion = nn.CrossEntropyLoss(ignore_index=VOID)
    if config == CONFIGS[0]:
        return model, criterion
    if config == CONFIGS[1]:
        aux_model = auxhead.attach(model, {FCN_TAP: "fcn"}, num_classes=len(CLASSES), sample=sample)
        loss = auxhead.AuxLoss(criterion, aux_model, weights=FCN_WEIGHT, resize="logits")
        return aux_model, loss
    aux_model = auxhead.attach(
        model, DECODER_TAPS, head="conv1x1", num_classes=len(CLASSES), sample=sample
    )
    loss = auxhead.AuxLoss(criterion, aux_model, weights="nnunet", resize="targets")
    return aux_model, loss


def train(config: str, seed: int, data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """`args.steps` AdamW steps on one-cycle learning rates; returns the stripped model."""
    torch.manual_seed(seed)
    model = unet()
    batches = Batches(*data["train"], bs=args.bs, seed=seed)
    mean, std = data["mean"], data["std"]
    sample = normalise(data["train"][0][:2], mean, std)
    trained, loss_func = with_heads(config, model, sample)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps)
    trained.train()
    losses = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        x, y = batches.batch()
        loss = loss_func(trained(normalise(x, mean, std)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    bare = trained.strip() if isinstance(trained, auxhead.AuxModel) else trained
    return {"model": bare, "wall_s": wall, "cpu_s": cpu, "last_loss": statistics.mean(losses[-20:])}


@torch.no_grad()
def evaluate(model: nn.Module, data: dict, bs: int = 8) -> dict[str, Any]:
    """Per-class IoU and pixel accuracy over the test split at its own size, void ignored
    (torchmetrics): the model sees the frames at the training size, and its logits are
    upsampled (bilinear) to the labels' size."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    iou = MulticlassJaccardIndex(len(CLASSES), average=None, ignore_index=VOID)
    accuracy = MulticlassAccuracy(len(CLASSES), average="micro", ignore_index=VOID)
    x_all, y_all = data["test"]
    model.eval()
    for i in range(0, len(y_all), bs):
        logits = model(normalise(x_all[i : i + bs], data["mean"], data["std"]))
        logits = F.interpolate(logits, y_all.shape[1:], mode="bilinear", align_corners=False)
        preds = logits.argmax(1)
        target = y_all[i : i + bs]
        iou.update(preds, target)
        accuracy.update(preds, target)
    return {"iou": iou.compute().tolist(), "pixel_acc": float(accuracy.compute())}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided t-interval over `values` (nan with one value)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    half = t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, float(half)


def part_train(data: dict, args: argparse.Namespace) -> tuple[str, dict]:
    runs: dict[str, list[dict]] = {config: [] for config in CONFIGS}
    for seed in args.seeds:
        for config in CONFIGS:
            run = train(config, seed, data, args)
            run.update(evaluate(run.pop("model"), data), seed=seed)
            runs[config].append(run)
            print(
                f"  seed {seed}, {config}: mIoU {statistics.fmean(run['iou']):.2%}, "
                f"pixel acc {run['pixel_acc']:.2%}, {run['wall_s']:.0f} s",
                flush=True,
            )
    base = runs[CONFIGS[0]]
    lines = [
        f"| U-Net, ResNet-18 encoder, {args.steps} steps | test mIoU, 95% CI "
        f"({len(args.seeds)} seeds) | gain vs no heads (paired) | pixel acc | "
        "train time vs no heads (wall / CPU) |",
        "|---|---|---|---|---|",
    ]
    for config, config_runs in runs.items():
        miou = [statistics.fmean(run["iou"]) * 100 for run in config_runs]
        gains = [m - statistics.fmean(b["iou"]) * 100 for m, b in zip(miou, base, strict=True)]
        mean, half = t_interval(miou)
        gain, gain_half = t_interval(gains)
        acc = statistics.fmean(run["pixel_acc"] for run in config_runs)
        wall = sum(r["wall_s"] for r in config_runs) / sum(r["wall_s"] for r in base)
        cpu = sum(r["cpu_s"] for r in config_runs) / sum(r["cpu_s"] for r in base)
        lines.append(
            f"| {config} | {mean:.2f} ± {half:.2f} | {gain:+.2f} ± {gain_half:.2f} pt | "
            f"{acc:.2%} | {wall:.3f} / {cpu:.3f} |"
        )
    lines += ["", "Per-class test IoU (%), mean over seeds:", ""]
    lines.append("| class | " + " | ".join(CONFIGS) + " |")
    lines.append("|---|" + "---|" * len(CONFIGS))
    for k, name in enumerate(CLASSES):
        cells = [statistics.fmean(run["iou"][k] for run in runs[c]) * 100 for c in CONFIGS]
        lines.append(f"| {name} | " + " | ".join(f"{cell:.1f}" for cell in cells) + " |")
    return "\n".join(lines), runs


# ---- step-time ratios on torchvision's segmentation models -------------------------------


def _time(fns: dict[str, Callable], repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per call of each fn, calls interleaved (ABC, CBA, ABC...)
    so that drift in the machine's speed hits every variant alike. With one thread, CPU time
    is what the call itself cost, whatever else the machine runs."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return {
        name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])}
        for name in fns
    }


def _timing_row(model: str, measure: str, base: tuple[str, dict], ours: tuple[str, dict]) -> str:
    (base_name, b), (ours_name, o) = base, ours
    target = {"train step": "<= 1.03", "inference": "<= 1.01"}[measure]
    if base_name.startswith("no heads"):
        target = ""
    return (
        f"| {model} | {measure} | {base_name}: {b['wall'] * 1e3:.1f} / {b['cpu'] * 1e3:.1f} ms "
        f"| {ours_name}: {o['wall'] * 1e3:.1f} / {o['cpu'] * 1e3:.1f} ms "
        f"| {o['wall'] / b['wall']:.3f} | {o['cpu'] / b['cpu']:.3f} | {target} |"
    )


def _train_step(model: nn.Module, loss_of: Callable, x, y) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = loss_of(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _inference(model: nn.Module, x) -> Callable[[], None]:
    model.eval()

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    return infer


def _reference_loss(outputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """torchvision's references/segmentation/train.py criterion."""
    out = F.cross_entropy(outputs["out"], y, ignore_index=255)
    return out + 0.5 * F.cross_entropy(outputs["aux"], y, ignore_index=255)


def _main_loss(outputs: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs["out"], y, ignore_index=255)


def _hold_dropout(*models: nn.Module) -> None:
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()


def step_rows(builder: Callable, args: argparse.Namespace) -> tuple[list[str], dict]:
    torch.manual_seed(0)
    kwargs = {"weights": None, "weights_backbone": None, "num_classes": len(CLASSES)}
    with_aux = builder(aux_loss=True, **kwargs)
    bare = builder(aux_loss=None, **kwargs)
    bare.load_state_dict(
        {k: v for k, v in with_aux.state_dict().items() if not k.startswith("aux_classifier.")}
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    y = torch.randint(0, len(CLASSES), (args.batch, args.size, args.size), generator=generator)
    y[:, :4] = 255  # some ignored pixels, as in the reference recipe
    aux_model = auxhead.attach(
        copy.deepcopy(bare), {"backbone.layer3": copy.deepcopy(with_aux.aux_classifier)}, sample=x
    )
    # The main loss reads torchvision's dict; the head's logits go to head_loss.
    aux_loss = auxhead.AuxLoss(
        _main_loss,
        aux_model,
        head_loss=nn.CrossEntropyLoss(ignore_index=255),
        weights=0.5,
        resize="logits",
    )

    # Same weights and inputs, dropout held still: the first losses must agree.
    with_aux.train(), aux_model.train()
    _hold_dropout(with_aux, aux_model)
    first = {"torchvision": _reference_loss(with_aux(x), y).item()}
    first["auxhead"] = aux_loss(aux_model(x), y).item()

    steps = {
        "torchvision": _train_step(with_aux, _reference_loss, x, y),
        "auxhead": _train_step(aux_model, aux_loss, x, y),
        "bare": _train_step(bare, _main_loss, x, y),
    }
    train = _time(steps, args.repeats, args.warmup)
    stripped = copy.deepcopy(aux_model).strip()
    infer = _time(
        {"bare": _inference(bare, x), "stripped": _inference(stripped, x)},
        args.repeats,
        args.warmup,
    )
    name, ours = builder.__name__, ("auxhead fcn at layer3", train["auxhead"])
    rows = [
        _timing_row(name, "train step", ("torchvision aux_loss=True", train["torchvision"]), ours),
        _timing_row(name, "train step", ("no heads", train["bare"]), ours),
        _timing_row(name, "inference", ("bare", infer["bare"]), ("stripped", infer["stripped"])),
    ]
    return rows, {"first_loss": first, "train_s": train, "infer_s": infer}


def part_steps(args: argparse.Namespace) -> tuple[str, dict]:
    from torchvision.models.segmentation import deeplabv3_resnet50, fcn_resnet50

    rows, results, notes = [], {}, []
    for builder in (fcn_resnet50, deeplabv3_resnet50):
        model_rows, result = step_rows(builder, args)
        rows += model_rows
        results[builder.__name__] = result
        first = result["first_loss"]
        notes.append(
            f"{builder.__name__} first-step loss, dropout held still: torchvision "
            f"{first['torchvision']:.6f}, auxhead {first['auxhead']:.6f}"
        )
        print(f"  {notes[-1]}", flush=True)
    lines = [
        f"batch {args.batch} x 3 x {args.size} x {args.size}, {len(CLASSES)} classes; medians of "
        f"{args.repeats} interleaved calls",
        "",
        *notes,
        "",
        "| model | measure | baseline (wall / CPU) | auxhead (wall / CPU) | ratio, wall "
        "| ratio, CPU | target |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    return "\n".join(lines), results


# ---- main --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=["train", "steps"], default=["train", "steps"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CamVid (SegNet split)")
    parser.add_argument("--steps", type=int, default=120, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bs", type=int, default=8)
    parser.add_argument(
        "--train-size",
        type=int,
        nargs=2,
        default=[128, 96],
        metavar=("W", "H"),
        help="frames resized to this for training and as the model's input (sides / 32)",
    )
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--size", type=int, default=64, help="image side for the step times")
    parser.add_argument("--batch", type=int, default=2, help="batch size for the step times")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="writes results.md/.json here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    sections: list[str] = []
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if "train" in args.part:
        data = load_camvid(args.data.resolve(), tuple(args.train_size))
        (x, y), y_test = data["train"], data["test"][1]
        header = (
            f"CamVid {args.data}: {len(y)} train frames, {len(y_test)} test frames; trained on "
            f"frames resized to {x.shape[3]}x{x.shape[2]} (random flips), {args.steps} AdamW "
            f"steps (one-cycle, lr {args.lr:g}, batch {args.bs}), seeds "
            f"{' '.join(map(str, args.seeds))}; test IoU at {y_test.shape[2]}x{y_test.shape[1]} "
            f"(logits upsampled); {torch.get_num_threads()} torch threads"
        )
        print(header, flush=True)
        table, runs = part_train(data, args)
        sections += [header, table]
        results["train"] = runs
        print(table, flush=True)
    if "steps" in args.part:
        table, steps = part_steps(args)
        sections.append(f"Step times, {torch.get_num_threads()} torch threads: " + table)
        results["steps"] = steps
        print(sections[-1], flush=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    sections.append(f"total: {wall:.0f} s wall, {cpu:.0f} s CPU")
    print(sections[-1])
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.md").write_text("\n\n".join(sections) + "\n")
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
