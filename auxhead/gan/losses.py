"""AC-GAN's objectives (Odena et al., ICML 2017) and their modern variants.

With L_S the log-likelihood of the right source (real or generated) and L_C that of the right
class, the discriminator maximises L_S + L_C and the generator L_C - L_S. Both are written here
as losses to minimise, on raw logits (BCE-with-logits, cross-entropy); the generator's source
term takes the non-saturating form -log D(G(z)) rather than log(1 - D(G(z))).

The source term can instead be the hinge loss (Lim & Ye 2017; SAGAN, BigGAN): the
discriminator minimises mean(relu(1 - s_real)) + mean(relu(1 + s_fake)), the generator
-mean(s_fake).

The class term follows the discriminator's conditioning (`auxhead.gan.models.CONDITIONINGS`):

- "ac": cross-entropy of the classifier on real images, and on generated ones if
  `fake_class_loss` (the paper's choice, the default for "ac").
- "tac": TAC-GAN (Gong et al., NeurIPS 2019) adds a twin classifier that learns the classes of
  generated images only; the generator plays against it. The generator's class term then
  becomes CE(class) - CE(twin), which cancels the push towards easily classified images.
- "adc": ADC-GAN (Hou et al., ICML 2022): the classifier tells 2K classes apart, real class k
  and generated class k. The discriminator minimises CE(real, k) on real and CE(fake, K + k) on
  generated images; the generator CE(G(z, k), k) - CE(G(z, k), K + k), so it is rewarded for
  images the classifier takes for real class k and not for generated class k.
- "reacgan": ReACGAN's data-to-data cross-entropy (Kang et al., NeurIPS 2021), see
  `data_to_data_cross_entropy`; on real images for the discriminator (and generated ones if
  `fake_class_loss`), on generated ones for the generator.
- "projection": no class term; the class enters the source logit (Miyato & Koyama 2018).

AC-GAN is known to lose diversity within a class: its generator is rewarded for images that are
easy to classify, and nothing stops it from ignoring its noise. TAC-GAN, ADC-GAN and ReACGAN
each counter that; MSGAN's mode-seeking term (Mao et al., CVPR 2019) is offered beside them:
it penalises the generator when two noise vectors with the same class give similar images,
lambda * mean|z1 - z2| / mean|G(z1) - G(z2)|.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from auxhead.gan.models import CONDITIONINGS

__all__ = ["ADVERSARIAL_LOSSES", "ACGANLoss", "data_to_data_cross_entropy", "mode_seeking_term"]

Outputs = Mapping[str, torch.Tensor]

ADVERSARIAL_LOSSES = ("bce", "hinge")

# The discriminator outputs each conditioning's class term reads.
_NEEDS = {
    "ac": ("class",),
    "tac": ("class", "twin"),
    "adc": ("class", "fake_class"),
    "reacgan": ("class", "embedding"),
    "projection": (),
}


def _source_bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


def data_to_data_cross_entropy(
    embeddings: torch.Tensor,
    proxy_cosines: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.5,
    positive_margin: float = 0.98,
    negative_margin: float = 0.02,
) -> torch.Tensor:
    """ReACGAN's data-to-data cross-entropy (Kang et al., NeurIPS 2021, eq. 7), batch mean.

    For sample i with unit embedding f_i, its class proxy's cosine p_i = <f_i, v_{y_i}> and
    the other samples of other classes N(i) (same-class samples are not pushed away):

        l_i = -log( exp(pos_i) / (exp(pos_i) + sum_{j in N(i)} exp(neg_ij)) )
        pos_i = min(p_i - positive_margin, 0) / temperature
        neg_ij = max(<f_i, f_j> - negative_margin, 0) / temperature

    The margins stop rewarding a sample once it is close enough to its proxy and far enough
    from the others. Computed with a log-sum-exp, exactly; StudioGAN's implementation (whose
    defaults these are) subtracts the row maximum from the negatives only, which rescales them.

    Args:
        embeddings: (B, E) unit-length embeddings ("embedding" of the discriminator).
        proxy_cosines: (B, K) cosines between each embedding and each class proxy ("class").
        labels: (B,) classes.
        temperature: tau, > 0.
        positive_margin: m_p.
        negative_margin: m_n.

    Returns:
        The mean of l_i over the batch, a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = labels.long()
    positive = proxy_cosines.gather(1, labels[:, None]).squeeze(1)  # (B,)
    positive = (positive - positive_margin).clamp(max=0) / temperature
    negative = ((embeddings @ embeddings.T - negative_margin).clamp(min=0)) / temperature  # (B, B)
    other_class = labels[:, None] != labels[None, :]  # the diagonal is excluded too
    negative = negative.masked_fill(~other_class, float("-inf"))
    logits = torch.cat([positive[:, None], negative], dim=1)  # (B, 1 + B)
    return (torch.logsumexp(logits, dim=1) - positive).mean()


