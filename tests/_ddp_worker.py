"""One rank of the plain-PyTorch DDP check in tests/test_distributed.py (not a test module).

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py OUT_DIR

Trains the same `AuxModel` for `len(PLAN)` steps under `DistributedDataParallel` twice (default
settings, then `static_graph=True`), each rank on its half of every global batch, with the
heads switched off for one step and a scheduled weight of 0 for another. Each config writes
`OUT_DIR/<config>_rank<r>.pt`: the mean loss over ranks per step and the final state_dict.

Last, the "naive" config trains with a hand-written loss that skips the heads when they did
not run, and records the error DDP raises on the step after: the failure that `AuxLoss`
prevents. The test computes the single-process reference with `reference_run`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import auxhead
from auxhead.distributed import check_ddp

# One entry per step: (heads_on, progress). set_heads(False) mid-run, then a step whose
# linear_decay weight is 0 (progress 1), then both back to normal.
PLAN = [(None, 0.0), (False, 0.25), (None, 1.0), (None, 0.5)]
GLOBAL_BATCH = 8
CONFIGS = {"default": {}, "static_graph": {"static_graph": True}}
NUM_CLASSES = 5


def build() -> tuple[auxhead.AuxModel, auxhead.AuxLoss]:
    """The same model, heads and loss on every rank (no BatchNorm, no dropout, so a sharded
    batch gives the gradients of the whole batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),  # 1: (B, 8, 8, 8)
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),  # 3: (B, 8, 4, 4)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )
    aux_model = auxhead.attach(model, ["1", "3"], head="linear", sample=torch.randn(2, 3, 8, 8))
    loss_func = auxhead.AuxLoss(
        nn.CrossEntropyLoss(), aux_model, weights=0.3, schedule="linear_decay"
    )
    return aux_model, loss_func


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator),
            torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=generator),
        )
        for _ in PLAN
    ]


def naive_loss(aux_model: auxhead.AuxModel, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What a hand-written loop does: add a term for each head that ran."""
    loss = nn.functional.cross_entropy(pred, y)
    for logits in aux_model.aux_outputs.values():
        loss = loss + 0.3 * nn.functional.cross_entropy(logits, y)
    return loss


def train(
    forward: nn.Module,
    aux_model: auxhead.AuxModel,
    loss_func: auxhead.AuxLoss,
    shard: slice,
    naive: bool = False,
) -> list[torch.Tensor]:
    """Run PLAN with `forward` (the DDP wrapper, or the AuxModel itself); the local losses."""
    optimizer = torch.optim.SGD(forward.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for (heads_on, progress), (x, y) in zip(PLAN, global_batches(), strict=True):
        aux_model.set_heads(heads_on)
        loss_func.progress = progress
        pred = forward(x[shard])
        loss = naive_loss(aux_model, pred, y[shard]) if naive else loss_func(pred, y[shard])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def reference_run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The same steps in one process on the whole global batches."""
    aux_model, loss_func = build()
    losses = train(aux_model, aux_model, loss_func, slice(None))
    return losses, aux_model.state_dict()


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = GLOBAL_BATCH // world
    shard = slice(rank * per_rank, (rank + 1) * per_rank)
    for config, ddp_kwargs in CONFIGS.items():
        aux_model, loss_func = build()
        ddp = nn.parallel.DistributedDataParallel(aux_model, **ddp_kwargs)
        check_ddp(ddp)
        losses = torch.stack(train(ddp, aux_model, loss_func, shard))
        dist.all_reduce(losses)
        result = {"losses": losses / world, "state": aux_model.state_dict()}
        torch.save(result, out_dir / f"{config}_rank{rank}.pt")

    aux_model, loss_func = build()
    ddp = nn.parallel.DistributedDataParallel(aux_model)
    try:
        train(ddp, aux_model, loss_func, shard, naive=True)
        error = ""
    except RuntimeError as caught:
        error = str(caught)
    (out_dir / f"naive_rank{rank}.txt").write_text(error)
    dist.destroy_process_group()
    # Skip the interpreter's teardown, which can abort with torch's C++ threads still running
    # (see _fastai_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
