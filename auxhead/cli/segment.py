"""`auxhead train --task segment`: train a segmentation model with dense auxiliary heads
(an FCN head on the encoder, deep supervision on the decoder), score it on the test split
with and without heads, and export it.

`TrainConfig` (shared with the classification task) -> `run_segment` -> `SegmentResult` ->
`auxhead.cli.report.write_segment_report`. Bad options and data raise `UsageError` (or the
data's `DataError`) naming the option or the file, before any training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastai.callback.schedule import fit_one_cycle  # noqa: F401  (patches Learner.fit_one_cycle)
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from torch import nn

from auxhead._format import count, recorder_history
from auxhead._segmetrics import SegmentationMeter, at_label_size
from auxhead._segmodels import (
    DEEP_SUPERVISED,
    DEFAULT_ENCODER,
    build_segmenter,
    deep_refusal,
    segment_arch,
    segment_taps,
)
from auxhead.attach import AttachError, AuxModel
from auxhead.cli._common import (
    MIXED_SIZE,
    UsageError,
    atomic_path,
    collect_warnings,
    one_line,
)
from auxhead.cli._state import seeded, torch_threads
from auxhead.cli.train import (
    Budget,
    CheckHeadsTrain,
    EpochLog,
    StopOnNonFinite,
    TrainConfig,
    _taps,
    check_runs,
    plan_epochs,
)
from auxhead.fastai import AuxHeads, export_learner, segmentation_metrics

__all__ = ["SegmentResult", "check_segment_config", "plan_segment_budget", "run_segment"]

# CPU-sized defaults: a U-Net on a ResNet-18 body, batches of 8 images, at least 3 epochs and
# 100 optimizer steps (CamVid's 367 training frames at 240x180: 3 epochs of 45 steps).
DEFAULT_BS = 8
DEFAULT_LR = 2e-3  # peak one-cycle lr (Adam)
DEFAULT_EPOCHS = 3
MIN_STEPS = 100
FIGURE_IMAGES = 4  # test images drawn in predictions.png

# Options of the classification task that mean nothing here: refused, naming the way out.
CLASSIFY_ONLY = {
    "early_exit": "--early-exit",
    "pretrained": "--pretrained",
    "init": "--init",
    "distill": "--distill",
}

OWNED_FILES = [
    "report.md",
    "report.json",
    "predictions.png",
    "model.pkl",
    "model.pth",
    "checkpoint.pth",
]


@dataclass
class SegmentScores:
    """One model's (or head's) scores on the test split, as `SegmentationScores.as_dict`."""

    name: str
    miou: float
    pixel_accuracy: float
    mean_dice: float
    iou: list[float | None]
    dice: list[float | None]


@dataclass
class SegmentResult:
    config: TrainConfig
    budget: Budget
    data: str
    codes: list[str]
    void: int | None
    n_train: int
    n_test: int
    test_split: str  # "test", or "valid" when the data has no test split
    arch: str
    encoder: str | None
    heads: dict[str, dict[str, Any]]  # tap -> {"kind", "weight", "resize"}
    main: SegmentScores  # the model trained with heads, scored without them
    head_scores: list[SegmentScores]  # each head, its logits upsampled to the labels
    history: list[dict[str, float | None]]
    train_seconds: float
    baseline: SegmentScores | None = None
    baseline_seconds: float | None = None
    baseline_history: list[dict[str, float | None]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    data_notes: list[str] = field(default_factory=list)
    figure: dict[str, Any] = field(default_factory=dict)  # what predictions.png draws

    def as_json(self) -> dict[str, Any]:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()}
        return {
            "task": "segment",
            "data": self.data,
            "arch": self.arch,
            "encoder": self.encoder,
            "codes": self.codes,
            "void": self.void,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "test_split": self.test_split,
            "heads": self.heads,
            "main": asdict(self.main),
            "head_scores": [asdict(s) for s in self.head_scores],
            "baseline": None if self.baseline is None else asdict(self.baseline),
            "train_seconds": self.train_seconds,
            "baseline_seconds": self.baseline_seconds,
            "budget": {**asdict(self.budget), "steps": self.budget.steps},
            "history": self.history,
            "baseline_history": self.baseline_history,
            "warnings": self.warnings,
            "data_notes": self.data_notes,
            "config": config,
            "files": self.files,
        }


def check_segment_config(config: TrainConfig) -> None:
    """Refuse the options that do not apply to segmentation, before the data loads."""
    for attr, option in CLASSIFY_ONLY.items():
        if getattr(config, attr):
            raise UsageError(f"{option} is for --task classify; drop it with --task segment")
    if config.head != TrainConfig.head:
        raise UsageError(
            "--head is for --task classify; segmentation heads are chosen with --heads "
            "(fcn, deep or both)"
        )
    try:
        spec = segment_arch(config.arch)
    except ValueError as error:
        raise UsageError(f"--arch: {error}") from None
    if config.heads in ("deep", "both") and not config.at and spec.name not in DEEP_SUPERVISED:
        raise UsageError(f"--heads {config.heads}: {deep_refusal(spec.name)}")
    if config.encoder is not None and not spec.takes_encoder:
        raise UsageError(
            f"--encoder: {config.arch} names its encoder itself; drop --encoder (or use unet, "
            "smp-unet, smp-fpn, smp-deeplabv3plus or smp-pspnet)"
        )
    if spec.family == "smp" and not config.at:
        _check_smp_taps(config)


def layers_hint(config: TrainConfig) -> str:
    """The `auxhead layers` command that lists this run's model's layers."""
    encoder = f" --encoder {config.encoder}" if config.encoder else ""
    return f"`auxhead layers --task segment --arch {config.arch}{encoder}` lists them"


def _check_smp_taps(config: TrainConfig) -> None:
    """Build the smp model (2 classes, its random init kept off the run's seed) and find its
    preset taps, so that an unknown encoder, or one without an FCN tap, is refused before the
    data loads."""
    with torch.random.fork_rng(devices=[]):
        try:
            model = build_segmenter(
                config.arch, 2, encoder=config.encoder or DEFAULT_ENCODER, size=(64, 64)
            )
        except ValueError as error:
            raise UsageError(f"--arch/--encoder: {error}") from None
        try:
            segment_taps(config.arch, model, config.heads)
        except ValueError as error:
            raise UsageError(f"--heads {config.heads}: {error} ({layers_hint(config)})") from None


def plan_segment_budget(n_train: int, config: TrainConfig) -> Budget:
    """Batch size (DEFAULT_BS), lr (DEFAULT_LR) and epochs (DEFAULT_EPOCHS, or more to make
    MIN_STEPS steps) unless given; `--steps` rounds up to whole epochs."""
    reasons = []
    bs = min(config.bs or DEFAULT_BS, n_train)
    if bs != (config.bs or DEFAULT_BS):
        reasons.append(f"batch size {bs} for {n_train} training images")
    steps_per_epoch = max(1, n_train // bs)
    lr = config.lr or DEFAULT_LR
    epochs = plan_epochs(config, steps_per_epoch, reasons, DEFAULT_EPOCHS, MIN_STEPS)
    return Budget(bs, lr, epochs, steps_per_epoch, "; ".join(reasons) or "the defaults")


def run_segment(
    config: TrainConfig, say: Callable[[str], None] = lambda line: None
) -> SegmentResult:
    """Train, score and export into `config.out` (prepared by the caller's `OutputFolder`).

    Raises:
        UsageError: bad options, naming the option.
        DataError: a bad data folder or file, naming it.
    """
    with collect_warnings() as caught, torch_threads(config.threads), seeded(config.seed):
        result = _run(config, say)
    result.warnings = caught
    return result


def _load(config: TrainConfig, say: Callable[[str], None]):
    from auxhead.data import MixedSizes, load_segmentation

    try:
        data = load_segmentation(config.data, seed=config.seed, size=config.size, void=config.void)
    except MixedSizes as error:
        say(f"{error} -- resizing every image to {MIXED_SIZE}x{MIXED_SIZE} (--size N chooses)")
        data = load_segmentation(config.data, seed=config.seed, size=MIXED_SIZE, void=config.void)
    if config.limit:
        data = data.subset(config.limit, max(config.limit // 4, 1), seed=config.seed)
    return data


def _loss(void: int | None) -> CrossEntropyLossFlat:
    return CrossEntropyLossFlat(axis=1, ignore_index=-100 if void is None else void)


class MainOut(nn.Module):
    """The loss of a model whose output is torchvision's dict: `loss(pred["out"], target)`."""

    def __init__(self, loss: Callable) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, pred: Any, *targets: Any) -> torch.Tensor:
        return self.loss(pred["out"] if isinstance(pred, Mapping) else pred, *targets)


def _model(config: TrainConfig, data) -> nn.Module:
    try:
        model = build_segmenter(
            config.arch, data.c, encoder=config.encoder or DEFAULT_ENCODER, size=data.size
        )
    except ValueError as error:
        raise UsageError(f"--arch/--encoder: {error}") from None
    check_runs(model, data.train_x[:2], config.arch)
    return model


def _heads(
    config: TrainConfig, model: nn.Module, sample: torch.Tensor
) -> dict[str, dict[str, Any]]:
    """Each tap's head kind, weight and how its logits meet the labels."""
    if config.at:  # names checked as for classification, with close matches
        return {
            tap: {"kind": "fcn", "weight": config.aux_weight, "resize": "logits"}
            for tap in _taps(config, model, sample)
        }
    try:
        taps = segment_taps(config.arch, model, config.heads)
    except ValueError as error:
        raise UsageError(f"--heads {config.heads}: {error} ({layers_hint(config)})") from None
    heads = {}
    for tap in taps.get("fcn", []):
        heads[tap] = {"kind": "fcn", "weight": config.aux_weight, "resize": "logits"}
    # One resize for every head (AuxLoss takes one): with both presets, torchvision's.
    deep_resize = "logits" if "fcn" in taps else "targets"
    for tap, weight in nnunet_weights(model, sample, taps.get("deep", [])).items():
        heads[tap] = {"kind": "conv1x1", "weight": weight, "resize": deep_resize}
    return heads


def nnunet_weights(model: nn.Module, sample: torch.Tensor, taps: list[str]) -> dict[str, float]:
    """nnU-Net's deep-supervision weights of the decoder blocks at `taps`, relative to the main
    output's (the same optimum as nnU-Net's normalised sum, scaled); the coarsest block, whose
    weight is 0, gets no head at all: it would never train."""
    if not taps:
        return {}
    from auxhead import deep_supervision_weights

    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        model.get_submodule(tap).register_forward_hook(
            lambda _m, _i, out, tap=tap: shapes.__setitem__(tap, tuple(out.shape))
        )
        for tap in taps
    ]
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(sample)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    out = out["out"] if isinstance(out, Mapping) else out
    weights = deep_supervision_weights({"main": tuple(out.shape), **shapes})
    main = weights.pop("main")
    return {tap: weights[tap] / main for tap in taps if weights[tap] > 0}


