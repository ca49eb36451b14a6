"""fastai adapter: auxiliary heads in any Learner with one callback.

The Learner's model becomes an `AuxModel`, so `learn.pred` stays the model's own output and
metrics, `get_preds`, `predict`, `Interpretation` and `show_results` see nothing new. The loss
function is never swapped: in training, `after_loss` adds the weighted head losses to
`learn.loss_grad` (and to the logged `learn.loss`), before `GradientAccumulation` scales it
and `MixedPrecision` scales it for backward. The validation loss is the main loss alone.

This is the only module of the core package that imports fastai.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auxhead._extras import raise_missing_extra
from auxhead._segmetrics import SegmentationMeter, at_label_size

try:
    from fastai.callback.core import Callback, GatherPredsCallback
    from fastai.learner import AvgMetric, Learner, Metric
    from fastai.torch_core import find_bs
except ModuleNotFoundError as error:
    raise_missing_extra(error, "auxhead.fastai")
    raise

from auxhead.attach import AuxModel, HeadSpec, attach
from auxhead.distributed import check_ddp
from auxhead.losses import AuxLoss, Weights, head_loss_term
from auxhead.schedules import Schedule

__all__ = [
    "AuxHeads",
    "SegmentationMetric",
    "aux_learner",
    "export_learner",
    "plot_heads",
    "segmentation_metrics",
]


def _column(name: str) -> str:
    """A Recorder column suffix from a tap name: 'layer2' -> 'layer2', '0.5' -> '0_5'."""
    return re.sub(r"\W", "_", name)


class _HeadMetric(AvgMetric):
    """Accuracy or loss of one head on the validation set, read from the batch's aux outputs;
    fastai's `AvgMetric` averages it over the samples."""

    def __init__(self, callback: AuxHeads, tap: str, kind: str) -> None:
        self.callback, self.tap, self.kind = callback, tap, kind
        self.reset()

    def accumulate(self, learn: Learner) -> None:
        logits = self.callback.batch_aux.get(self.tap)
        if logits is None or not len(learn.yb):
            return
        bs = find_bs(learn.yb)
        target = learn.yb[0]
        dense = _is_dense(logits, target)
        if dense:  # a dense head, scored as it is trained: its logits at the labels' size
            logits = at_label_size(logits, target)
        if self.kind == "acc" and dense:  # pixel accuracy over the labelled pixels
            labelled = target != _ignore_index(learn, self.callback.ignore_index)
            self.total += (logits.argmax(dim=1) == target)[labelled].sum().item()
            self.count += int(labelled.sum())
            return
        if self.kind == "acc":
            if target.dim() != 1 or logits.dim() != 2:
                return  # accuracy is for single-label classification
            self.total += (logits.argmax(dim=-1) == target).float().sum().item()
        else:
            loss_func = self.callback.head_loss or learn.loss_func
            term = head_loss_term(loss_func, self.tap, logits.float(), learn.yb, learn.pred)
            self.total += term.mean().item() * bs
        self.count += bs

    @property
    def name(self) -> str:
        return f"{self.kind}_{_column(self.tap)}"


