"""`auxhead train`: train a classifier with auxiliary heads through fastai, measure every exit,
and (optionally) the same model without heads and calibrated early exits.

`TrainConfig` (the options) -> `run_train` -> `TrainResult` -> `auxhead.cli.report`. Bad
options and data raise `UsageError` naming the option, before any training; nothing here
prints except fastai's progress bars and the `say` lines the caller passes in.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from torch import nn

from auxhead._format import count, recorder_history
from auxhead._probe import resolve
from auxhead._weights import InitWeights, read_init
from auxhead.attach import AttachError, AuxModel
from auxhead.cli._common import (
    EXIT_CODES,
    IMAGENET_SIZE,
    MIXED_SIZE,
    ManualFormatter,
    UsageError,
    atomic_path,
    collect_warnings,
    fraction,
    image_size,
    is_out_of_memory,
    load_images,
    nonnegative_float,
    one_line,
    positive_float,
    positive_int,
    void_label,
)
from auxhead.cli._state import seeded, torch_threads
from auxhead.data import ImageData, dataloaders
from auxhead.exits import EarlyExit, ExitSummary, check_targets, exit_flops, exit_params
from auxhead.fastai import AuxHeads, export_learner
from auxhead.heads import DENSE_KINDS, HEAD_KINDS
from auxhead.models import (
    WeightsUnavailable,
    build_model,
    classifier_split,
    default_taps,
    load_matching,
)
from auxhead.schedules import SCHEDULES

TASKS = ("classify", "segment")
SEGMENT_HEADS = ("fcn", "deep", "both")
SEGMENT_FCN_WEIGHT = 0.4  # torchvision's and mmsegmentation's auxiliary FCN head

__all__ = ["Budget", "TrainConfig", "TrainResult", "add_parser", "plan_budget", "run_train"]

# The budget when no --epochs/--steps is given: fitted to Fashion-MNIST's 60,000 images (3
# epochs of 234 steps of 256 images: 92% in under 2 minutes on 2 quiet cores), and fitted to
# smaller data sets so that they still get enough optimizer steps (digits: 99.7%; see
# docs/benchmarks/train.md).
DEFAULT_EPOCHS = 3
DEFAULT_BS = 256
DEFAULT_LR = 4e-3  # peak one-cycle lr at DEFAULT_BS; scaled by sqrt(bs / DEFAULT_BS) below it
MIN_BS = 16
MIN_STEPS_PER_EPOCH = 32  # the batch size halves (down to MIN_BS) until an epoch has this many
MIN_STEPS = 300  # at least this many optimizer steps in all: more epochs on small data
# Early exit: the thresholds are calibrated on held-out training images; fewer than
# MIN_HOLDOUT cannot calibrate anything, fewer than SMALL_HOLDOUT give uncertain thresholds.
MIN_HOLDOUT, SMALL_HOLDOUT = 50, 1000
FINE_TUNE_FROZEN_EPOCHS = 1  # fastai's fine_tune: epochs with the body frozen, heads training

OWNED_FILES = [  # what a run writes into --out: removed when the next run starts
    "report.md",
    "report.json",
    "heads.png",
    "compute.png",
    "model.pkl",
    "checkpoint.pth",
]


@dataclass(kw_only=True)
class TrainConfig:
    """Settings of one `auxhead train` run; the CLI's options, one for one."""

    data: str = "fashion-mnist"  # or "digits", or a folder
    arch: str = "small_cnn"
    at: list[str] | None = None  # None: `default_taps` of the model
    head: str = "inception"
    aux_weight: float = 0.3  # weight of every head's loss (AuxLoss(weights=...))
    schedule: str = "constant"
    epochs: int | None = None  # None: `plan_budget` decides
    steps: int | None = None  # optimizer steps (rounded up to whole epochs)
    lr: float | None = None  # None: DEFAULT_LR scaled to the batch size
    bs: int | None = None  # None: DEFAULT_BS, smaller on small data sets
    size: int | None = None  # resize images to size x size
    pretrained: bool = False  # the architecture's pretrained weights, fine-tuned
    init: Path | None = None  # a state_dict file to start from, fine-tuned
    seed: int = 0
    out: Path = Path("runs/train")
    compare: bool = False
    early_exit: bool = False
    max_drop: float = 0.005  # early exit: allowed accuracy drop from the main head
    confidence: float = 0.9  # early exit: the drop holds on new data with this probability
    holdout: int = 5000  # early exit: at most this many training images held out (a fifth)
    distill: float = 0.0
    limit: int | None = None  # use only this many training (and a quarter as many test) images
    threads: int | None = None  # torch's CPU threads for the run; None: torch's choice
    task: str = "classify"  # or "segment" (auxhead.cli.segment)
    encoder: str | None = None  # segment: the body of unet and the smp models (resnet18)
    heads: str = "fcn"  # segment: "fcn" (encoder), "deep" (decoder, nnU-Net) or "both"
    void: int | str | None = "auto"  # segment: mask value left out of loss and scores

    @property
    def fine_tune(self) -> bool:
        return self.pretrained or self.init is not None


