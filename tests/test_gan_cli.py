"""`auxhead acgan` in process: a tiny real run, the options it refuses, the output folder, and
the GAN metrics' refusal of non-finite samples."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import assert_same_state, error_line, process_state

from auxhead.cli import main
from auxhead.cli._common import LOCK_NAME
from auxhead.cli.acgan import DEFAULT_EPOCHS, MIN_STEPS_PER_EPOCH, classifier_epochs, gan_budget
from auxhead.gan.metrics import (
    SmallCNN,
    class_accuracy,
    frechet_distance,
    intra_class_diversity,
    mean_pairwise_distance,
)
from auxhead.gan.models import Generator

TINY = ["--epochs", "1", "--width", "4", "--latent-dim", "8", "--bs", "16", "--threads", "1"]
TINY += ["--n-per-class", "100", "--classifier-epochs", "1"]


@pytest.fixture(autouse=True)
def _threads_are_left_alone():
    threads = torch.get_num_threads()  # --threads 1 sets them for the run only
    yield
    assert torch.get_num_threads() == threads


def _image_folder(root, classes=("a", "b", "c"), n=12, size=(28, 28)):
    """One subfolder of `n` noisy PNGs per class, each class a different brightness."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = np.clip(rng.normal(60 + 70 * k, 30, size), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_classifier_epochs_scale_with_the_data():
    assert classifier_epochs(60_000) == 2  # Fashion-MNIST: 469 steps an epoch
    assert classifier_epochs(1_438) == 75  # digits: 12 steps an epoch, 900 steps in all
    assert classifier_epochs(300) == 100  # a small folder: 3 steps an epoch, capped
    assert classifier_epochs(10) == 100
    assert classifier_epochs(1_438, requested=3) == 3


def test_gan_budget_fits_the_data():
    fmnist = gan_budget(60_000, 128)
    assert fmnist == (DEFAULT_EPOCHS, 1, 468, 128, "the default, 7020 steps")
    digits = gan_budget(1_438, 128)  # 11 steps a pass: 20 passes make 224 steps an epoch
    assert digits.repeats == 20 and digits.steps_per_epoch == 1_438 * 20 // 128 == 224
    assert digits.epochs == DEFAULT_EPOCHS and "passes 20 times over the 1438" in digits.why
    for n in (3, 24, 50, 1_000):  # tiny folders: 15 epochs all the same, each long enough
        budget = gan_budget(n, 128)
        assert budget.epochs == DEFAULT_EPOCHS
        bs = min(n, 128)
        assert budget.bs == bs
        assert budget.steps_per_epoch == n * budget.repeats // bs >= MIN_STEPS_PER_EPOCH
        assert n * (budget.repeats - 1) // bs < MIN_STEPS_PER_EPOCH  # no more passes than needed
    assert gan_budget(50, 128).bs == 50 and gan_budget(50, 128).steps_per_epoch == 220
    assert gan_budget(50, 128).why.endswith(", all 50 in every batch")
    given = gan_budget(1_438, 128, requested=4)
    assert given.epochs == 4 and given.repeats == 20 and given.why.startswith("--epochs given")


