"""`auxhead train --task segment` as a user drives it: one run on a folder generated here and
one on the shipped CamVid frames (data/camvid-tiny), each shared by several tests; the error
paths in process (one line each); a run on ../shared/data/camvid marked slow."""

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import error_line
from PIL import Image

from auxhead._segmetrics import at_label_size, segmentation_scores
from auxhead.cli import main
from auxhead.cli._common import LOCK_NAME
from auxhead.cli.train import TrainConfig, add_parser, config_from_args
from auxhead.data import CAMVID_TINY, load_segmentation

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the clone (CI), or beside the main checkout for a worktree one level down
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()),
              ROOT.parent / "shared")  # fmt: skip
SHARED_CAMVID = SHARED / "data" / "camvid"
QUICK = ["--task", "segment", "--epochs", "1", "--threads", "1"]


def run(argv) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def make_folder(root: Path, n_train: int = 6, n_val: int = 2, size: int = 32) -> Path:
    """train/ and val/ folders of images/ + labels/: three classes drawn as horizontal bands
    whose colour says the class, and a few void pixels (255)."""
    rng = np.random.default_rng(0)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.uint8)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            cuts = np.sort(rng.choice(np.arange(4, size - 4), 2, replace=False))
            label = np.digitize(np.arange(size), cuts)[:, None].repeat(size, 1).astype(np.uint8)
            image = colours[label] + rng.integers(0, 30, (size, size, 3), dtype=np.uint8)
            label[0, :4] = 255  # void
            Image.fromarray(image).save(root / split / "images" / f"f{i}.png")
            Image.fromarray(label).save(root / split / "labels" / f"f{i}.png")
    return root


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    data = make_folder(tmp_path_factory.mktemp("bands"))
    out = tmp_path_factory.mktemp("bands-run")
    argv = [*QUICK, "--data", data, "--arch", "lraspp_mobilenet_v3_large", "--bs", "2"]
    return (*run(["train", *argv, "--compare", "--out", out]), out, data)


@pytest.fixture(scope="module")
def camvid_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("camvid-run")
    argv = [*QUICK, "--data", CAMVID_TINY, "--size", "64", "--heads", "both"]
    return (*run(["train", *argv, "--out", out]), out)


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The rows of the markdown table under `## heading`, by their first cell."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("|")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in rows[2:]}


def percent(value) -> str:
    return f"{100 * value:.2f}%"


def test_a_generated_folder_trains_with_and_without_heads(generated):
    code, stdout, stderr, out, _ = generated
    assert code == 0, stderr[-3000:]
    for name in ("report.md", "report.json", "predictions.png", "model.pth", "checkpoint.pth"):
        assert (out / name).is_file(), name
    assert not (out / "model.pkl").exists()  # torchvision's dict output: the module only
    assert not (out / LOCK_NAME).exists() and not list(out.glob(".*tmp*"))
    report = json.loads((out / "report.json").read_text())
    assert report["void"] == 255 and report["codes"] == ["0", "1", "2"]
    assert report["heads"] == {"backbone.4": {"kind": "fcn", "weight": 0.4, "resize": "logits"}}
    assert report["test_split"] == "valid" and report["n_test"] == 2
    md = (out / "report.md").read_text()
    rows = table_rows(md, "Per-class IoU")
    for k, name in enumerate(report["codes"]):
        with_heads, without = report["main"]["iou"][k], report["baseline"]["iou"][k]
        assert rows[name][0] == (percent(with_heads) if with_heads is not None else rows[name][0])
        assert rows[name][1] == (percent(without) if without is not None else "-")
    scores = table_rows(md, "Scores on the valid split")
    assert scores["with heads (main output)"][0] == percent(report["main"]["miou"])
    assert scores["without heads"][0] == percent(report["baseline"]["miou"])
    assert scores["head at backbone.4"][1] == percent(report["head_scores"][0]["pixel_accuracy"])
    assert "without heads" in stdout and "IoU without heads" in stdout


def test_camvid_tiny_report_figure_and_export(camvid_tiny):
    code, _, stderr, out = camvid_tiny
    assert code == 0, stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["codes"][0] == "Sky" and len(report["codes"]) == 11 and report["void"] == 11
    assert report["test_split"] == "test" and report["n_test"] == 4
    heads = report["heads"]
    assert heads["layers.0.6"] == {"kind": "fcn", "weight": 0.4, "resize": "logits"}
    # deep supervision on the U-Net's decoder blocks, nnU-Net's weights relative to the main
    # output's (1/2, 1/4, 1/8 by resolution); the coarsest block (weight 0) gets no head
    deep = {tap: h["weight"] for tap, h in heads.items() if h["kind"] == "conv1x1"}
    assert deep == pytest.approx({"layers.7": 0.5, "layers.6": 0.25, "layers.5": 0.125})
    md = (out / "report.md").read_text()
    rows = table_rows(md, "Per-class IoU")
    assert list(rows) == report["codes"]
    assert "![predictions beside the labels](predictions.png)" in md
    figure = Image.open(out / "predictions.png")
    assert figure.format == "PNG" and figure.width > 300
    # the exported model predicts what the report measured
    from fastai.vision.all import load_learner

    data = load_segmentation(CAMVID_TINY, size=64)
    bs = report["budget"]["bs"]
    exported = load_learner(out / "model.pkl").model
    module = torch.load(out / "model.pth", weights_only=False)
    for model in (exported, module):
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(x).as_subclass(torch.Tensor) for x in data.test_x.split(bs)])
        scores = segmentation_scores(at_label_size(logits, data.test_y), data.test_y, 11,
                                     ignore_index=11)  # fmt: skip
        assert scores.miou == pytest.approx(report["main"]["miou"], abs=1e-9)
        assert scores.pixel_accuracy == pytest.approx(report["main"]["pixel_accuracy"], abs=1e-9)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=False)
    assert any(key.startswith("heads.") for key in checkpoint["state_dict"])


