"""Dense heads and their losses on a small hand-written segmenter: shapes, resizing against
torch's own interpolation and brute force, nnU-Net's weights by hand, ignore labels, zero
weights, dense distillation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import auxhead
from auxhead.dense import deep_supervision_weights, match_size

K = 3
IGNORE = 255


class TinySegmenter(nn.Module):
    """Full resolution in, (B, K, H, W) out; two taps at 1/2 and 1/4."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, K, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.down2(self.down1(self.stem(x)))  # (B, 16, H/4, W/4)
        logits = self.classifier(features)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture
def seg_batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    y = torch.randint(0, K, (2, 16, 16), generator=generator)
    y[:, :2] = IGNORE
    return x, y


@pytest.fixture
def segmenter():
    torch.manual_seed(0)
    return TinySegmenter()


def _ce() -> nn.CrossEntropyLoss:
    return nn.CrossEntropyLoss(ignore_index=IGNORE)


# -- heads ---------------------------------------------------------------------------------


def test_fcn_head_is_torchvisions_fcn_head():
    from torchvision.models.segmentation.fcn import FCNHead as TorchvisionFCNHead

    ours = auxhead.FCNHead((2, 64, 8, 8), K)
    theirs = TorchvisionFCNHead(64, K)
    assert str(ours) == str(theirs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 8, 8)
    ours.eval(), theirs.eval()
    assert torch.equal(ours(x), theirs(x))


def test_dense_heads_on_a_sequence_predict_at_every_place():
    x = torch.randn(2, 11, 24)  # (B, N, C), as heads get sequences
    fcn = auxhead.FCNHead((2, 11, 24), K).eval()
    conv = auxhead.Conv1x1Head((2, 11, 24), K)
    assert fcn(x).shape == conv(x).shape == (2, K, 11)
    expected = conv.conv.weight[:, :, 0] @ x.transpose(1, 2) + conv.conv.bias[:, None]
    torch.testing.assert_close(conv(x), expected)


def test_conv1d_model_gets_class_maps_over_its_length():
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, K, 1))
    x = torch.randn(2, 4, 20)  # (B, C, L)
    aux_model = auxhead.attach(model, ["1"], head="fcn", sample=x)  # K read off (B, K, L)
    aux_model(x)
    assert aux_model.aux_outputs["1"].shape == (2, K, 20)


def test_conv1x1_head_on_a_map_is_one_pointwise_conv(segmenter, seg_batch):
    x, _ = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1"], head="conv1x1", sample=x)
    features = {}
    segmenter.down1.register_forward_hook(lambda _m, _a, out: features.setdefault("f", out))
    aux_model(x)
    head = aux_model.head("down1")
    expected = F.conv2d(features["f"], head.conv.weight, head.conv.bias)
    assert torch.equal(aux_model.aux_outputs["down1"], expected)


@pytest.mark.parametrize("kind", ["fcn", "conv1x1"])
def test_dense_kind_on_a_vector_tap_is_refused_naming_the_tap(kind):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K)
    )
    with pytest.raises(auxhead.AttachError, match=rf"layer '3'.*{kind!r} head predicts a class"):
        auxhead.attach(model, ["1", "3"], head=kind, num_classes=K, sample=torch.randn(2, 3, 8, 8))


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, K, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.conv(x)
        return {"out": out, "aux": out * 2}


def test_num_classes_is_not_guessed_from_a_dict_of_several_maps():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(auxhead.AttachError, match="pass `num_classes=`"):
        auxhead.attach(TwoOutputs(), ["conv"], head="fcn", sample=x)
    aux_model = auxhead.attach(TwoOutputs(), ["conv"], head="fcn", num_classes=2, sample=x)
    assert aux_model.head_shapes == {"conv": (2, 2, 8, 8)}


# -- resizing ------------------------------------------------------------------------------


def test_resize_logits_is_torchvisions_bilinear_upsampling():
    logits = torch.randn(2, K, 4, 5)
    y = torch.zeros(2, 16, 20, dtype=torch.long)
    up, targets = match_size(logits, (y,), "logits")
    expected = F.interpolate(logits, size=(16, 20), mode="bilinear", align_corners=False)
    assert torch.equal(up, expected) and targets[0] is y


def test_resize_targets_takes_pixel_centres_and_keeps_the_ignore_label():
    y = torch.randint(0, K, (2, 16, 16))
    y[:, 5] = IGNORE
    logits = torch.randn(2, K, 4, 4)
    same, (small,) = match_size(logits, (y,), "targets")
    assert same is logits and small.dtype == y.dtype
    # nearest-exact by 4: the pixel at 4i + 2, the centre of each 4x4 block (brute force).
    assert torch.equal(small, y[:, 2::4, 2::4])
    y[:, 6] = IGNORE  # a row a centre falls on: it stays the ignore label, not a blend
    assert (match_size(logits, (y,), "targets")[1][0][:, 1] == IGNORE).all()


