import math

import pytest
import torch

from auxhead._segmetrics import SegmentationMeter, segmentation_scores

VOID = 4  # four classes, void labelled 4 (as CamVid's 11 classes, void 11)


def brute_force(pred, target, num_classes, void):
    """IoU, Dice and pixel accuracy by counting pixels one by one in plain Python."""
    pairs = [
        (int(p), int(t))
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True)
        if t != void
    ]
    iou, dice = [], []
    for k in range(num_classes):
        tp = sum(1 for p, t in pairs if p == k and t == k)
        fp = sum(1 for p, t in pairs if p == k and t != k)
        fn = sum(1 for p, t in pairs if p != k and t == k)
        if tp + fp + fn == 0:
            iou.append(None)
            dice.append(None)
        else:
            iou.append(tp / (tp + fp + fn))
            dice.append(2 * tp / (2 * tp + fp + fn))
    accuracy = sum(1 for p, t in pairs if p == t) / len(pairs)
    return iou, dice, accuracy, len(pairs)


def mean(values):
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept)


@pytest.fixture
def example():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)  # class 3 never labelled...
    target[0, :2] = VOID  # ...void pixels...
    pred = torch.randint(0, 3, (2, 5, 6), generator=g)
    pred[0, 0, 0] = 3  # ...and class 3 predicted only on a void pixel: it has no IoU
    return pred, target


def test_scores_match_brute_force_with_void_pixels(example):
    pred, target = example
    iou, dice, accuracy, pixels = brute_force(pred, target, 4, VOID)
    scores = segmentation_scores(pred, target, 4, ignore_index=VOID)
    assert iou[3] is None and scores.iou[3] is None and scores.dice[3] is None
    assert scores.iou == pytest.approx(iou, abs=1e-6)
    assert scores.dice == pytest.approx(dice, abs=1e-6)
    assert scores.miou == pytest.approx(mean(iou), abs=1e-6)
    assert scores.mean_dice == pytest.approx(mean(dice), abs=1e-6)
    assert scores.pixel_accuracy == pytest.approx(accuracy, abs=1e-6)
    assert scores.pixels == pixels == int((target != VOID).sum())


def test_a_class_predicted_but_never_labelled_has_iou_zero():
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 2, 1, 1]]])
    scores = segmentation_scores(pred, target, 3)
    assert scores.iou == pytest.approx([0.5, 1.0, 0.0])
    assert scores.miou == pytest.approx(0.5)


def test_logits_and_batches_accumulate_like_one_call(example):
    pred, target = example
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    meter = SegmentationMeter(4, ignore_index=VOID)
    meter.update(logits[:1], target[:1])
    meter.update(logits[1:], target[1:])
    whole = segmentation_scores(pred, target, 4, ignore_index=VOID)
    assert meter.compute() == whole
    meter.reset()
    assert meter.pixels == 0 and math.isnan(meter.compute().pixel_accuracy)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ignore_index 2 is one of the 4 classes"):
        SegmentationMeter(4, ignore_index=2)
    with pytest.raises(ValueError, match="resize the logits"):
        segmentation_scores(torch.zeros(1, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), 2)
