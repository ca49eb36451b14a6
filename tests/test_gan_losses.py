import math

import pytest
import torch
import torch.nn.functional as F

from auxhead.gan.losses import ACGANLoss, data_to_data_cross_entropy, mode_seeking_term
from auxhead.gan.models import Discriminator, Generator


def _outputs(b=6, k=3, twin=True):
    out = {"source": torch.randn(b), "class": torch.randn(b, k)}
    if twin:
        out["twin"] = torch.randn(b, k)
    return out


def _ce(logits, y):
    return (-logits.log_softmax(1)[torch.arange(len(y)), y]).mean()


def test_discriminator_loss_is_minus_ls_minus_lc():
    real, fake = _outputs(), _outputs()
    yr, yf = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 1, 0, 0])
    out = ACGANLoss(class_weight=0.5).discriminator_loss(real, fake, yr, yf)
    # -log sigmoid(s) on real, -log(1 - sigmoid(s)) on fake
    source = F.softplus(-real["source"]).mean() + F.softplus(fake["source"]).mean()
    cls = _ce(real["class"], yr) + _ce(fake["class"], yf)
    torch.testing.assert_close(out["source"], source)
    torch.testing.assert_close(out["class"], cls)
    torch.testing.assert_close(out["loss"], source + 0.5 * cls)
    assert "twin" not in out


def test_generator_loss_is_non_saturating():
    fake, yf = _outputs(), torch.tensor([2, 2, 1, 1, 0, 0])
    out = ACGANLoss().generator_loss(fake, yf)
    expected = F.softplus(-fake["source"]).mean() + _ce(fake["class"], yf)
    torch.testing.assert_close(out["loss"], expected)


def test_fake_class_loss_can_be_turned_off():
    real, fake = _outputs(), _outputs()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = ACGANLoss(fake_class_loss=False).discriminator_loss(real, fake, y, y)
    torch.testing.assert_close(out["class"], _ce(real["class"], y))
    assert ACGANLoss().class_on_fake and not ACGANLoss(conditioning="tac").class_on_fake
    assert ACGANLoss(conditioning="tac", fake_class_loss=True).class_on_fake
    assert not ACGANLoss(conditioning="reacgan").class_on_fake
    assert ACGANLoss(conditioning="adc").class_on_fake
    assert not ACGANLoss(conditioning="projection").class_on_fake


def test_tac_twin_term_is_added_for_d_and_subtracted_for_g():
    real, fake = _outputs(), _outputs()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = ACGANLoss(conditioning="tac", class_weight=2.0)
    assert loss.tac
    twin = _ce(fake["twin"], y)
    d = loss.discriminator_loss(real, fake, y, y)
    torch.testing.assert_close(d["twin"], twin)
    torch.testing.assert_close(d["loss"], d["source"] + 2 * _ce(real["class"], y) + 2 * twin)
    g = loss.generator_loss(fake, y)
    torch.testing.assert_close(g["loss"], g["source"] + 2 * g["class"] - 2 * twin)


