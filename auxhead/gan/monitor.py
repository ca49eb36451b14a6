"""Per-class monitoring of a conditional GAN during fastai training: `ClassMonitor`.

A class-conditional GAN rarely fails everywhere at once: one class stops being drawn
recognisably, or all its samples turn into the same image, while the losses and the other
classes look fine. After every epoch `ClassMonitor` draws a fixed batch (the same noise every
epoch, `n_per_class` per class) from the learner's sampler (the generator's EMA when there is
one) and asks an independent classifier, per class:

- recognisability: the share of the class's samples the classifier labels as that class;
- diversity ratio: the mean pairwise distance between the classifier's features of the class's
  generated samples, over the same for real images of the class (1: as varied as the data;
  near 0: one image drawn over and over).

The worst class's two figures become Recorder columns ("worst_recognised", "worst_diversity").
A class whose diversity ratio falls below `min_diversity`, or that no sample of is recognised,
has collapsed: the monitor warns (`ClassCollapseWarning`, naming the class and epoch) and keeps
the event in `collapses`, for a report; it warns once per collapse, and again only if the class
recovers and collapses anew. It starts checking once the generator has learned to
draw the classes at all (the mean recognisability reaches `start_when_recognised`): before
that every class fails both tests, and flagging them would bury a real collapse in noise (on
scikit-learn's digits, AC-GAN with one-pass epochs drew no class recognisably for 7 epochs).

fastai adapter: imports fastai.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from auxhead._extras import raise_missing_extra

try:
    from fastai.callback.core import Callback
    from fastai.learner import Metric
except ModuleNotFoundError as error:
    raise_missing_extra(error, "auxhead.gan.monitor")
    raise

from auxhead.gan.metrics import mean_pairwise_distance

__all__ = ["ClassCollapse", "ClassCollapseWarning", "ClassMonitor"]


class ClassCollapseWarning(UserWarning):
    """A class's generated samples lost their variety or stopped being recognised."""


@dataclass(frozen=True)
class ClassCollapse:
    """One class found collapsed: the figures of the epoch it collapsed at, and how long it
    stayed so."""

    epoch: int  # 1-based, as the grids are numbered
    class_index: int
    class_name: str
    recognised: float  # share of the class's samples the classifier labels as the class
    diversity_ratio: float  # generated / real mean pairwise feature distance; NaN if unknown
    reason: str
    last_epoch: int  # the last epoch it was still collapsed (the last seen if it never recovered)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Column(Metric):
    """A Recorder column showing one of the monitor's latest figures."""

    def __init__(self, monitor: ClassMonitor, key: str) -> None:
        self.monitor, self.key = monitor, key

    @property
    def value(self) -> float:
        return self.monitor.latest.get(self.key, float("nan"))

    @property
    def name(self) -> str:
        return self.key


class ClassMonitor(Callback):
    """After every epoch: the worst class's recognisability and diversity, and collapse warnings.

    Args:
        classifier: an independent classifier of images in [0, 1]: `classifier(images)` gives
            (N, K) logits; its `features(images)`, if it has one, gives the features for the
            diversity (else the logits are used). `auxhead.gan.metrics.SmallCNN` (the
            `GANEvaluator`'s) fits. It is put in eval mode for the measurement and back after.
        real_images: (N, C, H, W) real images in [0, 1], at least 2 of every class: the
            diversity reference.
        real_labels: (N,) their classes.
        n_per_class: generated samples per class each epoch (at least 2).
        seed: seed of the fixed noise (the global random stream is not touched, so training
            runs the same with or without the monitor).
        min_diversity: a diversity ratio below this is a collapse.
        start_when_recognised: collapses are looked for from the first epoch whose mean
            recognisability over the classes reaches this; 0 looks from the first epoch.
        max_real_per_class: at most this many real images of a class in the reference.
        class_names: names for the warnings; default the data's vocab, else the indices.

    Attributes:
        latest: the last epoch's {"worst_recognised", "worst_diversity"}.
        history: per epoch, {"epoch", "recognised": [per class], "diversity_ratio": [...]}.
        collapses: every `ClassCollapse` seen, in order.
        checking_since: the epoch collapses began to be looked for; None if not yet.

    Raises:
        ValueError: for bad arguments, or (at the start of `fit`) a class with fewer than 2
            real images.

    Example:
        >>> evaluator = GANEvaluator.fit(train_x, train_y, test_x, test_y, 10)
        >>> monitor = ClassMonitor(evaluator.classifier, test_x, test_y)
        >>> learn = acgan_learner(dls, generator, discriminator, cbs=[monitor])
        >>> learn.fit(10)  # columns worst_recognised, worst_diversity; warns on a collapse
        >>> [c.as_dict() for c in monitor.collapses]
    """

    order = 45  # before the Recorder (50), which reads the columns in after_validate

    def __init__(
        self,
        classifier: nn.Module,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        *,
        n_per_class: int = 20,
        seed: int = 0,
        min_diversity: float = 0.3,
        start_when_recognised: float = 0.5,
        max_real_per_class: int = 200,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if real_images.dim() != 4 or not real_images.is_floating_point():
            raise ValueError(
                f"real_images must be float (N, C, H, W) images in [0, 1], got "
                f"{real_images.dtype} {tuple(real_images.shape)}"
            )
        if len(real_labels) != len(real_images):
            raise ValueError(f"{len(real_images)} real images but {len(real_labels)} labels")
        if n_per_class < 2 or max_real_per_class < 2:
            raise ValueError(
                f"n_per_class and max_real_per_class must be >= 2 (a pairwise distance needs "
                f"two samples), got {n_per_class}, {max_real_per_class}"
            )
        if not 0 <= min_diversity <= 1 or not 0 <= start_when_recognised <= 1:
            raise ValueError(
                f"min_diversity and start_when_recognised must be in [0, 1], got "
                f"{min_diversity}, {start_when_recognised}"
            )
        self.classifier = classifier
        self.real_images, self.real_labels = real_images, torch.as_tensor(real_labels).long()
        self.n_per_class, self.seed = n_per_class, seed
        self.min_diversity, self.max_real_per_class = min_diversity, max_real_per_class
        self.start_when_recognised = start_when_recognised
        self.class_names = None if class_names is None else [str(n) for n in class_names]
        self.latest: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.collapses: list[ClassCollapse] = []
        self._open: dict[int, int] = {}  # class index -> its ongoing collapse in `collapses`
        self.checking_since: int | None = None
        self._columns = [_Column(self, "worst_recognised"), _Column(self, "worst_diversity")]
        self._real_spread: list[float] = []  # set at the start of fit, with the fixed batch
        self._labels = self._noise = torch.empty(0)

    # fastai events ---------------------------------------------------------------------------

    def before_fit(self) -> None:
        self._open = {}  # a new fit counts its epochs from 1 again
        sampler = self.learn.model.sampler
        num_classes = sampler.num_classes
        if self.class_names is not None and len(self.class_names) != num_classes:
            raise ValueError(
                f"{len(self.class_names)} class_names for a generator of {num_classes} classes"
            )
        if self.class_names is None:
            vocab = getattr(self.learn.dls, "vocab", None)
            self.class_names = (
                [str(v) for v in vocab]
                if vocab is not None and len(vocab) == num_classes
                else [str(k) for k in range(num_classes)]
            )
        self._real_spread = self._real_reference(num_classes)
        rng = torch.Generator().manual_seed(self.seed)
        self._labels = torch.arange(num_classes).repeat_interleave(self.n_per_class)
        self._noise = torch.randn(len(self._labels), sampler.latent_dim, generator=rng)
        # Columns for the Recorder, which names them in its own before_fit (it runs after us).
        others = [m for m in self.learn.metrics if m not in self._columns]
        self.learn.metrics = [*others, *self._columns]

    def after_validate(self) -> None:
        self.measure(self.epoch + 1)

    def after_fit(self) -> None:  # fastai runs it after a cancelled fit too
        self.learn.metrics = [m for m in self.learn.metrics if m not in self._columns]

    # the measurement ---------------------------------------------------------------------------

    def measure(self, epoch: int) -> dict[str, Any]:
        """Draw the fixed batch, score every class, record and warn; returns the history row."""
        images = self.learn.model.sampler.generate(self._labels, noise=self._noise)
        logits, features = self._classify(images)
        labels = self._labels.to(logits.device)
        recognised, ratios = [], []
        for k, real_spread in enumerate(self._real_spread):
            mine = labels == k
            recognised.append((logits[mine].argmax(dim=1) == k).float().mean().item())
            spread = mean_pairwise_distance(features[mine])
            ratios.append(spread / real_spread if real_spread > 0 else float("nan"))
        row = {"epoch": epoch, "recognised": recognised, "diversity_ratio": ratios}
        self.history.append(row)
        self.latest = {
            "worst_recognised": min(recognised),
            "worst_diversity": min((r for r in ratios if not math.isnan(r)), default=math.nan),
        }
        if self.checking_since is None:
            if sum(recognised) / len(recognised) < self.start_when_recognised:
                return row  # the generator does not draw the classes yet: nothing to collapse
            self.checking_since = epoch
        for k, (share, ratio) in enumerate(zip(recognised, ratios, strict=True)):
            reasons = []
            if ratio < self.min_diversity:  # False for NaN
                reasons.append(f"diversity {ratio:.2f} of the real data's (< {self.min_diversity})")
            if share == 0:
                reasons.append("no sample recognised as the class")
            if not reasons:
                self._open.pop(k, None)  # recovered: a new collapse warns again
            elif k in self._open:  # still collapsed: extend the event, no new warning
                i = self._open[k]
                self.collapses[i] = replace(self.collapses[i], last_epoch=epoch)
            else:
                name, reason = self.class_names[k], "; ".join(reasons)
                self._open[k] = len(self.collapses)
                self._collapse(ClassCollapse(epoch, k, name, share, ratio, reason, epoch))
        return row

    def _collapse(self, event: ClassCollapse) -> None:
        self.collapses.append(event)
        warnings.warn(
            f"class {event.class_name!r} (index {event.class_index}) collapsed at epoch "
            f"{event.epoch}: {event.reason}; {event.recognised:.0%} of its samples recognised",
            ClassCollapseWarning,
            stacklevel=2,
        )

    @torch.no_grad()
    def _classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) logits and (N, d) features of `images`, in eval mode, put back after."""
        device = next(self.classifier.parameters(), torch.empty(0)).device
        images = images.to(device)
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            logits = self.classifier(images)
            features_fn = getattr(self.classifier, "features", None)
            features = features_fn(images) if callable(features_fn) else logits
        finally:
            self.classifier.train(was_training)
        return logits, features.reshape(len(images), -1)

    def _real_reference(self, num_classes: int) -> list[float]:
        """Each class's mean pairwise feature distance over (at most max_real_per_class) real
        images: the diversity ratio's denominator."""
        counts = torch.bincount(self.real_labels, minlength=num_classes)
        short = [k for k in range(num_classes) if counts[k] < 2]
        if short or len(counts) > num_classes:
            raise ValueError(
                f"ClassMonitor needs at least 2 real images of each of the {num_classes} "
                f"classes as its reference; classes {short} have fewer (real labels go up to "
                f"{len(counts) - 1})"
            )
        spreads = []
        for k in range(num_classes):
            index = (self.real_labels == k).nonzero().flatten()[: self.max_real_per_class]
            _, features = self._classify(self.real_images[index])
            spreads.append(mean_pairwise_distance(features))
        return spreads
