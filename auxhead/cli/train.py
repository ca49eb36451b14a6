"""The `auxhead train` job: train a classifier with auxiliary heads through fastai, measure
every exit, and (optionally) the same model without heads and calibrated early exits.

The job returns a `TrainResult`; `auxhead.report` writes it out and the CLI prints it. Nothing
here prints, except fastai's own progress bars and table while training.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.torch_core import set_seed
from torch import nn

from auxhead._calibrate import check_targets
from auxhead._flops import exit_flops, exit_params
from auxhead._probe import resolve
from auxhead.attach import AuxModel
from auxhead.data import ImageData, dataloaders, load_data
from auxhead.exits import EarlyExit, ExitSummary
from auxhead.fastai import AuxHeads, export_learner
from auxhead.models import build_model, default_taps

__all__ = ["TrainConfig", "TrainResult", "run_train"]


@dataclass
class TrainConfig:
    """Settings of one `auxhead train` run; the CLI's flags, one for one."""

    data: str | None = None  # None: Fashion-MNIST; "digits"; or a folder
    arch: str = "small_cnn"
    at: list[str] | None = None  # None: `default_taps` of the model
    head: str = "inception"
    weights: float = 0.3
    schedule: str = "constant"
    epochs: int = 3
    lr: float = 4e-3
    bs: int = 256
    seed: int = 0
    out: Path = Path("runs/train")
    compare: bool = False
    early_exit: bool = False
    max_drop: float = 0.005  # early exit: allowed accuracy drop from the main head
    confidence: float | None = None  # early exit: hold the drop with this confidence
    holdout: int = 5000  # early exit: training images held out for calibration
    distill: float = 0.0
    limit: int | None = None  # use only this many training (and a quarter as many test) images


@dataclass
class ExitReport:
    """One exit of the trained model, measured on the test split."""

    name: str
    accuracy: float
    flops: int  # per sample: the backbone up to the tap plus this head
    params: int  # parameters that run up to this exit


@dataclass
class TrainResult:
    config: TrainConfig
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
    files: dict[str, str] = field(default_factory=dict)

    @property
    def main(self) -> ExitReport:
        return self.exits[-1]

    def as_json(self) -> dict[str, Any]:
        """The `report.json` document."""
        heads = {e.name: {"accuracy": e.accuracy, "flops": e.flops, "params": e.params}
                 for e in self.exits[:-1]}  # fmt: skip
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
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
            "history": self.history,
            "baseline_history": self.baseline_history,
            "early_exit": self.early_exit,
            "config": config,
            "files": self.files,
        }


class EpochCheckpoint(Callback):
    """Save the model with its heads after every epoch, atomically, so a run stopped with
    Ctrl-C (or killed) leaves the last completed epoch's checkpoint whole."""

    order = 60  # after the Recorder has logged the epoch

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta

    def after_epoch(self) -> None:
        save_checkpoint(self.learn.model, self.path, {**self.meta, "epoch": self.learn.epoch + 1})


