"""`auxhead acgan`: train an AC-GAN (and with `--tac` a TAC-GAN beside it), evaluate, report.

The main command line registers this module as a subcommand:

    sub = subparsers.add_parser("acgan", help=...)
    add_acgan_arguments(sub)
    sub.set_defaults(func=run_acgan)

Files written to `--out`: `grid.png` (one row per class), `grids/grid_epoch_NNN.png`,
`generator.pth` (config + weights), `learner.pth` (both networks and the optimizer, for
`learn.load`), `samples.npz` (`images` float32 N x C x H x W in [0, 1], `labels` int64,
`classes`), `report.md` and `report.json`. With `--tac` the TAC-GAN's own files go to
`--out/tac/` and the report shows both side by side.

The defaults were measured on Fashion-MNIST to meet the goals in `TARGETS` within about ten
minutes on two CPU cores: the discriminator's class head learns from real images only (trained
on generated ones too, as in the paper, it learns the generator's own codes for the classes,
which an independent classifier does not share) and a mode-seeking term keeps the generator
from ignoring its noise. `--mode-seeking 0 --class-weight 1 --fake-class-loss` is the paper's
AC-GAN.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from auxhead.data import DataError, ImageData, dataloaders, load_data
from auxhead.gan.learner import acgan_learner, save_image
from auxhead.gan.losses import ACGANLoss
from auxhead.gan.metrics import GANEvaluator
from auxhead.gan.models import IMG_SIZES, Discriminator, Generator

__all__ = ["TARGETS", "add_acgan_arguments", "classifier_epochs", "run_acgan"]

# The default run's goals: share of generated samples the independent classifier assigns to
# their conditioning class, and the smallest per-class diversity as a share of the real data's.
TARGETS = {"accuracy": 0.85, "diversity_ratio": 0.70}

# The independent classifier trains for at least this many steps of 128 images (2 epochs of
# Fashion-MNIST); on a small data set such as digits that is many more epochs.
CLASSIFIER_STEPS = 900


def add_acgan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `acgan` subcommand's options to `parser`; returns it."""
    parser.add_argument(
        "--data",
        default=None,
        help="'fashion-mnist' (default), 'digits', a folder of idx files or of class subfolders",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"resize images to SIZE x SIZE, one of {sorted(IMG_SIZES)}; default the data's "
        "own size, or the next allowed one up (digits: 28)",
    )
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", default="acgan-out", help="output folder (default acgan-out)")
    parser.add_argument(
        "--tac",
        action="store_true",
        help="also train a TAC-GAN (twin auxiliary classifier) and report both side by side",
    )
    parser.add_argument("--bs", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (2e-4)")
    parser.add_argument("--latent-dim", type=int, default=64, help="noise size (default 64)")
    parser.add_argument("--width", type=int, default=32, help="network width (default 32)")
    parser.add_argument(
        "--class-weight", type=float, default=1.5, help="weight of the class loss (default 1.5)"
    )
    parser.add_argument(
        "--mode-seeking",
        type=float,
        default=1.0,
        help="weight of MSGAN's mode-seeking term against AC-GAN's loss of diversity "
        "(default 1.0; the paper's plain AC-GAN: --mode-seeking 0 --class-weight 1 "
        "--fake-class-loss)",
    )
    parser.add_argument(
        "--fake-class-loss",
        action="store_true",
        help="also train the discriminator's class head on generated images, as the AC-GAN "
        "paper does (default: real images only, which lets the generator collude with it less)",
    )
    parser.add_argument(
        "--n-per-class",
        type=int,
        default=500,
        help="generated samples per class to evaluate and save (at least 100; default 500)",
    )
    parser.add_argument(
        "--classifier-epochs",
        type=int,
        default=None,
        help=f"epochs of the independent evaluation classifier (default: enough for "
        f"{CLASSIFIER_STEPS} steps of 128 images, at least 2; 2 on Fashion-MNIST)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default torch's choice); 1 is faster on a busy machine",
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.size is not None and args.size not in IMG_SIZES:
        raise ValueError(f"--size must be one of {sorted(IMG_SIZES)}, got {args.size}")
    for name, low in (("epochs", 1), ("bs", 2), ("latent_dim", 1), ("width", 1), ("threads", 1)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
            )
    if args.n_per_class < 100:
        raise ValueError(f"--n-per-class must be >= 100, got {args.n_per_class}")
    if args.classifier_epochs is not None and args.classifier_epochs < 1:
        raise ValueError(f"--classifier-epochs must be >= 1, got {args.classifier_epochs}")
    for name in ("class_weight", "mode_seeking", "lr"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def classifier_epochs(n_train: int, requested: int | None = None) -> int:
    """`requested`, or enough epochs for `CLASSIFIER_STEPS` steps of 128 images (at least 2)."""
    if requested is not None:
        return requested
    steps_per_epoch = -(-n_train // 128)
    return max(2, -(-CLASSIFIER_STEPS // steps_per_epoch))


def _load(args: argparse.Namespace) -> ImageData:
    data = load_data(args.data, seed=args.seed, size=args.size)
    if args.size is None and data.size not in IMG_SIZES:
        # e.g. digits (8 px): the smallest size the networks make that is not smaller
        size = min((s for s in IMG_SIZES if s >= data.size), default=max(IMG_SIZES))
        print(f"resizing the {data.size}-pixel images to {size} (--size chooses)")
        data = load_data(args.data, seed=args.seed, size=size)
    if data.train_x.shape[2] != data.train_x.shape[3] or data.size not in IMG_SIZES:
        raise DataError(
            f"the images are {data.train_x.shape[2]}x{data.train_x.shape[3]}; the AC-GAN makes "
            f"square images of {sorted(IMG_SIZES)} pixels: pass --size"
        )
    n_seen = len(torch.unique(torch.cat([data.train_y, data.valid_y])))
    if data.c < 2 or n_seen < 2:
        raise DataError(
            f"{data.name} has {min(data.c, n_seen)} class(es); an AC-GAN conditions on the class "
            "and needs at least 2"
        )
    return data


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_variant(
    args: argparse.Namespace,
    data: ImageData,
    evaluator: GANEvaluator,
    tac: bool,
    out: Path,
) -> dict[str, Any]:
    """Train one GAN, write its files to `out`, and return its figures."""
    _seed_everything(args.seed)
    config = {
        "latent_dim": args.latent_dim,
        "n_classes": data.c,
        "img_size": data.size,
        "channels": data.channels,
        "width": args.width,
    }
    generator = Generator(**config)
    discriminator = Discriminator(data.c, data.size, data.channels, width=args.width, twin=tac)
    loss = ACGANLoss(
        class_weight=args.class_weight,
        fake_class_loss=args.fake_class_loss,
        tac=tac,
        mode_seeking=args.mode_seeking,
    )
    dls = dataloaders(data, bs=args.bs, seed=args.seed, device="cpu")
    learn = acgan_learner(
        dls,
        generator,
        discriminator,
        loss_func=loss,
        lr=args.lr,
        grid_dir=out / "grids",
        path=out,
        model_dir=".",
    )
    start = time.time()
    learn.fit(args.epochs)
    train_s = time.time() - start
    learn.save("learner")
    torch.save(
        {"config": config, "classes": data.classes, "state_dict": generator.state_dict()},
        out / "generator.pth",
    )
    save_image(learn.sample_grid(10, seed=args.seed), out / "grid.png")

    labels = torch.arange(data.c).repeat_interleave(args.n_per_class)
    images = learn.generate(labels, seed=args.seed + 1).cpu()
    np.savez_compressed(
        out / "samples.npz",
        images=images.numpy().astype(np.float32),
        labels=labels.numpy().astype(np.int64),
        classes=np.array(data.classes),
    )
    start = time.time()
    figures = evaluator.evaluate(images, labels)
    history = [
        dict(zip(learn.recorder.metric_names[1:-1], map(_num, values), strict=False))
        for values in learn.recorder.values
    ]
    return {
        "variant": "TAC-GAN" if tac else "AC-GAN",
        "out": str(out),
        "loss": {
            "class_weight": loss.class_weight,
            "class_on_fake": loss.class_on_fake,
            "tac": loss.tac,
            "mode_seeking": loss.mode_seeking,
        },
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.time() - start, 1),
        "history": history,
        **figures,
    }


def _num(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _markdown(report: dict[str, Any]) -> str:
    ref = report["reference"]
    runs = report["runs"]
    names = [run["variant"] for run in runs]
    classes = report["data"]["classes"]
    lines = [
        "# AC-GAN report",
        "",
        f"Data: {report['data']['name']}, {report['data']['n_train']} train / "
        f"{report['data']['n_valid']} held-out images of {report['data']['shape']}, "
        f"{len(classes)} classes. Seed {report['config']['seed']}, "
        f"{report['config']['epochs']} epochs, width {report['config']['width']}, class-loss "
        f"weight {report['config']['class_weight']}, mode-seeking weight "
        f"{report['config']['mode_seeking']}, discriminator's class loss on "
        f"{'real and generated' if report['config']['fake_class_loss'] else 'real'} images.",
        "",
        f"Independent classifier (trained on the real train split, "
        f"{report['classifier_seconds']:.0f} s): real test accuracy "
        f"{_fmt(ref['classifier_test_accuracy']['overall'], True)}.",
        f"Frechet distance floor (real train vs real test, {ref['floor_samples']} images, "
        f"classifier features): {ref['fid_floor']:.3f}.",
        "",
        "| metric | target | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
        "| generated classified as their class | >= 85% | "
        + " | ".join(_fmt(r["accuracy"]["overall"], True) for r in runs)
        + " |",
        "| Frechet distance to real test (floor "
        f"{ref['fid_floor']:.3f}) | near the floor | "
        + " | ".join(_fmt(r["fid"]) for r in runs)
        + " |",
        "| min per-class diversity, generated / real | >= 70% | "
        + " | ".join(_fmt(r["min_diversity_ratio"], True) for r in runs)
        + " |",
        "| train time (s) | | " + " | ".join(f"{r['train_seconds']:.0f}" for r in runs) + " |",
        "",
        "## Samples",
        "",
        f"One row per class ({', '.join(classes)}), one column per fixed noise vector; the "
        "grid of every epoch is in `grids/`" + (" and `tac/grids/`." if len(runs) > 1 else "."),
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---|" * len(names),
        "| "
        + " | ".join(
            f"![{r['variant']} samples]({'tac/' if r['loss']['tac'] else ''}grid.png)" for r in runs
        )
        + " |",
        "",
        "## Per class",
        "",
        "Accuracy: share of generated samples classified as their conditioning class (the real "
        "test images' accuracy beside it). Diversity: mean pairwise distance of classifier "
        "features within the class, generated / real.",
        "",
        "| class | real acc | " + " | ".join(f"{n} acc | {n} diversity" for n in names) + " |",
        "|---|---|" + "---|---|" * len(names),
    ]
    for k, name in enumerate(classes):
        cells = [name, _fmt(ref["classifier_test_accuracy"]["per_class"][k], True)]
        for run in runs:
            cells.append(_fmt(run["accuracy"]["per_class"][k], True))
            cells.append(_fmt(run["diversity_ratio"][k], True))
        lines.append("| " + " | ".join(cells) + " |")
    for run in runs:
        columns = list(run["history"][0]) if run["history"] else []
        lines += [
            "",
            f"## {run['variant']} training (validation columns per epoch)",
            "",
            "| epoch | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for epoch, row in enumerate(run["history"], 1):
            lines.append(f"| {epoch} | " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    lines += [
        "",
        f"Samples: `samples.npz` ({report['config']['n_per_class']} per class; `images` float32 "
        "N x C x H x W in [0, 1], `labels` int64)"
        + (", TAC-GAN's in `tac/samples.npz`." if len(runs) > 1 else "."),
        f"Total time: {report['total_seconds']:.0f} s on {torch.get_num_threads()} CPU "
        "thread(s); timings depend on what else runs on the machine.",
        "",
    ]
    return "\n".join(lines)


def run_acgan(args: argparse.Namespace) -> dict[str, Any]:
    """Run `auxhead acgan`: train, evaluate, write the files; returns the report as a dict.

    Raises:
        ValueError: bad options (`DataError` for data that cannot be used).
    """
    _check_args(args)
    args = argparse.Namespace(**vars(args))  # a copy: defaults resolved below are recorded
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _seed_everything(args.seed)
    data = _load(args)
    print(f"data: {data}")

    args.classifier_epochs = classifier_epochs(len(data.train_y), args.classifier_epochs)
    print(f"training the independent classifier ({args.classifier_epochs} epochs)...")
    t = time.time()
    evaluator = GANEvaluator.fit(
        data.train_x,
        data.train_y,
        data.valid_x,
        data.valid_y,
        data.c,
        epochs=args.classifier_epochs,
        floor_samples=args.n_per_class * data.c,
        seed=args.seed,
    )
    reference = evaluator.reference()
    classifier_s = time.time() - t
    print(
        f"classifier: real test accuracy {reference['classifier_test_accuracy']['overall']:.3f}"
        f", Frechet floor {reference['fid_floor']:.3f} ({classifier_s:.0f} s)"
    )

    runs = []
    for tac in [False, True] if args.tac else [False]:
        name = "TAC-GAN" if tac else "AC-GAN"
        print(f"training the {name} ({args.epochs} epochs)...")
        run = _train_variant(args, data, evaluator, tac, out / "tac" if tac else out)
        print(
            f"{name}: {run['accuracy']['overall']:.3f} classified as their class, Frechet "
            f"{run['fid']:.3f} (floor {run['fid_floor']:.3f}), min diversity ratio "
            f"{run['min_diversity_ratio']:.2f}"
        )
        runs.append(run)

    report = {
        "config": {
            key: getattr(args, key)
            for key in (
                "data",
                "size",
                "epochs",
                "seed",
                "tac",
                "bs",
                "lr",
                "latent_dim",
                "width",
                "class_weight",
                "mode_seeking",
                "fake_class_loss",
                "n_per_class",
                "classifier_epochs",
                "threads",
            )
        },
        "data": {
            "name": data.name,
            "classes": data.classes,
            "n_train": len(data.train_y),
            "n_valid": len(data.valid_y),
            "shape": "x".join(map(str, data.train_x.shape[1:])),
        },
        "targets": TARGETS,
        "classifier_seconds": round(classifier_s, 1),
        "reference": reference,
        "runs": runs,
        "passed": {
            run["variant"]: {
                "accuracy": run["accuracy"]["overall"] >= TARGETS["accuracy"],
                "diversity": (run["min_diversity_ratio"] or 0) >= TARGETS["diversity_ratio"],
            }
            for run in runs
        },
    }
    report["total_seconds"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    print(f"wrote {out / 'report.md'} ({report['total_seconds']:.0f} s)")
    return report