@dataclass(kw_only=True)
class ACGANLoss:
    """The discriminator's and the generator's losses, each a dict of named terms.

    Each method returns {"loss": total to minimise, "source": ...} and the conditioning's
    class terms: "class" (all but "projection") and, with "tac", "twin". The terms are
    unweighted and detached; "loss" carries the graph.

    Raises:
        ValueError: for an unknown `adversarial` or `conditioning`, a negative weight, or
            `fake_class_loss` with a conditioning it does not apply to.

    Example:
        >>> loss = ACGANLoss(class_weight=1.0)
        >>> d = loss.discriminator_loss(D(real), D(fake.detach()), y_real, y_fake)
        >>> d["loss"].backward()
        >>> g = loss.generator_loss(D(fake), y_fake)
        >>> hinge_reacgan = ACGANLoss(adversarial="hinge", conditioning="reacgan")
    """

    # Weight of the class terms against the source terms (1 in the paper).
    class_weight: float = 1.0
    # Train the discriminator's class output on generated images too ("ac", "tac", "reacgan").
    # None: on for "ac" as in the paper, off for "tac" and "reacgan" (real images only).
    fake_class_loss: bool | None = None
    # How the class is used; must match the discriminator's: see models.CONDITIONINGS.
    conditioning: str = "ac"
    # The source term: "bce" (the paper's, non-saturating for the generator) or "hinge".
    adversarial: str = "bce"
    # Weight lambda of MSGAN's mode-seeking term; 0 turns it off. The generator's batch is then
    # drawn in pairs: the second half repeats the first half's classes with new noise.
    mode_seeking: float = 0.0
    # ReACGAN's data-to-data cross-entropy: temperature and margins (StudioGAN's defaults).
    temperature: float = 0.5
    positive_margin: float = 0.98
    negative_margin: float = 0.02

    def __post_init__(self) -> None:
        for name in ("class_weight", "mode_seeking"):
            weight = getattr(self, name)
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
                raise ValueError(f"{name} must be a number >= 0, got {weight!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(
                f"conditioning must be one of {sorted(CONDITIONINGS)}, got "
                f"{self.conditioning!r}; see auxhead.gan.models.CONDITIONINGS"
            )
        if self.adversarial not in ADVERSARIAL_LOSSES:
            raise ValueError(
                f"adversarial must be one of {list(ADVERSARIAL_LOSSES)}, got {self.adversarial!r}"
            )
        if self.fake_class_loss is not None and self.conditioning in ("adc", "projection"):
            raise ValueError(
                f"fake_class_loss does not apply to conditioning={self.conditioning!r} (ADC-GAN "
                "always learns generated classes, projection has no classifier); leave it None"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    @property
    def tac(self) -> bool:
        """Whether this is TAC-GAN's loss (`conditioning == "tac"`)."""
        return self.conditioning == "tac"

    @property
    def class_on_fake(self) -> bool:
        """Whether the discriminator's class output learns from generated images."""
        if self.conditioning in ("adc", "projection"):
            return self.conditioning == "adc"
        default = self.conditioning == "ac"
        return default if self.fake_class_loss is None else self.fake_class_loss

    def _outputs(self, out: Outputs) -> Outputs:
        missing = [key for key in _NEEDS[self.conditioning] if key not in out]
        if missing:
            raise ValueError(
                f"ACGANLoss(conditioning={self.conditioning!r}) needs the discriminator's "
                f"{missing}, but its outputs have only {sorted(out)}; build "
                f"Discriminator(..., conditioning={self.conditioning!r})"
            )
        return out

    def _d2d(self, out: Outputs, labels: torch.Tensor) -> torch.Tensor:
        return data_to_data_cross_entropy(
            out["embedding"],
            out["class"],
            labels,
            temperature=self.temperature,
            positive_margin=self.positive_margin,
            negative_margin=self.negative_margin,
        )

    def discriminator_loss(
        self,
        real: Outputs,
        fake: Outputs,
        real_labels: torch.Tensor,
        fake_labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """-(L_S + L_C): the discriminator's loss on a real and a generated batch.

        Args:
            real: the discriminator's outputs on real images ("source" and the class outputs).
            fake: its outputs on generated images (detach them from the generator first).
            real_labels: the real images' classes, (B,) int64.
            fake_labels: the classes the generated images were conditioned on.

        Returns:
            {"loss", "source"[, "class"][, "twin"]}: the total and its unweighted terms.
        """
        real, fake = self._outputs(real), self._outputs(fake)
        if self.adversarial == "hinge":
            source = F.relu(1 - real["source"]).mean() + F.relu(1 + fake["source"]).mean()
        else:
            source = _source_bce(real["source"], True) + _source_bce(fake["source"], False)
        terms = {"source": source}
        if self.conditioning in ("ac", "tac"):
            cls = F.cross_entropy(real["class"], real_labels)
            if self.class_on_fake:
                cls = cls + F.cross_entropy(fake["class"], fake_labels)
            terms["class"] = cls
        elif self.conditioning == "adc":
            k = real["class"].shape[1]
            cls = F.cross_entropy(_dual(real), real_labels)  # real class k
            terms["class"] = cls + F.cross_entropy(_dual(fake), fake_labels + k)  # fake class k
        elif self.conditioning == "reacgan":
            cls = self._d2d(real, real_labels)
            if self.class_on_fake:
                cls = cls + self._d2d(fake, fake_labels)
            terms["class"] = cls
        if self.conditioning == "tac":
            terms["twin"] = F.cross_entropy(fake["twin"], fake_labels)
        total = source
        for name, term in terms.items():  # in order: "class" then "twin", as always
            if name != "source":
                total = total + self.class_weight * term
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
            {"loss", "source"[, "class"][, "twin"][, "mode_seeking"]}. With "tac" the twin
            term is subtracted; with "adc" "class" is CE(real class k) - CE(generated class k);
            the mode-seeking term is added with its weight.
        """
        fake = self._outputs(fake)
        if self.adversarial == "hinge":
            source = -fake["source"].mean()
        else:
            source = _source_bce(fake["source"], True)
        total = source
        terms = {"source": source}
        if self.conditioning in ("ac", "tac"):
            terms["class"] = F.cross_entropy(fake["class"], fake_labels)
        elif self.conditioning == "adc":
            dual, k = _dual(fake), fake["class"].shape[1]
            terms["class"] = F.cross_entropy(dual, fake_labels) - F.cross_entropy(
                dual, fake_labels + k
            )
        elif self.conditioning == "reacgan":
            terms["class"] = self._d2d(fake, fake_labels)
        if "class" in terms:
            total = total + self.class_weight * terms["class"]
        if self.conditioning == "tac":
            terms["twin"] = F.cross_entropy(fake["twin"], fake_labels)
            total = total - self.class_weight * terms["twin"]
        if self.mode_seeking > 0:
            if images is None or noise is None:
                raise ValueError(
                    "ACGANLoss(mode_seeking > 0) needs the generated images and their noise: "
                    "generator_loss(fake, labels, images=..., noise=...)"
                )
            terms["mode_seeking"] = mode_seeking_term(images, noise)
            total = total + self.mode_seeking * terms["mode_seeking"]
        return {"loss": total, **{name: term.detach() for name, term in terms.items()}}


def _dual(out: Outputs) -> torch.Tensor:
    """ADC-GAN's 2K logits: real class k at k, generated class k at K + k."""
    return torch.cat([out["class"], out["fake_class"]], dim=1)  # (B, 2K)


def mode_seeking_term(
    images: torch.Tensor, noise: torch.Tensor, *, eps: float = 1e-5
) -> torch.Tensor:
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