def save_checkpoint(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    """`torch.save` to a temporary file, then rename: never a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": model.state_dict(), **meta}, tmp)
    os.replace(tmp, path)


def _learner(dls, model: nn.Module, cbs: list, out: Path) -> Learner:
    return Learner(
        dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs, path=out
    )


def _history(learn: Learner) -> list[dict[str, float | None]]:
    names = [n for n in learn.recorder.metric_names[1:] if n != "time"]
    return [
        {n: (None if v is None else float(v)) for n, v in zip(names, row, strict=False)}
        for row in learn.recorder.values
    ]


@torch.no_grad()
def exit_accuracies(aux_model: AuxModel, x: torch.Tensor, y: torch.Tensor, bs: int = 1000):
    """Accuracy of every head and of the main output on (x, y), heads enabled, eval mode."""
    was_training = aux_model.training
    aux_model.eval()
    correct = dict.fromkeys([*aux_model.taps, "main"], 0)
    device = next(aux_model.parameters()).device
    try:
        with aux_model.heads_enabled():
            for xb, yb in zip(x.split(bs), y.split(bs), strict=True):
                xb, yb = xb.to(device), yb.to(device)
                out = aux_model(xb)
                correct["main"] += int((out.argmax(1) == yb).sum())
                for name, logits in aux_model.aux_outputs.items():
                    correct[name] += int((logits.argmax(1) == yb).sum())
    finally:
        aux_model.clear_aux()
        aux_model.train(was_training)
    return {name: n / len(y) for name, n in correct.items()}


def _split_holdout(data: ImageData, n: int, seed: int) -> tuple[ImageData, ImageData]:
    """Move `n` training images (a seeded random choice) into a calibration set."""
    n = min(n, len(data.train_y) // 5)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:n], order[n:]
    train = ImageData(data.name, data.classes, data.train_x[kept], data.train_y[kept],
                      data.valid_x, data.valid_y)  # fmt: skip
    holdout = ImageData(data.name, data.classes, data.train_x[kept[:1]], data.train_y[kept[:1]],
                        data.train_x[held], data.train_y[held])  # fmt: skip
    return train, holdout


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int):
    return list(zip(x.split(bs), y.split(bs), strict=True))


def run_train(config: TrainConfig) -> TrainResult:
    """Train, measure and export; see `auxhead train --help` for what each setting does.

    Raises:
        auxhead.data.DataError: the data cannot be loaded.
        ValueError: an unknown architecture, layer name, head kind or schedule, or an early
            exit setting out of range.
    """
    # the early exit's settings before training, not after it
    check_targets(config.max_drop, config.confidence, names=("--max-drop", "--confidence"))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(config.seed, reproducible=True)
    data = load_data(config.data, seed=config.seed)
    if config.limit:
        data = data.subset(config.limit, max(config.limit // 4, data.c * 2), seed=config.seed)
    holdout = None
    if config.early_exit:
        data, holdout = _split_holdout(data, config.holdout, config.seed)
    dls = dataloaders(data, bs=config.bs, seed=config.seed, device="cpu")

    model = build_model(config.arch, data.c, data.channels, data.size)
    taps = list(config.at) if config.at else default_taps(model)
    resolve(model, taps)  # unknown layer names fail here, before any training
    heads = AuxHeads(
        taps,
        head=config.head,
        weights=config.weights,
        schedule=config.schedule,
        distill=config.distill,
    )
    meta = {"arch": config.arch, "taps": taps, "head": config.head, "classes": data.classes,
            "channels": data.channels, "size": data.size}  # fmt: skip
    checkpoint = out / "checkpoint.pth"
    learn = _learner(dls, model, [heads, EpochCheckpoint(checkpoint, meta)], out)
    start = time.perf_counter()
    learn.fit_one_cycle(config.epochs, config.lr)
    train_seconds = time.perf_counter() - start
    history = _history(learn)

    aux_model = heads.aux_model
    sample = data.valid_x[:2]
    flops = exit_flops(aux_model, sample)
    params = exit_params(aux_model, sample)
    accuracies = exit_accuracies(aux_model, data.valid_x, data.valid_y)
    exits = [ExitReport(name, accuracies[name], flops[name], params[name])
             for name in [*taps, "main"]]  # fmt: skip

    files = {"checkpoint": str(checkpoint)}
    files["model"] = str(export_learner(learn, (out / "model.pkl").resolve()))
    result = TrainResult(
        config=config,
        data=data.name,
        classes=data.classes,
        n_train=len(data.train_y),
        n_test=len(data.valid_y),
        arch=config.arch,
        taps=taps,
        exits=exits,
        history=history,
        train_seconds=train_seconds,
        files=files,
    )
    if holdout is not None:
        result.early_exit = _early_exit(aux_model, holdout, data, config)
    if config.compare:
        _baseline(result, dls, data, config, out)
    return result


def _early_exit(aux_model: AuxModel, holdout: ImageData, data: ImageData, config: TrainConfig):
    exit_model = EarlyExit(aux_model)
    calibration: ExitSummary = exit_model.calibrate(
        _batches(holdout.valid_x, holdout.valid_y, 500),
        max_accuracy_drop=config.max_drop,
        confidence=config.confidence,
    )
    test: ExitSummary = exit_model.evaluate(_batches(data.valid_x, data.valid_y, 500))
    return {
        "mode": exit_model.mode,
        "n_calibration": len(holdout.valid_y),
        "calibration": calibration.as_dict(),
        "test": test.as_dict(),
        "test_table": str(test),
    }


def _baseline(result: TrainResult, dls, data: ImageData, config: TrainConfig, out: Path) -> None:
    """The same architecture, seed and budget without heads."""
    set_seed(config.seed, reproducible=True)
    model = build_model(config.arch, data.c, data.channels, data.size)
    learn = _learner(dls, model, [], out)
    start = time.perf_counter()
    learn.fit_one_cycle(config.epochs, config.lr)
    result.baseline_seconds = time.perf_counter() - start
    result.baseline_history = _history(learn)  # before get_preds, which resets the Recorder
    preds, targets = learn.get_preds()
    result.baseline_accuracy = float((preds.argmax(1) == targets).float().mean())
