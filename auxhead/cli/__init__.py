"""The `auxhead` command line: `auxhead train` and `auxhead acgan`.

Errors in what the user gave (a missing path, an unknown architecture or layer, ...) print one
line and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from auxhead.heads import HEAD_KINDS
from auxhead.schedules import SCHEDULES

__all__ = ["build_parser", "main"]

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _add_train(subparsers) -> None:
    from auxhead.train import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train with auxiliary heads and report what each head achieves",
        description="Train a classifier with auxiliary heads through fastai, then report each "
        "exit's test accuracy, FLOPs and parameters, with plots, an exported model and a "
        "checkpoint. Defaults: Fashion-MNIST, the built-in small CNN, two inception heads; "
        "about 3-4 minutes on 2 CPU cores.",
    )
    p.add_argument("--data", default=None, metavar="DATA",
                   help="'fashion-mnist' (default: Debian's dataset-fashion-mnist), 'digits' "
                   "(scikit-learn's 8x8 digits), a folder with the four idx files (MNIST "
                   "works), or a folder of images with one subfolder per class")  # fmt: skip
    p.add_argument("--arch", default=d.arch,
                   help="'small_cnn' (default), a torchvision model name (resnet18, ...) or "
                   "a timm model name")  # fmt: skip
    p.add_argument("--at", nargs="+", default=None, metavar="LAYER",
                   help="layers to attach heads to (default: two spread over the depth); "
                   "`python -c \"import auxhead; ...list_layers\"` lists them")  # fmt: skip
    p.add_argument("--head", default=d.head, choices=sorted(HEAD_KINDS),
                   help=f"head kind (default {d.head})")  # fmt: skip
    p.add_argument("--weights", type=float, default=d.weights,
                   help=f"weight of every head's loss (default {d.weights})")  # fmt: skip
    p.add_argument("--schedule", default=d.schedule, choices=sorted(SCHEDULES),
                   help=f"how the weights change over training (default {d.schedule})")  # fmt: skip
    p.add_argument("--epochs", type=_positive_int, default=d.epochs,
                   help=f"default {d.epochs}")  # fmt: skip
    p.add_argument("--lr", type=_positive_float, default=d.lr,
                   help=f"peak one-cycle learning rate (default {d.lr})")  # fmt: skip
    p.add_argument("--bs", type=_positive_int, default=d.bs, help=f"batch size (default {d.bs})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--out", type=Path, default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--compare", action="store_true",
                   help="also train the same model without heads (same seed and budget) and "
                   "report both")  # fmt: skip
    p.add_argument("--early-exit", action="store_true",
                   help="calibrate early exits on held-out training images and report the "
                   "accuracy-compute trade-off")  # fmt: skip
    p.add_argument("--max-drop", type=float, default=d.max_drop,
                   help=f"early exit: accuracy it may lose (default {d.max_drop})")  # fmt: skip
    p.add_argument("--confidence", type=float, default=None,
                   help="early exit: hold --max-drop with this one-sided confidence, e.g. 0.9 "
                   "(default: on the held-out images themselves)")  # fmt: skip
    p.add_argument("--distill", type=float, default=d.distill,
                   help="weight of self-distillation from the main output (0-1)")  # fmt: skip
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="use only this many training images (quick runs)")  # fmt: skip
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default torch's choice); on a machine busy "
                   "with other jobs 1 is often faster")  # fmt: skip
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from auxhead.report import terminal_summary, write_report
    from auxhead.train import TrainConfig, run_train

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    config = TrainConfig(
        data=args.data, arch=args.arch, at=args.at, head=args.head, weights=args.weights,
        schedule=args.schedule, epochs=args.epochs, lr=args.lr, bs=args.bs, seed=args.seed,
        out=args.out, compare=args.compare, early_exit=args.early_exit,
        max_drop=args.max_drop, confidence=args.confidence, distill=args.distill,
        limit=args.limit,
    )  # fmt: skip
    print(f"auxhead train: {config.arch} on {config.data or 'fashion-mnist'}, "
          f"{config.epochs} epochs, heads: {config.head}", flush=True)  # fmt: skip
    result = run_train(config)
    write_report(result, config.out)
    print()
    print(terminal_summary(result))
    print(f"\nreport: {config.out / 'report.md'}  (json, plots, exported model and checkpoint "
          f"beside it)")  # fmt: skip
    return 0


def _add_acgan(subparsers) -> None:
    from auxhead.gan.cli import add_acgan_arguments

    p = subparsers.add_parser(
        "acgan",
        help="train a class-conditional AC-GAN and evaluate its samples",
        description="Train an Auxiliary Classifier GAN through fastai, sample every class and "
        "evaluate the samples with an independently trained classifier (accuracy, Frechet "
        "distance, diversity).",
    )
    add_acgan_arguments(p)
    p.set_defaults(func=_run_acgan)


def _run_acgan(args: argparse.Namespace) -> int:
    from auxhead.gan.cli import run_acgan

    run_acgan(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auxhead", description="Auxiliary classifiers for PyTorch and fastai."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(subparsers)
    _add_acgan(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    if not debug:  # before fastai and torch are imported: their import-time warnings too
        warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        where = f"; the last completed epoch is in {out}/checkpoint.pth" if out else ""
        print(f"\nauxhead: interrupted{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, KeyError) as error:
        if args.debug:
            raise
        # One line, even for messages fastai wraps ("Exception occured in ...:\n\t<ours>").
        message = " ".join(part.strip() for part in str(error).splitlines()) or repr(error)
        print(f"auxhead: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
