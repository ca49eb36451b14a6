"""Distributed training with heads: two CPU processes over gloo, launched as a user would
(torchrun for plain DDP, `accelerate launch` for fastai's `distrib_ctx`), checked against the
same steps in one process on the whole global batch."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import auxhead
from auxhead.distributed import check_ddp

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# Two ranks on half batches against one process on the whole batch: the same arithmetic
# summed in another order and by other kernels (the workers run one thread, this process may
# run more), so the results agree to float32 rounding, not bit for bit.
SHARDED = {"rtol": 1e-5, "atol": 1e-6}

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: list[str], tmp_path: Path, port: int) -> None:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config file
    }
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _assert_same_across_ranks(states: list[dict[str, torch.Tensor]]) -> None:
    for name, value in states[0].items():
        for state in states[1:]:
            assert torch.equal(state[name], value), f"{name} differs between ranks"


@pytest.mark.slow  # two torchrun processes
def test_torchrun_ddp_matches_one_process(tmp_path):
    import _ddp_worker as worker

    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    _launch([*command, str(TESTS / "_ddp_worker.py"), str(tmp_path)], tmp_path, port)

    ref_losses, ref_state = worker.reference_run()
    assert any(key.startswith("heads.") for key in ref_state)
    for config in worker.CONFIGS:
        results = [torch.load(tmp_path / f"{config}_rank{r}.pt") for r in range(2)]
        _assert_same_across_ranks([result["state"] for result in results])
        torch.testing.assert_close(results[0]["losses"], torch.stack(ref_losses), **SHARDED)
        torch.testing.assert_close(results[0]["state"], ref_state, **SHARDED)
    # Without AuxLoss's zero term, the step after the heads were off fails: the check above
    # would fail the same way if AuxLoss stopped giving the heads a gradient.
    for rank in range(2):
        error = (tmp_path / f"naive_rank{rank}.txt").read_text()
        assert "parameters that were not used in producing loss" in error


@pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("fastai") is None,
    reason="needs accelerate and fastai",
)
@pytest.mark.slow  # two accelerate processes
def test_accelerate_fastai_distrib_ctx_matches_one_process(tmp_path):
    import _fastai_worker as worker

    port = _free_port()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    command += ["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port)]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    _launch([*command, str(TESTS / "_fastai_worker.py"), str(tmp_path)], tmp_path, port)

    ref_losses, ref_state = worker.reference_run()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0]["model_types"] == ["DistributedDataParallel"]
    _assert_same_across_ranks([result["state"] for result in results])
    mean_losses = torch.tensor([results[0]["losses"], results[1]["losses"]]).mean(dim=0)
    torch.testing.assert_close(mean_losses, torch.tensor(ref_losses), **SHARDED)
    torch.testing.assert_close(results[0]["state"], ref_state, **SHARDED)


@pytest.fixture
def one_process_group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_check_ddp_rejects_find_unused_parameters(one_process_group, cnn, x):
    aux_model = auxhead.attach(cnn, ["1", "3"], head="linear", sample=x)
    check_ddp(nn.parallel.DistributedDataParallel(aux_model))
    check_ddp(nn.parallel.DistributedDataParallel(aux_model, static_graph=True))
    check_ddp(nn.parallel.DistributedDataParallel(cnn, find_unused_parameters=True))
    check_ddp(aux_model)
    unused = nn.parallel.DistributedDataParallel(aux_model, find_unused_parameters=True)
    with pytest.raises(ValueError, match=r"find_unused_parameters=True\) cannot see"):
        check_ddp(unused)


def test_heads_off_in_training_still_give_every_head_a_gradient(cnn, x):
    aux_model = auxhead.attach(cnn, ["1", "3"], head="linear", sample=x)
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model)
    y = torch.tensor([0, 1, 2, 3])
    aux_model.set_heads(False)
    out = aux_model(x)
    loss = loss_func(out, y)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(out, y))
    loss.backward()
    for name, param in aux_model.heads.named_parameters():
        assert param.grad is not None, name
        assert not param.grad.any(), name
    aux_model.eval()  # no aux term at all in eval mode
    assert loss_func.aux_term(aux_model(x), y) is None


def test_a_tap_that_did_not_run_still_gives_its_head_a_gradient(x):
    class SometimesDeeper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.extra = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 5)
            self.skip_extra = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            if not self.skip_extra:
                x = self.extra(x)
            return self.fc(x.mean(dim=(2, 3)))

    model = SometimesDeeper()
    aux_model = auxhead.attach(model, ["stem", "extra"], head="linear", sample=x)
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model)
    model.skip_extra = True
    loss_func(aux_model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert list(aux_model.aux_outputs) == ["stem"]
    assert aux_model.head("stem").fc.weight.grad.any()
    assert not aux_model.head("extra").fc.weight.grad.any()
