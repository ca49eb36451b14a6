"""AC-GAN (Odena et al., ICML 2017): a class-conditional GAN whose discriminator has an auxiliary
classifier head, with the modern variants as options: TAC-GAN, ADC-GAN and ReACGAN
conditioning, a projection discriminator, spectral normalisation, the hinge loss, DiffAugment
(`auxhead.gan.augment`) and a generator EMA (`auxhead.gan.ema`).

Torch only: networks (`Generator`, `Discriminator`), objectives (`ACGANLoss`) and evaluation
with an independent classifier (`GANEvaluator`). fastai training lives in
`auxhead.gan.learner` (`acgan_learner`), per-class collapse monitoring in
`auxhead.gan.monitor` (`ClassMonitor`), the command line in `auxhead.cli.acgan`.

Example:
    >>> from auxhead.gan import Discriminator, Generator
    >>> from auxhead.gan.learner import acgan_learner
    >>> learn = acgan_learner(dls, Generator(10), Discriminator(10))  # 28 px, grey
    >>> learn.fit(10)
    >>> images = learn.generate([0, 1, 2])  # (3, 1, 28, 28) in [0, 1]
"""

from auxhead.gan.losses import ACGANLoss, mode_seeking_term
from auxhead.gan.metrics import (
    GANEvaluator,
    SmallCNN,
    class_accuracy,
    frechet_distance,
    intra_class_diversity,
    mean_pairwise_distance,
    train_classifier,
)
from auxhead.gan.models import IMG_SIZES, Discriminator, Generator, make_grid

__all__ = [
    "IMG_SIZES",
    "ACGANLoss",
    "Discriminator",
    "GANEvaluator",
    "Generator",
    "SmallCNN",
    "class_accuracy",
    "frechet_distance",
    "intra_class_diversity",
    "make_grid",
    "mean_pairwise_distance",
    "mode_seeking_term",
    "train_classifier",
]