def test_missing_outputs_and_bad_settings_are_refused():
    with pytest.raises(
        ValueError, match=r"needs the discriminator's \['twin'\].*conditioning='tac'"
    ):
        ACGANLoss(conditioning="tac").generator_loss(
            _outputs(twin=False), torch.zeros(6, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="class_weight must be a number >= 0, got -1"):
        ACGANLoss(class_weight=-1)
    with pytest.raises(ValueError, match=r"adversarial must be one of \['bce', 'hinge'\]"):
        ACGANLoss(adversarial="wasserstein")
    with pytest.raises(ValueError, match="conditioning must be one of"):
        ACGANLoss(conditioning="cgan")
    with pytest.raises(ValueError, match="fake_class_loss does not apply"):
        ACGANLoss(conditioning="adc", fake_class_loss=True)


# The variants' terms by hand on tiny tensors --------------------------------------------------


def test_hinge_source_terms_by_hand():
    real = {"source": torch.tensor([2.0, 0.5, -1.0]), "class": torch.zeros(3, 2)}
    fake = {"source": torch.tensor([-3.0, 0.0, 0.25]), "class": torch.zeros(3, 2)}
    y = torch.tensor([0, 1, 0])
    loss = ACGANLoss(adversarial="hinge")
    d = loss.discriminator_loss(real, fake, y, y)
    # real: relu(1 - s) = 0, 0.5, 2 -> 2.5 / 3; fake: relu(1 + s) = 0, 1, 1.25 -> 2.25 / 3
    torch.testing.assert_close(d["source"], torch.tensor(2.5 / 3 + 2.25 / 3))
    g = loss.generator_loss(fake, y)
    torch.testing.assert_close(g["source"], torch.tensor((3.0 - 0.0 - 0.25) / 3))
    torch.testing.assert_close(g["loss"], g["source"] + math.log(2))  # uniform class logits


def test_adc_terms_by_hand():
    # K = 2: dual logits [real 0, real 1, fake 0, fake 1]
    real = {"source": torch.zeros(2), "class": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
            "fake_class": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}  # fmt: skip
    fake = {"source": torch.zeros(2), "class": torch.tensor([[0.0, 3.0], [0.0, 0.0]]),
            "fake_class": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}  # fmt: skip
    y_real, y_fake = torch.tensor([0, 1]), torch.tensor([1, 0])
    loss = ACGANLoss(conditioning="adc", class_weight=0.5)

    def nll(logits, k):  # -log softmax(logits)[k]
        return math.log(sum(math.exp(v) for v in logits)) - logits[k]

    # discriminator: real sample i should be real class y, generated sample i fake class y
    d_class = (nll([1, 0, 0, 0], 0) + nll([0, 0, 0, 2], 1)) / 2
    d_class += (nll([0, 3, 1, 0], 2 + 1) + nll([0, 0, 0, 0], 2 + 0)) / 2
    d = loss.discriminator_loss(real, fake, y_real, y_fake)
    torch.testing.assert_close(d["class"], torch.tensor(d_class))
    torch.testing.assert_close(d["loss"], d["source"] + 0.5 * d["class"])
    # generator: be taken for real class y, not for fake class y
    g_class = (nll([0, 3, 1, 0], 1) - nll([0, 3, 1, 0], 3)) / 2
    g_class += (nll([0, 0, 0, 0], 0) - nll([0, 0, 0, 0], 2)) / 2
    g = loss.generator_loss(fake, y_fake)
    torch.testing.assert_close(g["class"], torch.tensor(g_class))
    torch.testing.assert_close(g["loss"], g["source"] + 0.5 * g["class"])


def _d2d_by_hand(embeddings, cosines, labels, tau, m_p, m_n):
    """The paper's equation, one sample at a time, in plain Python."""
    e, c, y = embeddings.tolist(), cosines.tolist(), labels.tolist()
    total = 0.0
    for i in range(len(y)):
        pos = min(c[i][y[i]] - m_p, 0) / tau
        negs = [
            max(sum(a * b for a, b in zip(e[i], e[j], strict=True)) - m_n, 0) / tau
            for j in range(len(y))
            if y[j] != y[i]
        ]
        total += -math.log(math.exp(pos) / (math.exp(pos) + sum(math.exp(n) for n in negs)))
    return total / len(y)


def test_data_to_data_cross_entropy_by_hand():
    torch.manual_seed(0)
    embeddings = F.normalize(torch.randn(5, 4), dim=1)
    proxies = F.normalize(torch.randn(3, 4), dim=1)
    cosines = embeddings @ proxies.T
    labels = torch.tensor([0, 1, 0, 2, 1])  # two pairs of one class: not each other's negatives
    for tau, m_p, m_n in [(0.5, 0.98, 0.02), (0.1, 0.5, -1.0), (1.0, -1.0, 0.0)]:
        got = data_to_data_cross_entropy(
            embeddings, cosines, labels, temperature=tau, positive_margin=m_p, negative_margin=m_n
        )
        expected = _d2d_by_hand(embeddings, cosines, labels, tau, m_p, m_n)
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_data_to_data_cross_entropy_ignores_same_class_samples_and_is_stable():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    cos = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # each sample on its proxy
    # Positives are past their margin (pos = 0); samples of the other class are orthogonal,
    # below the negative margin (neg = 0); the twin of the same class is not a negative.
    # So l = log(1 + number of other-class samples): log 2, log 2, log 3, at any temperature.
    expected = torch.tensor((2 * math.log(2) + math.log(3)) / 3)
    for tau in (1.0, 1e-4):
        got = data_to_data_cross_entropy(e, cos, torch.tensor([0, 0, 1]), temperature=tau)
        torch.testing.assert_close(got, expected)
    no_negatives = data_to_data_cross_entropy(e[:2], cos[:2], torch.tensor([0, 0]))
    torch.testing.assert_close(no_negatives, torch.tensor(0.0))
    # close negatives at a tiny temperature: exp(~1e4) overflows, the log-sum-exp does not
    close = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01]]), dim=1)
    hard = data_to_data_cross_entropy(close, cos[:2], torch.tensor([0, 1]), temperature=1e-4)
    assert torch.isfinite(hard) and hard > 1000


