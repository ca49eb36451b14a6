"""Deep supervision under DistributedDataParallel: a head weighted 0 (nnU-Net's coarsest)
still joins the graph, so the default `find_unused_parameters=False` trains; two CPU processes
over gloo, checked against the same steps in one process on the whole global batch."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import SHARDED, _assert_same_across_ranks, _free_port, _launch

TESTS = Path(__file__).parent

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


@pytest.mark.slow  # two torchrun processes
def test_nnunet_weights_with_a_zero_weight_head_train_under_ddp(tmp_path):
    import _ddp_dense_worker as worker

    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    _launch([*command, str(TESTS / "_ddp_dense_worker.py"), str(tmp_path)], tmp_path, port)

    ref_losses, ref_state = worker.reference_run()
    results = [torch.load(tmp_path / f"dense_rank{r}.pt") for r in range(2)]
    _assert_same_across_ranks([result["state"] for result in results])
    torch.testing.assert_close(results[0]["losses"], torch.stack(ref_losses), **SHARDED)
    torch.testing.assert_close(results[0]["state"], ref_state, **SHARDED)
    # The zero-weight head never moved: a zero gradient every step, on every rank.
    aux_model, _ = worker.build()
    initial = aux_model.state_dict()
    for key in ("heads.down2.conv.weight", "heads.down2.conv.bias"):
        assert torch.equal(results[0]["state"][key], initial[key])
    assert not torch.equal(
        results[0]["state"]["heads.down1.conv.weight"], initial["heads.down1.conv.weight"]
    )
