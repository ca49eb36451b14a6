"""Faults and churn: a failing batch leaves heads, hooks and learner usable; attaching and
stripping again and again leaves nothing behind."""

import gc
import weakref

import pytest
import torch
from conftest import digits_cnn, hook_count
from torch import nn

import auxhead

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_failing_forward_leaves_the_aux_model_usable(cnn, x):
    aux_model = auxhead.attach(cnn, ["1", "3"], head="linear", sample=x)
    bad = torch.randn(4, 5, 16, 16)  # wrong channels: the first conv raises
    with pytest.raises(RuntimeError, match="expected input.*to have 3 channels"):
        aux_model(bad)
    assert aux_model._pending is None  # the hooks are idle outside forward again
    assert hook_count(cnn) == 2
    aux_model(x)
    assert list(aux_model.aux_outputs) == ["1", "3"]


def test_a_failing_head_surfaces_and_the_next_forward_works(cnn, x):
    class Flaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 5)
            self.fail = False  # attach runs every head once: it must work then

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise ValueError("head input out of range")
            return self.fc(features.mean(dim=(2, 3)))

    head = Flaky()
    aux_model = auxhead.attach(cnn, {"1": head, "3": "linear"}, num_classes=5, sample=x)
    head.fail = True
    with pytest.raises(ValueError, match="head input out of range"):
        aux_model(x)
    head.fail = False
    torch.testing.assert_close(aux_model(x), cnn(x))
    assert list(aux_model.aux_outputs) == ["1", "3"] and hook_count(cnn) == 2


def test_a_failing_forward_releases_the_previous_outputs(cnn, x):
    aux_model = auxhead.attach(cnn, ["1", "3"], head="linear", sample=x)
    aux_model(x)
    previous = weakref.ref(aux_model.aux_outputs["1"])
    with pytest.raises(RuntimeError):
        aux_model(torch.randn(4, 5, 16, 16))
    assert previous() is None


def test_20_attach_strip_cycles_leave_the_model_as_it_was(cnn, x):
    y = torch.arange(4) % 5
    state = {name: value.clone() for name, value in cnn.state_dict().items()}
    parameters = [id(p) for p in cnn.parameters()]
    gone = []
    for _ in range(20):
        aux_model = auxhead.attach(cnn, ["1", "3"], sample=x)
        assert hook_count(cnn) == 2
        loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model)
        loss_func(aux_model(x), y).backward()
        assert aux_model.strip() is cnn
        assert hook_count(cnn) == 0
        assert [id(p) for p in cnn.parameters()] == parameters
        gone.append(weakref.ref(aux_model))
        del aux_model, loss_func
    gc.collect()
    assert not [ref for ref in gone if ref() is not None], "stripped AuxModels are still alive"
    assert cnn.state_dict().keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(cnn.state_dict()[name], value), name


pytest.importorskip("fastai")

from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402
from fastai.metrics import accuracy  # noqa: E402

from auxhead.data import dataloaders, load_data  # noqa: E402
from auxhead.fastai import AuxHeads, export_learner  # noqa: E402


@pytest.fixture
def dls():
    data = load_data("digits", seed=0).subset(128, 32, seed=0)
    return dataloaders(data, bs=32, seed=0, device="cpu")


def test_a_bad_batch_mid_epoch_surfaces_and_the_learner_fits_again(dls):
    torch.manual_seed(0)
    learn = Learner(
        dls,
        digits_cnn(),
        loss_func=CrossEntropyLossFlat(),
        metrics=accuracy,
        cbs=AuxHeads(["1", "3"], head="linear"),
    )
    aux_model = learn.aux_heads.aux_model
    good_batches = dls.train.create_batches

    def third_batch_is_corrupt(samples):
        for i, batch in enumerate(good_batches(samples)):
            if i == 2:
                raise OSError("image 70 is truncated (corrupt file?)")
            yield batch

    dls.train.create_batches = third_batch_is_corrupt  # this loader only
    with pytest.raises(OSError, match=r"image 70 is truncated \(corrupt file\?\)"):
        learn.fit(1, 1e-3)
    assert learn.model is aux_model and hook_count(aux_model.model) == 2

    del dls.train.create_batches  # the data is fixed
    learn.fit(1, 1e-3)
    assert learn.model is aux_model and hook_count(aux_model.model) == 2
    names = learn.recorder.metric_names
    assert names.count("acc_1") == 1 and names.count("acc_3") == 1
    assert all(v is not None for v in learn.recorder.values[-1])
    assert aux_model.aux_outputs == {} and learn.aux_heads.batch_aux == {}
    assert not aux_model.heads_active  # off outside fit, as after any fit


def test_20_add_fit_strip_cycles_of_the_callback(dls, tmp_path):
    torch.manual_seed(0)
    model = digits_cnn()
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, path=tmp_path)
    n_params = sum(p.numel() for p in model.parameters())
    for cycle in range(20):
        callback = AuxHeads(["1", "3"], head="linear")
        learn.add_cb(callback)
        learn.fit(1, 1e-3)
        if cycle % 5 == 0:
            export_learner(learn, "export.pkl")  # takes the hooks off and puts them back
            assert hook_count(model) == 2
        callback.strip()
        learn.remove_cb(callback)
        assert learn.model is model and hook_count(model) == 0
        assert sum(p.numel() for p in model.parameters()) == n_params
        assert [m.name for m in learn.metrics] == ["accuracy"]
        optimizer_params = [p for group in learn.opt.param_lists for p in group]
        assert sum(p.numel() for p in optimizer_params) == n_params