def _learner(dls, model: nn.Module, void: int | None, cbs: list, out: Path) -> Learner:
    loss = _loss(void)
    return Learner(
        dls,
        model,
        loss_func=MainOut(loss) if _dict_output(model) else loss,
        metrics=segmentation_metrics(dls.c, ignore_index=void),
        cbs=cbs,
        path=out,
    )


def _dict_output(model: nn.Module) -> bool:
    return type(model).__module__.startswith("torchvision.models.segmentation")


def _run(config: TrainConfig, say: Callable[[str], None]) -> SegmentResult:
    check_segment_config(config)
    out = Path(config.out)
    data = _load(config, say)
    budget = plan_segment_budget(len(data.train_y), config)
    say(
        f"budget: {count(budget.epochs, 'epoch')} of {count(budget.steps_per_epoch, 'step')} "
        f"({count(budget.steps, 'step')}), batch size {budget.bs}, lr {budget.lr:g} ({budget.why})"
    )
    from auxhead.data import segmentation_dataloaders

    dls = segmentation_dataloaders(data, bs=budget.bs, seed=config.seed, device="cpu")
    model = _model(config, data)
    heads = _heads(config, model, data.train_x[:2])
    callback = _aux_heads(heads, data, config)
    meta = {"arch": config.arch, "encoder": config.encoder, "heads": heads,
            "codes": data.codes, "void": data.void, "size": data.size}  # fmt: skip
    checkpoint = out / "checkpoint.pth"
    log = EpochLog(checkpoint, meta)
    causes = f"--lr {budget.lr:g} too high, or --aux-weight {config.aux_weight:g} too large"
    try:
        cbs = [callback, log, StopOnNonFinite(causes), CheckHeadsTrain()]
        learn = _learner(dls, model, data.void, cbs, out)
    except AttachError as error:
        raise UsageError(
            f"--at/--heads: cannot attach heads at {', '.join(heads)} ({one_line(error)}); "
            f"choose other layers ({layers_hint(config)})"
        ) from None
    start = time.perf_counter()
    learn.fit_one_cycle(budget.epochs, budget.lr)
    train_seconds = time.perf_counter() - start

    test_x, test_y, split = _test_split(data)
    aux_model = callback.aux_model
    main, per_head, predicted = score(aux_model, test_x, test_y, data, bs=budget.bs)
    files = {"checkpoint": str(checkpoint)}
    files.update(_export(learn, aux_model, out, _dict_output(model)))
    result = SegmentResult(
        config=config,
        budget=budget,
        data=data.name,
        codes=list(data.codes),
        void=data.void,
        n_train=len(data.train_y),
        n_test=len(test_y),
        test_split=split,
        arch=config.arch,
        encoder=None
        if not segment_arch(config.arch).takes_encoder
        else config.encoder or DEFAULT_ENCODER,
        heads=heads,
        main=main,
        head_scores=per_head,
        history=log.history,
        train_seconds=train_seconds,
        files=files,
        data_notes=list(data.notes),
    )
    shown = slice(0, FIGURE_IMAGES)
    result.figure = {"images": test_x[shown], "labels": test_y[shown], "with heads": predicted}
    if config.compare:
        _baseline(result, dls, data, config, out, test_x, test_y)
    return result


