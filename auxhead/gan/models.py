"""AC-GAN networks (Odena et al., ICML 2017), DCGAN-style and sized for 28, 32 or 64 pixels.

`Generator(noise, labels)` draws images in [-1, 1] (tanh), conditioned on the class through an
embedding. `Discriminator(images)` returns named raw logits from one shared trunk: "source"
(real vs generated), "class", and with `twin=True` the TAC-GAN twin classifier's "twin".
`Generator.generate` and `Generator.sample_grid` give images in [0, 1], ready to save or score.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IMG_SIZES", "Discriminator", "Generator", "make_grid"]

# Each size is a 4x4 or 7x7 map doubled k times: (smallest map side, number of doublings).
IMG_SIZES: dict[int, tuple[int, int]] = {28: (7, 2), 32: (4, 3), 64: (4, 4)}


def _check_common(n_classes: int, img_size: int, channels: int) -> None:
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(
            f"an AC-GAN needs at least 2 classes to condition on, got n_classes={n_classes!r}; "
            "for a single class train an unconditional GAN instead"
        )
    if img_size not in IMG_SIZES:
        raise ValueError(
            f"img_size must be one of {sorted(IMG_SIZES)}, got {img_size!r}; "
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
        latent_dim: size of the noise vector z.
        n_classes: number of classes to condition on (at least 2).
        img_size: side of the square images: 28, 32 or 64.
        channels: 1 (grey) or 3 (RGB).
        width: channels of the last hidden map; the others are multiples of it.
        embed_dim: size of the class embedding; default `latent_dim`.

    Example:
        >>> g = Generator(64, n_classes=10, img_size=28, channels=1)
        >>> images = g.generate(torch.arange(10))  # (10, 1, 28, 28) in [0, 1]
    """

    def __init__(
        self,
        latent_dim: int,
        n_classes: int,
        img_size: int,
        channels: int,
        *,
        width: int = 64,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        _check_common(n_classes, img_size, channels)
        if latent_dim < 1 or width < 1:
            raise ValueError(f"latent_dim and width must be >= 1, got {latent_dim}, {width}")
        self.latent_dim = latent_dim
        self.n_classes = n_classes
        self.img_size = img_size
        self.channels = channels
        embed_dim = latent_dim if embed_dim is None else embed_dim
        side, doublings = IMG_SIZES[img_size]
        self._start = (width * 2 ** (doublings - 1), side, side)

        self.embed = nn.Embedding(n_classes, embed_dim)
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

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([noise, self.embed(labels)], dim=1)  # (B, latent_dim + embed_dim)
        h = self.project(h).view(-1, *self._start)  # (B, C0, s, s)
        return self.decode(h)  # (B, channels, img_size, img_size) in [-1, 1]

    def check_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """`labels` as a 1-d int64 tensor on the generator's device, every one in range.

        Raises:
            ValueError: if a label is outside [0, n_classes), or `labels` is not 1-d integers.
        """
        labels = torch.as_tensor(labels)
        if labels.is_floating_point() or labels.is_complex() or labels.dim() > 1:
            raise ValueError(
                f"labels must be a 1-d sequence of class indices, got dtype {labels.dtype} "
                f"and shape {tuple(labels.shape)}"
            )
        labels = labels.long().reshape(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.n_classes):
            bad = labels[(labels < 0) | (labels >= self.n_classes)].unique().tolist()
            raise ValueError(
                f"labels must be in [0, {self.n_classes}) for a generator of {self.n_classes} "
                f"classes; got {bad[:10]}"
            )
        return labels.to(self.embed.weight.device)

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
            labels: class index of each image, in [0, n_classes).
            noise: (N, latent_dim) noise to use; default fresh N(0, 1) noise.
            seed: seed for that noise, for repeatable samples; default the global RNG.
            batch_size: images drawn per forward pass, to bound memory.

        Returns:
            (N, channels, img_size, img_size) float32 in [0, 1], on the generator's device.

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
            return torch.empty(0, self.channels, self.img_size, self.img_size, device=device)
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
            (channels, rows * (img_size + 2) + 2, cols * (img_size + 2) + 2) in [0, 1], on CPU.
        """
        if noise is None:
            noise = torch.randn(
                n_per_class, self.latent_dim, generator=torch.Generator().manual_seed(seed)
            )
        n_per_class = len(noise)
        labels = torch.arange(self.n_classes).repeat_interleave(n_per_class)
        images = self.generate(labels, noise=noise.repeat(self.n_classes, 1))
        return make_grid(images.cpu(), n_per_class)


class Discriminator(nn.Module):
    """DCGAN discriminator with AC-GAN's two heads on one shared trunk.

    Strided 4x4 convolutions with LeakyReLU(0.2) (BatchNorm after the first) halve the side down
    to 7x7 or 4x4; the flattened map feeds a linear "source" head (one real-vs-generated logit)
    and a linear "class" head (n_classes logits). `twin=True` adds TAC-GAN's twin classifier
    (Gong et al., NeurIPS 2019), trained on generated images only.

    Args:
        n_classes: number of classes (at least 2).
        img_size: side of the square images: 28, 32 or 64.
        channels: 1 (grey) or 3 (RGB).
        width: channels of the first map; each halving of the side doubles them.
        twin: add the TAC-GAN twin classifier head.
        dropout: dropout before the heads (AC-GAN's discriminator used 0.5); 0 for none.

    Example:
        >>> d = Discriminator(10, img_size=28, channels=1)
        >>> out = d(torch.rand(8, 1, 28, 28) * 2 - 1)
        >>> out["source"].shape, out["class"].shape
        (torch.Size([8]), torch.Size([8, 10]))
    """

    def __init__(
        self,
        n_classes: int,
        img_size: int,
        channels: int,
        *,
        width: int = 64,
        twin: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_common(n_classes, img_size, channels)
        if width < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need width >= 1 and 0 <= dropout < 1, got {width}, {dropout}")
        self.n_classes = n_classes
        self.img_size = img_size
        self.channels = channels
        side, halvings = IMG_SIZES[img_size]
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        ch = width
        for _ in range(halvings - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch *= 2
        layers += [nn.Flatten(), nn.Dropout(dropout)]
        self.trunk = nn.Sequential(*layers)
        features = ch * side * side
        self.source = nn.Linear(features, 1)
        self.classifier = nn.Linear(features, n_classes)
        self.twin = nn.Linear(features, n_classes) if twin else None
        self.apply(_init_dcgan)

    @property
    def has_twin(self) -> bool:
        """Whether the TAC-GAN twin classifier head exists."""
        return self.twin is not None

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(images)  # (B, features)
        out = {"source": self.source(h).squeeze(1), "class": self.classifier(h)}  # (B,), (B, K)
        if self.twin is not None:
            out["twin"] = self.twin(h)  # (B, K)
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