@dataclass
class Budget:
    """How long and how a run trains, and why."""

    bs: int
    lr: float
    epochs: int
    steps_per_epoch: int
    why: str

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def plan_budget(n_train: int, config: TrainConfig) -> Budget:
    """Batch size, learning rate and epochs for `n_train` training images.

    Unless given: the batch size is DEFAULT_BS, halved (not below MIN_BS) until an epoch has
    MIN_STEPS_PER_EPOCH steps; the learning rate is DEFAULT_LR * sqrt(bs / DEFAULT_BS); the
    epochs are DEFAULT_EPOCHS, or more to reach MIN_STEPS steps. `--steps` asks for a number of
    steps (rounded up to whole epochs), `--epochs` for a number of epochs.
    """
    reasons = []
    bs = config.bs
    if bs is None:
        bs = DEFAULT_BS
        while bs > MIN_BS and n_train // bs < MIN_STEPS_PER_EPOCH:
            bs //= 2
    bs = min(bs, n_train)  # never more than the data: the reason below gives the batch used
    if bs != (config.bs or DEFAULT_BS):
        reasons.append(f"batch size {bs} for {n_train} training images")
    steps_per_epoch = max(1, n_train // bs)  # the last partial batch is dropped
    lr = config.lr
    if lr is None:
        lr = float(f"{DEFAULT_LR * math.sqrt(bs / DEFAULT_BS):.2g}")
        if bs != DEFAULT_BS:
            reasons.append(f"lr {lr:g} scaled to it")
    epochs = plan_epochs(config, steps_per_epoch, reasons, DEFAULT_EPOCHS, MIN_STEPS)
    return Budget(bs, lr, epochs, steps_per_epoch, "; ".join(reasons) or "the defaults")


def plan_epochs(
    config: TrainConfig, steps_per_epoch: int, reasons: list[str], default: int, min_steps: int
) -> int:
    """--epochs, or --steps rounded up to whole epochs, or `default` epochs (more to make
    `min_steps` steps); the reason goes into `reasons`."""
    if config.epochs is not None:
        reasons.append("--epochs given")
        return config.epochs
    if config.steps is not None:
        reasons.append(f"--steps {config.steps} at {steps_per_epoch} steps an epoch")
        return -(-config.steps // steps_per_epoch)
    epochs = max(default, -(-min_steps // steps_per_epoch))
    if epochs > default:
        reasons.append(f"at least {min_steps} steps (--epochs or --steps to change)")
    return epochs


@dataclass
class ExitReport:
    """One exit of the trained model, measured on the test split."""

    name: str
    accuracy: float
    flops: int  # per sample: the backbone up to the tap plus this head
    params: int  # parameters that run up to this exit


@dataclass
class ClassReport:
    """One class on the test split: its images and each exit's accuracy on them (None: the
    split holds none of its images, so no figure of the run covers it)."""

    name: str
    n_test: int
    accuracy: dict[str, float] | None  # by exit, as in `TrainResult.exits`


@dataclass
class TrainResult:
    config: TrainConfig
    budget: Budget
    data: str
    classes: list[str]
    n_train: int
    n_test: int
    arch: str
    taps: list[str]
    exits: list[ExitReport]  # the heads in `at` order, then "main"
    history: list[dict[str, float | None]]  # Recorder row per epoch
    train_seconds: float
    baseline_accuracy: float | None = None
    baseline_seconds: float | None = None
    baseline_history: list[dict[str, float | None]] = field(default_factory=list)
    early_exit: dict[str, Any] | None = None  # calibration and test summaries
    early_exit_summary: ExitSummary | None = None  # the test set's, for the terminal
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    per_class: list[ClassReport] = field(default_factory=list)
    data_notes: list[str] = field(default_factory=list)  # what load_data skipped or could not split

    @property
    def main(self) -> ExitReport:
        return self.exits[-1]

    def as_json(self) -> dict[str, Any]:
        """The `report.json` document."""
        heads = {e.name: {"accuracy": e.accuracy, "flops": e.flops, "params": e.params}
                 for e in self.exits[:-1]}  # fmt: skip
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        budget = {**asdict(self.budget), "steps": self.budget.steps}
        return {
            "data": self.data,
            "arch": self.arch,
            "classes": self.classes,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "taps": self.taps,
            "main_accuracy": self.main.accuracy,
            "main_flops": self.main.flops,
            "main_params": self.main.params,
            "heads": heads,
            "baseline_accuracy": self.baseline_accuracy,
            "baseline_seconds": self.baseline_seconds,
            "train_seconds": self.train_seconds,
            "budget": budget,
            "history": self.history,
            "baseline_history": self.baseline_history,
            "early_exit": self.early_exit,
            "per_class": [asdict(c) for c in self.per_class],
            "warnings": self.warnings,
            "data_notes": self.data_notes,
            "config": config,
            "files": self.files,
        }


# The command line --------------------------------------------------------------------------

DESCRIPTION = """\
Train a classifier with auxiliary heads through fastai, then report each exit's test
accuracy, FLOPs and parameters, with plots, an exported model and a checkpoint.

Defaults: Fashion-MNIST, the built-in small CNN, two inception heads, 3 epochs (about 2
minutes on 2 CPU cores). On a smaller data set the batch size, learning rate and number of
epochs adapt (at least 300 optimizer steps); the run prints what it chose and why, and
--epochs, --steps, --bs and --lr override it."""

EPILOG = f"""\
examples:
  auxhead train                                   # Fashion-MNIST, ~92% in under 2 minutes
  auxhead train --data digits --compare           # also the model without heads
  auxhead train --data photos/ --arch resnet18 --pretrained --size 64
  auxhead layers --arch resnet18 --data photos/   # where heads can go (--at)

output files (in --out; an earlier run's are deleted when a run starts, and the report is
written only when the run completes):
  report.md, report.json  every figure of the run
  heads.png, compute.png  accuracy per epoch; accuracy against FLOPs
  model.pkl               the model without heads (fastai's load_learner opens it)
  checkpoint.pth          state_dict with heads, after every epoch (kept on Ctrl-C)

{EXIT_CODES}"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train with auxiliary heads and report what each head achieves",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=ManualFormatter,
    )
    p.add_argument("--data", default=d.data, metavar="DATA",
                   help="'fashion-mnist' (default: Debian's dataset-fashion-mnist), 'digits' "
                   "(scikit-learn's 8x8 digits), a folder with the four idx files (MNIST "
                   "works), or a folder of images with one subfolder per class, or with "
                   "train/ and val/ (or test/) folders that each have one")  # fmt: skip
    p.add_argument("--size", type=image_size, default=None, metavar="N",
                   help="resize every image to N x N, 8 to 1024 (default: the data's own "
                   "size)")  # fmt: skip
    p.add_argument("--task", default=d.task, choices=TASKS,
                   help="'classify' (one class an image) or 'segment' (one class a pixel: "
                   "--data is a folder of images/ and labels/, see --heads)")  # fmt: skip
    p.add_argument("--arch", default=None,
                   help="classify: 'small_cnn' (default), a torchvision model name (resnet18, "
                   "...) or a timm model name; segment: 'unet' (default: fastai's U-Net), a "
                   "torchvision segmentation model (fcn_resnet50, deeplabv3_resnet50, "
                   "deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large, ...), or smp-unet, "
                   "smp-fpn, smp-deeplabv3plus, smp-pspnet (the smp extra)")  # fmt: skip
    p.add_argument("--encoder", default=None,
                   help="segment: the encoder of unet (a torchvision ResNet) and of the smp "
                   "models (any smp encoder name); default resnet18")  # fmt: skip
    p.add_argument("--heads", default=d.heads, choices=SEGMENT_HEADS,
                   help="segment: 'fcn', an FCN head on the encoder's third stage (weight "
                   "--aux-weight, default 0.4; logits upsampled to the labels, torchvision's "
                   "recipe); 'deep', deep supervision, a 1x1-conv head on each decoder block "
                   "(nnU-Net's weights; labels downsampled to each head); 'both'")  # fmt: skip
    p.add_argument("--void", type=void_label, default=d.void, metavar="N",
                   help="segment: the mask value of unlabelled pixels, left out of the loss and "
                   "the scores ('none' for none; default: a Void line of codes.txt, else 255 "
                   "when the masks hold it, or 11 for a folder named camvid)")  # fmt: skip
    p.add_argument("--pretrained", action="store_true",
                   help="start from the architecture's pretrained weights (torchvision's or "
                   "timm's cache; $TORCH_HOME/hub/checkpoints for torchvision) and fine-tune "
                   "with fastai's fine_tune: one epoch with the body frozen, then all")  # fmt: skip
    p.add_argument("--init", type=Path, default=None, metavar="PATH",
                   help="start from this weights file instead (same fine-tuning): a "
                   "state_dict (torch.save or .safetensors) or the checkpoint.pth of an earlier "
                   "run, whose heads are loaded too when --at and --head match")  # fmt: skip
    p.add_argument("--at", nargs="+", default=None, metavar="LAYER",
                   help="layers to attach heads to (default: two blocks about a third and two "
                   "thirds deep, chosen for every built-in, torchvision and timm model); "
                   "`auxhead layers --arch ARCH` lists them and marks the defaults")  # fmt: skip
    p.add_argument("--head", default=None, choices=sorted(HEAD_KINDS),
                   help=f"head kind (default {d.head}; --task classify)")  # fmt: skip
    p.add_argument("--aux-weight", type=nonnegative_float, default=None,
                   help="weight of every head's loss in the training loss (default 0.3; 0.4 "
                   "for segment's FCN head)")  # fmt: skip
    p.add_argument("--schedule", default=d.schedule, choices=sorted(SCHEDULES),
                   help="how the head weight changes over training")  # fmt: skip
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs (default: 3, or more to make 300 steps)")  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=None,
                   help="optimizer steps instead of --epochs (rounded up)")  # fmt: skip
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak one-cycle learning rate (default 4e-3 at bs 256)")  # fmt: skip
    p.add_argument("--bs", type=positive_int, default=None,
                   help="batch size, at least 2 (default 256, smaller on small data)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights, the data order and the held-out split; the same "
                   "seed gives the same numbers on the CPU")  # fmt: skip
    p.add_argument("--out", default=str(d.out),
                   help="output folder; the files this command writes are replaced")  # fmt: skip
    p.add_argument("--compare", action="store_true",
                   help="also train the same model without heads (same seed and budget) and "
                   "report both")  # fmt: skip
    p.add_argument("--early-exit", action="store_true",
                   help="calibrate early exits on held-out training images (a fifth, at most "
                   "5000) and report the accuracy-compute trade-off")  # fmt: skip
    p.add_argument("--max-drop", type=fraction, default=d.max_drop,
                   help="early exit: accuracy it may lose")  # fmt: skip
    p.add_argument("--confidence", type=positive_float, default=d.confidence,
                   help="early exit: --max-drop holds on new images with this probability "
                   "(Learn then Test; default %(default)s)")  # fmt: skip
    p.add_argument("--distill", type=fraction, default=d.distill,
                   help="weight of self-distillation from the main output (0-1)")  # fmt: skip
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only this many training images, and shrink the test set to "
                   "max(N/4, 2 x classes) images (quick runs)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default torch's choice); on a machine busy "
                   "with other jobs 1 is often faster")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.out is not None and str(args.out).strip() == "":
        raise UsageError("--out is empty; give a folder path (it is created if missing)")
    segment = args.task == "segment"
    arch = args.arch or ("unet" if segment else TrainConfig.arch)
    aux_weight = args.aux_weight
    if aux_weight is None:
        aux_weight = SEGMENT_FCN_WEIGHT if segment else TrainConfig.aux_weight
    if segment and args.head is not None:
        raise UsageError(
            "--head is for --task classify; segmentation heads are chosen with --heads "
            "(fcn, deep or both)"
        )
    if not segment:
        for option, value in (("--encoder", args.encoder), ("--heads", args.heads != "fcn"),
                              ("--void", args.void != "auto")):  # fmt: skip
            if value:
                raise UsageError(f"{option} is for --task segment")
    return TrainConfig(
        task=args.task, encoder=args.encoder, heads=args.heads, void=args.void,
        data=args.data, arch=arch, at=args.at, head=args.head or TrainConfig.head,
        aux_weight=aux_weight, schedule=args.schedule, epochs=args.epochs, steps=args.steps,
        lr=args.lr, bs=args.bs, size=args.size, pretrained=args.pretrained, init=args.init,
        seed=args.seed, out=Path(args.out), compare=args.compare, early_exit=args.early_exit,
        max_drop=args.max_drop, confidence=args.confidence, distill=args.distill,
        limit=args.limit, threads=args.threads,
    )  # fmt: skip


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot work, before any data is loaded."""
    try:
        check_targets(config.max_drop, config.confidence, names=("--max-drop", "--confidence"))
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.bs is not None and config.bs < 2:
        raise UsageError(
            f"--bs {config.bs}: training needs at least 2 images a batch (BatchNorm layers "
            "normalise over the batch)"
        )
    if config.head in DENSE_KINDS:
        raise UsageError(
            f"--head {config.head} predicts a class per pixel: it is for --task segment; a "
            f"classifier takes {', '.join(k for k in sorted(HEAD_KINDS) if k not in DENSE_KINDS)}"
        )
    if config.epochs is not None and config.steps is not None:
        raise UsageError("--epochs and --steps both set the training length; give one")
    if config.pretrained and config.init is not None:
        raise UsageError("--pretrained and --init both choose the starting weights; give one")
    if config.init is not None and Path(config.init).is_dir():
        inside = Path(config.init) / "checkpoint.pth"
        hint = f"; give a file in it ({inside})" if inside.is_file() else ""
        raise UsageError(f"--init {config.init} is a folder, not a weights file{hint}")
    if config.init is not None and not Path(config.init).is_file():
        raise UsageError(f"--init {config.init}: no such file (a state_dict saved with torch.save)")


# The run -------------------------------------------------------------------------------------


class EpochLog(Callback):
    """After every epoch (across fine_tune's frozen and unfrozen fits): keep the Recorder's
    row and save the model with its heads atomically, so a run stopped with Ctrl-C (or killed)
    leaves the last completed epoch's checkpoint whole."""

    order = 60  # after the Recorder has logged the epoch

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self.history: list[dict[str, float | None]] = []

    def after_epoch(self) -> None:
        self.history.append(recorder_history(self.learn)[-1])
        save_checkpoint(self.learn.model, self.path, {**self.meta, "epoch": len(self.history)})


class StopOnNonFinite(Callback):
    """Stop at the first non-finite training loss with one line naming the likely causes."""

    order = 0  # after AuxHeads (-5) has added the head losses

    def __init__(self, causes: str) -> None:
        self.causes = causes

    def after_loss(self) -> None:
        if self.training and not bool(torch.isfinite(self.learn.loss).all()):
            raise UsageError(
                f"the training loss became {float(self.learn.loss)} at epoch {self.epoch + 1}, "
                f"step {self.iter + 1}: training diverged; likely cause: {self.causes}"
            )


class CheckHeadsTrain(Callback):
    """Warn about every head that got no gradient in a whole fit: its tap's output does not
    reach the loss through it (a detached or constant tap), or its weight was 0 throughout.
    Its figures then mean nothing. Checks stop once every head has had a gradient."""

    order = 70

    def __init__(self) -> None:
        self.trained: set[str] = set()
        self.warned: set[str] = set()

    def after_backward(self) -> None:
        aux_model = _unwrap(self.learn.model)
        for tap in aux_model.taps:
            if tap not in self.trained and any(
                p.grad is not None and bool(p.grad.any()) for p in aux_model.head(tap).parameters()
            ):
                self.trained.add(tap)

    def after_fit(self) -> None:
        for tap in _unwrap(self.learn.model).taps:
            if tap not in self.trained and tap not in self.warned:
                self.warned.add(tap)
                warnings.warn(
                    f"the head at {tap!r} did not train (no gradient reached it): its tap's "
                    "output does not reach the loss through it, or its weight was 0; choose "
                    "another --at layer or a weight above 0",
                    UserWarning,
                    stacklevel=1,
                )


def _unwrap(model: nn.Module) -> AuxModel:
    return getattr(model, "module", model)


def save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """`torch.save` through `atomic_path`: never a half-written checkpoint."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": model.state_dict(), **meta}, tmp)


def _learner(dls, model: nn.Module, cbs: list, out: Path, fine_tune: bool) -> Learner:
    extra = {"splitter": classifier_split} if fine_tune else {}
    return Learner(
        dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs, path=out, **extra
    )


def _fit(learn: Learner, budget: Budget, fine_tune: bool) -> None:
    if fine_tune:
        learn.fine_tune(budget.epochs, budget.lr, freeze_epochs=FINE_TUNE_FROZEN_EPOCHS)
    else:
        learn.fit_one_cycle(budget.epochs, budget.lr)


@torch.no_grad()
def exit_predictions(aux_model: AuxModel, x: torch.Tensor, bs: int = 1000):
    """The class every head and the main output predict for each image of `x` (heads
    enabled, eval mode): {"<tap>": (N,), ..., "main": (N,)}."""
    was_training = aux_model.training
    aux_model.eval()
    predicted: dict[str, list[torch.Tensor]] = {name: [] for name in [*aux_model.taps, "main"]}
    device = next(aux_model.parameters()).device
    try:
        with aux_model.heads_enabled():
            for xb in x.split(bs):
                out = aux_model(xb.to(device))
                predicted["main"].append(out.argmax(1).cpu())
                for name, logits in aux_model.aux_outputs.items():
                    predicted[name].append(logits.argmax(1).cpu())
    finally:
        aux_model.clear_aux()
        aux_model.train(was_training)
    return {name: torch.cat(p) if p else torch.zeros(0, dtype=torch.long)
            for name, p in predicted.items()}  # fmt: skip


def exit_accuracies(aux_model: AuxModel, x: torch.Tensor, y: torch.Tensor, bs: int = 1000):
    """Accuracy of every head and of the main output on (x, y), heads enabled, eval mode."""
    return _accuracies(exit_predictions(aux_model, x, bs), y)


def _accuracies(predicted: dict[str, torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    return {name: int((p == y).sum()) / len(y) for name, p in predicted.items()}


def class_reports(
    predicted: dict[str, torch.Tensor], y: torch.Tensor, classes: list[str]
) -> list[ClassReport]:
    """Each class's test images and every exit's accuracy on them; a class without test
    images is kept, with no accuracy."""
    reports = []
    for k, name in enumerate(classes):
        members = y == k
        n = int(members.sum())
        accuracy = None
        if n:
            accuracy = {exit_: int((p[members] == k).sum()) / n for exit_, p in predicted.items()}
        reports.append(ClassReport(name, n, accuracy))
    return reports


def _split_holdout(data: ImageData, n: int, seed: int) -> tuple[ImageData, ImageData]:
    """Move `n` training images (a seeded random choice) into a calibration set."""
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:n], order[n:]
    train = ImageData(data.name, data.classes, data.train_x[kept], data.train_y[kept],
                      data.valid_x, data.valid_y)  # fmt: skip
    holdout = ImageData(data.name, data.classes, data.train_x[kept[:1]], data.train_y[kept[:1]],
                        data.train_x[held], data.train_y[held])  # fmt: skip
    return train, holdout


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int):
    return list(zip(x.split(bs), y.split(bs), strict=True))


def _load(config: TrainConfig, say: Callable[[str], None]) -> ImageData:
    fallback = IMAGENET_SIZE if config.pretrained else MIXED_SIZE  # a folder of mixed sizes
    data = load_images(config.data, seed=config.seed, size=config.size, fallback=fallback, say=say)
    noted = set(_untested(data))  # load_data's notes (logged) name these already
    if config.limit:
        data = data.subset(config.limit, max(config.limit // 4, data.c * 2), seed=config.seed)
    untested = [name for name in _untested(data) if name not in noted]
    if untested:
        warnings.warn(
            f"{len(untested)} class{'es' if len(untested) > 1 else ''} without a held-out "
            f"image ({', '.join(untested)}): the test accuracy leaves "
            f"{'them' if len(untested) > 1 else 'it'} out (the report's per-class table says "
            "so); add images (5 or more a class), or put some in a valid/ folder beside train/",
            UserWarning,
            stacklevel=1,
        )
    seen = torch.unique(data.train_y)
    if len(seen) < 2:
        raise UsageError(
            f"--data {data.name}: the training images hold {len(seen)} class(es); a classifier "
            "needs at least two" + (" (raise --limit)" if config.limit else "")
        )
    return data


def _untested(data: ImageData) -> list[str]:
    """The classes without a held-out image."""
    counts = torch.bincount(data.valid_y, minlength=data.c)
    return [name for name, n in zip(data.classes, counts.tolist(), strict=True) if n == 0]


def _read_init(config: TrainConfig) -> InitWeights | None:
    if config.init is None:
        return None
    try:
        return read_init(config.init)
    except WeightsUnavailable as error:
        raise UsageError(f"--init {error}") from None


def _model(config: TrainConfig, data: ImageData, init: InitWeights | None = None) -> nn.Module:
    try:
        model = build_model(
            config.arch,
            data.c,
            channels=data.channels,
            size=data.size,
            pretrained=config.pretrained,
        )
    except WeightsUnavailable as error:
        raise UsageError(f"--pretrained: {error}") from None
    except ValueError as error:
        from auxhead._segmodels import SEGMENT_ARCHS

        if config.arch in SEGMENT_ARCHS:
            raise UsageError(
                f"--arch {config.arch} is a segmentation model: add --task segment"
            ) from None
        raise UsageError(f"--arch: {error}") from None
    if init is not None:
        try:
            load_matching(model, init.model)
        except ValueError:
            saved = init.meta.get("arch")
            found = f" (it was saved from --arch {saved})" if saved else ""
            raise UsageError(
                f"--init {init.path}: none of its {len(init.model)} tensors fits --arch "
                f"{config.arch}{found}; pass the --arch it was saved from, or a state_dict of "
                f"{config.arch}"
            ) from None
    check_runs(model, data.train_x[:2], config.arch)
    return model


def _init_heads(init: InitWeights | None, aux_model: AuxModel, config: TrainConfig) -> str | None:
    """Load the heads of an `auxhead train` checkpoint passed as --init when they are the ones
    this run attaches (same taps, kind and shapes); returns the line saying what happened."""
    if init is None or not init.heads:
        return None
    own = aux_model.heads.state_dict()
    same = (
        init.meta.get("taps") == aux_model.taps
        and init.meta.get("head") == config.head
        and own.keys() == init.heads.keys()
        and all(own[k].shape == v.shape for k, v in init.heads.items())  # classes, channels
    )
    if same:
        aux_model.heads.load_state_dict(init.heads)
        return f"--init: the heads at {', '.join(aux_model.taps)} start from {init.path} too"
    return (
        f"--init: the heads in {init.path} (taps {init.meta.get('taps')}, "
        f"{init.meta.get('head')}) are not this run's; the heads start fresh"
    )


# What a model raises on images it cannot take: torch's shape errors, and the AssertionError of
# torchvision's and timm's `_assert` on the input size.
_SHAPE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)


def check_runs(model: nn.Module, sample: torch.Tensor, arch: str) -> None:
    """Run `model` once on `sample` (eval, no grad): an architecture that cannot take these
    images is a usage error naming --arch and --size, before anything else happens."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except _SHAPE_ERRORS as error:  # the architecture cannot take these images
        if is_out_of_memory(error):
            raise UsageError(
                f"out of memory running --arch {arch} on "
                f"{'x'.join(map(str, sample.shape[1:]))} images: lower the image size (--size)"
            ) from None
        message = " ".join(str(error).split())[:200]
        shape = "x".join(map(str, sample.shape[1:]))
        raise UsageError(
            f"--arch {arch} does not run on {shape} images ({type(error).__name__}: "
            f"{message}); resize them with --size N (e.g. --size 224 for ImageNet models)"
        ) from None
    finally:
        model.train(was_training)


def _taps(config: TrainConfig, model: nn.Module, sample: torch.Tensor) -> list[str]:
    segment = " --task segment" if config.task == "segment" else ""
    encoder = f" --encoder {config.encoder}" if segment and config.encoder else ""
    listing = f"`auxhead layers{segment} --arch {config.arch}{encoder}` lists every layer"
    if not config.at:
        try:
            return default_taps(model, sample)
        except ValueError:
            raise UsageError(
                f"--arch {config.arch}: auxhead finds no layers to attach heads to by default; "
                f"name them with --at LAYER ({listing})"
            ) from None
    names = [name for name, _ in model.named_modules() if name]
    for tap in config.at:
        if tap not in names:
            close = difflib.get_close_matches(tap, names, n=5, cutoff=0.5)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            raise UsageError(f"--at {tap}: no such layer in {config.arch}{hint}; {listing}")
    try:
        resolve(model, list(config.at))  # anything else about the names fails here
    except (ValueError, TypeError) as error:
        raise UsageError(f"--at: {one_line(error)} ({listing})") from None
    return list(config.at)


def run_train(config: TrainConfig, say: Callable[[str], None] = lambda line: None) -> TrainResult:
    """Train, measure and export into `config.out` (which the caller has prepared: see
    `auxhead.cli._common.OutputFolder`); returns the result for the report writer.

    Raises:
        UsageError: bad options or data, naming the option; all raised before training, but
            for a loss that becomes non-finite.
    """
    with collect_warnings() as caught, torch_threads(config.threads), seeded(config.seed):
        result = _run(config, say)
    result.warnings = caught
    return result


def _run(config: TrainConfig, say: Callable[[str], None]) -> TrainResult:
    check_config(config)
    out = Path(config.out)
    init = _read_init(config)  # a file it cannot read is refused before the data loads
    data = _load(config, say)
    holdout = None
    if config.early_exit:
        n = min(config.holdout, len(data.train_y) // 5)
        if n < MIN_HOLDOUT:
            more = (
                f"raise --limit to {5 * MIN_HOLDOUT} or more"
                if config.limit
                else f"use a data set with at least {5 * MIN_HOLDOUT} training images"
            )
            raise UsageError(
                f"--early-exit calibrates on a fifth of the training images; {len(data.train_y)} "
                f"leave {n}, fewer than {MIN_HOLDOUT}: {more}, or drop --early-exit"
            )
        if n < SMALL_HOLDOUT:
            warnings.warn(
                f"early exit: calibrating on only {n} held-out images; with so few, little "
                f"passes the guarantee (use {SMALL_HOLDOUT}+ held-out images)",
                UserWarning,
                stacklevel=1,
            )
        data, holdout = _split_holdout(data, n, config.seed)
    budget = plan_budget(len(data.train_y), config)
    say(
        f"budget: {count(budget.epochs, 'epoch')} of {count(budget.steps_per_epoch, 'step')} "
        f"({count(budget.steps, 'step')}), batch size {budget.bs}, lr {budget.lr:g} ({budget.why})"
        + (
            f", after {FINE_TUNE_FROZEN_EPOCHS} epoch with the body frozen"
            if config.fine_tune
            else ""
        )
    )
    dls = dataloaders(data, bs=budget.bs, seed=config.seed, device="cpu")
    model = _model(config, data, init)
    taps = _taps(config, model, data.train_x[:2])
    try:
        heads = AuxHeads(
            taps,
            head=config.head,
            weights=config.aux_weight,
            schedule=config.schedule,
            distill=config.distill,
        )
    except ValueError as error:
        raise UsageError(f"--aux-weight/--distill: {error}") from None
    meta = {"arch": config.arch, "taps": taps, "head": config.head, "classes": data.classes,
            "channels": data.channels, "size": data.size}  # fmt: skip
    checkpoint = out / "checkpoint.pth"
    log = EpochLog(checkpoint, meta)
    causes = f"--lr {budget.lr:g} too high, or --aux-weight {config.aux_weight:g} too large"
    try:  # heads are attached (and sized) as the Learner is built
        cbs = [heads, log, StopOnNonFinite(causes), CheckHeadsTrain()]
        learn = _learner(dls, model, cbs, out, config.fine_tune)
    except AttachError as error:  # attach refused a tap; anything else is a bug, raised
        message = one_line(error)
        raise UsageError(
            f"--at {' '.join(taps)}: cannot attach {config.head} heads there ({message}); "
            f"choose other layers (`auxhead layers --arch {config.arch}` lists them)"
        ) from None
    heads_line = _init_heads(init, heads.aux_model, config)
    if heads_line:
        say(heads_line)
    start = time.perf_counter()
    try:
        with _memory_is_the_options(budget.bs, data):
            _fit(learn, budget, config.fine_tune)
    except FloatingPointError as error:  # AuxLoss found a non-finite head loss
        message = one_line(error)
        raise UsageError(f"{message}: training diverged; likely cause: {causes}") from None
    train_seconds = time.perf_counter() - start

    aux_model = heads.aux_model
    sample = data.valid_x[:2]
    with _memory_is_the_options(budget.bs, data):
        flops = exit_flops(aux_model, sample)
        params = exit_params(aux_model, sample)
        predicted = exit_predictions(aux_model, data.valid_x, bs=budget.bs)
    accuracies = _accuracies(predicted, data.valid_y)
    exits = [ExitReport(name, accuracies[name], flops[name], params[name])
             for name in [*taps, "main"]]  # fmt: skip

    files = {"checkpoint": str(checkpoint)}
    model_path = (out / "model.pkl").resolve()
    with atomic_path(model_path) as tmp:
        export_learner(learn, tmp)
    files["model"] = str(model_path)
    result = TrainResult(
        config=config,
        budget=budget,
        data=data.name,
        classes=data.classes,
        n_train=len(data.train_y),
        n_test=len(data.valid_y),
        arch=config.arch,
        taps=taps,
        exits=exits,
        history=log.history,
        train_seconds=train_seconds,
        files=files,
        per_class=class_reports(predicted, data.valid_y, data.classes),
        data_notes=list(data.notes),
    )
    if holdout is not None:
        _early_exit(result, aux_model, holdout, data, config)
    if config.compare:
        _baseline(result, dls, data, config, out, init)
    return result


@contextlib.contextmanager
def _memory_is_the_options(bs: int, data: ImageData):
    """Running out of memory is a usage error naming the options that shrink it."""
    try:
        yield
    except Exception as error:
        if isinstance(error, UsageError) or not is_out_of_memory(error):
            raise
        raise UsageError(
            f"out of memory training on {data.channels}x{data.size}x{data.size} images in "
            f"batches of {bs}: lower the batch size (--bs) or the image size (--size)"
        ) from None


def _early_exit(
    result: TrainResult,
    aux_model: AuxModel,
    holdout: ImageData,
    data: ImageData,
    config: TrainConfig,
) -> None:
    exit_model = EarlyExit(aux_model)
    calibration: ExitSummary = exit_model.calibrate(
        _batches(holdout.valid_x, holdout.valid_y, 500),
        max_accuracy_drop=config.max_drop,
        confidence=config.confidence,  # guaranteed by Learn then Test (method="ltt")
    )
    test: ExitSummary = exit_model.evaluate(_batches(data.valid_x, data.valid_y, 500))
    fallback = all(t >= 1.0 for t in exit_model.thresholds)
    result.early_exit_summary = test
    result.early_exit = {
        "mode": exit_model.mode,
        "n_calibration": len(holdout.valid_y),
        "fallback_to_main": fallback,
        "calibration": calibration.as_dict(),
        "test": test.as_dict(),
        "test_table": str(test),
    }


def _baseline(
    result: TrainResult,
    dls,
    data: ImageData,
    config: TrainConfig,
    out: Path,
    init: InitWeights | None,
) -> None:
    """The same architecture, seed, starting weights and budget without heads."""
    with seeded(config.seed):  # as the run with heads started
        model = _model(config, data, init)
        learn = _learner(dls, model, [], out, config.fine_tune)
        start = time.perf_counter()
        _fit(learn, result.budget, config.fine_tune)
        result.baseline_seconds = time.perf_counter() - start
    result.baseline_history = recorder_history(learn)  # before get_preds resets the Recorder
    preds, targets = learn.get_preds()
    result.baseline_accuracy = float((preds.argmax(1) == targets).float().mean())