def test_tiny_run_with_tac_writes_everything(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    (out / "grids").mkdir(parents=True)
    (out / "grids" / "grid_epoch_099.png").write_text("an earlier run's")
    args = ["--conditioning", "ac", "tac", "--out", str(out)]
    before = process_state()
    assert main(["acgan", *TINY, "--data", str(data), *args]) == 0
    assert_same_state(before, process_state())  # threads, seeds and cuDNN flags put back
    stdout = capsys.readouterr().out
    assert "wrote" in stdout
    assert "AC-GAN: 1 epoch (" in stdout  # not "1 epochs"
    assert "tip: on few images (30 to train) --augment color,translation,cutout" in stdout
    assert not (out / "grids" / "grid_epoch_099.png").exists()  # the earlier run's: removed
    for folder in (out, out / "tac"):
        for name in ("grid.png", "generator.pth", "learner.pth", "samples.npz", "checkpoint.pth"):
            assert (folder / name).is_file(), folder / name
        assert (folder / "grids" / "grid_epoch_001.png").is_file()
        with np.load(folder / "samples.npz") as samples:
            images, labels = samples["images"], samples["labels"]
        assert images.dtype == np.float32 and images.shape == (300, 1, 28, 28)
        assert images.min() >= 0 and images.max() <= 1
        assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [100] * 3
    assert not (out / LOCK_NAME).exists()
    saved = json.loads((out / "report.json").read_text())
    assert [run["variant"] for run in saved["runs"]] == ["AC-GAN", "TAC-GAN"]
    assert [run["loss"]["class_on_fake"] for run in saved["runs"]] == [False, False]
    assert [run["conditioning"] for run in saved["runs"]] == ["ac", "tac"]
    assert [run["folder"] for run in saved["runs"]] == ["", "tac"]
    assert saved["config"]["epochs"] == 1 and saved["epochs_why"].startswith("--epochs given")
    assert 0 <= saved["reference"]["classifier_test_accuracy"]["overall"] <= 1
    for run in saved["runs"]:
        assert len(run["accuracy"]["per_class"]) == 3 and run["fid"] >= 0
        assert len(run["diversity_ratio"]) == 3 and run["history"][0]["d_loss"] > 0
    markdown = (out / "report.md").read_text()
    assert "| AC-GAN | TAC-GAN |" in markdown and "Frechet" in markdown
    # each run's class loss is described, not only the first's
    assert "- AC-GAN (`ac`): class loss weight 1.5, on real images only\n" in markdown
    assert "- TAC-GAN (`tac`): class loss weight 1.5, on real images only, and a twin" in markdown
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert images == ["grid.png", "tac/grid.png"]
    assert all((out / image).is_file() for image in images)
    why = "1 epoch (--epochs given, 221 steps: each epoch passes 118 times over the 30 "
    assert why in markdown
    train_time = next(line for line in markdown.splitlines() if line.startswith("| train time"))
    assert " 0 |" not in train_time  # a short run shows tenths of a second, not 0
    assert not list(out.glob(".*tmp*")) and not list((out / "tac").glob(".*tmp*"))
    # the generator file rebuilds the generator; the checkpoint holds both networks
    ckpt = torch.load(out / "generator.pth")
    g = Generator(**ckpt["config"])
    g.load_state_dict(ckpt["state_dict"])
    assert g.generate([2]).shape == (1, 1, 28, 28)
    checkpoint = torch.load(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 1 and set(checkpoint) >= {"generator", "discriminator"}
    # generator.pth holds the weights that drew the samples: the EMA's
    ema = {k.removeprefix("module."): v for k, v in checkpoint["generator_ema"].items()}
    torch.testing.assert_close(ckpt["state_dict"], {k: ema[k] for k in ckpt["state_dict"]})
    assert checkpoint["generator"].keys() == ckpt["state_dict"].keys()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--class-weight", "nan"], "--class-weight: must be a finite number, got nan"),
        (["--mode-seeking", "inf"], "--mode-seeking: must be a finite number, got inf"),
        (["--lr", "inf"], "--lr: must be a finite number, got inf"),
        (["--size", "30"], "--size: invalid choice: 30"),
        (["--epochs", "0"], "--epochs: must be at least 1, got 0"),
        (["--conditioning", "acgan"], "--conditioning: invalid choice: 'acgan'"),
        (["--loss", "wgan"], "--loss: invalid choice: 'wgan'"),
        (["--ema", "1"], "--ema: must be in [0, 1)"),
        (["--ema", "nan"], "--ema: must be a finite number, got nan"),
    ],
)
def test_bad_options_are_refused_by_the_parser(tmp_path, capsys, argv, expected):
    assert main(["acgan", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_input_one_clear_line(tmp_path, capsys):
    out = ["--out", tmp_path / "o"]
    assert "--n-per-class must be >= 100" in error_line(
        capsys, ["acgan", "--n-per-class", "10", *out]
    )
    assert "--bs 1" in error_line(capsys, ["acgan", "--bs", "1", *out])
    assert "no data set" in error_line(capsys, ["acgan", "--data", "/no/such/folder", *out])
    odd = _image_folder(tmp_path / "odd", size=(28, 40))
    assert re.search(
        r"images are 28x40.*--size N", error_line(capsys, ["acgan", "--data", odd, *out])
    )
    _image_folder(tmp_path / "one", classes=("only",), n=4)
    assert "single class" in error_line(capsys, ["acgan", "--data", tmp_path / "one", *out])
    _image_folder(tmp_path / "few", n=4)  # 1 image of each class held out: too few to score
    few = error_line(capsys, ["acgan", "--data", tmp_path / "few", *out])
    assert "at least 2 held-out images of every class" in few and "(a: 1, b: 1, c: 1)" in few
    assert "--out is empty" in error_line(capsys, ["acgan", "--out", ""])
    assert "--augment flip: unknown" in error_line(capsys, ["acgan", "--augment", "flip", *out])


FAKE = "ac, tac, reacgan"  # the conditionings --fake-class-loss applies to


@pytest.mark.parametrize(
    ("argv", "option", "applies"),
    [
        (["--fake-class-loss"], "--fake-class-loss does not apply to --conditioning adc (", FAKE),
        (["--conditioning", "projection", "--fake-class-loss"],
         "--conditioning projection (a projection discriminator has no class head)", FAKE),
        (["--conditioning", "adc", "projection", "--fake-class-loss"],
         "--fake-class-loss does not apply to --conditioning adc projection", FAKE),
        (["--conditioning", "projection", "--class-weight", "2"],
         "--class-weight does not apply to --conditioning projection", "ac, tac, adc, reacgan"),
    ],
)  # fmt: skip
def test_options_that_no_chosen_conditioning_uses_are_refused(
    tmp_path, capsys, argv, option, applies
):
    line = error_line(capsys, ["acgan", *argv, "--out", tmp_path / "o"])
    assert option in line and f"it applies to {applies}" in line
    assert not (tmp_path / "o").exists()


def test_options_that_some_chosen_conditioning_uses_are_accepted():
    from auxhead.cli.acgan import ACGANConfig, check_config

    check_config(ACGANConfig(conditioning=("adc", "ac"), fake_class_loss=True))
    check_config(ACGANConfig(conditioning=("projection", "adc"), class_weight=2.0))
    check_config(ACGANConfig(conditioning=("projection",)))  # the default weight is no choice


def test_tiny_run_with_the_modern_ingredients(tmp_path):
    """Spectral norm, hinge loss, EMA and DiffAugment, each conditioning that is not AC-GAN's;
    the old --tac still adds a TAC-GAN; the EMA's weights are what generator.pth holds."""
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    modern = ["--loss", "hinge", "--spectral-norm", "--ema", "0.9", "--augment", "translation"]
    kinds = ["--conditioning", "reacgan", "adc", "projection", "--tac", "--fake-class-loss"]
    argv = ["acgan", *TINY, "--data", str(data), *modern, *kinds]  # 1 epoch: 221 steps
    assert main([*argv, "--out", str(out)]) == 0
    saved = json.loads((out / "report.json").read_text())
    runs = saved["runs"]
    assert [r["conditioning"] for r in runs] == ["reacgan", "adc", "projection", "tac"]
    assert [r["folder"] for r in runs] == ["", "adc", "projection", "tac"]
    assert all(r["loss"]["adversarial"] == "hinge" and r["loss"]["ema"] == 0.9 for r in runs)
    # --fake-class-loss applies to reacgan and tac; adc always, projection has no class loss
    assert [r["loss"]["class_on_fake"] for r in runs] == [True, True, None, True]
    assert [r["loss"]["class_weight"] for r in runs] == [1.5, 1.5, None, 1.5]
    markdown = (out / "report.md").read_text()
    for line in [
        "- ReACGAN (`reacgan`): class loss weight 1.5, on real and generated images",
        "- ADC-GAN (`adc`): class loss weight 1.5, on real class k and generated class k",
        "- projection GAN (`projection`): no class loss",
        "- TAC-GAN (`tac`): class loss weight 1.5, on real and generated images, and a twin",
    ]:
        assert line in markdown, line
    for run in runs:
        assert 0 <= run["accuracy"]["overall"] <= 1 and isinstance(run["collapses"], list)
        folder = out / run["folder"]
        checkpoint = torch.load(folder / "checkpoint.pth")
        generator = torch.load(folder / "generator.pth")["state_dict"]
        ema = {k.removeprefix("module."): v for k, v in checkpoint["generator_ema"].items()}
        torch.testing.assert_close(generator, {k: ema[k] for k in generator})
        assert not torch.equal(
            generator["embed.weight"], checkpoint["generator"]["embed.weight"]
        )  # the average, not the last step's weights


def test_a_diverging_gan_stops_with_one_line(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    line = error_line(capsys, ["acgan", *TINY, "--data", data, "--class-weight", "1e38",
                               "--out", tmp_path / "o"])  # fmt: skip
    assert "the GAN's loss became nan at epoch 1" in line and "--class-weight" in line
    assert not (tmp_path / "o" / "report.md").exists()
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_ctrl_c_names_only_files_that_exist(tmp_path, capsys, monkeypatch):
    import auxhead.cli.acgan as acgan

    (tmp_path / "checkpoint.pth").write_text("an earlier run's")
    (tmp_path / "report.json").write_text("an earlier run's")

    def interrupted(config, say):
        raise KeyboardInterrupt

    monkeypatch.setattr(acgan, "run_acgan", interrupted)
    assert main(["acgan", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "no epoch completed, so nothing was saved" in err
    assert not any(tmp_path.iterdir())

    def after_one_epoch(config, say):
        torch.save({"epoch": 1}, config.out / "checkpoint.pth")
        raise KeyboardInterrupt

    monkeypatch.setattr(acgan, "run_acgan", after_one_epoch)
    assert main(["acgan", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert f"(both networks) is in {tmp_path / 'checkpoint.pth'}" in err


def test_help_is_a_manual(capsys):
    assert main(["acgan", "--help"]) == 0
    text = capsys.readouterr().out
    for expected in ("examples:", "auxhead acgan --data digits", "samples.npz", "checkpoint.pth",
                     "exit codes:", "130", "are deleted when a run starts"):  # fmt: skip
        assert expected in text, expected


# The metrics refuse non-finite samples (a NaN covariance used to crash the process) ----------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_metrics_refuse_non_finite_samples(bad):
    classifier = SmallCNN(3, 1, width=4, feature_dim=8)
    images = torch.rand(6, 1, 28, 28)
    images[2, 0, 5, 5] = bad
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    match = "hold 1 NaN or infinite value"
    with pytest.raises(ValueError, match=match):
        class_accuracy(classifier, images, labels, 3)
    with pytest.raises(ValueError, match=match):
        frechet_distance(classifier.features, torch.rand(6, 1, 28, 28), images)
    features = torch.rand(6, 8)
    features[0, 0] = bad
    with pytest.raises(ValueError, match=match):
        mean_pairwise_distance(features)
    with pytest.raises(ValueError, match=match):
        intra_class_diversity(features, labels, 3)


def test_report_seconds_never_round_a_short_run_to_zero():
    from auxhead.cli.report import _seconds

    assert [_seconds(s) for s in (0.04, 0.4, 9.94, 9.96, 12.3)] == [
        "<0.1",
        "0.4",
        "9.9",
        "10",
        "12",
    ]


@pytest.mark.parametrize("size", [32, 64])
def test_a_folder_of_mixed_rgb_images_at_32_and_64_px(tmp_path, size):
    """A user's own folder: RGB PNGs and JPEGs of different sizes, one greyscale image among
    them; --size resizes all, and the networks are built for 3 channels at that size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "photos"
    for k, name in enumerate(["red", "green", "blue"]):
        (data / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 60, (30 + 3 * i, 40, 3)).astype(np.uint8)
            pixels[..., k] += 180
            image = Image.fromarray(pixels)
            if i == 0 and k == 0:
                image = image.convert("L")  # one grey image: read as RGB with the rest
            image.save(data / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    out = tmp_path / "out"
    assert main(["acgan", *TINY, "--data", str(data), "--size", str(size), "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as samples:
        assert samples["images"].shape == (300, 3, size, size)
    assert Image.open(out / "grid.png").mode == "RGB"
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["shape"] == f"3x{size}x{size}" and report["runs"][0]["variant"]
