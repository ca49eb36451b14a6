"""Process-wide settings a run changes, changed for the run only: torch's thread count and the
random seeds (Python's, NumPy's, torch's on every device) with cuDNN's determinism flags.

The commands set them; `main` is also called in process (tests, notebooks), so each is a
context manager that puts back what it found.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["seeded", "torch_threads"]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count is `n` inside (left alone for None), as before after.

    Example:
        >>> with torch_threads(1):
        ...     train()  # steadier timings on a shared machine
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cuda_devices() -> list[int]:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(range(torch.cuda.device_count()))
    return []


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Inside, every random generator a run draws from is seeded with `seed` (Python's
    `random`, NumPy's global generator, torch's CPU and CUDA generators) and cuDNN picks
    deterministic kernels (`deterministic=True`, `benchmark=False`), as fastai's
    `set_seed(seed, reproducible=True)` does; afterwards the generators' states and the flags
    are what they were. Blocks nest (a second run in the same process re-seeds for itself).

    Example:
        >>> with seeded(0):
        ...     a = torch.rand(2)
        >>> with seeded(0):
        ...     torch.testing.assert_close(torch.rand(2), a)
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cudnn = torch.backends.cudnn
    flags = cudnn.deterministic, cudnn.benchmark
    with torch.random.fork_rng(devices=_cuda_devices()):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)  # and every CUDA device's generator
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            cudnn.deterministic, cudnn.benchmark = flags
