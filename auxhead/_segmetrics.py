"""Segmentation scores (IoU per class, mean IoU, pixel accuracy, Dice) from torchmetrics.

The counting is torchmetrics' (`MulticlassJaccardIndex`, `MulticlassF1Score`, whose F1 is the
Dice coefficient, and `MulticlassAccuracy`); this module only wires them together the way
segmentation papers report them: pixels labelled `ignore_index` (void) count nowhere, and a
class that appears neither in the labels nor in the predictions has no IoU (None), and is left
out of the means, as mmsegmentation's `nanmean` does.

torchmetrics is imported on first use, so that the core imports only torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "SegmentationMeter",
    "SegmentationScores",
    "at_label_size",
    "segmentation_scores",
]


@dataclass
class SegmentationScores:
    """Scores over every pixel seen, void pixels left out."""

    iou: list[float | None]  # per class; None: in neither the labels nor the predictions
    dice: list[float | None]  # per class, same None
    miou: float  # mean of the classes' IoU that are not None
    mean_dice: float  # mean of the classes' Dice that are not None
    pixel_accuracy: float  # correct pixels / labelled (non-void) pixels
    pixels: int  # labelled pixels counted

    def as_dict(self) -> dict:
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_dice": self.mean_dice,
            "iou": self.iou,
            "dice": self.dice,
            "pixels": self.pixels,
        }


class SegmentationMeter:
    """Accumulates predictions batch by batch; `compute()` gives the scores of all of them.

    Args:
        num_classes: classes the model predicts (void not among them).
        ignore_index: the label of void pixels (may be `num_classes`, as CamVid's 11), or None.

    Example:
        >>> meter = SegmentationMeter(11, ignore_index=11)
        >>> for x, y in batches:
        ...     meter.update(model(x).argmax(1), y)
        >>> meter.compute().miou
    """

    def __init__(self, num_classes: int, *, ignore_index: int | None = None) -> None:
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassF1Score,
            MulticlassJaccardIndex,
        )

        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            # torchmetrics would also take an in-range ignore_index, but then that class has a
            # row of zeros in every table: say so rather than report it.
            raise ValueError(
                f"ignore_index {ignore_index} is one of the {num_classes} classes (0 to "
                f"{num_classes - 1}); give the void label, outside them, or None"
            )
        self.num_classes, self.ignore_index = num_classes, ignore_index
        kwargs = {"num_classes": num_classes, "ignore_index": ignore_index}
        self._iou = MulticlassJaccardIndex(average="none", zero_division=float("nan"), **kwargs)
        self._dice = MulticlassF1Score(average="none", **kwargs)
        self._accuracy = MulticlassAccuracy(average="micro", **kwargs)
        self.pixels = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: `pred` class indices (B, H, W) or logits (B, K, H, W) at the target's
        size, `target` class indices (B, H, W) with void as `ignore_index`."""
        pred, target = pred.detach(), target.detach()
        if pred.is_floating_point():
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(
                f"predictions of shape {tuple(pred.shape)} for targets of shape "
                f"{tuple(target.shape)}: resize the logits to the targets' size first"
            )
        pred, target = pred.cpu().long(), target.cpu().long()
        for metric in (self._iou, self._dice, self._accuracy):
            metric.update(pred, target)
        labelled = target != self.ignore_index if self.ignore_index is not None else target >= 0
        self.pixels += int(labelled.sum())

    def compute(self) -> SegmentationScores:
        if not self._iou.update_called:  # nothing seen: no class has a score
            nothing = [None] * self.num_classes
            return SegmentationScores(nothing, nothing, *[float("nan")] * 3, pixels=0)
        iou = self._iou.compute()
        present = ~torch.isnan(iou)
        dice = self._dice.compute()
        iou_list = [float(v) if p else None for v, p in zip(iou, present, strict=True)]
        dice_list = [float(v) if p else None for v, p in zip(dice, present, strict=True)]
        return SegmentationScores(
            iou=iou_list,
            dice=dice_list,
            miou=float(iou[present].mean()) if present.any() else float("nan"),
            mean_dice=float(dice[present].mean()) if present.any() else float("nan"),
            pixel_accuracy=float(self._accuracy.compute()) if self.pixels else float("nan"),
            pixels=self.pixels,
        )

    def reset(self) -> None:
        for metric in (self._iou, self._dice, self._accuracy):
            metric.reset()
        self.pixels = 0


def at_label_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dense logits (B, K, h, w) upsampled to the labels' size (B, H, W), bilinear with
    align_corners=False as torchvision's and mmsegmentation's auxiliary heads are scored (linear
    for (B, K, L)); as they are when the sizes already match."""
    size = tuple(target.shape[1:])
    if tuple(logits.shape[2:]) == size:
        return logits
    mode = "linear" if len(size) == 1 else "bilinear"
    return torch.nn.functional.interpolate(
        logits.float(), size=size, mode=mode, align_corners=False
    )


def segmentation_scores(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, *, ignore_index: int | None = None
) -> SegmentationScores:
    """The scores of one set of predictions (see `SegmentationMeter`)."""
    meter = SegmentationMeter(num_classes, ignore_index=ignore_index)
    meter.update(pred, target)
    return meter.compute()
