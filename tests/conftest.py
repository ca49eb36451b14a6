import random

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread: thousands of tiny steps on a busy 2-core machine spend ~15x the
    arithmetic on thread hand-offs with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cnn(num_classes: int = 5) -> nn.Sequential:
    """A 4-stage CNN for 16x16 inputs: taps "1" (8x8), "3" (4x4) and "5" (vector)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),  # 1: (B, 8, 8, 8)
        nn.Conv2d(8, 16, 3, padding=1),  # 2
        nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)),  # 3: (B, 16, 4, 4)
        nn.Flatten(),  # 4
        nn.Linear(16 * 16, 32),  # 5: (B, 32)
        nn.ReLU(),  # 6
        nn.Linear(32, num_classes),  # 7
    )


def digits_cnn() -> nn.Sequential:
    """A 2-conv CNN for 1x8x8 digits, 10 classes: taps "1" (B, 8, 8, 8) and "3" (B, 16, 4, 4)."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),  # 1: (B, 8, 8, 8)
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),  # 3: (B, 16, 4, 4)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def cnn() -> nn.Sequential:
    return tiny_cnn()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16)


def process_state() -> dict:
    """What a run may change process-wide and must put back."""
    return {
        "threads": torch.get_num_threads(),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["threads"] == before["threads"]
    assert after["cudnn"] == before["cudnn"]
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    assert after["python_rng"] == before["python_rng"]
    assert np.array_equal(after["numpy_rng"], before["numpy_rng"])


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test reaches the network: auxhead's "is the weights host up?" probe says no (a test
    that needs another answer sets its own)."""
    import auxhead._weights

    monkeypatch.setattr(auxhead._weights, "_reachable", lambda url: False)


def error_line(capsys, argv) -> str:
    """Run `auxhead argv` in process: it must exit 2, without a traceback, with exactly one
    error line; that line."""
    from auxhead.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]
