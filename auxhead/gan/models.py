"""AC-GAN networks (Odena et al., ICML 2017), DCGAN-style and sized for 28, 32 or 64 pixels.

`Generator(noise, labels)` draws images in [-1, 1] (tanh), conditioned on the class through an
embedding. `Discriminator(images, labels)` returns named raw logits from one shared trunk:
"source" (real vs generated) and, depending on its `conditioning`, the class outputs of
AC-GAN, TAC-GAN, ADC-GAN or ReACGAN, or a projection discriminator's class-aware "source"
(see `CONDITIONINGS`). `Generator.generate` and `Generator.sample_grid` give images in [0, 1],
ready to save or score.

Both take the class count as their one positional argument; everything else is keyword-only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["CONDITIONINGS", "SIZES", "Discriminator", "Generator", "make_grid"]

# Each size is a 4x4 or 7x7 map doubled k times: (smallest map side, number of doublings).
SIZES: dict[int, tuple[int, int]] = {28: (7, 2), 32: (4, 3), 64: (4, 4)}

# How the discriminator uses the class, and the outputs each adds to "source".
CONDITIONINGS: dict[str, str] = {
    "ac": 'AC-GAN (Odena et al. 2017): a classifier head, "class" (B, K) logits',
    "tac": 'TAC-GAN (Gong et al. 2019): "class" and a twin classifier "twin" (B, K)',
    "adc": 'ADC-GAN (Hou et al. 2022): a 2K-way classifier, "class" (real k) and "fake_class"',
    "reacgan": 'ReACGAN (Kang et al. 2021): "embedding" (B, E) unit vectors and "class" (B, K) '
    "cosines to one proxy per class",
    "projection": "projection discriminator (Miyato & Koyama 2018): no classifier; "
    '"source" += <embed(y), phi(x)>, so the labels are required',
}


def _check_common(num_classes: int, size: int, channels: int) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(
            f"an AC-GAN needs at least 2 classes to condition on, got num_classes="
            f"{num_classes!r}; for a single class train an unconditional GAN instead"
        )
    if size not in SIZES:
        raise ValueError(
            f"size must be one of {sorted(SIZES)}, got {size!r}; "
            "resize the data first, e.g. auxhead.data.load_data(..., size=32)"
        )
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")


def _init_dcgan(module: nn.Module) -> None:
    # DCGAN's initialisation (Radford et al. 2016): N(0, 0.02) weights, BN scale N(1, 0.02).
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """Class-conditional DCGAN generator: (noise, label) -> image in [-1, 1].

    The label's embedding is concatenated to the noise, projected to a `width * 2^(k-1)`-channel
    map of 7x7 (28 px) or 4x4 (32, 64 px), then k transposed convolutions double the side,
    halving the channels, down to `channels` and a tanh.

    Args:
        num_classes: number of classes to condition on (at least 2).
        latent_dim: size of the noise vector z.
        size: side of the square images: 28, 32 or 64.
        channels: 1 (grey) or 3 (RGB).
        width: channels of the last hidden map; the others are multiples of it.
        embed_dim: size of the class embedding; default `latent_dim`.

    Raises:
        ValueError: for fewer than 2 classes, an image size not in `SIZES` or channels
            other than 1 or 3.

    Example:
        >>> g = Generator(10, latent_dim=64, size=28, channels=1)
        >>> images = g.generate(torch.arange(10))  # (10, 1, 28, 28) in [0, 1]
    """

    def __init__(
        self,
        num_classes: int,
        *,
        latent_dim: int = 64,
        size: int = 28,
        channels: int = 1,
        width: int = 64,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_common(num_classes, size, channels)
        if latent_dim < 1 or width < 1:
            raise ValueError(f"latent_dim and width must be >= 1, got {latent_dim}, {width}")
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.size = size
        self.channels = channels
        embed_dim = latent_dim if embed_dim is None else embed_dim
        side, doublings = SIZES[size]
        self._start = (width * 2 ** (doublings - 1), side, side)

        self.embed = nn.Embedding(num_classes, embed_dim)
        self.project = nn.Sequential(
            nn.Linear(latent_dim + embed_dim, self._start[0] * side * side, bias=False),
            nn.BatchNorm1d(self._start[0] * side * side),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        ch = self._start[0]
        for _ in range(doublings - 1):
            blocks += [
                nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        blocks += [nn.ConvTranspose2d(ch, channels, 4, stride=2, padding=1), nn.Tanh()]
        self.decode = nn.Sequential(*blocks)
        self.apply(_init_dcgan)

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | Path | Mapping[str, Any], *, map_location: Any = "cpu"
    ) -> Generator:
        """The generator saved in a `generator.pth` (as `auxhead acgan` writes it).

        Args:
            checkpoint: the file, or the dict it holds: {"config": the constructor's keyword
                arguments, "state_dict": the weights}.
            map_location: where to load the tensors (`torch.load`'s argument).

        Returns:
            The generator with its weights, in training mode (`generate` switches to eval).

        Raises:
            ValueError: if the dict lacks "config" or "state_dict".
        """
        if not isinstance(checkpoint, Mapping):
            checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
        missing = [key for key in ("config", "state_dict") if key not in checkpoint]
        if missing:
            raise ValueError(
                f"a generator checkpoint needs 'config' and 'state_dict', this one lacks "
                f"{missing} (it has {sorted(checkpoint)}); is it auxhead acgan's generator.pth?"
            )
        config = dict(checkpoint["config"])
        generator = cls(config.pop("num_classes"), **config)
        generator.load_state_dict(checkpoint["state_dict"])
        return generator

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([noise, self.embed(labels)], dim=1)  # (B, latent_dim + embed_dim)
        h = self.project(h).view(-1, *self._start)  # (B, C0, s, s)
        return self.decode(h)  # (B, channels, size, size) in [-1, 1]

    def check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """`labels` as a 1-d int64 tensor on the generator's device, every one in range.

        Raises:
            ValueError: if a label is outside [0, num_classes), or `labels` is not 1-d integers.
        """
        return _check_labels(labels, self.num_classes, self.embed.weight.device, "generator")

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor | list[int],
        *,
        noise: torch.Tensor | None = None,
        seed: int | None = None,
        batch_size: int = 1000,
    ) -> torch.Tensor:
        """Images in [0, 1], one per label, drawn in eval mode (BatchNorm running stats).

        The generator goes back to the mode it was in.

        Args:
            labels: class index of each image, in [0, num_classes).
            noise: (N, latent_dim) noise to use; default fresh N(0, 1) noise.
            seed: seed for that noise, for repeatable samples; default the global RNG.
            batch_size: images drawn per forward pass, to bound memory.

        Returns:
            (N, channels, size, size) float32 in [0, 1], on the generator's device.

        Raises:
            ValueError: for a label out of range or noise of the wrong shape.
        """
        labels = self.check_labels(labels)
        device = labels.device
        if noise is None:
            rng = None if seed is None else torch.Generator().manual_seed(seed)
            noise = torch.randn(len(labels), self.latent_dim, generator=rng)
        if noise.shape != (len(labels), self.latent_dim):
            raise ValueError(
                f"noise must have shape ({len(labels)}, {self.latent_dim}) for {len(labels)} "
                f"labels, got {tuple(noise.shape)}"
            )
        noise = noise.to(device)
        was_training = self.training
        self.eval()
        try:
            chunks = [
                self(noise[i : i + batch_size], labels[i : i + batch_size])
                for i in range(0, len(labels), batch_size)
            ]
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.channels, self.size, self.size, device=device)
        return (torch.cat(chunks) + 1) / 2

    def sample_grid(
        self, n_per_class: int = 10, *, noise: torch.Tensor | None = None, seed: int = 0
    ) -> torch.Tensor:
        """A grid with one row per class and `n_per_class` columns, for a look or a PNG.

        Column j uses the same noise in every row, so a column shows one z across classes.

        Args:
            n_per_class: images per row.
            noise: (n_per_class, latent_dim) noise, one per column; default from `seed`.
            seed: seed for the noise when `noise` is not given.

        Returns:
            (channels, rows * (size + 2) + 2, cols * (size + 2) + 2) in [0, 1], on CPU.
        """
        if noise is None:
            noise = torch.randn(
                n_per_class, self.latent_dim, generator=torch.Generator().manual_seed(seed)
            )
        n_per_class = len(noise)
        labels = torch.arange(self.num_classes).repeat_interleave(n_per_class)
        images = self.generate(labels, noise=noise.repeat(self.num_classes, 1))
        return make_grid(images.cpu(), n_per_class)


def _check_labels(labels: Any, num_classes: int, device: torch.device, owner: str) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dim() > 1:
        raise ValueError(
            f"labels must be a 1-d sequence of class indices, got dtype {labels.dtype} "
            f"and shape {tuple(labels.shape)}"
        )
    labels = labels.long().reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique().tolist()
        raise ValueError(
            f"labels must be in [0, {num_classes}) for a {owner} of {num_classes} classes; "
            f"got {bad[:10]}"
        )
    return labels.to(device)


class Discriminator(nn.Module):
    """DCGAN discriminator: a shared trunk, a real-vs-generated "source" head and class outputs.

    Strided 4x4 convolutions with LeakyReLU(0.2) (BatchNorm after the first) halve the side down
    to 7x7 or 4x4; the flattened map h feeds a linear "source" head (one real-vs-generated logit)
    and the class outputs that `conditioning` chooses (K = num_classes, B = batch):

    - "ac": AC-GAN (Odena et al., ICML 2017), a linear classifier: "class" (B, K) logits.
    - "tac": TAC-GAN (Gong et al., NeurIPS 2019): "class" and a twin classifier "twin" (B, K)
      that learns the classes of generated images only.
    - "adc": ADC-GAN (Hou et al., ICML 2022): one linear classifier over 2K classes, real class
      k and generated class k; "class" holds the real half (B, K), "fake_class" the generated
      half (B, K).
    - "reacgan": ReACGAN (Kang et al., NeurIPS 2021): a linear map of h to an `embed_dim`
      embedding and one learned proxy per class, both normalised to unit length;
      "embedding" (B, embed_dim) and "class" (B, K), the cosines between embedding and proxies
      (for the data-to-data cross-entropy, `ACGANLoss(conditioning="reacgan")`).
    - "projection": the projection discriminator (Miyato & Koyama, ICLR 2018), the
      non-auxiliary baseline: no class output; "source" = psi(h) + <embed(y), h>, so
      `forward` needs the labels.

    With `spectral_norm=True` (SNGAN, Miyato et al., ICLR 2018) every convolution, linear and
    embedding layer has its weight divided by its largest singular value (one power iteration
    per training forward), which bounds the discriminator's Lipschitz constant; BatchNorm is
    then left out, as in SNGAN.

    Args:
        num_classes: number of classes (at least 2).
        size: side of the square images: 28, 32 or 64.
        channels: 1 (grey) or 3 (RGB).
        width: channels of the first map; each halving of the side doubles them.
        conditioning: one of `CONDITIONINGS`: "ac", "tac", "adc", "reacgan", "projection".
        spectral_norm: spectral normalisation on every weight, and no BatchNorm.
        dropout: dropout before the heads (AC-GAN's discriminator used 0.5); 0 for none.
        embed_dim: size of ReACGAN's embedding and proxies (other conditionings ignore it).

    Raises:
        ValueError: for a bad size, class count, channel count or conditioning.

    Example:
        >>> d = Discriminator(10, size=28, channels=1)
        >>> out = d(torch.rand(8, 1, 28, 28) * 2 - 1)
        >>> out["source"].shape, out["class"].shape
        (torch.Size([8]), torch.Size([8, 10]))
        >>> d = Discriminator(10, conditioning="projection", spectral_norm=True)
        >>> d(torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8))["source"].shape
        torch.Size([8])
    """

    def __init__(
        self,
        num_classes: int,
        *,
        size: int = 28,
        channels: int = 1,
        width: int = 64,
        conditioning: str = "ac",
        spectral_norm: bool = False,
        dropout: float = 0.0,
        embed_dim: int = 128,
    ) -> None:
        super().__init__()
        _check_common(num_classes, size, channels)
        if width < 1 or embed_dim < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"need width >= 1, embed_dim >= 1 and 0 <= dropout < 1, got {width}, "
                f"{embed_dim}, {dropout}"
            )
        if conditioning not in CONDITIONINGS:
            raise ValueError(
                f"conditioning must be one of {sorted(CONDITIONINGS)}, got {conditioning!r}; "
                "see auxhead.gan.models.CONDITIONINGS"
            )
        self.num_classes = num_classes
        self.size = size
        self.channels = channels
        self.conditioning = conditioning
        self.spectral_norm = spectral_norm
        side, halvings = SIZES[size]
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        ch = width
        for _ in range(halvings - 1):
            if spectral_norm:  # SNGAN: no BatchNorm, so the convolution keeps its bias
                layers += [nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1)]
            else:
                layers += [
                    nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(ch * 2),
                ]
            layers += [nn.LeakyReLU(0.2, inplace=True)]
            ch *= 2
        layers += [nn.Flatten(), nn.Dropout(dropout)]
        self.trunk = nn.Sequential(*layers)
        features = ch * side * side
        self.source = nn.Linear(features, 1)
        # Built in this order so that "ac" and "tac" draw the same initial weights at one seed.
        if conditioning in ("ac", "tac"):
            self.classifier = nn.Linear(features, num_classes)
        if conditioning == "tac":
            self.twin = nn.Linear(features, num_classes)
        if conditioning == "adc":
            self.classifier = nn.Linear(features, 2 * num_classes)  # real 0..K-1, fake K..2K-1
        if conditioning == "reacgan":
            self.embed = nn.Linear(features, embed_dim)
            self.proxies = nn.Embedding(num_classes, embed_dim)
        if conditioning == "projection":
            self.embed = nn.Embedding(num_classes, features)
        self.apply(_init_dcgan)
        if spectral_norm:
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear, nn.Embedding)):
                    _spectral_norm(module)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Named raw outputs for (B, C, H, W) images in [-1, 1].

        Args:
            images: the batch.
            labels: (B,) class indices; required by "projection", ignored by the others.

        Returns:
            {"source": (B,) real-vs-generated logits, and the conditioning's class outputs}.
        """
        h = self.trunk(images)  # (B, features)
        out = {"source": self.source(h).squeeze(1)}  # (B,)
        if self.conditioning in ("ac", "tac"):
            out["class"] = self.classifier(h)  # (B, K)
            if self.conditioning == "tac":
                out["twin"] = self.twin(h)  # (B, K)
        elif self.conditioning == "adc":
            real_fake = self.classifier(h)  # (B, 2K)
            out["class"], out["fake_class"] = real_fake.split(self.num_classes, dim=1)
        elif self.conditioning == "reacgan":
            embedding = F.normalize(self.embed(h), dim=1)  # (B, E), unit rows
            proxies = F.normalize(self.proxies.weight, dim=1)  # (K, E)
            out["embedding"] = embedding
            out["class"] = embedding @ proxies.T  # (B, K) cosines
        else:  # projection
            if labels is None:
                raise ValueError(
                    "Discriminator(conditioning='projection') needs the labels: "
                    "discriminator(images, labels)"
                )
            labels = _check_labels(labels, self.num_classes, h.device, "discriminator")
            if len(labels) != len(h):
                raise ValueError(f"{len(h)} images but {len(labels)} labels")
            out["source"] = out["source"] + (self.embed(labels) * h).sum(dim=1)  # (B,)
        return out


def make_grid(images: torch.Tensor, ncol: int, *, pad: int = 2, value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images row by row into one (C, H', W') image, `ncol` per row.

    Args:
        images: the images, N >= 1.
        ncol: images per row; the last row is padded with `value`.
        pad: pixels of border around and between images.
        value: the border's value (1 is white for images in [0, 1]).
    """
    if images.dim() != 4 or len(images) == 0 or ncol < 1:
        raise ValueError(
            f"need (N, C, H, W) images with N >= 1 and ncol >= 1, got "
            f"{tuple(images.shape)} and ncol={ncol}"
        )
    n, c, h, w = images.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = images.new_full((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), value)
    for i in range(n):
        top, left = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid
