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

from auxhead.gan.augment import AUGMENTATIONS, DiffAugment
from auxhead.gan.ema import EMADecay, generator_ema
from auxhead.gan.losses import (
    ADVERSARIAL_LOSSES,
    ACGANLoss,
    data_to_data_cross_entropy,
    mode_seeking_term,
)
from auxhead.gan.metrics import (
    GANEvaluator,
    SmallCNN,
    class_accuracy,
    classification_accuracy_score,
    frechet_distance,
    intra_class_diversity,
    intra_class_frechet_distance,
    mean_pairwise_distance,
    precision_recall,
    train_classifier,
)
from auxhead.gan.models import CONDITIONINGS, IMG_SIZES, Discriminator, Generator, make_grid

__all__ = [
    "ADVERSARIAL_LOSSES",
    "AUGMENTATIONS",
    "CONDITIONINGS",
    "IMG_SIZES",
    "ACGANLoss",
    "DiffAugment",
    "Discriminator",
    "EMADecay",
    "GANEvaluator",
    "Generator",
    "SmallCNN",
    "class_accuracy",
    "classification_accuracy_score",
    "data_to_data_cross_entropy",
    "frechet_distance",
    "generator_ema",
    "intra_class_diversity",
    "intra_class_frechet_distance",
    "make_grid",
    "mean_pairwise_distance",
    "mode_seeking_term",
    "precision_recall",
    "train_classifier",
]
