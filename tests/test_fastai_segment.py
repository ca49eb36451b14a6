"""AuxHeads on fastai's U-Net with segmentation DataLoaders: dense-head columns, fastai's own
predictions untouched, and an export that plain fastai opens."""

import subprocess
import sys
import textwrap

import matplotlib
import pytest
import torch
from conftest import hook_count
from fastai.vision.learner import unet_learner
from torchvision.models import resnet18

from auxhead import AuxModel
from auxhead._segmetrics import at_label_size, segmentation_scores
from auxhead.data import SegmentationData, segmentation_dataloaders
from auxhead.fastai import AuxHeads, export_learner, segmentation_metrics

matplotlib.use("Agg")

K, VOID, SIZE = 3, 3, 32
TAPS = {"layers.0.6": "fcn", "layers.5": "conv1x1"}  # encoder's layer3; a decoder block


@pytest.fixture(scope="module")
def dls():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, K + 1, (12, SIZE, SIZE), generator=g)  # void (3) among the labels
    data = SegmentationData("tiny", ["a", "b", "c"], VOID, x[:8], y[:8], x[8:], y[8:])
    return segmentation_dataloaders(data, bs=4, seed=0, device="cpu")


def learner(dls, **heads_kwargs):
    learn = unet_learner(
        dls, resnet18, pretrained=False, n_out=K, metrics=segmentation_metrics(K, ignore_index=VOID)
    )
    learn.add_cb(AuxHeads(TAPS, resize="logits", **heads_kwargs))
    return learn


@pytest.fixture(scope="module")
def trained(dls):
    """One U-Net with an FCN head and a decoder head, fitted for one epoch (shared: the tests
    below only read it, but for the export test's extra fit at the end)."""
    learn = learner(dls)
    learn.fit(1, 1e-3)
    return learn


def valid_batches(dls):
    return [(x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)) for x, y in dls.valid]


def test_dense_head_columns_are_pixel_accuracy_and_scores_match_torchmetrics(dls, trained):
    learn = trained
    names = [m.name for m in learn.metrics]
    for column in ("miou", "pixel_accuracy", "mean_dice", "acc_layers_0_6", "loss_layers_5"):
        assert column in names
    row = dict(zip(["valid_loss", *names], learn.validate(), strict=True))
    # the same columns by hand: each head's logits upsampled to the labels, void left out
    aux_model = learn.model
    aux_model.eval()
    correct = {tap: 0 for tap in TAPS}
    labelled, outputs, targets = 0, [], []
    with torch.no_grad(), aux_model.heads_enabled():
        for x, y in valid_batches(dls):
            outputs.append(aux_model(x))
            targets.append(y)
            keep = y != VOID
            labelled += int(keep.sum())
            for tap, logits in aux_model.aux_outputs.items():
                correct[tap] += int((at_label_size(logits, y).argmax(1) == y)[keep].sum())
    aux_model.clear_aux()
    for tap in TAPS:
        column = "acc_" + tap.replace(".", "_")
        assert row[column] == pytest.approx(correct[tap] / labelled, abs=1e-6)
    scores = segmentation_scores(torch.cat(outputs), torch.cat(targets), K, ignore_index=VOID)
    assert row["miou"] == pytest.approx(scores.miou, abs=1e-6)
    assert row["pixel_accuracy"] == pytest.approx(scores.pixel_accuracy, abs=1e-6)
    assert row["mean_dice"] == pytest.approx(scores.mean_dice, abs=1e-6)


def test_get_preds_and_show_results_are_the_bare_models(dls, trained):
    learn = trained
    preds, targets = learn.get_preds()
    bare = learn.model.model.eval()
    with torch.no_grad(), learn.model.hooks_removed():
        expected = torch.cat([bare(x) for x, _ in valid_batches(dls)])
    assert preds.shape == (4, K, SIZE, SIZE)
    torch.testing.assert_close(preds, torch.softmax(expected, dim=1))
    assert targets.shape == (4, SIZE, SIZE)
    learn.show_results(max_n=2)  # fastai draws the masks over the images, as without heads
    assert learn.model.aux_outputs == {}


def test_nnunet_style_heads_train_with_targets_downsampled(dls):
    learn = unet_learner(dls, resnet18, pretrained=False, n_out=K)
    heads = AuxHeads(["layers.5", "layers.6"], head="conv1x1", resize="targets", weights=0.5)
    learn.add_cb(heads)
    learn.fit(1, 1e-3)
    assert heads.aux_model.head_shapes["layers.5"][2:] == (SIZE // 8, SIZE // 8)
    assert all(p.grad is not None for p in heads.aux_model.heads.parameters())


@pytest.mark.slow  # a subprocess: a Python without auxhead
def test_export_loads_without_auxhead_and_predicts_the_same(dls, trained, tmp_path):
    learn = trained
    path = export_learner(learn, tmp_path / "export.pkl")
    x = valid_batches(dls)[0][0]
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = learn.model.eval()(x).as_subclass(torch.Tensor)
    torch.save(expected, tmp_path / "expected.pt")
    own_hooks = hook_count(learn.model.model) - len(TAPS)  # DynamicUnet's skip connections
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["auxhead"] = None  # any import of auxhead now fails
        import torch
        # fastai's vision import, as fastai's own U-Net exports need (its augment patches)
        from fastai.vision.all import load_learner
        learn = load_learner({str(path)!r})
        assert type(learn.model).__name__ == "DynamicUnet", type(learn.model)
        hooks = sum(len(m._forward_hooks) for m in learn.model.modules())
        assert hooks == {own_hooks}, hooks
        with torch.no_grad():
            out = learn.model.eval()(torch.load({str(tmp_path / "x.pt")!r}))
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok", list(learn.dls.vocab))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok ['a', 'b', 'c']")
    assert isinstance(learn.model, AuxModel) and hook_count(learn.model.model) == own_hooks + 2