def test_classify_stays_the_default_task():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    config = config_from_args(parser.parse_args(["train"]))
    assert config.task == "classify" and config.arch == "small_cnn"
    assert config.aux_weight == TrainConfig.aux_weight == 0.3
    segment = config_from_args(parser.parse_args(["train", "--task", "segment"]))
    assert segment.arch == "unet" and segment.aux_weight == 0.4 and segment.heads == "fcn"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--early-exit"], "--early-exit is for --task classify"),
        (["--head", "sdn"], "--head is for --task classify; segmentation heads are chosen"),
        # the classification default, given explicitly, is refused as well
        (["--head", "inception"], "--head is for --task classify; segmentation heads are"),
        (["--arch", "unett"], "--arch: unknown segmentation model 'unett' (did you mean unet"),
        (["--arch", "fcn_resnet50", "--encoder", "resnet34"], "fcn_resnet50 names its encoder"),
        (["--arch", "lraspp_mobilenet_v3_large", "--heads", "deep"], "deep supervision needs"),
        (["--arch", "unet", "--encoder", "vgg16"], "takes a torchvision ResNet encoder"),
        (["--arch", "smp-unet", "--encoder", "resnet1"], "unknown smp encoder 'resnet1'"),
        (["--void", "x"], "--void: must be a mask value"),
        (["--at", "layers.0.66"], "--at layers.0.66: no such layer in unet (close matches: "),
    ],
)
def test_bad_segment_options_end_in_one_line(tmp_path, capsys, extra, expected):
    argv = ["train", *QUICK, "--data", CAMVID_TINY, "--size", "32", *extra, "--out", tmp_path]
    line = error_line(capsys, argv)
    assert expected in line


def test_segment_options_are_refused_for_classification(tmp_path, capsys):
    argv = ["train", "--data", "digits", "--arch", "smp-unet", "--out", tmp_path]
    line = error_line(capsys, argv)
    assert line == "auxhead: error: --arch smp-unet is a segmentation model: add --task segment"
    line = error_line(capsys, ["train", "--encoder", "resnet18", "--out", tmp_path])
    assert line == "auxhead: error: --encoder is for --task segment"
    out = tmp_path / "o"
    line = error_line(capsys, ["train", "--data", "digits", "--head", "fcn", "--out", out])
    assert "--head fcn predicts a class per pixel: it is for --task segment" in line
    assert "inception, linear, sdn" in line and not out.exists()


def test_bad_data_ends_in_one_line_naming_the_file(tmp_path, capsys):
    data = make_folder(tmp_path / "data", n_train=2, n_val=1)
    bad = data / "train" / "labels" / "f1.png"
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(bad)  # another size
    line = error_line(capsys, ["train", *QUICK, "--data", data, "--out", tmp_path / "out"])
    assert "f1.png" in line
    line = error_line(capsys, ["train", *QUICK, "--data", tmp_path / "none", "--out", tmp_path])
    assert "none" in line


def test_ctrl_c_and_an_unusable_out(tmp_path, capsys, monkeypatch):
    import auxhead.cli.segment as segment

    def interrupted(config, say):
        raise KeyboardInterrupt

    monkeypatch.setattr(segment, "run_segment", interrupted)
    assert main(["train", *QUICK, "--data", str(CAMVID_TINY), "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no epoch completed, so nothing was saved" in err
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / "file").write_text("")
    line = error_line(capsys, ["train", *QUICK, "--data", CAMVID_TINY, "--out", tmp_path / "file"])
    assert re.search(r"--out .*file is a file", line)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch", ["smp-unet --heads deep", "smp-fpn --heads both", "deeplabv3_resnet50", "smp-pspnet"]
)
def test_other_families_train_on_camvid_tiny(tmp_path, arch):
    argv = [*QUICK, "--data", CAMVID_TINY, "--size", "64", "--bs", "4", "--arch", *arch.split()]
    code, _, stderr = run(["train", *argv, "--out", tmp_path])
    assert code == 0, stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["head_scores"]) == len(report["heads"]) >= 1


@pytest.mark.slow
def test_shared_camvid_short_run(tmp_path):
    if not SHARED_CAMVID.is_dir():
        pytest.skip(f"{SHARED_CAMVID} is absent (CI has ../shared beside the clone)")
    argv = [*QUICK, "--data", SHARED_CAMVID, "--size", "64", "--limit", "16"]
    code, _, stderr = run(["train", *argv, "--out", tmp_path])
    assert code == 0, stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n_test"] == 233 and report["codes"][0] == "Sky" and report["void"] == 11
