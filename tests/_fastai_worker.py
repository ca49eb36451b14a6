"""One rank of the fastai `distrib_ctx` check in tests/test_distributed.py (not a test module).

    accelerate launch --multi_gpu --num_processes 2 tests/_fastai_worker.py OUT_DIR

(`--multi_gpu` picks accelerate's torchrun launcher; on a machine without GPUs the processes
train on the CPU over gloo.) Fits a Learner with `AuxHeads` for one epoch inside
`learn.distrib_ctx()`, switching the heads off for the middle step, and writes
`OUT_DIR/rank<r>.pt`: this rank's loss per step and the final state_dict. The test runs the
same steps in one process with `reference_run`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import digits_cnn
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import SGD

from auxhead.data import ImageData, dataloaders, load_data
from auxhead.fastai import AuxHeads

PER_RANK_BS = 16
STEPS = 3
WORLD = 2


def data() -> ImageData:
    """Digits in a fixed order (the loaders do not shuffle), so the batches are known."""
    return load_data("digits", seed=0).subset(WORLD * PER_RANK_BS * STEPS, 32, seed=0)


def global_order(n: int) -> torch.Tensor:
    """The sample indices of each global batch, batch after batch: `DistributedDL` gives rank r
    the r-th contiguous share of the (unshuffled) indices and cuts that into batches."""
    shares = torch.arange(n).view(WORLD, STEPS, PER_RANK_BS)  # (rank, step, sample)
    return shares.transpose(0, 1).reshape(-1)  # step 0 of every rank, then step 1, ...


class HeadsOffMidEpoch(Callback):
    """Switches the heads off for the second training step only (after AuxHeads' before_batch
    has run), and records each step's loss and the model's type in training."""

    order = 0

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.model_types: set[str] = set()

    def before_batch(self) -> None:
        if self.training:
            self.learn.aux_heads.aux_model.set_heads(False if self.iter == 1 else None)
            self.model_types.add(type(self.learn.model).__name__)

    def after_batch(self) -> None:
        if self.training:
            self.losses.append(self.learn.loss.item())


def learner(image_data: ImageData, bs: int) -> Learner:
    torch.manual_seed(0)
    model = digits_cnn()
    dls = dataloaders(image_data, bs=bs, device="cpu", shuffle_train=False)
    return Learner(
        dls,
        model,
        loss_func=CrossEntropyLossFlat(),
        opt_func=SGD,
        cbs=[AuxHeads(["1", "3"], head="linear", schedule="linear_decay"), HeadsOffMidEpoch()],
    )


def reference_run() -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same epoch in one process, on batches of both ranks' samples."""
    image_data = data()
    order = global_order(len(image_data.train_y))
    image_data.train_x = image_data.train_x[order]
    image_data.train_y = image_data.train_y[order]
    learn = learner(image_data, WORLD * PER_RANK_BS)
    learn.fit(1, 0.1)
    return learn.heads_off_mid_epoch.losses, learn.model.state_dict()


def _broadcast_on_cpu(self: DistributedDL, t: list[int], rank: int) -> list[int]:
    # fastai's DistributedDL sends the shuffled indices over CUDA (NCCL); gloo needs CPU tensors.
    t = torch.tensor(t, dtype=torch.long)
    dist.broadcast(t, rank)
    return t.tolist()


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    DistributedDL._broadcast = _broadcast_on_cpu
    learn = learner(data(), PER_RANK_BS)
    with learn.distrib_ctx(sync_bn=False, cpu=True):
        learn.fit(1, 0.1)
    assert dist.get_world_size() == WORLD, dist.get_world_size()
    result = {
        "losses": learn.heads_off_mid_epoch.losses,
        "model_types": sorted(learn.heads_off_mid_epoch.model_types),
        "state": learn.model.state_dict(),
    }
    torch.save(result, out_dir / f"rank{dist.get_rank()}.pt")
    # Leave together, close the group, and skip the interpreter's teardown: a rank that tears
    # down with torch's C++ threads still running can abort at exit ("terminate called without
    # an active exception", SIGABRT) after its results are written, failing the launch.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
