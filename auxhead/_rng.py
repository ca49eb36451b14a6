"""A private random stream for each head, so that heads never change the random numbers the
model draws.

A head's dropout draws from torch's default generator, the one the model's own dropout and
stochastic depth use. Had it drawn from it directly, every mask after the tap would change
with the heads on, and a run with heads would not be comparable with one without at the same
seed. Inside `with stream:` the default generator of the device in use continues the head's
stream instead; the global stream is put back, untouched, when the block ends.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

__all__ = ["RngStream", "generator_state", "stream_seed"]


def stream_seed(name: str) -> int:
    """The seed of the stream of the head at tap `name`: the process's seed
    (`torch.initial_seed()`, i.e. the last `torch.manual_seed`) mixed with the tap's name, so
    that heads at different taps draw different numbers and the same seed gives the same
    heads."""
    return (torch.initial_seed() * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class RngStream:
    """The random stream of one head: its own CPU and CUDA generator states.

    Args:
        seed: seeds the stream on every device.

    Example:
        >>> stream = RngStream(stream_seed("layer2"))
        >>> with stream.on(x.device):
        ...     y = head(x)  # head's dropout draws from the stream, not the global generator
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._states: dict[str, torch.Tensor] = {}  # device -> generator state, made on first use

    def _state(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._states:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._states[key] = generator.get_state()
        return self._states[key]

    def on(self, device: torch.device) -> _Swap:
        """A context in which `device`'s default generator continues this stream."""
        return _Swap(self, torch.device(device))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "states": dict(self._states)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._states = {key: value.clone() for key, value in state["states"].items()}


def generator_state(device: torch.device) -> torch.Tensor:
    """The state of the default generator that ops on `device` draw from."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _Swap:
    """Puts a stream's state into the default generator of one device, and back out."""

    def __init__(self, stream: RngStream, device: torch.device) -> None:
        self.stream, self.device = stream, device
        if device.type == "cuda" and device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())

    def __enter__(self) -> None:
        self._saved = None
        if self.device.type not in ("cpu", "cuda"):
            return  # other accelerators: the head draws from the global stream
        state = self.stream._state(self.device)
        self._saved = generator_state(self.device)
        _set_generator_state(self.device, state)

    def __exit__(self, *_exc: object) -> None:
        if self._saved is None:
            return
        self.stream._states[str(self.device)] = generator_state(self.device)
        _set_generator_state(self.device, self._saved)