def test_resize_targets_resizes_per_class_maps_and_leaves_other_targets():
    masks = torch.rand(2, K, 8, 8) > 0.5  # (B, K, H, W), for a BCE loss
    labels = torch.tensor([0, 1])  # (B,): no map
    logits = torch.randn(2, K, 4, 4)
    _, (small, same) = match_size(logits, (masks, labels), "targets")
    assert torch.equal(small, masks[:, :, 1::2, 1::2]) and same is labels


def test_pooled_logits_and_matching_sizes_pass_through():
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    pooled = torch.randn(2, K)
    for mode in (None, "logits", "targets"):
        assert match_size(pooled, (y,), mode)[0] is pooled
    dense = torch.randn(2, K, 8, 8)
    assert match_size(dense, (y,), "logits")[0] is dense
    assert match_size(dense, (y,), "targets")[1][0] is y


def test_resize_logits_without_a_target_map_and_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="no target is a map"):
        match_size(torch.randn(2, K, 4, 4), (torch.tensor([0, 1]),), "logits")
    with pytest.raises(ValueError, match="resize must be one of"):
        match_size(torch.randn(2, K, 4, 4), (), "bilinear")


# -- nnU-Net's weights ---------------------------------------------------------------------


def test_deep_supervision_weights_by_hand():
    weights = deep_supervision_weights(
        {"main": (2, K, 64, 64), "up3": (2, K, 32, 32), "up2": (2, K, 16, 16), "up1": (2, K, 8, 8)}
    )
    total = 1 + 0.5 + 0.25  # the coarsest (1/8) is 0
    expected = {"main": 1 / total, "up3": 0.5 / total, "up2": 0.25 / total, "up1": 0.0}
    assert weights == pytest.approx(expected, rel=0, abs=1e-15)
    assert math.isclose(sum(weights.values()), 1.0)


def test_deep_supervision_weights_ties_one_scale_and_pooled_outputs():
    tied = deep_supervision_weights({"a": (1, K, 8, 8), "b": (1, K, 8, 8), "c": (1, K, 4, 4)})
    assert tied == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert deep_supervision_weights({"a": (1, K, 8), "b": (1, K, 8)}) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match=r"'pooled' has shape \(2, 3\)"):
        deep_supervision_weights({"main": (2, K, 8, 8), "pooled": (2, K)})


def test_nnunet_preset_weighs_main_and_heads_by_resolution(segmenter, seg_batch):
    x, y = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1", "down2"], head="conv1x1", sample=x)
    ce = _ce()
    loss_func = auxhead.AuxLoss(ce, aux_model, weights="nnunet", resize="targets")
    # main 1/1, down1 1/2, down2 1/4 (coarsest: 0): 1, 0.5, 0 normalised
    assert loss_func.main_weight == pytest.approx(2 / 3)
    assert loss_func.weights == pytest.approx({"down1": 1 / 3, "down2": 0.0})
    out = aux_model(x)
    loss = loss_func(out, y)
    head = aux_model.aux_outputs["down1"]
    expected = (2 / 3) * ce(out, y) + (1 / 3) * ce(head, y[:, 1::2, 1::2])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    loss.backward()
    down2 = aux_model.head("down2").conv.weight.grad
    assert down2 is not None and not down2.any()  # weight 0: in the graph, zero gradient


def test_nnunet_preset_needs_the_shapes_attach_measures(segmenter):
    aux_model = auxhead.attach(segmenter, {"down1": nn.Conv2d(16, K, 1)})  # no sample
    with pytest.raises(ValueError, match="attach with `sample=`"):
        auxhead.AuxLoss(_ce(), aux_model, weights="nnunet")
    with pytest.raises(ValueError, match="unknown weights preset 'nnUNet'"):
        auxhead.AuxLoss(_ce(), aux_model, weights="nnUNet")


# -- AuxLoss on dense heads ----------------------------------------------------------------


def test_resize_logits_loss_is_the_torchvision_recipe(segmenter, seg_batch):
    x, y = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1"], head="fcn", sample=x)
    ce = _ce()
    loss_func = auxhead.AuxLoss(ce, aux_model, weights=0.5, resize="logits")
    out = aux_model(x)
    up = F.interpolate(
        aux_model.aux_outputs["down1"], size=(16, 16), mode="bilinear", align_corners=False
    )
    assert torch.equal(loss_func(out, y), ce(out, y) + 0.5 * ce(up, y))
    assert loss_func.components["down1"] == ce(up, y)


def test_ignored_pixels_do_not_count(segmenter, seg_batch):
    x, y = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1"], head="conv1x1", sample=x)
    loss_func = auxhead.AuxLoss(_ce(), aux_model, weights=1.0, resize="targets")
    out = aux_model(x)
    logits = aux_model.aux_outputs["down1"]
    loss_func(out, y)
    small = y[:, 1::2, 1::2]
    kept = small != IGNORE
    by_hand = F.cross_entropy(logits.permute(0, 2, 3, 1)[kept], small[kept])
    torch.testing.assert_close(loss_func.components["down1"], by_hand, rtol=1e-6, atol=0)


