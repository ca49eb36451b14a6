"""segmentation_dataloaders: batches typed as fastai's SegmentationDataLoaders types them, the
default loss ignoring void, and fastai's Learner machinery (get_preds, show_results, predict,
export) on them. A 3x3-conv model keeps it fast; unet_learner runs in the slow set."""

from __future__ import annotations

import pickle

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auxhead.data import (
    CAMVID_TINY,
    SegmentationData,
    dataloaders,
    load_data,
    load_segmentation,
    segmentation_dataloaders,
)

pytest.importorskip("fastai")
matplotlib.use("Agg")

import fastai.callback.progress  # noqa: F401  (Learner.no_bar)
from fastai.learner import Learner, load_learner
from fastai.torch_core import TensorCategory, TensorImage, TensorMask


@pytest.fixture(scope="module")
def camvid() -> SegmentationData:
    return load_segmentation(CAMVID_TINY, size=(24, 32))


def _model(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, c, 3, padding=1)


def test_batches_are_typed_as_fastai_segmentation(camvid):
    dls = segmentation_dataloaders(camvid, bs=4, device="cpu")
    x, y = dls.one_batch()
    assert type(x) is TensorImage and x.dtype == torch.float32 and x.shape == (4, 3, 24, 32)
    assert type(y) is TensorMask and y.dtype == torch.int64 and y.shape == (4, 24, 32)
    assert dls.c == 11 and list(dls.vocab) == camvid.codes
    assert len(dls.loaders) == 3 and dls[2].n == 4  # the test split
    xv, yv = dls.valid.one_batch()
    torch.testing.assert_close(xv.as_subclass(torch.Tensor), camvid.valid_x, rtol=0, atol=0)
    assert torch.equal(yv.as_subclass(torch.Tensor), camvid.valid_y)
    decoded = dls.decode_batch((x, y), max_n=1)[0][1]
    assert decoded.codes == camvid.codes  # what TensorMask.show colours by


def test_no_test_loader_without_a_test_split(camvid):
    data = SegmentationData(
        "x", camvid.codes, None, camvid.train_x, camvid.train_y, camvid.valid_x, camvid.valid_y
    )
    dls = segmentation_dataloaders(data, bs=4, device="cpu")
    assert len(dls.loaders) == 2


def test_the_same_seed_gives_the_same_batches(camvid):
    def first(seed):
        return segmentation_dataloaders(camvid, bs=4, seed=seed, device="cpu").one_batch()[1]

    assert torch.equal(first(1), first(1))
    ordered = segmentation_dataloaders(camvid, bs=4, shuffle_train=False, device="cpu")
    assert torch.equal(ordered.train.one_batch()[1].as_subclass(torch.Tensor), camvid.train_y[:4])


def test_default_loss_ignores_void(camvid):
    dls = segmentation_dataloaders(camvid, bs=4, device="cpu")
    learn = Learner(dls, _model(dls.c))  # no loss_func: the data's
    x, y = dls.valid.one_batch()
    logits = learn.model(x)
    got = learn.loss_func(logits, y)
    # Reference: the mean over the pixels that are not void, by hand.
    plain_logits, plain_y = logits.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
    keep = plain_y != camvid.void
    assert 0 < int(keep.sum()) < keep.numel()  # the frames do have void pixels
    log_p = F.log_softmax(plain_logits, dim=1).permute(0, 2, 3, 1)[keep]
    want = -log_p.gather(1, plain_y[keep][:, None]).mean()
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:load_learner:UserWarning")  # the file is ours
def test_learner_fits_predicts_shows_and_exports(camvid, tmp_path):
    import matplotlib.pyplot as plt
    from fastai.vision.learner import show_results  # noqa: F401  (registers it for masks)

    dls = segmentation_dataloaders(camvid, bs=4, device="cpu")
    learn = Learner(dls, _model(dls.c), lr=1e-2)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
        preds, targets = learn.get_preds()
        test_preds, test_targets = learn.get_preds(ds_idx=2)
    assert preds.shape == (4, 11, 24, 32) and targets.shape == (4, 24, 32)
    assert torch.equal(targets.as_subclass(torch.Tensor), camvid.valid_y)
    assert test_preds.shape == (4, 11, 24, 32)
    assert torch.equal(test_targets.as_subclass(torch.Tensor), camvid.test_y)
    dls.show_batch(max_n=2)
    with learn.no_bar():
        learn.show_results(max_n=2)
    plt.close("all")
    with learn.no_bar():
        mask, _, probs = learn.predict(camvid.valid_x[0])
    assert mask.shape == (24, 32) and probs.shape == (11, 24, 32)
    learn.export(tmp_path / "learner.pkl")
    raw = (tmp_path / "learner.pkl").read_bytes()
    assert b"auxhead" not in raw  # loads with plain fastai
    loaded = load_learner(tmp_path / "learner.pkl")
    assert loaded.loss_func.func.ignore_index == camvid.void
    assert pickle.loads(pickle.dumps(loaded.dls.vocab)) == camvid.codes


def test_classification_loaders_still_yield_categories():
    dls = dataloaders(load_data("digits").subset(64, 32), bs=16, device="cpu")
    _x, y = dls.one_batch()
    assert type(y) is TensorCategory and y.shape == (16,)


def test_bad_batch_size(camvid):
    with pytest.raises(ValueError, match="bs must be an integer >= 1, got 0"):
        segmentation_dataloaders(camvid, bs=0)


@pytest.mark.slow
def test_unet_learner_trains_on_the_shipped_frames(camvid):
    from fastai.vision.learner import unet_learner
    from torchvision.models import resnet18

    dls = segmentation_dataloaders(load_segmentation(CAMVID_TINY, size=64), bs=4, device="cpu")
    learn = unet_learner(dls, resnet18, pretrained=False)
    assert learn.loss_func.func.ignore_index == 11
    with learn.no_bar(), learn.no_logging():
        learn.fit(1)
        preds, targets = learn.get_preds()
    assert preds.shape == (4, 11, 64, 64) and targets.shape == (4, 64, 64)
