"""fastai training for the AC-GAN: `acgan_learner` and its callbacks.

fastai's own GAN machinery (`fastai.vision.gan`) feeds no class labels and switches between a
generator and a critic batch by batch through one loss function, so it does not fit. Here one
callback, `ACGANTrainer`, takes each batch of (images, labels) in `before_batch`, does one
discriminator step and one generator step itself, records the numbers and cancels the rest of
fastai's batch. Everything else is plain fastai: the optimizer (one group per network, so
`lr=slice(lr_g, lr_d)` works), schedules, progress bars, the Recorder, `save`/`load`.

Options beside the paper's AC-GAN, each off by default: DiffAugment on every discriminator
input (`augment=`), an exponential moving average of the generator that draws the samples
(`ema_decay=`); the discriminator's conditioning, spectral normalisation and the hinge loss are
chosen on the `Discriminator` and the `ACGANLoss`. Per-class collapse monitoring during
training is `auxhead.gan.monitor.ClassMonitor`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from auxhead._extras import raise_missing_extra

try:
    import fastai.callback.progress  # noqa: F401  (makes progress bars a default callback)
    from fastai.callback.core import Callback, CancelBatchException
    from fastai.data.core import DataLoaders
    from fastai.learner import AvgMetric, Learner
    from fastai.optimizer import OptimWrapper
    from PIL import Image
except ModuleNotFoundError as error:
    raise_missing_extra(error, "auxhead.gan.learner")
    raise

from auxhead.gan.augment import DiffAugment
from auxhead.gan.ema import generator_ema
from auxhead.gan.losses import ACGANLoss
from auxhead.gan.models import Discriminator, Generator

__all__ = [
    "ACGANLearner",
    "ACGANModel",
    "ACGANTrainer",
    "SaveGridCallback",
    "acgan_learner",
    "save_image",
]

STATS = ("d_loss", "g_loss", "acc_real", "acc_fake")


class ACGANModel(nn.Module):
    """The generator, the discriminator and the generator's EMA as one module: what
    `learn.model` holds, so that `learn.save`/`learn.load` cover them all. Calling it runs the
    generator.

    Args:
        generator: the `Generator`.
        discriminator: the `Discriminator`.
        ema_decay: keep an exponential moving average of the generator's weights with this
            decay (`auxhead.gan.ema`), as `generator_ema`; None for none.

    Raises:
        ValueError: if the two networks disagree on classes, image size or channels.
    """

    def __init__(
        self,
        generator: Generator,
        discriminator: Discriminator,
        *,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        for attr in ("num_classes", "size", "channels"):
            g, d = getattr(generator, attr), getattr(discriminator, attr)
            if g != d:
                raise ValueError(
                    f"generator and discriminator disagree on {attr}: {g} vs {d}; "
                    "build both with the same num_classes, size and channels"
                )
        self.generator = generator
        self.discriminator = discriminator
        self.generator_ema = None if ema_decay is None else generator_ema(generator, ema_decay)

    @property
    def sampler(self) -> Generator:
        """The generator that draws samples: the EMA's average when there is one."""
        return self.generator if self.generator_ema is None else self.generator_ema.module

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.generator(noise, labels)  # (B, C, H, W) in [-1, 1]


def _split(model: ACGANModel) -> list[list[nn.Parameter]]:
    return [list(model.generator.parameters()), list(model.discriminator.parameters())]


