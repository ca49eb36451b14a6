"""One rank of the dense-heads DDP check in tests/test_dense_ddp.py (not a test module).

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_dense_worker.py OUT_DIR

Trains a small segmenter with nnU-Net-style deep supervision (1x1 heads at 1/2 and 1/4,
`weights="nnunet"`, so the 1/4 head weighs 0, targets downsampled to each head) under
`DistributedDataParallel` with its default `find_unused_parameters=False`, each rank on its
half of every global batch. Writes `OUT_DIR/dense_rank<r>.pt`: the mean loss over ranks per
step and the final state_dict. The test computes the single-process reference with
`reference_run`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import auxhead
from auxhead.distributed import check_ddp

STEPS = 3
GLOBAL_BATCH = 4
NUM_CLASSES = 3
IGNORE = 255


class Segmenter(nn.Module):
    """No BatchNorm, no dropout: a sharded batch gives the gradients of the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(8, NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.down2(self.down1(self.stem(x))))  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build() -> tuple[auxhead.AuxModel, auxhead.AuxLoss]:
    torch.manual_seed(0)
    model = Segmenter()
    sample = torch.randn(2, 3, 16, 16)
    aux_model = auxhead.attach(model, ["down1", "down2"], head="conv1x1", sample=sample)
    ce = nn.CrossEntropyLoss(ignore_index=IGNORE)
    loss_func = auxhead.AuxLoss(ce, aux_model, weights="nnunet", resize="targets")
    assert loss_func.weights["down2"] == 0.0
    return aux_model, loss_func


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator)
        y = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH, 16, 16), generator=generator)
        # The same void pixels in every sample: each rank's mean over its kept pixels then
        # averages to the whole batch's.
        y[:, :3] = IGNORE
        batches.append((x, y))
    return batches


def train(forward: nn.Module, loss_func: auxhead.AuxLoss, shard: slice) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(forward.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in global_batches():
        loss = loss_func(forward(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def reference_run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    aux_model, loss_func = build()
    losses = train(aux_model, loss_func, slice(None))
    return losses, aux_model.state_dict()


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    aux_model, loss_func = build()
    ddp = nn.parallel.DistributedDataParallel(aux_model)  # find_unused_parameters=False
    check_ddp(ddp)
    losses = torch.stack(train(ddp, loss_func, shard))
    dist.all_reduce(losses)
    result = {"losses": losses / world, "state": aux_model.state_dict()}
    torch.save(result, out_dir / f"dense_rank{rank}.pt")
    dist.destroy_process_group()
    # Skip the interpreter's teardown (see _ddp_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
