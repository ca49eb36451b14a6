"""Exact resume: a run stopped mid-training and resumed from its checkpoint ends with the same
weights, heads included, as the run that was never stopped (CPU, same seed)."""

import random

import numpy as np
import pytest
import torch
from conftest import tiny_cnn
from torch import nn

import auxhead

N, BS, EPOCHS = 48, 8, 3
STEPS_PER_EPOCH = N // BS
TOTAL = EPOCHS * STEPS_PER_EPOCH
STOP_AT = STEPS_PER_EPOCH + 2  # in the middle of the second epoch


pytestmark = pytest.mark.usefixtures("one_thread")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    x = torch.randn(N, 3, 16, 16, generator=generator)
    return x, torch.randint(0, 5, (N,), generator=generator)


def _train(stop_at: int | None = None, resume: dict | None = None, restore_rng: bool = True):
    """A plain PyTorch loop: inception heads (BatchNorm, dropout) with a decaying weight, Adam
    and a one-cycle schedule, shuffled batches. Returns the final state, or the checkpoint
    taken after `stop_at` steps."""
    torch.manual_seed(0 if resume is None else 99)  # a resumed run starts from other weights
    model = tiny_cnn()
    x, y = _data()
    aux_model = auxhead.attach(model, ["1", "3"], sample=x[:2])
    loss_func = auxhead.AuxLoss(
        nn.CrossEntropyLoss(), aux_model, weights=0.3, schedule="linear_decay"
    )
    optimizer = torch.optim.Adam(aux_model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=TOTAL)
    shuffle = torch.Generator().manual_seed(0)
    step = 0
    if resume is not None:
        aux_model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        step = resume["step"]
        shuffle.set_state(resume["shuffle_at_epoch_start"])
        if restore_rng:
            torch.set_rng_state(resume["torch_rng"])
    aux_model.train()
    for epoch in range(step // STEPS_PER_EPOCH, EPOCHS):
        epoch_start = shuffle.get_state()
        order = torch.randperm(N, generator=shuffle)
        for i in range(step - epoch * STEPS_PER_EPOCH, STEPS_PER_EPOCH):
            batch = order[i * BS : (i + 1) * BS]
            loss_func.progress = step / TOTAL  # the schedule's position is the step count
            loss = loss_func(aux_model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == stop_at:
                return {
                    "model": aux_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "shuffle_at_epoch_start": epoch_start,
                    "torch_rng": torch.get_rng_state(),
                }
    return aux_model.state_dict()


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_plain_loop_resumes_exactly(tmp_path):
    uninterrupted = _train()
    torch.save(_train(stop_at=STOP_AT), tmp_path / "checkpoint.pt")
    torch.manual_seed(1234)  # the new process's RNG is anywhere
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    resumed = _train(resume=checkpoint)
    assert any(name.startswith("heads.") for name in resumed)
    _assert_equal_states(resumed, uninterrupted)
    # The check is sharp: without the RNG state the heads' dropout masks differ.
    drifted = _train(resume=checkpoint, restore_rng=False)
    assert not all(torch.equal(drifted[name], uninterrupted[name]) for name in uninterrupted)


# fastai: stop after an epoch of fit_one_cycle, resume with `start_epoch` -------------------------

pytest.importorskip("fastai")

import fastai.callback.schedule  # noqa: E402, F401  (patches fit_one_cycle onto Learner)
from fastai.callback.core import Callback, CancelFitException  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402

from auxhead.data import dataloaders, load_data  # noqa: E402
from auxhead.fastai import AuxHeads  # noqa: E402

FASTAI_EPOCHS, FASTAI_STOP = 3, 1  # stop after the second epoch of three


def _rng_state(learn: Learner) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "loaders": [dl.rng.getstate() for dl in learn.dls.loaders],  # shuffle order
    }


def _set_rng_state(learn: Learner, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    for dl, dl_state in zip(learn.dls.loaders, state["loaders"], strict=True):
        dl.rng.setstate(dl_state)


class CheckpointAndStop(Callback):
    """Save model (with heads), optimizer and RNG after epoch `epoch`, then stop the fit as a
    crash would."""

    order = 100  # after the Recorder and AuxHeads are done with the epoch

    def __init__(self, epoch: int) -> None:
        self.stop_after = epoch

    def after_epoch(self) -> None:
        if self.epoch == self.stop_after:
            self.learn.save("checkpoint", with_opt=True)
            torch.save(_rng_state(self.learn), self.learn.path / "rng.pt")
            raise CancelFitException


def _learner(tmp_path, seed: int = 0) -> Learner:
    torch.manual_seed(seed)
    data = load_data("digits", seed=0).subset(192, 64, seed=0)
    dls = dataloaders(data, bs=48, seed=0, device="cpu")
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),  # 2: (B, 16, 8, 8)
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),  # 4: (B, 32, 4, 4)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    heads = AuxHeads(["2", "4"], schedule="linear_decay")  # inception heads: BN and dropout
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), path=tmp_path, cbs=heads)


def test_fastai_resumes_exactly_with_start_epoch(tmp_path):
    learn = _learner(tmp_path)
    learn.fit_one_cycle(FASTAI_EPOCHS, 1e-2)
    uninterrupted = learn.model.state_dict()

    stopped = _learner(tmp_path)
    stopped.fit_one_cycle(FASTAI_EPOCHS, 1e-2, cbs=CheckpointAndStop(FASTAI_STOP))
    assert stopped.recorder.values and len(stopped.recorder.values) == FASTAI_STOP + 1

    resumed = _learner(tmp_path, seed=99)
    resumed.load("checkpoint", with_opt=True)
    _set_rng_state(resumed, torch.load(tmp_path / "rng.pt", weights_only=False))
    resumed.fit_one_cycle(FASTAI_EPOCHS, 1e-2, start_epoch=FASTAI_STOP + 1)
    _assert_equal_states(resumed.model.state_dict(), uninterrupted)