def _is_dense(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """A head that predicts a class per pixel (B, K, h, w) for labels (B, H, W)."""
    return logits.dim() >= 3 and target.dim() == logits.dim() - 1 and not target.is_floating_point()


def _ignore_index(learn: Learner, given: int | None) -> int:
    """The label of void pixels: given, or the Learner's loss's (`CrossEntropyLossFlat(axis=1,
    ignore_index=...)`), or torch's default -100 (no pixel has it)."""
    if given is not None:
        return given
    loss = getattr(learn.loss_func, "func", learn.loss_func)
    return getattr(loss, "ignore_index", -100)


SEGMENTATION_SCORES = ("miou", "pixel_accuracy", "mean_dice")


class SegmentationMetric(Metric):
    """One segmentation score of the model's output over the validation set, void pixels left
    out: "miou" (mean IoU over the classes seen), "pixel_accuracy" or "mean_dice", counted by
    torchmetrics (see `auxhead._segmetrics`). Logits smaller than the labels are upsampled
    (bilinear) first; a dict output (torchvision's segmentation models) is scored by its
    "out". `export_learner` leaves it out of the exported file.

    Example:
        >>> learn = unet_learner(dls, resnet18, pretrained=False, n_out=11,
        ...                      loss_func=CrossEntropyLossFlat(axis=1, ignore_index=11),
        ...                      metrics=segmentation_metrics(11, ignore_index=11))
    """

    def __init__(self, score: str, num_classes: int, *, ignore_index: int | None = None) -> None:
        if score not in SEGMENTATION_SCORES:
            raise ValueError(f"unknown score {score!r}; choose one of {SEGMENTATION_SCORES}")
        self.score = score
        self.meter = SegmentationMeter(num_classes, ignore_index=ignore_index)

    def reset(self) -> None:
        self.meter.reset()

    def accumulate(self, learn: Learner) -> None:
        pred = learn.pred["out"] if isinstance(learn.pred, Mapping) else learn.pred
        target = learn.yb[0]
        self.meter.update(at_label_size(pred, target).argmax(dim=1), target)

    @property
    def value(self) -> float | None:
        scores = self.meter.compute()
        return None if not scores.pixels else getattr(scores, self.score)

    @property
    def name(self) -> str:
        return self.score


def segmentation_metrics(num_classes: int, *, ignore_index: int | None = None) -> list[Metric]:
    """mIoU, pixel accuracy and mean Dice of the model's output, as fastai metrics."""
    return [
        SegmentationMetric(s, num_classes, ignore_index=ignore_index) for s in SEGMENTATION_SCORES
    ]


class AuxHeads(Callback):
    """Train any fastai Learner with auxiliary classifier heads at named layers.

    Heads are attached when the callback joins a Learner (sized from `dls.one_batch()`, with
    `num_classes` from `dls.c` unless given), so their parameters are in the optimizer from
    the start: in the last parameter group, where they train even after `learn.freeze()`.

    In training the weighted head losses are added to the main loss (the logged train loss
    includes them); the validation loss is the main loss alone. During validation the heads
    also run, to give each head's accuracy and loss as Recorder columns `acc_<tap>` and
    `loss_<tap>`. Schedules follow `learn.pct_train`. A dense head ((B, K, h, w) logits for
    (B, H, W) labels, as on a U-Net) is scored with its logits upsampled to the labels' size:
    `acc_<tap>` is then its pixel accuracy, void pixels left out.

    Args:
        at: layer names (see `auxhead.list_layers(learn.model, xb)`) or a dict name -> head.
        num_classes: logits per head; default `dls.c`.
        head: head kind for names given as a list ("inception", "linear", "sdn"; dense
            "fcn", "conv1x1" with `resize=`), an `nn.Module` factory
            `(tap_shape, num_classes) -> nn.Module`.
        weights: one weight for all heads, a list in `at` order or a dict by name.
        schedule: multiplier of the weights over training progress, by name or callable.
        head_metrics: add per-head validation accuracy and loss columns.
        distill: self-distillation weight (Be Your Own Teacher); 0 turns it off.
        temperature: distillation temperature.
        select: picks the tensor to classify from taps with tuple/dict outputs.
        head_loss: the heads' loss `(logits, *targets) -> loss`, when the Learner's
            `loss_func` does not fit them (a model whose output is a dict, say). Default: the
            Learner's current `loss_func` (so wrappers such as MixUp's apply to the heads).
        ignore_index: the label of void pixels, left out of a dense head's pixel accuracy
            (`acc_<tap>`); default: the loss's `ignore_index`.
        resize: how dense heads' logits meet the labels in training, `AuxLoss`'s `resize`:
            "logits" (upsampled to the labels, torchvision's recipe) or "targets" (labels
            downsampled to each head, nnU-Net's).

    Example:
        >>> learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy,
        ...                        cbs=AuxHeads(["0.5", "0.6"]))
        >>> learn.fit_one_cycle(3)
    """

    order = -5  # before GradientAccumulation (6) and MixedPrecision (10) touch loss_grad

    def __init__(
        self,
        at: Sequence[str] | Mapping[str, HeadSpec],
        *,
        num_classes: int | None = None,
        head: HeadSpec = "inception",
        weights: Weights = 0.3,
        schedule: str | Schedule = "constant",
        head_metrics: bool = True,
        distill: float = 0.0,
        temperature: float = 3.0,
        select: Callable | Mapping[str, Callable] | None = None,
        head_loss: Callable | None = None,
        ignore_index: int | None = None,
        resize: str | None = None,
    ) -> None:
        # `learn` is a property over `_learn`; set it first, as fastai's GetAttr would
        # otherwise forward the lookup of a missing `_learn` to `learn`, endlessly.
        self.__dict__["_learn"] = None
        super().__init__()
        if isinstance(at, str):
            at = [at]
        self.at, self.num_classes, self.head_spec = at, num_classes, head
        self.weights, self.schedule, self.head_metrics = weights, schedule, head_metrics
        self.distill, self.temperature, self.select = distill, temperature, select
        self.head_loss, self.ignore_index, self.resize = head_loss, ignore_index, resize
        self.aux_loss: AuxLoss | None = None
        # One dict per trained epoch, Recorder column -> value, across every fit (fine_tune's
        # frozen and unfrozen phases alike): what plot_heads draws.
        self.history: list[dict[str, float | None]] = []
        self._trained_this_epoch = False
        self.batch_aux: dict[str, torch.Tensor] = {}
        self._head_metrics: list[_HeadMetric] = []
        self._splitter: Callable | None = None

    # Joining and leaving a Learner ----------------------------------------------------------

    @property
    def learn(self) -> Learner | None:
        return self._learn

    @learn.setter
    def learn(self, learn: Learner | None) -> None:
        # fastai sets `cb.learn = None` in remove_cb: take the heads' effect away with it.
        if learn is None and self._learn is not None:
            self._leave()
        self._learn = learn

    def after_create(self) -> None:
        self._join()

    def before_fit(self) -> None:
        self._join()
        self.aux_model.set_heads(False)
        if self.head_metrics:
            self._add_metrics()

    def _join(self) -> None:
        """Wrap the model and its splitter once; rebuild an optimizer made without heads."""
        learn = self.learn
        model = _unwrap(learn.model)
        if self.aux_loss is not None:
            aux_model = self.aux_loss.aux_model
            if model is aux_model:
                return
            if model is aux_model.model and not aux_model.hooked:
                # Back after remove_cb (learn.removed_cbs, say): the same heads, not new ones.
                self._splitter = learn.splitter
                learn.model = aux_model.reattach()
                learn.splitter = _HeadsLastSplitter(self._splitter)
                return
        if isinstance(model, AuxModel):
            raise ValueError(
                "this Learner's model already has auxiliary heads; add one AuxHeads callback"
            )
        sample = _sample(learn)
        num_classes = self.num_classes or getattr(learn.dls, "c", None)
        aux_model = attach(
            learn.model,
            self.at,
            num_classes=num_classes,
            head=self.head_spec,
            sample=sample,
            select=self.select,
        )
        self.aux_loss = AuxLoss(
            learn.loss_func,
            aux_model,
            weights=self.weights,
            schedule=self.schedule,
            distill=self.distill,
            temperature=self.temperature,
            **({} if self.resize is None else {"resize": self.resize}),
        )
        aux_model.set_heads(False)  # heads run only inside fit, when this callback says so
        self._splitter = learn.splitter
        learn.model = aux_model
        learn.splitter = _HeadsLastSplitter(self._splitter)
        if learn.opt is not None:  # e.g. vision_learner froze the body: keep it frozen
            frozen = learn.opt.frozen_idx
            learn.create_opt()
            learn.opt.freeze_to(frozen)

    def _leave(self) -> None:
        """Give the Learner back its own model (no hooks) and splitter; keep the heads, so
        that adding the callback again brings the same ones back."""
        self._remove_metrics()
        if self.aux_loss is None:
            return
        aux_model = self.aux_loss.aux_model
        aux_model.set_heads(False)
        # The optimizer still holds the heads: with no gradient (None, not zero) every fastai
        # and torch optimizer skips them, so no momentum or weight decay moves them while the
        # callback is away.
        for param in aux_model.heads.parameters():
            param.grad = None
        learn = self._learn
        if learn.model is aux_model:
            learn.model = aux_model.strip()
            if self._splitter is not None:
                learn.splitter = self._splitter

    def _add_metrics(self) -> None:
        self._remove_metrics()
        self._head_metrics = [
            _HeadMetric(self, tap, kind) for tap in self.aux_model.taps for kind in ("acc", "loss")
        ]
        self.learn.metrics = [*self.learn.metrics, *self._head_metrics]

    def _remove_metrics(self) -> None:
        if self._learn is not None and self._head_metrics:
            ours = set(map(id, self._head_metrics))
            self._learn.metrics = [m for m in self._learn.metrics if id(m) not in ours]
        self._head_metrics = []

    @property
    def aux_model(self) -> AuxModel:
        """The AuxModel this callback made (also inside a DistributedDataParallel wrapper)."""
        if self.aux_loss is None:
            raise RuntimeError("AuxHeads has not joined a Learner yet")
        return self.aux_loss.aux_model

    # The training loop -----------------------------------------------------------------------

    def before_train(self) -> None:
        self._trained_this_epoch = True
        check_ddp(self.learn.model)  # distrib_ctx wraps the model after our before_fit
        self.aux_model.set_heads(None)  # follow the mode: heads run in training

    def before_validate(self) -> None:
        # Heads run in validation for the per-head columns, but not inside get_preds.
        gathering = any(isinstance(cb, GatherPredsCallback) for cb in self.learn.cbs)
        self.aux_model.set_heads(bool(self._head_metrics) and not gathering)

    def before_batch(self) -> None:
        # The previous batch's head outputs (and the graph they hold) go now; they had to live
        # through after_batch, where the Recorder reads the per-head metrics.
        self.batch_aux = {}
        self.aux_model.clear_aux()
        self.aux_loss.progress = float(getattr(self.learn, "pct_train", 0.0))

    def after_pred(self) -> None:
        self.batch_aux = self.aux_model.aux_outputs

    def after_loss(self) -> None:
        if not self.training or not len(self.learn.yb):
            return
        aux = self.aux_loss.aux_term(
            self.learn.pred, *self.learn.yb, head_loss=self.head_loss or self.learn.loss_func
        )
        if aux is not None:
            self.learn.loss_grad = self.learn.loss_grad + aux
            self.learn.loss = self.learn.loss_grad.clone()

    def after_fit(self) -> None:
        self.aux_model.set_heads(False)
        self.batch_aux = {}
        self.aux_model.clear_aux()

    # Reports ----------------------------------------------------------------------------------

    def after_epoch(self) -> None:
        # fastai also fires after_epoch when get_preds/validate leave their context (and
        # resets the Recorder then); only epochs that trained are history.
        if not self._trained_this_epoch:
            return
        self._trained_this_epoch = False
        names = [n for n in self.learn.recorder.metric_names[1:] if n != "time"]
        values = [_maybe_float(v) for v in self.learn.recorder.log[1 : len(names) + 1]]
        self.history.append(dict(zip(names, values, strict=False)))

    def plot_heads(self, *, metric: str = "acc", ax: Any = None):
        """Each head's validation accuracy (or loss) per epoch, beside the main model's
        `accuracy` when that metric is recorded, like a Keras per-output history."""
        return plot_heads(self.learn, metric=metric, ax=ax)

    def strip(self) -> nn.Module:
        """Take the heads off for good: restore the splitter and return the bare model (also
        put back as `learn.model`). Remove the callback afterwards."""
        learn = self.learn
        self._remove_metrics()
        if self._splitter is not None:
            learn.splitter = self._splitter
        model = self.aux_model.strip()
        learn.model = model
        learn.create_opt()
        return model


class _HeadsLastSplitter:
    """The Learner's splitter applied to the bare model, with the heads in the last group."""

    def __init__(self, splitter: Callable) -> None:
        self.splitter = splitter

    def __call__(self, aux_model: AuxModel) -> list:
        groups = list(self.splitter(aux_model.model))
        heads = list(aux_model.heads.parameters())
        if groups and isinstance(groups[0], torch.Tensor):  # one flat group
            return [*groups, *heads]
        groups[-1] = [*groups[-1], *heads]
        return groups


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside (Distributed)DataParallel wrappers, as distrib_ctx makes them."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _maybe_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def _sample(learn: Learner) -> Any:
    """Two samples of the training set's inputs, on the model's device, to size the heads.
    The inputs are the batch's first `n_inp` items, by fastai's own rule (`Learner._split`):
    without `dls.n_inp` (DataLoaders of plain DataLoaders), all items but the last."""
    batch = learn.dls.one_batch()
    n_inp = getattr(learn.dls, "n_inp", 1 if len(batch) == 1 else len(batch) - 1)
    xb = tuple(x[:2] for x in batch[:n_inp])
    device = next(learn.model.parameters()).device
    xb = tuple(x.to(device) for x in xb)
    return xb[0] if len(xb) == 1 else xb


def aux_learner(
    dls: Any,
    model: nn.Module | Callable | str,
    at: Sequence[str] | Mapping[str, HeadSpec],
    **kwargs: Any,
) -> Learner:
    """A Learner with auxiliary heads in one line.

    Args:
        dls: fastai DataLoaders.
        model: an `nn.Module` (a plain `Learner` is built), or an architecture for
            `vision_learner` (a torchvision function such as `resnet18`, or a timm name).
        at: layer names or a dict name -> head, as for `AuxHeads`.
        **kwargs: `AuxHeads`' options (head, weights, schedule, num_classes, head_metrics,
            distill, temperature, select); the rest go to `Learner`/`vision_learner`
            (metrics, loss_func, pretrained, ...).

    Example:
        >>> learn = aux_learner(dls, resnet18, ["0.5", "0.6"], weights=0.3, metrics=accuracy,
        ...                     pretrained=False)
    """
    options = set(inspect.signature(AuxHeads).parameters) - {"at"}
    callback = AuxHeads(at, **{k: kwargs.pop(k) for k in list(kwargs) if k in options})
    cbs = [*_as_list(kwargs.pop("cbs", None)), callback]
    if isinstance(model, nn.Module):
        return Learner(dls, model, cbs=cbs, **kwargs)
    from fastai.vision.learner import vision_learner

    return vision_learner(dls, model, cbs=cbs, **kwargs)


def _as_list(cbs: Any) -> list:
    if cbs is None:
        return []
    return list(cbs) if isinstance(cbs, (list, tuple)) else [cbs]


def _ours(obj: Any) -> bool:
    """Whether `obj` is an instance of a class defined by auxhead (so unpicklable without it)."""
    return type(obj).__module__.split(".")[0] == "auxhead"


def export_learner(learn: Learner, fname: str | Path = "export.pkl") -> Path:
    """Export `learn` without its heads: the file opens with plain fastai's `load_learner`
    in a process where auxhead is not installed, and predicts like the trained model.

    The heads, their hooks, and every auxhead callback and metric are left out of the file;
    the Learner itself keeps them all and can go on training.

    Returns:
        The path written (relative names resolve against `learn.path`, as fastai does).
    """
    aux_model = _unwrap(learn.model)
    aux_model = aux_model if isinstance(aux_model, AuxModel) else None
    callbacks = [cb for cb in learn.cbs if _ours(cb)]
    heads = [cb for cb in callbacks if isinstance(cb, AuxHeads)]
    saved = {
        "model": learn.model,
        "splitter": learn.splitter,
        "metrics": learn.metrics,
        "cbs": learn.cbs,
        "opt": learn.opt,
    }
    bare = aux_model.hooks_removed() if aux_model is not None else contextlib.nullcontext()
    try:
        if aux_model is not None:
            learn.model = aux_model.model
        if heads and heads[0]._splitter is not None:
            learn.splitter = heads[0]._splitter
        learn.metrics = [m for m in learn.metrics if not _ours(m)]
        learn.cbs = type(learn.cbs)([cb for cb in learn.cbs if not _ours(cb)])
        for cb in callbacks:  # Learner attributes named after the callbacks go too
            learn.__dict__.pop(cb.name, None)
        # fastai's export rebuilds the optimizer for the model it saw; keep ours (with the
        # heads' parameters and state) aside and put it back after.
        learn.opt = None
        with bare:
            learn.export(fname)
    finally:
        learn.model, learn.splitter = saved["model"], saved["splitter"]
        learn.metrics, learn.cbs, learn.opt = saved["metrics"], saved["cbs"], saved["opt"]
        for cb in callbacks:
            setattr(learn, cb.name, cb)
    return Path(learn.path) / fname


def plot_heads(learn: Learner, *, metric: str = "acc", ax: Any = None):
    """Per-epoch validation accuracy (or loss) of every head, and of the main model.

    Args:
        learn: a Learner trained with `AuxHeads`.
        metric: "acc" or "loss".
        ax: a matplotlib Axes to draw on; a new figure otherwise.

    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if metric not in ("acc", "loss"):
        raise ValueError(f"metric must be 'acc' or 'loss', got {metric!r}")
    ours = [cb for cb in learn.cbs if isinstance(cb, AuxHeads)]
    if not ours or not ours[0].history:
        raise ValueError("nothing to plot: fit a Learner that has an AuxHeads callback first")
    callback = ours[0]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = ax.figure
    main = "accuracy" if metric == "acc" else "valid_loss"
    epochs = range(1, len(callback.history) + 1)
    series = [("main", main)] + [
        (tap, f"{metric}_{_column(tap)}") for tap in callback.aux_model.taps
    ]
    for label, column in series:
        values = [row.get(column) for row in callback.history]
        if any(v is not None for v in values):
            style = {"linewidth": 2.5} if label == "main" else {}
            ax.plot(
                epochs,
                [float("nan") if v is None else v for v in values],
                marker="o",
                label=label,
                **style,
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy" if metric == "acc" else "validation loss")
    ax.set_title("accuracy of each exit" if metric == "acc" else "loss of each exit")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
