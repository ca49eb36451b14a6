"""No leaks: training with heads keeps resident memory flat, and head outputs (with their
graphs) do not outlive their step."""

import gc
import multiprocessing
import os
import weakref

import pytest
import torch
from torch import nn

import auxhead

STEPS, WARMUP = 2000, 200
ALLOWED_GROWTH = 4 * 2**20  # bytes of RSS over 1,800 steps; a retained graph costs ~60 KiB/step


pytestmark = pytest.mark.usefixtures("one_thread")


needs_proc = pytest.mark.skipif(
    not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc"
)


def _rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),  # 1: (B, 128)
        nn.Linear(128, 128),
        nn.ReLU(),  # 3: (B, 128)
        nn.Linear(128, 5),
    )
    x = torch.randn(32, 64)
    y = torch.randint(0, 5, (32,))
    aux_model = auxhead.attach(model, ["1", "3"], head="linear", sample=x[:2])
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model, schedule="linear_decay")
    optimizer = torch.optim.SGD(aux_model.parameters(), lr=1e-3)
    return aux_model, loss_func, optimizer, x, y


def _growth(steps: int, keep: list | None = None) -> int:
    """RSS growth from step WARMUP to `steps` of plain training with heads. With `keep`, each
    step's head outputs are kept with their graph: the leak the test must be able to see."""
    aux_model, loss_func, optimizer, x, y = _setup()
    start = 0
    for step in range(steps):
        if step == WARMUP:
            gc.collect()
            start = _rss()
        if step == steps // 2:
            aux_model.set_heads(False)  # some steps with the heads off: the zero term
        elif step == steps // 2 + 10:
            aux_model.set_heads(None)
        loss_func.progress = step / steps
        loss = loss_func(aux_model(x), y)
        optimizer.zero_grad()
        loss.backward(retain_graph=keep is not None)
        optimizer.step()
        if keep is not None:
            keep.append(aux_model.aux_outputs)
    gc.collect()
    return _rss() - start


def _growth_in_fresh_process(steps: int, keep: bool) -> int:
    """`_growth` in a new process: freed memory that earlier tests left in this process's
    allocator would otherwise hide a leak from RSS."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_growth_with_threads, (steps, keep))


def _growth_with_threads(steps: int, keep: bool) -> int:
    torch.set_num_threads(1)
    return _growth(steps, [] if keep else None)


@pytest.mark.slow  # RSS depends on the allocator
@needs_proc
def test_2000_steps_with_heads_keep_memory_flat():
    growth = _growth_in_fresh_process(STEPS, keep=False)
    assert growth < ALLOWED_GROWTH, f"RSS grew {growth / 2**20:.1f} MiB over {STEPS} steps"


@pytest.mark.slow  # RSS depends on the allocator
@needs_proc
def test_the_memory_check_sees_a_retained_graph():
    growth = _growth_in_fresh_process(WARMUP + 400, keep=True)
    assert growth > ALLOWED_GROWTH, f"RSS grew only {growth / 2**20:.1f} MiB"


def test_aux_outputs_do_not_outlive_the_next_forward():
    aux_model, loss_func, _, x, y = _setup()
    loss = loss_func(aux_model(x), y)
    loss.backward()
    first = weakref.ref(aux_model.aux_outputs["1"])
    del loss
    assert first() is not None  # still there to read after the step
    aux_model(x)
    assert first() is None  # the next forward dropped it
    second = weakref.ref(aux_model.aux_outputs["1"])
    aux_model.clear_aux()
    assert second() is None
    with torch.no_grad():  # a forward with the heads off leaves nothing behind either
        aux_model(x)
        third = weakref.ref(aux_model.aux_outputs["1"])
        aux_model.set_heads(False)
        aux_model(x)
    assert third() is None and aux_model.aux_outputs == {}


def test_backward_frees_the_heads_graph():
    aux_model, loss_func, _, x, y = _setup()
    saved = []  # what the head's Linear keeps for backward: its input
    aux_model.head("3").fc.register_forward_pre_hook(
        lambda _module, args: saved.append(weakref.ref(args[0]))
    )
    loss = loss_func(aux_model(x), y)
    assert saved[0]() is not None  # held by the graph, through aux_outputs
    loss.backward()
    assert saved[0]() is None  # backward freed it, though aux_outputs still holds the logits
    assert aux_model.aux_outputs["3"].shape == (32, 5)


pytest.importorskip("fastai")

from fastai.callback.core import Callback  # noqa: E402
from fastai.learner import Learner  # noqa: E402
from fastai.losses import CrossEntropyLossFlat  # noqa: E402

from auxhead.data import dataloaders, load_data  # noqa: E402
from auxhead.fastai import AuxHeads  # noqa: E402


class WatchAux(Callback):
    order = 0  # after AuxHeads' after_pred

    def __init__(self) -> None:
        self.refs: list[weakref.ref] = []

    def after_pred(self) -> None:
        aux = self.learn.aux_heads.batch_aux
        self.refs += [weakref.ref(logits) for logits in aux.values()]


def test_fastai_fit_keeps_no_head_outputs():
    data = load_data("digits", seed=0).subset(128, 64, seed=0)
    dls = dataloaders(data, bs=32, seed=0, device="cpu")
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),  # 1
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    watch = WatchAux()
    learn = Learner(
        dls, model, loss_func=CrossEntropyLossFlat(), cbs=[AuxHeads(["1"], head="linear"), watch]
    )
    learn.fit(2, 1e-3)
    assert len(watch.refs) == 2 * (4 + 2)  # every train and valid batch ran the head
    gc.collect()
    alive = [ref for ref in watch.refs if ref() is not None]
    assert not alive, f"{len(alive)} head outputs outlived the fit"
