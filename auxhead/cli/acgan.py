"""`auxhead acgan`: train an AC-GAN (or its variants, side by side), evaluate, report.

`ACGANConfig` (the options) -> `run_acgan` -> `ACGANResult` -> `write_acgan_report`.

Files written to `--out`: `grid.png` (one row per class), `grids/grid_epoch_NNN.png`,
`checkpoint.pth` (both networks, after every epoch), `generator.pth` (config + weights),
`learner.pth` (both networks and the optimizer, for `learn.load`), `samples.npz` (`images`
float32 N x C x H x W in [0, 1], `labels` int64, `classes`), `report.md` and `report.json`.
With `--conditioning ac tac ...` each further variant's files go to `--out/<kind>/` and the
report shows them side by side.

The defaults were chosen by measuring (`benchmarks/gan_conditioning.py`: every variant at one
step budget on Fashion-MNIST and scikit-learn's digits, two seeds): ADC-GAN's dual classifier
with a generator EMA (decay 0.999) and the DCGAN discriminator (BCE, BatchNorm) gave the
lowest Frechet distances and the highest recall on both. For "ac" and "tac", the
discriminator's class head learns from real images only (trained on generated ones too, as in
the paper, it learns the generator's own codes for the classes, which an independent
classifier does not share); a mode-seeking term keeps the generator from ignoring its noise.
`--conditioning ac --ema 0 --mode-seeking 0 --class-weight 1 --fake-class-loss` is the paper's
AC-GAN.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.learner import save_model

from auxhead._format import recorder_history
from auxhead.cli._common import (
    EXIT_CODES,
    ManualFormatter,
    UsageError,
    atomic_path,
    collect_warnings,
    ema_decay,
    load_images,
    nonnegative_float,
    positive_float,
    positive_int,
)
from auxhead.cli._state import seeded, torch_threads
from auxhead.data import ImageData, dataloaders, load_data
from auxhead.gan.augment import AUGMENTATIONS, split_policy
from auxhead.gan.learner import acgan_learner, save_image
from auxhead.gan.losses import ADVERSARIAL_LOSSES, ACGANLoss
from auxhead.gan.metrics import GANEvaluator
from auxhead.gan.models import CONDITIONINGS, SIZES, Discriminator, Generator
from auxhead.gan.monitor import ClassMonitor

__all__ = [
    "TARGETS",
    "ACGANConfig",
    "ACGANResult",
    "GANBudget",
    "add_parser",
    "classifier_epochs",
    "gan_budget",
    "run_acgan",
]

# The default run's goals (issue #14), all measured with the independent classifier: the share
# of generated samples it assigns to their conditioning class, the smallest per-class
# diversity as a share of the real data's, the Frechet distance as a multiple of the
# real-vs-real floor, recall (k = 3) and the classification accuracy score.
TARGETS = {"accuracy": 0.90, "diversity_ratio": 0.85, "fid_ratio": 15.0, "recall": 0.6, "cas": 0.80}


def passed(figures: dict[str, Any]) -> dict[str, bool]:
    """Which of `TARGETS` one run's figures (`GANEvaluator.evaluate`'s) meet."""
    floor, cas = figures["fid_floor"], figures.get("cas")
    return {
        "accuracy": figures["accuracy"]["overall"] >= TARGETS["accuracy"],
        "diversity": (figures["min_diversity_ratio"] or 0) >= TARGETS["diversity_ratio"],
        "fid_ratio": bool(floor) and figures["fid"] / floor <= TARGETS["fid_ratio"],
        "recall": figures["recall"] >= TARGETS["recall"],
        "cas": cas is not None and cas["accuracy"] >= TARGETS["cas"],
    }


# The independent classifier trains for at least this many steps of 128 images (2 epochs of
# Fashion-MNIST); on a small data set such as digits that is many more epochs, but never more
# than MAX_CLASSIFIER_EPOCHS: a folder of a few dozen images would otherwise get 900 passes,
# and the classification accuracy score, which gets as many steps over ~1,000 generated
# images, would take most of the run.
CLASSIFIER_STEPS = 900
MAX_CLASSIFIER_EPOCHS = 100
# The GAN trains DEFAULT_EPOCHS epochs (Fashion-MNIST: 468 steps each; 15 epochs met 4 of the
# 5 quality targets in 9 minutes, 10 epochs met 1) of at least MIN_STEPS_PER_EPOCH steps: on a
# smaller data set an epoch passes over the training images several times (scikit-learn's
# digits: 20 passes of 11 steps), so that every data set gets at least 3,300 steps (digits at
# 10 epochs of one pass: samples at chance) and a few dozen images still make 15 epochs, each
# with one grid, checkpoint and monitor check, not thousands.
DEFAULT_EPOCHS = 15
MIN_STEPS_PER_EPOCH = 220
MIN_SAMPLES_PER_CLASS = 100  # fewer make the per-class figures noise
# The held-out images each class needs: the monitor's and the evaluation's diversity compare
# pairwise distances (2 at least), and precision/recall need more than k = 3 images in all.
MIN_HELD_OUT_PER_CLASS = 2
# Below this many training images the run suggests DiffAugment: on a folder of 39 it doubled
# the smallest class's diversity on two seeds; on 480 it traded recognisability for FD.
FEW_IMAGES = 200

OWNED_FILES = [  # what a run writes into --out: removed when the next run starts
    "report.md",
    "report.json",
    "grid.png",
    "grids",
    "checkpoint.pth",
    "generator.pth",
    "learner.pth",
    "samples.npz",
    *CONDITIONINGS,  # the side-by-side runs' folders
]

DEFAULT_CLASS_WEIGHT = 1.5

# The options that apply to some conditionings only (auxhead.gan.losses reads them only there),
# and why the others have no use for them: each is refused when no --conditioning uses it.
APPLIES_TO = {
    "fake_class_loss": ("ac", "tac", "reacgan"),
    "class_weight": ("ac", "tac", "adc", "reacgan"),
}
WHY_NOT = {
    ("fake_class_loss", "adc"): "ADC-GAN always trains its classifier on generated images, "
    "as classes of their own",
    ("fake_class_loss", "projection"): "a projection discriminator has no class head",
    ("class_weight", "projection"): "a projection discriminator has no class loss; the class "
    "enters its real/generated logit",
}

VARIANT_NAMES = {
    "ac": "AC-GAN",
    "tac": "TAC-GAN",
    "adc": "ADC-GAN",
    "reacgan": "ReACGAN",
    "projection": "projection GAN",
}


@dataclass(kw_only=True)
class ACGANConfig:
    """Settings of one `auxhead acgan` run; the CLI's options, one for one."""

    data: str = "fashion-mnist"  # or "digits", or a folder
    size: int | None = None  # None: the data's size, or the next one in SIZES
    epochs: int | None = None  # None: DEFAULT_EPOCHS (see `gan_budget`)
    seed: int = 0
    out: Path = Path("runs/acgan")
    # The discriminator's use of the class, one run each, side by side: the first writes to
    # --out, each other one to --out/<name>/ (see auxhead.gan.models.CONDITIONINGS).
    conditioning: tuple[str, ...] = ("adc",)
    loss: str = "bce"  # the source term: "bce" (the paper's) or "hinge"
    spectral_norm: bool = False  # in the discriminator (BatchNorm then dropped)
    ema: float = 0.999  # decay of the generator's weight average that draws samples; 0: none
    augment: str = "none"  # DiffAugment policy for every discriminator input, or "none"
    bs: int = 128
    lr: float = 2e-4  # Adam, both networks
    latent_dim: int = 64
    width: int = 32
    # Weight of the class loss; None: DEFAULT_CLASS_WEIGHT. Not for "projection" (no class loss).
    class_weight: float | None = None
    mode_seeking: float = 1.0  # MSGAN's term
    # The class head also learns from generated images; only "ac", "tac" and "reacgan" have
    # the choice (ADC-GAN always does, a projection discriminator has no class head).
    fake_class_loss: bool = False
    n_per_class: int = 500  # generated samples per class, evaluated and saved
    classifier_epochs: int | None = None  # None: `classifier_epochs` decides
    threads: int | None = None