def test_without_resize_a_size_mismatch_names_the_way_out(segmenter, seg_batch):
    x, y = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1"], head="conv1x1", sample=x)
    loss_func = auxhead.AuxLoss(_ce(), aux_model)
    with pytest.raises(ValueError, match=r"head 'down1'.*resize='logits'.*resize='targets'"):
        loss_func(aux_model(x), y)
    with pytest.raises(ValueError, match="resize must be one of"):
        auxhead.AuxLoss(_ce(), aux_model, resize="nearest")


def test_a_zero_weight_head_with_a_nan_term_leaves_the_loss_finite(segmenter, seg_batch):
    x, y = seg_batch
    y = y.clone()
    y[:, 1::2, 1::2] = IGNORE  # every pixel the 1/2 head sees is ignored: its CE is 0/0
    aux_model = auxhead.attach(segmenter, ["down1", "down2"], head="conv1x1", sample=x)
    loss_func = auxhead.AuxLoss(
        _ce(), aux_model, weights={"down1": 0.0, "down2": 0.4}, resize="targets"
    )
    loss = loss_func(aux_model(x), y)
    assert torch.isnan(loss_func.components["down1"])
    assert torch.isfinite(loss)
    loss.backward()
    grad = aux_model.head("down1").conv.weight.grad
    assert grad is not None and not grad.any()
    # Weighted, the same NaN is caught, naming the head.
    loss_func = auxhead.AuxLoss(_ce(), aux_model, weights=0.4, resize="targets")
    with pytest.raises(FloatingPointError, match="head 'down1'"):
        loss_func(aux_model(x), y)


def test_main_weight_scales_the_main_term(segmenter, seg_batch):
    x, y = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1"], head="conv1x1", sample=x)
    ce = _ce()
    loss_func = auxhead.AuxLoss(ce, aux_model, weights=0.2, resize="targets", main_weight=0.5)
    out = aux_model(x)
    loss = loss_func(out, y)
    expected = 0.5 * ce(out, y) + 0.2 * loss_func.components["down1"]
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert loss_func.components["main"] == ce(out, y)  # unweighted
    with pytest.raises(ValueError, match="main_weight must be"):
        auxhead.AuxLoss(ce, aux_model, main_weight=-1.0)


# -- distillation on dense heads -----------------------------------------------------------


def test_dense_distillation_skips_ignored_pixels(segmenter, seg_batch):
    x, y = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1"], head="conv1x1", sample=x)
    ce = _ce()
    loss_func = auxhead.AuxLoss(
        ce, aux_model, weights=1.0, resize="logits", distill=0.5, temperature=2.0
    )
    out = aux_model(x)
    loss_func(out, y)
    up = F.interpolate(
        aux_model.aux_outputs["down1"], size=(16, 16), mode="bilinear", align_corners=False
    )
    # By hand, pixel by pixel over the kept ones: T^2 * KL(softmax(main/T) || softmax(head/T)).
    kept = y != IGNORE
    student = up.permute(0, 2, 3, 1)[kept] / 2.0  # (P, K)
    teacher = out.detach().permute(0, 2, 3, 1)[kept] / 2.0
    q = teacher.softmax(-1)
    kl = (q * (q.log() - student.log_softmax(-1))).sum(-1).mean() * 4.0
    expected = 0.5 * ce(up, y) + 0.5 * kl
    torch.testing.assert_close(loss_func.components["down1"], expected, rtol=1e-5, atol=0)


def test_dense_distillation_needs_an_ignore_label_and_one_size(segmenter, seg_batch):
    x, y = seg_batch
    aux_model = auxhead.attach(segmenter, ["down1"], head="conv1x1", sample=x)
    ce = _ce()
    loss_func = auxhead.AuxLoss(
        ce, aux_model, head_loss=lambda logits, t: ce(logits, t), resize="logits", distill=0.5
    )
    with pytest.raises(ValueError, match="has no `ignore_index`"):
        loss_func(aux_model(x), y)
    loss_func = auxhead.AuxLoss(ce, aux_model, resize="targets", distill=0.5)
    with pytest.raises(ValueError, match="pass resize='logits'"):
        loss_func(aux_model(x), y)


def test_distillation_loss_mask_counts_kept_places_only():
    student, teacher = torch.randn(2, K, 4, 4), torch.randn(2, K, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = mask[1, 3, 2] = True
    per_place = auxhead.distillation_loss(student, teacher, temperature=1.0, reduction="none")
    masked = auxhead.distillation_loss(student, teacher, temperature=1.0, mask=mask)
    torch.testing.assert_close(masked, per_place[mask].mean())