def test_reacgan_loss_uses_d2d_on_real_for_d_and_on_fake_for_g():
    d = Discriminator(3, width=4, conditioning="reacgan", embed_dim=8)
    real, fake = d(torch.rand(6, 1, 28, 28)), d(torch.rand(6, 1, 28, 28))
    y_real, y_fake = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 1, 1, 0, 0])
    loss = ACGANLoss(conditioning="reacgan", class_weight=2.0)

    def d2d(out, y):
        return data_to_data_cross_entropy(out["embedding"], out["class"], y)

    out = loss.discriminator_loss(real, fake, y_real, y_fake)
    torch.testing.assert_close(out["class"], d2d(real, y_real))
    torch.testing.assert_close(out["loss"], out["source"] + 2 * out["class"])
    both = ACGANLoss(conditioning="reacgan", fake_class_loss=True)
    torch.testing.assert_close(
        both.discriminator_loss(real, fake, y_real, y_fake)["class"],
        d2d(real, y_real) + d2d(fake, y_fake),
    )
    g = loss.generator_loss(fake, y_fake)
    torch.testing.assert_close(g["class"], d2d(fake, y_fake))


def test_projection_has_only_the_source_term():
    real, fake = {"source": torch.randn(4)}, {"source": torch.randn(4)}
    y = torch.tensor([0, 1, 0, 1])
    loss = ACGANLoss(conditioning="projection", class_weight=3.0)
    d = loss.discriminator_loss(real, fake, y, y)
    assert sorted(d) == ["loss", "source"]
    torch.testing.assert_close(d["loss"], d["source"])
    g = loss.generator_loss(fake, y)
    assert sorted(g) == ["loss", "source"]


@pytest.mark.parametrize("conditioning", ["ac", "tac", "adc", "reacgan", "projection"])
@pytest.mark.parametrize("adversarial", ["bce", "hinge"])
def test_a_discriminator_step_lowers_its_loss_on_that_batch(conditioning, adversarial):
    torch.manual_seed(0)
    d = Discriminator(3, width=4, conditioning=conditioning, embed_dim=8)
    loss = ACGANLoss(conditioning=conditioning, adversarial=adversarial)
    real, fake = torch.rand(16, 1, 28, 28) * 2 - 1, torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 3, (16,))
    # ReACGAN's loss sees the embedding only through its direction, and DCGAN's N(0, 0.02) init
    # leaves the raw embedding short (norm ~0.004), so a step of 1e-4 already turns it far:
    # a smaller one checks that the gradient points downhill
    opt = torch.optim.SGD(d.parameters(), lr=1e-6 if conditioning == "reacgan" else 0.05)

    def d_loss():
        return loss.discriminator_loss(d(real, y), d(fake, y), y, y)["loss"]

    d.eval()  # fixed BatchNorm statistics, so that before and after compare the same function
    before = d_loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert d_loss().item() < before.item()


@pytest.mark.parametrize("conditioning", ["ac", "tac", "adc", "reacgan", "projection"])
def test_a_generator_step_lowers_its_loss(conditioning):
    torch.manual_seed(0)
    g = Generator(3, latent_dim=8, width=4).eval()
    d = Discriminator(3, width=4, conditioning=conditioning, embed_dim=8).eval()
    z, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(g.parameters(), lr=1.0)  # DCGAN's N(0, 0.02) init: small gradients
    loss = ACGANLoss(conditioning=conditioning)
    before = loss.generator_loss(d(g(z, y), y), y)["loss"]
    before.backward()
    opt.step()
    assert loss.generator_loss(d(g(z, y), y), y)["loss"].item() < before.item()
    assert all(p.grad is not None for p in d.parameters())  # gradients went through D


def test_mode_seeking_term_by_hand():
    images = torch.tensor([0.0, 0.0, 1.0, 3.0]).view(4, 1, 1, 1)  # pairs (0, 1) and (0, 3)
    noise = torch.tensor([[0.0], [0.0], [2.0], [2.0]])  # both pairs 2 apart
    # mean image gap 2, mean noise gap 2: ratio 1
    torch.testing.assert_close(mode_seeking_term(images, noise), torch.tensor(1 / (1 + 1e-5)))
    assert mode_seeking_term(images[:1], noise[:1]) == 0  # no pair
    with pytest.raises(ValueError, match="one noise vector per image"):
        mode_seeking_term(images, noise[:3])


def test_mode_seeking_is_added_to_the_generator_loss():
    fake, y = _outputs(b=4, twin=False), torch.tensor([0, 1, 0, 1])
    images, noise = torch.rand(4, 1, 2, 2), torch.randn(4, 3)
    plain = ACGANLoss().generator_loss(fake, y)
    out = ACGANLoss(mode_seeking=0.5).generator_loss(fake, y, images=images, noise=noise)

    torch.testing.assert_close(out["mode_seeking"], mode_seeking_term(images, noise))
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * out["mode_seeking"])
    with pytest.raises(ValueError, match="images=..., noise=..."):
        ACGANLoss(mode_seeking=0.5).generator_loss(fake, y)