@dataclass
class GANRun:
    """One trained GAN, evaluated."""

    variant: str  # VARIANT_NAMES[conditioning]
    conditioning: str
    folder: str  # relative to --out: "" for the first run, else the conditioning's name
    out: Path
    epochs: int
    loss: dict[str, Any]
    train_seconds: float
    eval_seconds: float
    history: list[dict[str, float | None]]
    figures: dict[str, Any]  # GANEvaluator.evaluate's
    collapses: list[dict[str, Any]] = field(default_factory=list)  # ClassMonitor's events

    def as_json(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "conditioning": self.conditioning,
            "folder": self.folder,
            "out": str(self.out),
            "epochs": self.epochs,
            "loss": self.loss,
            "train_seconds": round(self.train_seconds, 1),
            "eval_seconds": round(self.eval_seconds, 1),
            "history": self.history,
            "collapses": self.collapses,
            **self.figures,
        }


@dataclass
class ACGANResult:
    config: ACGANConfig
    data: ImageData
    budget: GANBudget
    classifier_epochs: int
    classifier_seconds: float
    reference: dict[str, Any]
    runs: list[GANRun]
    total_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def passed(self) -> dict[str, dict[str, bool]]:
        return {run.variant: passed(run.figures) for run in self.runs}

    def as_json(self) -> dict[str, Any]:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        config.update(epochs=self.budget.epochs, classifier_epochs=self.classifier_epochs)
        config["class_weight"] = _class_weight(self.config)  # each run's own: runs[i]["loss"]
        data = self.data
        return {
            "config": config,
            "epochs_why": self.budget.why,
            "steps_per_epoch": self.budget.steps_per_epoch,
            "passes_per_epoch": self.budget.repeats,
            "bs": self.budget.bs,  # --bs, or the training set's size if smaller
            "data": {
                "name": data.name,
                "classes": data.classes,
                "n_train": len(data.train_y),
                "n_valid": len(data.valid_y),
                "shape": "x".join(map(str, data.train_x.shape[1:])),
            },
            "targets": TARGETS,
            "classifier_seconds": round(self.classifier_seconds, 1),
            "reference": self.reference,
            "runs": [run.as_json() for run in self.runs],
            "passed": self.passed(),
            "warnings": self.warnings,
            "total_seconds": round(self.total_seconds, 1),
        }


