"""AC-GAN (Odena et al., ICML 2017): a class-conditional GAN whose discriminator has an auxiliary
classifier head, with the modern variants as options: TAC-GAN, ADC-GAN and ReACGAN
conditioning, a projection discriminator, spectral normalisation, the hinge loss, DiffAugment
(`auxhead.gan.augment`) and a generator EMA (`auxhead.gan.ema`).

Here: the networks (`Generator`, `Discriminator`; `Generator.generate` and `make_grid` to
sample), the objectives (`ACGANLoss`), evaluation with an independent classifier
(`GANEvaluator`) and fastai training (`acgan_learner`, which imports fastai on first use; the
rest is torch only). The parts (the metrics one by one, augmentation, the EMA, per-class
collapse monitoring) stay importable from their modules: `auxhead.gan.metrics`,
`auxhead.gan.augment`, `auxhead.gan.ema`, `auxhead.gan.monitor`. The command line is
`auxhead.cli.acgan`.

Example:
    >>> from auxhead.gan import Discriminator, Generator, acgan_learner
    >>> learn = acgan_learner(dls, Generator(10), Discriminator(10))  # 28 px, grey
    >>> learn.fit(10)
    >>> images = learn.generate([0, 1, 2])  # (3, 1, 28, 28) in [0, 1]
"""

from typing import Any

from auxhead.gan.losses import ACGANLoss
from auxhead.gan.metrics import GANEvaluator
from auxhead.gan.models import CONDITIONINGS, SIZES, Discriminator, Generator, make_grid

__all__ = [
    "CONDITIONINGS",
    "SIZES",
    "ACGANLoss",
    "Discriminator",
    "GANEvaluator",
    "Generator",
    "acgan_learner",
    "make_grid",
]


def __getattr__(name: str) -> Any:
    # The learner needs fastai; the rest of auxhead.gan needs only torch, so it is imported on
    # first use (`from auxhead.gan import acgan_learner`), not with the package.
    if name == "acgan_learner":
        from auxhead.gan.learner import acgan_learner

        return acgan_learner
    raise AttributeError(f"module 'auxhead.gan' has no attribute {name!r}")