def _aux_heads(heads: dict[str, dict[str, Any]], data, config: TrainConfig) -> AuxHeads:
    """The AuxHeads callback for `heads`: FCN heads upsample their logits to the labels,
    deep-supervision heads get the labels downsampled to them (nnU-Net)."""
    (resize,) = {h["resize"] for h in heads.values()}
    weights = {tap: h["weight"] for tap, h in heads.items()}
    return AuxHeads(
        {tap: h["kind"] for tap, h in heads.items()},
        num_classes=data.c,
        weights=weights,
        schedule=config.schedule,
        resize=resize,
        head_loss=_loss(data.void),
        ignore_index=data.void,
    )


def _test_split(data) -> tuple[torch.Tensor, torch.Tensor, str]:
    if data.test_x is not None and len(data.test_y):
        return data.test_x, data.test_y, "test"
    return data.valid_x, data.valid_y, "valid"


@torch.no_grad()
def score(
    aux_model: AuxModel | nn.Module, x: torch.Tensor, y: torch.Tensor, data, *, bs: int
) -> tuple[SegmentScores, list[SegmentScores], torch.Tensor]:
    """The main output's scores (and each head's, with heads) on (x, y), eval mode, and the
    main output's predicted classes on the first FIGURE_IMAGES images."""
    has_heads = isinstance(aux_model, AuxModel)
    taps = aux_model.taps if has_heads else []
    meters = {name: SegmentationMeter(data.c, ignore_index=data.void) for name in ["main", *taps]}
    predicted = []
    was_training = aux_model.training
    aux_model.eval()
    try:
        for xb, yb in zip(x.split(bs), y.split(bs), strict=True):
            if has_heads:
                with aux_model.heads_enabled():
                    out = aux_model(xb)
                    aux = dict(aux_model.aux_outputs)
                aux_model.clear_aux()
            else:
                out, aux = aux_model(xb), {}
            out = out["out"] if isinstance(out, Mapping) else out
            classes = at_label_size(out, yb).argmax(1)
            meters["main"].update(classes, yb)
            if sum(map(len, predicted)) < FIGURE_IMAGES:  # the figure's, not every image's
                predicted.append(classes[:FIGURE_IMAGES])
            for tap, logits in aux.items():
                meters[tap].update(at_label_size(logits, yb).argmax(1), yb)
    finally:
        aux_model.train(was_training)
    scores = {name: _scores(name, meter) for name, meter in meters.items()}
    return scores.pop("main"), list(scores.values()), torch.cat(predicted)[:FIGURE_IMAGES]