# The command line --------------------------------------------------------------------------

DESCRIPTION = """\
Train an auxiliary-classifier GAN through fastai, sample every class, and evaluate the
samples with an independently trained classifier: the share recognised as their class, the
Frechet distance (overall and per class) in that classifier's feature space beside the
real-vs-real floor, precision and recall, the classification accuracy score (a classifier
trained on the samples alone, tested on real images) and per-class diversity; a class that
collapses during training is named.

The default GAN is ADC-GAN (the discriminator classifies real class k and generated class k
apart) with a moving average of the generator's weights drawing the samples: measured against
AC-GAN, TAC-GAN, ReACGAN and a projection discriminator (benchmarks/gan_conditioning.py), it
had the lowest Frechet distances and the highest recall. --conditioning picks others.

Defaults: Fashion-MNIST, 15 epochs (about 9 minutes on 2 CPU cores). An epoch has at least
220 optimizer steps: on a smaller data set it passes over the images several times
(scikit-learn's digits: 20 passes; 50 training images: 220 passes, all 50 in each batch).
The run prints what it chose; --epochs sets the number of epochs."""

EPILOG = f"""\
examples:
  auxhead acgan                                  # Fashion-MNIST, 15 epochs
  auxhead acgan --data digits --out runs/digits  # 8x8 digits at 28x28, 15 epochs of 20 passes
  auxhead acgan --conditioning ac tac adc reacgan projection --out runs/all  # side by side
  auxhead acgan --conditioning ac --ema 0 --mode-seeking 0 --class-weight 1 --fake-class-loss
                                                 # the paper's AC-GAN

output files (in --out; an earlier run's are deleted when a run starts, and the report is
written only when the run completes):
  report.md, report.json   the figures, the grids, per-class accuracy and diversity
  grid.png, grids/         one row per class; the grid after every epoch
  checkpoint.pth           both networks after every epoch (kept on Ctrl-C)
  generator.pth            the generator's config and weights
  learner.pth              both networks and the optimizer, for fastai's learn.load
  samples.npz              N per class: images float32 N x C x H x W in [0, 1], labels int64
  KIND/                    each further --conditioning KIND's files

{EXIT_CODES}"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "acgan",
        help="train a class-conditional AC-GAN and evaluate its samples",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=ManualFormatter,
    )
    return add_acgan_arguments(p)


def add_acgan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `acgan` subcommand's options to `parser`; returns it."""
    d = ACGANConfig()
    parser.add_argument(
        "--data",
        default=d.data,
        help="'fashion-mnist' (default), 'digits', a folder of idx files or of class subfolders",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        choices=sorted(SIZES),
        help="resize images to SIZE x SIZE (default: the data's own size, or the next allowed "
        "one up; digits: 28)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"training epochs (default {DEFAULT_EPOCHS}); an epoch has at least "
        f"{MIN_STEPS_PER_EPOCH} steps, passing over a small data set several times",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed")
    parser.add_argument(
        "--out",
        default=str(d.out),
        help="output folder; the files this command writes are replaced",
    )
    parser.add_argument(
        "--conditioning",
        nargs="+",
        choices=list(CONDITIONINGS),
        default=list(d.conditioning),
        metavar="KIND",
        help="how the discriminator uses the class, one GAN per KIND side by side (the first "
        "in --out, the others in --out/KIND/): "
        + "; ".join(f"{k}: {VARIANT_NAMES[k]}" for k in CONDITIONINGS)
        + f" (default {' '.join(d.conditioning)})",
    )
    parser.add_argument("--tac", action="store_true", help=argparse.SUPPRESS)  # = ... tac
    parser.add_argument(
        "--loss",
        choices=list(ADVERSARIAL_LOSSES),
        default=d.loss,
        help=f"real-vs-generated loss: bce (the paper's) or hinge (default {d.loss})",
    )
    parser.add_argument(
        "--spectral-norm",
        action=argparse.BooleanOptionalAction,
        default=d.spectral_norm,
        help="spectral normalisation of every discriminator layer",
    )
    parser.add_argument(
        "--ema",
        type=ema_decay,
        default=d.ema,
        metavar="DECAY",
        help=f"draw samples from a moving average of the generator's weights with this decay, "
        f"in [0, 1); 0: none (default {d.ema:g})",
    )
    parser.add_argument(
        "--augment",
        default=d.augment,
        metavar="POLICY",
        help="DiffAugment for every image the discriminator sees: 'none' or a comma list of "
        f"{', '.join(AUGMENTATIONS)} (default {d.augment})",
    )
    parser.add_argument("--bs", type=positive_int, default=d.bs, help="batch size, at least 2")
    parser.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate")
    parser.add_argument("--latent-dim", type=positive_int, default=d.latent_dim, help="noise size")
    parser.add_argument("--width", type=positive_int, default=d.width, help="network width")
    parser.add_argument(
        "--class-weight",
        type=nonnegative_float,
        default=d.class_weight,
        help=f"weight of the class loss (default {DEFAULT_CLASS_WEIGHT:g}; not for projection, "
        "which has none)",
    )
    parser.add_argument(
        "--mode-seeking",
        type=nonnegative_float,
        default=d.mode_seeking,
        help="weight of MSGAN's mode-seeking term against AC-GAN's loss of diversity (the "
        "paper's plain AC-GAN: --conditioning ac --ema 0 --mode-seeking 0 --class-weight 1 "
        "--fake-class-loss)",
    )
    parser.add_argument(
        "--fake-class-loss",
        action="store_true",
        help="also train the discriminator's class head on generated images, as the AC-GAN "
        "paper does (default: real images only, which lets the generator collude with it "
        "less); for ac, tac and reacgan (adc always does, projection has no class head)",
    )
    parser.add_argument(
        "--n-per-class",
        type=positive_int,
        default=d.n_per_class,
        help=f"generated samples per class to evaluate and save (at least {MIN_SAMPLES_PER_CLASS})",
    )
    parser.add_argument(
        "--classifier-epochs",
        type=positive_int,
        default=None,
        help=f"epochs of the independent evaluation classifier (default: enough for "
        f"{CLASSIFIER_STEPS} steps of 128 images, between 2 and {MAX_CLASSIFIER_EPOCHS}; 2 on "
        "Fashion-MNIST)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default torch's choice); 1 is faster on a busy machine",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> ACGANConfig:
    if str(args.out).strip() == "":
        raise UsageError("--out is empty; give a folder path (it is created if missing)")
    names = [f.name for f in ACGANConfig.__dataclass_fields__.values()]
    values = {name: getattr(args, name) for name in names}
    values["out"] = Path(values["out"])
    conditioning = list(dict.fromkeys(values["conditioning"]))  # in order, once each
    if getattr(args, "tac", False) and "tac" not in conditioning:  # the old --tac
        conditioning.append("tac")
    values["conditioning"] = tuple(conditioning)
    return ACGANConfig(**values)


def check_config(config: ACGANConfig) -> None:
    """Refuse settings that cannot work, before any data is loaded (the parser has checked
    types, ranges and that every number is finite)."""
    if config.bs < 2:
        raise UsageError(f"--bs {config.bs}: the discriminator needs at least 2 images a batch")
    if config.n_per_class < MIN_SAMPLES_PER_CLASS:
        raise UsageError(
            f"--n-per-class must be >= {MIN_SAMPLES_PER_CLASS}, got {config.n_per_class}"
        )
    for name in ("lr", "class_weight", "mode_seeking"):
        value = getattr(config, name)
        if value is None:  # the default
            continue
        if not np.isfinite(value) or value < 0:
            raise UsageError(
                f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}"
            )
    if config.size is not None and config.size not in SIZES:
        raise UsageError(f"--size must be one of {sorted(SIZES)}, got {config.size}")
    unknown = [c for c in config.conditioning if c not in CONDITIONINGS]
    if unknown or not config.conditioning:
        raise UsageError(
            f"--conditioning {' '.join(unknown) or '(none)'}: choose from "
            f"{', '.join(CONDITIONINGS)}"
        )
    _check_applies(config)
    if config.loss not in ADVERSARIAL_LOSSES:
        raise UsageError(f"--loss {config.loss}: choose from {', '.join(ADVERSARIAL_LOSSES)}")
    if not 0 <= config.ema < 1:
        raise UsageError(f"--ema {config.ema}: a decay in [0, 1), e.g. 0.999; 0 for none")
    if config.augment != "none":
        ops, unknown = split_policy(config.augment)
        if unknown or not ops:
            raise UsageError(
                f"--augment {config.augment}: unknown operation {', '.join(unknown) or '(none)'}"
                f"; give a comma list of {', '.join(AUGMENTATIONS)}, or none"
            )


def _given(config: ACGANConfig, name: str) -> bool:
    """Whether an option of APPLIES_TO was given (it has no default effect to give)."""
    value = getattr(config, name)
    return value is not None and value is not False


def _check_applies(config: ACGANConfig) -> None:
    """An option that no chosen --conditioning reads would be ignored: refuse it, naming it,
    the conditionings and those it applies to. With several conditionings, an option that
    applies to some is used by those (each run's report says which)."""
    for name, kinds in APPLIES_TO.items():
        if not _given(config, name) or any(c in kinds for c in config.conditioning):
            continue
        option = "--" + name.replace("_", "-")
        why = "; ".join(
            WHY_NOT[name, c] for c in dict.fromkeys(config.conditioning) if (name, c) in WHY_NOT
        )
        raise UsageError(
            f"{option} does not apply to --conditioning {' '.join(config.conditioning)} ({why}); "
            f"it applies to {', '.join(kinds)}: drop it, or choose one of those"
        )


def _class_weight(config: ACGANConfig) -> float:
    """The weight of the class loss: --class-weight, or DEFAULT_CLASS_WEIGHT."""
    return DEFAULT_CLASS_WEIGHT if config.class_weight is None else config.class_weight


def classifier_epochs(n_train: int, requested: int | None = None) -> int:
    """`requested`, or enough epochs for `CLASSIFIER_STEPS` steps of 128 images (at least 2,
    at most `MAX_CLASSIFIER_EPOCHS`)."""
    if requested is not None:
        return requested
    steps_per_epoch = -(-n_train // 128)
    return min(MAX_CLASSIFIER_EPOCHS, max(2, -(-CLASSIFIER_STEPS // steps_per_epoch)))


class GANBudget(NamedTuple):
    """How long the GAN trains: `epochs` of `steps_per_epoch` optimizer steps of `bs` images,
    each epoch `repeats` shuffled passes over the training images; `why`, in words."""

    epochs: int
    repeats: int
    steps_per_epoch: int
    bs: int
    why: str


def gan_budget(n_train: int, bs: int, requested: int | None = None) -> GANBudget:
    """`requested` epochs or DEFAULT_EPOCHS, each at least MIN_STEPS_PER_EPOCH steps: as many
    passes over the `n_train` training images as that takes (the last partial batch of an
    epoch is dropped). The batch is `bs` images, or all of them if there are fewer: a batch
    that holds each image several times costs more and teaches nothing more."""
    bs = min(bs, n_train)
    repeats = 1
    if n_train // bs < MIN_STEPS_PER_EPOCH:
        repeats = -(-MIN_STEPS_PER_EPOCH * bs // n_train)
    steps = n_train * repeats // bs
    epochs = DEFAULT_EPOCHS if requested is None else requested
    why = "--epochs given" if requested is not None else "the default"
    why += f", {epochs * steps} steps"
    if repeats > 1:
        why += f": each epoch passes {repeats} times over the {n_train} training images"
    if bs == n_train:
        why += f", all {n_train} in every batch"
    return GANBudget(epochs, repeats, steps, bs, why)


def _load(config: ACGANConfig, say: Callable[[str], None]) -> ImageData:
    data = load_images(
        config.data, seed=config.seed, size=config.size, fallback=max(SIZES), say=say
    )
    if config.size is None and data.size not in SIZES:
        # e.g. digits (8 px): the smallest size the networks make that is not smaller
        size = min((s for s in SIZES if s >= data.size), default=max(SIZES))
        say(f"resizing the {data.size}-pixel images to {size} (--size chooses)")
        data = load_data(config.data, seed=config.seed, size=size)
    if data.train_x.shape[2] != data.train_x.shape[3] or data.size not in SIZES:
        raise UsageError(
            f"--data: the images are {data.train_x.shape[2]}x{data.train_x.shape[3]}; the AC-GAN "
            f"makes square images of {sorted(SIZES)} pixels: pass --size N to resize them"
        )
    n_seen = len(torch.unique(torch.cat([data.train_y, data.valid_y])))
    if data.c < 2 or n_seen < 2:
        raise UsageError(
            f"--data {data.name} has {min(data.c, n_seen)} class(es); an AC-GAN conditions on the "
            "class and needs at least 2"
        )
    held_out = torch.bincount(data.valid_y, minlength=data.c).tolist()
    pairs = zip(data.classes, held_out, strict=True)
    short = [f"{name}: {n}" for name, n in pairs if n < MIN_HELD_OUT_PER_CLASS]
    if short:
        raise UsageError(
            f"--data {data.name}: the evaluation needs at least {MIN_HELD_OUT_PER_CLASS} held-out "
            f"images of every class, and the split holds out too few ({', '.join(short)}); add "
            "images (about 10 a class), or put at least 2 of each class in a valid/ folder "
            "beside train/"
        )
    return data


class GANCheckpoint(Callback):
    """After every epoch, save both networks (and the epoch) atomically to `path`, so an
    interrupted run keeps its last completed epoch; stop at a non-finite loss with one line."""

    order = 60  # after the Recorder

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta

    def after_batch(self) -> None:  # the trainer steps both networks itself, in before_batch
        loss = getattr(self.learn, "loss", None)
        if self.training and loss is not None and not bool(torch.isfinite(loss).all()):
            raise UsageError(
                f"the GAN's loss became {float(loss)} at epoch {self.epoch + 1}: "
                "training diverged; likely cause: --lr too high, or --class-weight / "
                "--mode-seeking too large"
            )

    def after_epoch(self) -> None:
        model = self.learn.model
        ema = model.generator_ema
        state = {
            "generator": model.generator.state_dict(),
            "discriminator": model.discriminator.state_dict(),
            "generator_ema": None if ema is None else ema.state_dict(),
            "epoch": self.epoch + 1,
            **self.meta,
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)


def _train_variant(
    config: ACGANConfig,
    data: ImageData,
    evaluator: GANEvaluator,
    budget: GANBudget,
    conditioning: str,
    folder: str,
) -> GANRun:
    """Train one GAN, write its files to `--out/folder`, and evaluate it."""
    out = Path(config.out) / folder
    out.mkdir(parents=True, exist_ok=True)
    networks = {
        "latent_dim": config.latent_dim,
        "num_classes": data.c,
        "size": data.size,
        "channels": data.channels,
        "width": config.width,
    }
    generator = Generator(**networks)
    discriminator = Discriminator(
        data.c,
        size=data.size,
        channels=data.channels,
        width=config.width,
        conditioning=conditioning,
        spectral_norm=config.spectral_norm,
    )
    own_choice = conditioning in APPLIES_TO["fake_class_loss"]
    loss = ACGANLoss(
        class_weight=_class_weight(config),
        # ADC-GAN always learns generated classes; projection has no classifier
        fake_class_loss=config.fake_class_loss if own_choice else None,
        conditioning=conditioning,
        adversarial=config.loss,
        mode_seeking=config.mode_seeking,
    )
    dls = dataloaders(data, bs=budget.bs, seed=config.seed, device="cpu", repeats=budget.repeats)
    meta = {"config": networks, "classes": data.classes, "conditioning": conditioning}
    monitor = ClassMonitor(
        evaluator.classifier, data.valid_x, data.valid_y, seed=config.seed, class_names=data.classes
    )
    learn = acgan_learner(
        dls,
        generator,
        discriminator,
        loss_func=loss,
        ema_decay=config.ema or None,
        augment=None if config.augment == "none" else config.augment,
        lr=config.lr,
        grid_dir=out / "grids",
        cbs=[GANCheckpoint(out / "checkpoint.pth", meta), monitor],
        path=out,
        model_dir=".",
    )
    start = time.perf_counter()
    learn.fit(budget.epochs)
    train_seconds = time.perf_counter() - start
    with atomic_path(out / "learner.pth") as tmp:
        save_model(tmp, learn.model, getattr(learn, "opt", None))  # what learn.save writes
    with atomic_path(out / "generator.pth") as tmp:  # the weights that drew the samples
        state = learn.sampler.state_dict()
        torch.save({"config": networks, "classes": data.classes, "state_dict": state}, tmp)
    with atomic_path(out / "grid.png") as tmp:
        save_image(learn.sample_grid(10, seed=config.seed), tmp)

    labels = torch.arange(data.c).repeat_interleave(config.n_per_class)
    images = learn.generate(labels, seed=config.seed + 1).cpu()
    if not bool(torch.isfinite(images).all()):
        raise UsageError(
            "the generator produces non-finite images: training diverged; likely cause: --lr "
            "too high, or --class-weight / --mode-seeking too large"
        )
    with atomic_path(out / "samples.npz") as tmp:
        np.savez_compressed(
            tmp,
            images=images.numpy().astype(np.float32),
            labels=labels.numpy().astype(np.int64),
            classes=np.array(data.classes),
        )
    start = time.perf_counter()
    figures = evaluator.evaluate(images, labels)
    history = [
        {k: None if v is None else round(v, 4) for k, v in row.items()}
        for row in recorder_history(learn)
    ]
    return GANRun(
        variant=VARIANT_NAMES[conditioning],
        conditioning=conditioning,
        folder=folder,
        out=out,
        epochs=budget.epochs,
        loss={
            "conditioning": conditioning,
            "adversarial": loss.adversarial,
            # None where the conditioning has no class loss (projection)
            "class_weight": loss.class_weight if conditioning != "projection" else None,
            "class_on_fake": loss.class_on_fake if conditioning != "projection" else None,
            "mode_seeking": loss.mode_seeking,
            "spectral_norm": config.spectral_norm,
            "ema": config.ema,
            "augment": config.augment,
        },
        collapses=[event.as_dict() for event in monitor.collapses],
        train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - start,
        history=history,
        figures=figures,
    )


def run_acgan(config: ACGANConfig, say: Callable[[str], None] = lambda line: None) -> ACGANResult:
    """Train, evaluate and write the networks and samples into `config.out` (which the caller
    has prepared: see `auxhead.cli._common.OutputFolder`); the report is the caller's.

    Raises:
        UsageError: bad options or data, naming the option (before training), or a training
            run that diverged.
    """
    with collect_warnings() as caught, torch_threads(config.threads), seeded(config.seed):
        result = _run(config, say)
    result.warnings = caught
    return result


def _run(config: ACGANConfig, say: Callable[[str], None]) -> ACGANResult:
    check_config(config)
    start = time.perf_counter()
    data = _load(config, say)
    say(f"data: {data}")
    n_train = len(data.train_y)
    budget = gan_budget(n_train, config.bs, config.epochs)
    if n_train < FEW_IMAGES and config.augment == "none":
        say(
            f"tip: on few images ({n_train} to train) --augment "
            "color,translation,cutout gave more varied samples (docs/benchmarks/acgan.md, "
            "'Your own few images')"
        )
    n_classifier = classifier_epochs(n_train, config.classifier_epochs)
    say(f"training the independent classifier ({n_classifier} epoch{'s' * (n_classifier != 1)})...")
    t = time.perf_counter()
    evaluator = GANEvaluator.fit(
        data.train_x,
        data.train_y,
        data.valid_x,
        data.valid_y,
        data.c,
        epochs=n_classifier,
        floor_samples=config.n_per_class * data.c,
        seed=config.seed,
    )
    reference = evaluator.reference()
    classifier_seconds = time.perf_counter() - t
    say(
        f"classifier: real test accuracy {reference['classifier_test_accuracy']['overall']:.3f}"
        f", Frechet floor {reference['fid_floor']:.3f} ({classifier_seconds:.0f} s)"
    )
    result = ACGANResult(
        config=config,
        data=data,
        budget=budget,
        classifier_epochs=n_classifier,
        classifier_seconds=classifier_seconds,
        reference=reference,
        runs=[],
    )
    for i, conditioning in enumerate(config.conditioning):
        name = VARIANT_NAMES[conditioning]
        epochs = f"{budget.epochs} epoch{'s' * (budget.epochs != 1)}"
        say(f"training the {name}: {epochs} ({budget.why})...")
        folder = "" if i == 0 else conditioning
        with seeded(config.seed):  # each variant starts from the same seed
            run = _train_variant(config, data, evaluator, budget, conditioning, folder)
        f = run.figures
        say(
            f"{name}: {f['accuracy']['overall']:.3f} classified as their class, Frechet "
            f"{f['fid']:.3f} (floor {f['fid_floor']:.3f}), min diversity ratio "
            f"{f['min_diversity_ratio'] or 0:.2f}"
        )
        result.runs.append(run)
    result.total_seconds = time.perf_counter() - start
    return result
