"""An exponential moving average (EMA) of the generator's weights, for sampling.

A GAN's generator oscillates from step to step as it chases the discriminator; the average of
its recent weights draws better samples than any one of them (Yazici et al., ICLR 2019; used
by BigGAN, StyleGAN and StudioGAN). The average is torch's own `AveragedModel`; what this
module adds is the decay schedule, with a warm-up so that the first average is not dominated by
the random initial weights:

    decay_n = min(decay, (1 + n) / (10 + n))    after n updates (TensorFlow's `num_updates`)
    ema <- decay_n * ema + (1 - decay_n) * weights

The first update copies the weights. Buffers (BatchNorm's running statistics) are not
averaged but copied from the generator at every update, as StyleGAN and StudioGAN do.

Torch only.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["EMADecay", "generator_ema"]


class EMADecay:
    """The `multi_avg_fn` of an `AveragedModel`: an EMA with an optional warm-up.

    A class rather than a closure, so that a learner holding it can be pickled.

    Args:
        decay: the EMA's decay once warmed up, in [0, 1).
        warmup: ramp the decay up as (1 + n) / (10 + n) after n updates.
    """

    def __init__(self, decay: float = 0.999, *, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA's decay must be in [0, 1), got {decay!r}; e.g. 0.999")
        self.decay, self.warmup = decay, warmup

    def __repr__(self) -> str:
        return f"EMADecay({self.decay}, warmup={self.warmup})"

    def at(self, num_averaged: int) -> float:
        """The decay used for the update after `num_averaged` earlier ones (>= 1)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + num_averaged) / (10 + num_averaged))

    @torch.no_grad()
    def __call__(
        self,
        averaged: list[torch.Tensor],
        current: list[torch.Tensor],
        num_averaged: torch.Tensor,
    ) -> None:
        weight = 1.0 - self.at(int(num_averaged))
        for avg, now in zip(averaged, current, strict=True):
            avg.lerp_(now, weight)


def generator_ema(
    generator: nn.Module, decay: float = 0.999, *, warmup: bool = True
) -> AveragedModel:
    """An `AveragedModel` that keeps the EMA of `generator`'s weights.

    Call `.update_parameters(generator)` after every generator step; `.module` is the averaged
    generator (a copy of `generator`, with `generate` and `sample_grid` if it is a `Generator`).

    Args:
        generator: the network to average; it is deep-copied.
        decay: the EMA's decay once warmed up (0.999 is StudioGAN's and BigGAN's 0.9999 for
            long runs).
        warmup: ramp the decay up over the first updates; see the module docstring.

    Example:
        >>> ema = generator_ema(generator, 0.999)
        >>> ...  # one optimizer step of the generator
        >>> ema.update_parameters(generator)
        >>> images = ema.module.generate([0, 1, 2])
    """
    averaged = AveragedModel(generator, multi_avg_fn=EMADecay(decay, warmup=warmup))
    averaged.requires_grad_(False)  # never trained, never in an optimizer
    return averaged