def _scores(name: str, meter: SegmentationMeter) -> SegmentScores:
    s = meter.compute()
    return SegmentScores(name, s.miou, s.pixel_accuracy, s.mean_dice, s.iou, s.dice)


def _export(learn: Learner, aux_model: AuxModel, out: Path, dict_output: bool) -> dict[str, str]:
    """model.pth (the model without heads, `torch.load(path, weights_only=False)`) and, for a
    model whose output fastai's loss takes as it is, model.pkl (`load_learner`)."""
    files = {}
    pth = (out / "model.pth").resolve()
    with aux_model.hooks_removed(), atomic_path(pth) as tmp:
        torch.save(aux_model.model, tmp)
    files["model_pth"] = str(pth)
    if not dict_output:  # the exported Learner's loss would be auxhead's MainOut
        pkl = (out / "model.pkl").resolve()
        with atomic_path(pkl) as tmp:
            export_learner(learn, tmp)
        files["model"] = str(pkl)
    return files


def _baseline(result: SegmentResult, dls, data, config: TrainConfig, out: Path, x, y) -> None:
    """The same model, seed and budget without heads."""
    with seeded(config.seed):  # as the run with heads started
        model = _model(config, data)
        learn = _learner(dls, model, data.void, [], out)
        start = time.perf_counter()
        learn.fit_one_cycle(result.budget.epochs, result.budget.lr)
        result.baseline_seconds = time.perf_counter() - start
    result.baseline_history = recorder_history(learn)
    result.baseline, _, predicted = score(learn.model, x, y, data, bs=result.budget.bs)
    result.baseline.name = "without heads"
    result.figure["without heads"] = predicted
