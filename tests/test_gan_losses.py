import pytest
import torch
import torch.nn.functional as F

from auxhead.gan.losses import ACGANLoss
from auxhead.gan.models import Discriminator


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
    assert ACGANLoss().class_on_fake and not ACGANLoss(tac=True).class_on_fake
    assert ACGANLoss(tac=True, fake_class_loss=True).class_on_fake


def test_tac_twin_term_is_added_for_d_and_subtracted_for_g():
    real, fake = _outputs(), _outputs()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = ACGANLoss(tac=True, class_weight=2.0)
    twin = _ce(fake["twin"], y)
    d = loss.discriminator_loss(real, fake, y, y)
    torch.testing.assert_close(d["twin"], twin)
    torch.testing.assert_close(d["loss"], d["source"] + 2 * _ce(real["class"], y) + 2 * twin)
    g = loss.generator_loss(fake, y)
    torch.testing.assert_close(g["loss"], g["source"] + 2 * g["class"] - 2 * twin)


def test_tac_without_twin_head_and_bad_weight_are_refused():
    with pytest.raises(ValueError, match=r"twin=True"):
        ACGANLoss(tac=True).generator_loss(_outputs(twin=False), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="class_weight must be a number >= 0, got -1"):
        ACGANLoss(class_weight=-1)


@pytest.mark.parametrize("tac", [False, True])
def test_a_discriminator_step_lowers_its_loss_on_that_batch(tac):
    d = Discriminator(3, 28, 1, width=4, twin=tac)
    loss = ACGANLoss(tac=tac)
    real, fake = torch.rand(16, 1, 28, 28) * 2 - 1, torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(d.parameters(), lr=0.05)

    def d_loss():
        return loss.discriminator_loss(d(real), d(fake), y, y)["loss"]

    d.eval()  # fixed BatchNorm statistics, so that before and after compare the same function
    before = d_loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    assert d_loss().item() < before.item()


def test_a_generator_step_lowers_its_loss():
    from auxhead.gan.models import Generator

    g, d = Generator(8, 3, 28, 1, width=4).eval(), Discriminator(3, 28, 1, width=4).eval()
    z, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(g.parameters(), lr=1.0)  # DCGAN's N(0, 0.02) init: small gradients
    loss = ACGANLoss()
    before = loss.generator_loss(d(g(z, y)), y)["loss"]
    before.backward()
    opt.step()
    assert loss.generator_loss(d(g(z, y)), y)["loss"].item() < before.item()
    assert all(p.grad is not None for p in d.parameters())  # gradients went through D


def test_mode_seeking_term_by_hand():
    from auxhead.gan.losses import mode_seeking_term

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
    from auxhead.gan.losses import mode_seeking_term

    torch.testing.assert_close(out["mode_seeking"], mode_seeking_term(images, noise))
    torch.testing.assert_close(out["loss"], plain["loss"] + 0.5 * out["mode_seeking"])
    with pytest.raises(ValueError, match="images=..., noise=..."):
        ACGANLoss(mode_seeking=0.5).generator_loss(fake, y)
