"""Where `--heads fcn` goes on an smp model, for any smp encoder (`smp_fcn_tap`), checked
against the features smp's encoder itself returns; `auxhead layers --task segment`; and the
refusals, each one line, before any data loads."""

import contextlib
import io
import json

import pytest
import torch
from conftest import error_line

import auxhead
from auxhead._segmodels import build_segmenter, segment_taps, smp_fcn_tap
from auxhead.cli import main
from auxhead.data import CAMVID_TINY

pytest.importorskip("segmentation_models_pytorch")

K = 3


@pytest.mark.parametrize(
    ("arch", "encoder", "stride"),
    [
        ("smp-unet", "resnet18", 16),  # the ResNet's layer3, as torchvision's recipe
        ("smp-unet", "mobilenet_v2", 16),
        ("smp-fpn", "efficientnet-b0", 16),
        ("smp-unet", "tu-regnetx_002", 16),  # a timm encoder
        ("smp-deeplabv3plus", "mobilenet_v2", 16),  # dilated: two stages at 16, the first
        ("smp-pspnet", "mobilenet_v2", 8),  # PSPNet's encoder stops at stride 8
    ],
)
def test_the_fcn_tap_is_the_layer_smp_returns_as_the_stride_16_stage(arch, encoder, stride):
    torch.manual_seed(0)
    model = build_segmenter(arch, K, encoder=encoder, size=(64, 64))
    tap = smp_fcn_tap(model)
    assert segment_taps(arch, model, "fcn") == {"fcn": [tap]}
    # reference: the first feature smp's encoder returns at that stride (its own stage list)
    x = torch.randn(2, 3, 64, 64)
    seen = {}
    hook = model.get_submodule(tap).register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("out", out.clone())
    )
    model.eval()
    with torch.no_grad():
        features = model.encoder(x)
    hook.remove()
    (expected,) = [f for f in features[1:] if 64 // f.shape[-1] == stride][:1]
    assert torch.equal(seen["out"], expected)
    # and an FCN head attaches there and trains: the model's output is unchanged
    model.train()
    aux_model = auxhead.attach(model, {tap: "fcn"}, num_classes=K, sample=x)
    torch.manual_seed(1)
    out = aux_model(x)
    assert out.shape == (2, K, 64, 64) and aux_model.aux_outputs[tap].shape[:2] == (2, K)
    (out.mean() + aux_model.aux_outputs[tap].mean()).backward()
    assert next(aux_model.heads.parameters()).grad is not None


def test_an_encoder_whose_stages_no_layer_returns_is_refused_naming_at():
    model = build_segmenter("smp-unet", K, encoder="mit_b0", size=(64, 64))
    assert smp_fcn_tap(model) is None  # mit reshapes its tokens inside its forward
    with pytest.raises(ValueError, match="name the layer with --at"):
        segment_taps("smp-unet", model, "fcn")


@pytest.mark.slow  # a training run of the command, 6 s
def test_default_heads_train_on_a_mobilenet_encoder(tmp_path):
    argv = ["train", "--task", "segment", "--data", CAMVID_TINY, "--size", "32", "--steps", "1",
            "--bs", "4", "--threads", "1", "--arch", "smp-unet", "--encoder", "mobilenet_v2",
            "--out", tmp_path]  # fmt: skip
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    assert code == 0, stderr.getvalue()[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["heads"] == {
        "encoder.features.13": {"kind": "fcn", "weight": 0.4, "resize": "logits"}
    }


def test_an_encoder_without_an_fcn_tap_is_refused_before_the_data_loads(tmp_path, capsys):
    missing = tmp_path / "no-such-data"  # never read: the refusal comes first
    argv = ["train", "--task", "segment", "--data", missing, "--arch", "smp-fpn",
            "--encoder", "mit_b0", "--out", tmp_path / "out"]  # fmt: skip
    line = error_line(capsys, argv)
    assert line.startswith("auxhead: error: --heads fcn: smp-fpn with this encoder has no layer")
    assert "--at" in line
    assert "`auxhead layers --task segment --arch smp-fpn --encoder mit_b0` lists them" in line
    line = error_line(capsys, [*argv[:6], "smp-unet", "--encoder", "resnet1", *argv[-2:]])
    assert "unknown smp encoder 'resnet1'" in line and "tu-NAME" in line


def rows(out: str) -> dict[str, str]:
    """The table's rows by layer name, each with its mark ("*", "+" or " ")."""
    lines = out.splitlines()[4:]
    return {line[2:].split()[0]: line[0] for line in lines if line.strip()}


def test_layers_lists_a_segmentation_model_with_its_preset_taps(capsys):
    argv = ["layers", "--task", "segment", "--arch", "smp-unet", "--encoder", "mobilenet_v2",
            "--size", "32"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "smp-unet (encoder mobilenet_v2) on 3x32x32 inputs (* the --heads fcn tap: "
        "encoder.features.13; + the --heads deep taps: decoder.blocks.1, decoder.blocks.2, "
        "decoder.blocks.3)"
    )
    marks = rows(out)
    assert marks["encoder.features.13"] == "*" and marks["decoder.blocks.3"] == "+"
    assert marks["decoder.blocks.0"] == " "  # the coarsest: weight 0, no head
    assert marks["encoder.features.12"] == " "
    assert marks and "pooled,dense" in out.splitlines()[4]
    # the taps marked are the ones `auxhead train --task segment --heads both` uses
    model = build_segmenter("smp-unet", K, encoder="mobilenet_v2", size=(32, 32))
    assert segment_taps("smp-unet", model, "fcn")["fcn"] == ["encoder.features.13"]
    assert main(["layers", "--task", "segment", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "unet (encoder resnet18) on 3x32x32 inputs (* the --heads fcn tap: layers.0.6; + the "
        "--heads deep taps: layers.5, layers.6, layers.7)"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--arch", "smp-unet"], "--arch smp-unet is a segmentation model: add --task segment"),
        (["--arch", "unet", "--size", "64"], "--arch unet is a segmentation model: add --task"),
        (["--encoder", "mobilenet_v2"], "--encoder is for --task segment; add --task segment"),
        (["--task", "segment", "--time"], "--time is for --task classify"),
        (["--task", "segment", "--arch", "resnet18"], "unknown segmentation model 'resnet18'"),
        (
            ["--task", "segment", "--arch", "fcn_resnet50", "--encoder", "resnet18"],
            "fcn_resnet50 names its encoder itself",
        ),
    ],
)
def test_layers_segment_refusals_are_one_line(capsys, argv, expected):
    assert expected in error_line(capsys, ["layers", *argv])
