"""AC-GAN's objectives (Odena et al., ICML 2017), optionally with TAC-GAN's twin classifier.

With L_S the log-likelihood of the right source (real or generated) and L_C that of the right
class, the discriminator maximises L_S + L_C and the generator L_C - L_S. Both are written here
as losses to minimise, on raw logits (BCE-with-logits, cross-entropy); the generator's source
term takes the non-saturating form -log D(G(z)) rather than log(1 - D(G(z))).

AC-GAN is known to lose diversity within a class: its generator is rewarded for images that are
easy to classify, and nothing stops it from ignoring its noise. Two counters are offered:

- TAC-GAN (Gong et al., NeurIPS 2019) adds a twin classifier that learns the classes of generated
  images only; the generator plays against it. The generator's class term then becomes
  CE(class) - CE(twin), which cancels the push towards easily classified images.
- MSGAN's mode-seeking term (Mao et al., CVPR 2019) penalises the generator when two noise
  vectors with the same class give similar images: lambda * mean|z1 - z2| / mean|G(z1) - G(z2)|.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ACGANLoss", "mode_seeking_term"]

Outputs = Mapping[str, torch.Tensor]


def _source(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


@dataclass
class ACGANLoss:
    """The discriminator's and the generator's losses, each a dict of named terms.

    Each method returns {"loss": total to minimise, "source": ..., "class": ...} and, with
    `tac`, "twin". The terms are unweighted and detached; "loss" carries the graph.

    Example:
        >>> loss = ACGANLoss(class_weight=1.0)
        >>> d = loss.discriminator_loss(D(real), D(fake.detach()), y_real, y_fake)
        >>> d["loss"].backward()
        >>> g = loss.generator_loss(D(fake), y_fake)
    """

    # Weight of the class terms against the source terms (1 in the paper).
    class_weight: float = 1.0
    # Train the discriminator's class head on generated images too, as the paper does.
    # None: on for AC-GAN, off with `tac` (TAC-GAN's classifier learns from real images only).
    fake_class_loss: bool | None = None
    # TAC-GAN's twin auxiliary classifier; needs `Discriminator(..., twin=True)`.
    tac: bool = False
    # Weight lambda of MSGAN's mode-seeking term; 0 turns it off. The generator's batch is then
    # drawn in pairs: the second half repeats the first half's classes with new noise.
    mode_seeking: float = 0.0

    def __post_init__(self) -> None:
        for name in ("class_weight", "mode_seeking"):
            weight = getattr(self, name)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ValueError(f"{name} must be a number >= 0, got {weight!r}")

    @property
    def class_on_fake(self) -> bool:
        """Whether the discriminator's class head learns from generated images."""
        return (not self.tac) if self.fake_class_loss is None else self.fake_class_loss

    def _twin(self, out: Outputs) -> torch.Tensor:
        if "twin" not in out:
            raise ValueError(
                "ACGANLoss(tac=True) needs the discriminator's twin classifier, but its outputs "
                f"have only {sorted(out)}; build Discriminator(..., twin=True)"
            )
        return out["twin"]

    def discriminator_loss(
        self,
        real: Outputs,
        fake: Outputs,
        real_labels: torch.Tensor,
        fake_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """-(L_S + L_C): the discriminator's loss on a real and a generated batch.

        Args:
            real: the discriminator's outputs on real images ("source", "class"[, "twin"]).
            fake: its outputs on generated images (detach them from the generator first).
            real_labels: the real images' classes, (B,) int64.
            fake_labels: the classes the generated images were conditioned on.

        Returns:
            {"loss", "source", "class"[, "twin"]}: the total and its unweighted terms.
        """
        source = _source(real["source"], True) + _source(fake["source"], False)
        cls = F.cross_entropy(real["class"], real_labels)
        if self.class_on_fake:
            cls = cls + F.cross_entropy(fake["class"], fake_labels)
        total = source + self.class_weight * cls
        terms = {"source": source, "class": cls}
        if self.tac:
            twin = F.cross_entropy(self._twin(fake), fake_labels)
            total = total + self.class_weight * twin
            terms["twin"] = twin
        return {"loss": total, **{name: term.detach() for name, term in terms.items()}}

    def generator_loss(
        self,
        fake: Outputs,
        fake_labels: torch.Tensor,
        *,
        images: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """-(L_C - L_S) in the non-saturating form: the generator's loss on a generated batch.

        Args:
            fake: the discriminator's outputs on generated images, not detached.
            fake_labels: the classes the images were conditioned on.
            images: the generated images, (2h, C, H, W), needed with `mode_seeking`: image i
                and image i + h share a class.
            noise: the noise they were drawn from, (2h, latent_dim).

        Returns:
            {"loss", "source", "class"[, "twin"][, "mode_seeking"]}; with `tac` the twin term is
            subtracted, the mode-seeking term is added with its weight.
        """
        source = _source(fake["source"], True)
        cls = F.cross_entropy(fake["class"], fake_labels)
        total = source + self.class_weight * cls
        terms = {"source": source, "class": cls}
        if self.tac:
            twin = F.cross_entropy(self._twin(fake), fake_labels)
            total = total - self.class_weight * twin
            terms["twin"] = twin
        if self.mode_seeking > 0:
            if images is None or noise is None:
                raise ValueError(
                    "ACGANLoss(mode_seeking > 0) needs the generated images and their noise: "
                    "generator_loss(fake, labels, images=..., noise=...)"
                )
            seeking = mode_seeking_term(images, noise)
            total = total + self.mode_seeking * seeking
            terms["mode_seeking"] = seeking
        return {"loss": total, **{name: term.detach() for name, term in terms.items()}}


def mode_seeking_term(images: torch.Tensor, noise: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's term 1 / (mean|G(z1) - G(z2)| / mean|z1 - z2| + eps) over pairs (i, i + h).

    Small when two noise vectors give different images, large when the generator ignores its
    noise. The first half of `images` pairs with the second half (of the same classes); an
    odd last image is left out.
    """
    if len(noise) != len(images):
        raise ValueError(
            f"the mode-seeking term needs one noise vector per image, got {len(images)} images "
            f"and {len(noise)} noise vectors"
        )
    h = len(images) // 2
    if h == 0:  # a batch of one has no pair: no term
        return images.new_zeros(())
    image_gap = (images[:h] - images[h : 2 * h]).abs().mean()
    noise_gap = (noise[:h] - noise[h : 2 * h]).abs().mean()
    return 1 / (image_gap / noise_gap + eps)