def _clear_grads(module: nn.Module) -> None:
    # None, not zeros: the optimizer then skips these parameters, Adam's moments included.
    for p in module.parameters():
        p.grad = None


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """No weight gradients for `module` inside (they would be thrown away anyway)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels).float().mean().item()


class ACGANTrainer(Callback):
    """Does AC-GAN's alternating steps: per batch one discriminator, then one generator step.

    In training, the generator draws one image per real image, conditioned on the real batch's
    labels (so the class mix follows the data; with `mode_seeking`, the first half's labels
    twice, giving same-class pairs); the discriminator steps on both batches, then the
    generator steps against the updated discriminator, then the generator's EMA (if any) takes
    the new weights. With `augment`, every image the discriminator sees in training, real or
    generated, goes through it first. In validation the same losses and accuracies are computed
    without stepping or augmenting. `stats` holds the last batch's numbers, which the Recorder
    columns read (the accuracies are NaN for a projection discriminator, which has no
    classifier); `learn.loss` is d_loss + g_loss.

    fastai's `before_step`/`after_step` events do not run for these steps (gradient clipping
    callbacks, for instance, see nothing).

    Args:
        augment: a `DiffAugment` (or any differentiable image-to-image module) for the
            discriminator's inputs; None for none.
    """

    order = 70  # after ParamScheduler (60): the steps use this batch's scheduled lr

    def __init__(self, augment: nn.Module | None = None) -> None:
        self.augment = augment
        self.stats: dict[str, float] = dict.fromkeys(STATS, float("nan"))

    def before_fit(self) -> None:
        if not isinstance(self.learn.loss_func, ACGANLoss):
            raise TypeError(
                f"ACGANTrainer needs learn.loss_func to be an ACGANLoss, got "
                f"{type(self.learn.loss_func).__name__}; build the learner with acgan_learner"
            )
        _check_conditioning(self.learn.loss_func, self.learn.model.discriminator)

    def before_batch(self) -> None:
        real = self.learn.xb[0].as_subclass(torch.Tensor)  # plain tensors: fastai's subclasses
        labels = self.learn.yb[0].as_subclass(torch.Tensor).long()  # are slow on CPU
        self._check_batch(real, labels)
        real = real * 2 - 1  # [0, 1] -> the generator's [-1, 1]
        if self.learn.training:
            self._train_step(real, labels)
        else:
            with torch.no_grad():
                self._eval_step(real, labels)
        self.learn.loss = torch.tensor(self.stats["d_loss"] + self.stats["g_loss"])
        raise CancelBatchException

    def _check_batch(self, real: torch.Tensor, labels: torch.Tensor) -> None:
        gen = self.learn.model.generator
        expected = (gen.channels, gen.size, gen.size)
        if tuple(real.shape[1:]) != expected:
            raise ValueError(
                f"the data's images are {tuple(real.shape[1:])} but the networks make "
                f"{expected}; build them with channels={real.shape[1]}, size="
                f"{real.shape[-1]} or resize the data (auxhead.data.load_data(..., size=...))"
            )
        if labels.min() < 0 or labels.max() >= gen.num_classes:
            raise ValueError(
                f"a batch has labels in [{labels.min().item()}, {labels.max().item()}] but the "
                f"networks have {gen.num_classes} classes; build them with the data's class count"
            )

    def _discriminate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """The discriminator's outputs, on augmented images in training."""
        if self.augment is not None and self.learn.training:
            images = self.augment(images)
        return self.learn.model.discriminator(images, labels)

    def _forward(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        """Generate a batch for `labels` and run the discriminator on both batches."""
        gen = self.learn.model.generator
        fake_labels = labels
        if self.learn.loss_func.mode_seeking > 0:
            # pairs (i, i + h) of one class and two noise vectors, for the mode-seeking term
            half = labels[: len(labels) // 2]
            fake_labels = torch.cat([half, half])
        noise = torch.randn(len(fake_labels), gen.latent_dim, device=real.device)
        fake = gen(noise, fake_labels)  # (B, C, H, W), keeps the graph for the generator step
        return {
            "noise": noise,
            "fake": fake,
            "fake_labels": fake_labels,
            "d_real": self._discriminate(real, labels),
            "d_fake": self._discriminate(fake.detach(), fake_labels),
        }

    def _train_step(self, real: torch.Tensor, labels: torch.Tensor) -> None:
        model, opt, loss_func = self.learn.model, self.learn.opt, self.learn.loss_func
        _clear_grads(model)
        # Discriminator: the generated batch is detached, so only its parameters get gradients
        # and the optimizer (one group per network) moves only them.
        out = self._forward(real, labels)
        d = loss_func.discriminator_loss(out["d_real"], out["d_fake"], labels, out["fake_labels"])
        d["loss"].backward()
        opt.step()
        _clear_grads(model.discriminator)
        # Generator: against the updated discriminator, whose weights get no gradients.
        with _frozen(model.discriminator):
            g = loss_func.generator_loss(
                self._discriminate(out["fake"], out["fake_labels"]),
                out["fake_labels"],
                images=out["fake"],
                noise=out["noise"],
            )
            g["loss"].backward()
        opt.step()
        _clear_grads(model.generator)
        if model.generator_ema is not None:
            model.generator_ema.update_parameters(model.generator)
        self._record(d, g, out, labels)

    def _eval_step(self, real: torch.Tensor, labels: torch.Tensor) -> None:
        loss_func = self.learn.loss_func
        out = self._forward(real, labels)
        d = loss_func.discriminator_loss(out["d_real"], out["d_fake"], labels, out["fake_labels"])
        g = loss_func.generator_loss(
            out["d_fake"], out["fake_labels"], images=out["fake"], noise=out["noise"]
        )
        self._record(d, g, out, labels)

    def _record(self, d: dict, g: dict, out: dict[str, Any], labels: torch.Tensor) -> None:
        has_class = "class" in out["d_real"]  # not a projection discriminator
        nan = float("nan")
        self.stats = {
            "d_loss": d["loss"].item(),
            "g_loss": g["loss"].item(),
            "acc_real": _accuracy(out["d_real"]["class"], labels) if has_class else nan,
            "acc_fake": _accuracy(out["d_fake"]["class"], out["fake_labels"]) if has_class else nan,
        }


def _check_conditioning(loss: ACGANLoss, discriminator: Discriminator) -> None:
    if loss.conditioning != discriminator.conditioning:
        raise ValueError(
            f"ACGANLoss(conditioning={loss.conditioning!r}) does not fit a discriminator built "
            f"with conditioning={discriminator.conditioning!r}; give both the same (or leave "
            "loss_func out: acgan_learner then follows the discriminator)"
        )


class _TrainerStat(AvgMetric):
    """A Recorder column: one of `ACGANTrainer.stats`, averaged over the samples by fastai's
    `AvgMetric`."""

    def __init__(self, trainer: ACGANTrainer, key: str) -> None:
        self.trainer, self.key = trainer, key
        self.reset()

    def accumulate(self, learn: Learner) -> None:
        bs = len(learn.yb[0])
        self.total += self.trainer.stats[self.key] * bs
        self.count += bs

    @property
    def name(self) -> str:
        return self.key


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save one (C, H, W) image in [0, 1] (C = 1 or 3) as a PNG; returns the path.

    Written to a temporary name beside `path`, then renamed: an interrupted save (Ctrl-C, a
    full disk) leaves no half-written PNG, only the previous file if there was one."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"need a (1 or 3, H, W) image, got shape {tuple(image.shape)}")
    pixels = (image.detach().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(
        pixels[..., 0] if pixels.shape[2] == 1 else np.ascontiguousarray(pixels)
    )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class SaveGridCallback(Callback):
    """After every epoch, save a grid from fixed noise (one row per class) as a PNG.

    Args:
        folder: where the PNGs go (created if missing).
        n_per_class: images per row.
        seed: seed of the fixed noise, the same every epoch so the grids can be compared.
        fname: file name pattern, formatted with the 1-based `epoch`.

    Attributes:
        saved: paths of the grids saved so far.
    """

    order = 80

    def __init__(
        self,
        folder: str | Path,
        *,
        n_per_class: int = 10,
        seed: int = 0,
        fname: str = "grid_epoch_{epoch:03d}.png",
    ) -> None:
        if n_per_class < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
        self.folder = Path(folder)
        self.n_per_class, self.seed, self.fname = n_per_class, seed, fname
        self.saved: list[Path] = []

    def after_epoch(self) -> None:
        grid = self.learn.model.sampler.sample_grid(self.n_per_class, seed=self.seed)
        self.saved.append(save_image(grid, self.folder / self.fname.format(epoch=self.epoch + 1)))


class ACGANLearner(Learner):
    """A fastai `Learner` over an `ACGANModel`, with sampling helpers. Use `acgan_learner`."""

    @property
    def generator(self) -> Generator:
        return self.model.generator

    @property
    def discriminator(self) -> Discriminator:
        return self.model.discriminator

    @property
    def sampler(self) -> Generator:
        """The generator that draws samples: the EMA's average with `ema_decay`, else the
        generator itself."""
        return self.model.sampler

    def generate(
        self, labels: torch.Tensor | Sequence[int], *, seed: int | None = None
    ) -> torch.Tensor:
        """Images in [0, 1], one per label, from `sampler`; see `Generator.generate`.

        Raises:
            ValueError: for a label outside [0, num_classes).
        """
        return self.sampler.generate(labels, seed=seed)

    def sample_grid(self, n_per_class: int = 10, *, seed: int = 0) -> torch.Tensor:
        """A (C, H, W) grid in [0, 1], one row per class, from `sampler`; see
        `Generator.sample_grid`."""
        return self.sampler.sample_grid(n_per_class, seed=seed)


def _adam(params: list, lr: float | slice, betas: tuple[float, float]) -> OptimWrapper:
    # fastai builds the optimizer with the learner's lr, a slice included, then sets each
    # group's lr itself in `fit`; torch's Adam only takes a number to start with.
    start = lr.stop if isinstance(lr, slice) else lr
    return OptimWrapper(params, opt=torch.optim.Adam, lr=start, betas=betas)


def _data_classes(dls: DataLoaders) -> int | None:
    n = getattr(dls, "c", None)
    if n is None and getattr(dls, "vocab", None) is not None:
        n = len(dls.vocab)
    return n


def acgan_learner(
    dls: DataLoaders,
    generator: Generator,
    discriminator: Discriminator,
    *,
    loss_func: ACGANLoss | None = None,
    ema_decay: float | None = None,
    augment: str | nn.Module | None = None,
    lr: float | slice = 2e-4,
    betas: tuple[float, float] = (0.5, 0.999),
    grid_dir: str | Path | None = None,
    grid_per_class: int = 10,
    grid_seed: int = 0,
    cbs: Sequence[Callback] = (),
    path: str | Path | None = None,
    model_dir: str | Path = "models",
) -> ACGANLearner:
    """A fastai learner that trains an AC-GAN on batches of (images in [0, 1], labels).

    Columns: train_loss and valid_loss (d_loss + g_loss), then on the validation set d_loss,
    g_loss and the discriminator's class accuracy on real (acc_real) and generated (acc_fake)
    images (not for a projection discriminator, which has no classifier). Adam with DCGAN's
    betas; `lr=slice(lr_g, lr_d)` sets the two networks apart.

    Args:
        dls: fastai DataLoaders of (images (B, C, H, W) in [0, 1], int labels), e.g. from
            `auxhead.data.dataloaders`.
        generator: the `Generator`.
        discriminator: the `Discriminator`; its `conditioning` chooses AC-GAN, TAC-GAN,
            ADC-GAN, ReACGAN or a projection discriminator.
        loss_func: the objectives; default `ACGANLoss(conditioning=discriminator.conditioning)`
            (BCE source term; `ACGANLoss(adversarial="hinge", ...)` for the hinge loss).
        ema_decay: keep an exponential moving average of the generator's weights with this
            decay (e.g. 0.999, warmed up over the first steps; `auxhead.gan.ema`), updated
            after every generator step; `generate`, `sample_grid` and the saved grids then
            draw from it (`learn.sampler`), and `save`/`load` include it. None: no average.
        augment: DiffAugment (Zhao et al. 2020) on every image the discriminator sees in
            training, real and generated: a policy such as "translation,cutout" or
            "color,translation,cutout", or a `DiffAugment`; None: no augmentation.
        lr: learning rate, or slice(generator lr, discriminator lr).
        betas: Adam's betas (DCGAN's 0.5, 0.999).
        grid_dir: if given, save a sample grid there after every epoch (`SaveGridCallback`).
        grid_per_class: images per row of that grid.
        grid_seed: seed of the grid's fixed noise.
        cbs: more callbacks.
        path, model_dir: where `learn.save`/`learn.load` put files (path/model_dir/name.pth).

    Returns:
        An `ACGANLearner`: `fit(epochs)`, `save`/`load`, `generate(labels)`, `sample_grid()`.

    Raises:
        ValueError: if the networks disagree with each other or with the data's class count,
            or the data has fewer than 2 classes.

    Example:
        >>> g = Generator(10, latent_dim=64, size=28, channels=1)
        >>> d = Discriminator(10, size=28, channels=1)
        >>> learn = acgan_learner(dls, g, d, grid_dir="out/grids")
        >>> learn.fit(5)
        >>> images = learn.generate([0, 1, 2])  # (3, 1, 28, 28) in [0, 1]
        >>> d = Discriminator(10, conditioning="reacgan", spectral_norm=True)
        >>> modern = acgan_learner(
        ...     dls, Generator(10), d, loss_func=ACGANLoss(conditioning="reacgan",
        ...     adversarial="hinge"), ema_decay=0.999, augment="translation,cutout")
    """
    model = ACGANModel(generator, discriminator, ema_decay=ema_decay)
    n_data = _data_classes(dls)
    if n_data is not None and n_data < 2:
        raise ValueError(
            f"the data has {n_data} class(es); an AC-GAN conditions on the class and needs at "
            "least 2"
        )
    if n_data is not None and n_data != generator.num_classes:
        raise ValueError(
            f"the data has {n_data} classes but the networks have {generator.num_classes}; "
            f"build them with num_classes={n_data}"
        )
    if loss_func is None:
        loss_func = ACGANLoss(conditioning=discriminator.conditioning)
    _check_conditioning(loss_func, discriminator)
    trainer = ACGANTrainer(DiffAugment(augment) if isinstance(augment, str) else augment)
    # a projection discriminator has no classifier, so no accuracy columns
    columns = STATS[:2] if discriminator.conditioning == "projection" else STATS
    callbacks: list[Callback] = [trainer]
    if grid_dir is not None:
        callbacks.append(SaveGridCallback(grid_dir, n_per_class=grid_per_class, seed=grid_seed))
    return ACGANLearner(
        dls,
        model,
        loss_func=loss_func,
        opt_func=partial(_adam, betas=betas),
        lr=lr,
        splitter=_split,
        cbs=[*callbacks, *cbs],
        metrics=[_TrainerStat(trainer, key) for key in columns],
        path=path,
        model_dir=model_dir,
    )
