import argparse
import json
import re

import numpy as np
import pytest
import torch

from auxhead.data import DataError
from auxhead.gan.cli import add_acgan_arguments, classifier_epochs, run_acgan
from auxhead.gan.models import Generator

TINY = ["--epochs", "1", "--width", "4", "--latent-dim", "8", "--bs", "16"]
TINY += ["--n-per-class", "100", "--classifier-epochs", "1"]


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


def _args(*argv):
    return add_acgan_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults():
    args = _args()
    assert args.data is None and args.out == "acgan-out" and not args.tac
    assert args.n_per_class >= 100 and not args.fake_class_loss and args.mode_seeking > 0
    assert args.classifier_epochs is None


def test_classifier_epochs_scale_with_the_data():
    assert classifier_epochs(60_000) == 2  # Fashion-MNIST: 469 steps an epoch
    assert classifier_epochs(1_438) == 75  # digits: 12 steps an epoch, 900 steps in all
    assert classifier_epochs(10) == 900
    assert classifier_epochs(1_438, requested=3) == 3


def test_tiny_run_with_tac_writes_everything(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    report = run_acgan(_args(*TINY, "--data", str(data), "--tac", "--out", str(tmp_path / "out")))
    tmp_path = tmp_path / "out"
    assert [run["variant"] for run in report["runs"]] == ["AC-GAN", "TAC-GAN"]
    for folder in (tmp_path, tmp_path / "tac"):
        for name in ("grid.png", "generator.pth", "learner.pth", "samples.npz"):
            assert (folder / name).is_file(), folder / name
        assert (folder / "grids" / "grid_epoch_001.png").is_file()
        with np.load(folder / "samples.npz") as samples:
            images, labels = samples["images"], samples["labels"]
        assert images.dtype == np.float32 and images.shape == (300, 1, 28, 28)
        assert images.min() >= 0 and images.max() <= 1
        assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [100] * 3
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [run["loss"]["class_on_fake"] for run in saved["runs"]] == [False, False]
    assert [run["loss"]["tac"] for run in saved["runs"]] == [False, True]
    assert 0 <= saved["reference"]["classifier_test_accuracy"]["overall"] <= 1
    for run in saved["runs"]:
        assert len(run["accuracy"]["per_class"]) == 3 and run["fid"] >= 0
        assert len(run["diversity_ratio"]) == 3 and run["history"][0]["d_loss"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert "| AC-GAN | TAC-GAN |" in markdown and "Frechet" in markdown
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert images == ["grid.png", "tac/grid.png"]
    assert all((tmp_path / image).is_file() for image in images)
    # the checkpoint rebuilds the generator
    ckpt = torch.load(tmp_path / "generator.pth")
    g = Generator(**ckpt["config"])
    g.load_state_dict(ckpt["state_dict"])
    assert g.generate([2]).shape == (1, 1, 28, 28)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "error", "match"),
    [
        (["--size", "30"], ValueError, r"--size must be one of \[28, 32, 64\], got 30"),
        (["--n-per-class", "10"], ValueError, "--n-per-class must be >= 100"),
        (["--epochs", "0"], ValueError, "--epochs must be >= 1"),
        (["--data", "/no/such/folder"], DataError, "no data set"),
        (["--data", "odd"], DataError, r"images are 28x40.*pass --size"),
    ],
)
def test_bad_options(tmp_path, argv, error, match):
    if argv[:2] == ["--data", "odd"]:  # images that are not square
        argv = ["--data", str(_image_folder(tmp_path / "odd", size=(28, 40))), *argv[2:]]
    with pytest.raises(error, match=match):
        run_acgan(_args(*argv, "--out", str(tmp_path)))


def test_one_class_folder_is_refused(tmp_path):
    _image_folder(tmp_path / "data", classes=("only",), n=4)
    with pytest.raises(DataError, match="single class"):
        run_acgan(_args("--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")))
