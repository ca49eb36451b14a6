"""Time and accuracy of `small_cnn` on Fashion-MNIST with plain fastai, with and without heads.

The CLI's default run (Fashion-MNIST, two inception heads, fit_one_cycle) must finish in under
5 minutes on a 2-core CPU and reach 90% test accuracy. This script measures candidate settings:

    python benchmarks/fmnist_budget.py                       # the default settings
    python benchmarks/fmnist_budget.py --epochs 3 4 --lr 3e-3 1e-2 --repeat 2
    python benchmarks/fmnist_budget.py --widths 16 32 64 128 --depth 1 --heads off
    python benchmarks/fmnist_budget.py --probe               # speed only, in seconds

One row per run:
    s/epoch      wall-clock seconds per epoch: training plus the validation that
                 fit_one_cycle runs after each epoch;
    cpu s/ep     the process's CPU seconds per epoch (all threads);
    fit s        the whole fit_one_cycle, wall clock;
    eval s       one more pass over the test set (learn.validate);
    test acc     accuracy on the 10,000 test images.
Other processes slow the wall clock, badly when torch's threads outnumber the free cores
(check the load average printed at the start and end; try --threads 1 on a busy machine).
--probe times a tenth of an epoch only, to catch an idle moment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Sequence

import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner)
from fastai.callback.training import ShortEpochCallback
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed

import auxhead
from auxhead.data import ImageData, dataloaders, load_data
from auxhead.models import SMALL_CNN_DEPTH, SMALL_CNN_WIDTHS, default_taps, small_cnn


class BatchTimer(Callback):
    """Wall-clock time of every training batch: forward, loss, backward, step."""

    def before_fit(self) -> None:
        self.batch_s: list[float] = []

    def before_batch(self) -> None:
        self.start = time.perf_counter()

    def after_batch(self) -> None:
        if self.training:
            self.batch_s.append(time.perf_counter() - self.start)


def run(
    data: ImageData, *, epochs: int, lr: float, bs: int, widths, depth: int, heads: bool, seed: int
) -> dict[str, float]:
    set_seed(seed)
    dls = dataloaders(data, bs=bs, seed=seed, device="cpu")
    model = small_cnn(data.c, channels=data.channels, size=data.size, widths=widths, depth=depth)
    loss_func = CrossEntropyLossFlat()
    if heads:
        model = auxhead.attach(model, default_taps(model), sample=data.train_x[:2])
        loss_func = auxhead.AuxLoss(loss_func, model, weights=0.3)
    learn = Learner(dls, model, loss_func=loss_func, metrics=accuracy)
    start, cpu_start = time.perf_counter(), time.process_time()
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(epochs, lr)
    fit_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    start = time.perf_counter()
    with learn.no_bar():
        _, acc = learn.validate()
    return {
        "fit_s": fit_s,
        "cpu_s": cpu_s,
        "eval_s": time.perf_counter() - start,
        "acc": float(acc),
    }


def probe(data: ImageData, *, bs: int, widths, depth: int, heads: bool) -> float:
    """Seconds per epoch from the median of the first 10% of an epoch's batches, no accuracy:
    a quick check to run when the machine is idle."""
    dls = dataloaders(data, bs=bs, device="cpu")
    model = small_cnn(data.c, channels=data.channels, size=data.size, widths=widths, depth=depth)
    loss_func = CrossEntropyLossFlat()
    if heads:
        model = auxhead.attach(model, default_taps(model), sample=data.train_x[:2])
        loss_func = auxhead.AuxLoss(loss_func, model, weights=0.3)
    timer = BatchTimer()
    learn = Learner(dls, model, loss_func=loss_func, cbs=[timer, ShortEpochCallback(0.1)])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    return statistics.median(timer.batch_s[2:]) * len(dls.train)  # skip warm-up batches


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[3])
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-3])
    parser.add_argument("--bs", type=int, nargs="+", default=[256])
    parser.add_argument("--widths", type=int, nargs=4, default=list(SMALL_CNN_WIDTHS))
    parser.add_argument("--depth", type=int, default=SMALL_CNN_DEPTH)
    parser.add_argument("--heads", choices=["both", "on", "off"], default="both")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting (seeds 0, 1...)")
    parser.add_argument("--data", default=None, help="for load_data (default: Fashion-MNIST)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--probe", action="store_true", help="only time 10%% of an epoch (no accuracy)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")  # fastai/torch deprecation chatter
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = load_data(args.data)
    print(f"{data}: loaded in {time.perf_counter() - start:.1f} s")
    print(
        f"small_cnn widths {args.widths}, depth {args.depth}; {torch.get_num_threads()} "
        f"threads; load average {' '.join(f'{x:.1f}' for x in _load_average())}"
    )
    heads = {"both": [False, True], "on": [True], "off": [False]}[args.heads]
    if args.probe:
        for bs in args.bs:
            for with_heads in heads:
                train_s = probe(data, bs=bs, widths=args.widths, depth=args.depth, heads=with_heads)
                label = "2 inception heads" if with_heads else "no heads"
                print(f"bs {bs}, {label}: {train_s:.1f} s per training epoch", flush=True)
        print(f"load average at the end: {' '.join(f'{x:.1f}' for x in _load_average())}")
        return
    header = ("heads", "epochs", "lr", "bs", "s/epoch", "cpu s/ep", "fit s", "eval s", "test acc")
    print("  ".join(f"{h:>9}" for h in header))
    for epochs in args.epochs:
        for lr in args.lr:
            for bs in args.bs:
                for with_heads in heads:
                    accs = []
                    for seed in range(args.repeat):
                        r = run(
                            data,
                            epochs=epochs,
                            lr=lr,
                            bs=bs,
                            widths=args.widths,
                            depth=args.depth,
                            heads=with_heads,
                            seed=seed,
                        )
                        accs.append(r["acc"])
                        row = (
                            "2 incep" if with_heads else "none",
                            epochs,
                            f"{lr:g}",
                            bs,
                            f"{r['fit_s'] / epochs:.1f}",
                            f"{r['cpu_s'] / epochs:.1f}",
                            f"{r['fit_s']:.0f}",
                            f"{r['eval_s']:.1f}",
                            f"{r['acc']:.2%}",
                        )
                        print("  ".join(f"{c!s:>9}" for c in row), flush=True)
                    if args.repeat > 1:
                        print(f"{'':>9}  mean test acc {statistics.mean(accs):.2%}")
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in _load_average())}")


def _load_average() -> tuple[float, ...]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):  # not on every platform
        return ()


if __name__ == "__main__":
    main()
