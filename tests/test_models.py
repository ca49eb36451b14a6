import importlib.util
import pickle

import pytest
import torch
from torch import nn

import auxhead
from auxhead.models import build_model, classifier_split, default_taps, load_matching, small_cnn

needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
)
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="no timm")


def test_small_cnn_shapes_for_28x28():
    model = small_cnn(10, channels=1, size=28)
    assert [name for name, _ in model.named_children()] == [
        "stem",
        "stage1",
        "stage2",
        "stage3",
        "head",
    ]
    table = auxhead.list_layers(model, torch.rand(2, 1, 28, 28))
    shapes = {info.name: info.shape for info in table}
    assert shapes["stem"] == (2, 16, 28, 28)
    assert shapes["stage1"] == (2, 32, 14, 14)  # early downsampling
    assert shapes["stage2"] == (2, 64, 7, 7)
    assert shapes["stage3"] == (2, 128, 4, 4)
    assert shapes["head"] == (2, 10)


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 8), (3, 64), (1, 128)])
def test_small_cnn_other_inputs(channels, size):
    model = small_cnn(5, channels=channels, size=size).eval()
    assert model(torch.rand(2, channels, size, size)).shape == (2, 5)


def test_small_cnn_large_inputs_get_a_strided_stem():
    table = auxhead.list_layers(small_cnn(size=128), torch.rand(1, 1, 128, 128))
    assert {info.name: info.shape for info in table}["stem"] == (1, 16, 32, 32)


def test_small_cnn_options():
    model = small_cnn(3, widths=(8, 8, 16, 16), depth=1)
    assert model.head.fc.in_features == 16 and len(model.stage1) == 1
    with pytest.raises(ValueError, match=r"4 numbers, got \[8, 16\]"):
        small_cnn(widths=(8, 16))
    with pytest.raises(ValueError, match="at least 1; got 0"):
        small_cnn(depth=0)


def test_channels_last_computes_the_same_function():
    torch.manual_seed(0)
    fast = small_cnn().eval()
    plain = small_cnn(channels_last=False).eval()
    plain.load_state_dict(fast.state_dict())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    assert fast.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_small_cnn_pickles_without_auxhead():
    # An exported fastai learner pickles the model: it must load without auxhead.
    assert b"auxhead" not in pickle.dumps(small_cnn())


def test_default_taps_are_layers_that_run():
    model = small_cnn()
    sample = torch.rand(2, 1, 28, 28)
    taps = default_taps(model)
    assert taps == ["stage1", "stage2"]
    assert set(taps) <= set(auxhead.list_layers(model, sample).names)
    aux = auxhead.attach(model, taps, sample=sample)
    aux.train()
    aux(torch.rand(4, 1, 28, 28))
    assert {name: tuple(out.shape) for name, out in aux.aux_outputs.items()} == {
        "stage1": (4, 10),
        "stage2": (4, 10),
    }


def test_default_taps_unknown_model():
    with pytest.raises(ValueError, match="no default taps for Linear without a sample batch; "):
        default_taps(nn.Linear(2, 2))


@needs_torchvision
def test_build_model_small_cnn_and_torchvision():
    assert next(iter(build_model().named_children()))[0] == "stem"
    model = build_model("resnet18", num_classes=7, channels=1, size=28).eval()
    assert model.conv1.in_channels == 1
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    assert default_taps(model) == ["layer2", "layer3"]
    rgb = build_model("torchvision:mobilenet_v3_small", num_classes=3, channels=3).eval()
    assert rgb(torch.rand(2, 3, 32, 32)).shape == (2, 3)


@needs_timm
def test_build_model_timm():
    model = build_model("resnet10t", num_classes=4, channels=1).eval()  # timm only
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    assert default_taps(model) == ["layer2", "layer3"]
    forced = build_model("timm:resnet18", num_classes=4, channels=1)
    assert type(forced).__module__.startswith("timm")


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match=r"unknown model 'resnet181'\. Did you mean: .*resnet18"):
        build_model("resnet181")
    with pytest.raises(ValueError, match=r"torchvision\.models\.list_models\(\)"):
        build_model("no_such_net_at_all")
    with pytest.raises(ValueError, match=r"unknown model 'timm:resnet181'\. Did you mean: timm:"):
        build_model("timm:resnet181")  # suggestions keep the prefix
    with pytest.raises(ValueError) as raised:
        build_model("resnet181")
    close = str(raised.value).split("Did you mean: ")[1].split("?")[0].split(", ")
    assert len(close) == len(set(close))  # a name torchvision and timm both know, once
    with pytest.raises(ValueError, match="unknown model source 'keras'"):
        build_model("keras:resnet18")


@needs_torchvision
def test_default_taps_of_a_vision_transformer():
    import torchvision

    model = torchvision.models.vit_b_16(num_classes=10)  # 12 encoder blocks
    assert default_taps(model) == [
        "encoder.layers.encoder_layer_3",
        "encoder.layers.encoder_layer_7",
    ]


@needs_torchvision
def test_pretrained_weights_come_from_torch_hubs_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = torchvision.models.resnet18().state_dict()  # random "pretrained" weights
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_model("resnet18", num_classes=7, channels=1, pretrained=True)
    state = model.state_dict()
    torch.testing.assert_close(state["layer3.1.conv2.weight"], cached["layer3.1.conv2.weight"])
    torch.testing.assert_close(state["bn1.running_var"], cached["bn1.running_var"])
    # grayscale: the RGB filters summed, so a gray image gives what RGB gray would
    torch.testing.assert_close(state["conv1.weight"], cached["conv1.weight"].sum(1, keepdim=True))
    gray = torch.rand(1, 1, 32, 32)
    conv = model.conv1
    torch.testing.assert_close(
        conv(gray), nn.functional.conv2d(gray.expand(1, 3, 32, 32), cached["conv1.weight"],
                                         stride=2, padding=3),
    )  # fmt: skip
    assert state["fc.weight"].shape == (7, 512)  # a new classifier for 7 classes


def test_pretrained_small_cnn_is_refused():
    with pytest.raises(ValueError, match="small_cnn has no pretrained weights"):
        build_model("small_cnn", pretrained=True)


def test_load_matching_skips_what_does_not_fit():
    source = small_cnn(10, channels=3, size=28).state_dict()
    target = small_cnn(4, channels=1, size=28)
    missing = load_matching(target, source)
    assert missing == ["head.fc.weight", "head.fc.bias"]  # 4 classes, not 10
    torch.testing.assert_close(target.state_dict()["stage2.0.conv.weight"],
                               source["stage2.0.conv.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="none of the 1 entries fits"):
        load_matching(target, {"nothing.weight": torch.zeros(3)})


def test_classifier_split_puts_the_last_linear_last():
    model = small_cnn(10)
    body, classifier = classifier_split(model)
    assert [p.shape for p in classifier] == [(10, 128), (10,)]
    assert len(body) + len(classifier) == len(list(model.parameters()))


@needs_timm
def test_timm_weights_that_cannot_be_fetched_say_how_to_provide_them(monkeypatch, tmp_path):
    import auxhead._weights
    from auxhead.models import WeightsUnavailable

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # empty: not cached
    monkeypatch.setattr(auxhead._weights, "_reachable", lambda url: False)  # offline
    with pytest.raises(WeightsUnavailable, match=r"timm's resnet18 .*--init PATH"):
        build_model("timm:resnet18", pretrained=True)


@needs_torchvision
@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        ("mobilenet_v3_small", ["features.4", "features.8"]),
        ("regnet_x_400mf", ["trunk_output.block2", "trunk_output.block3"]),
        ("googlenet", ["inception3a", "inception4c"]),
    ],
)
def test_default_taps_found_from_the_layers_that_run(arch, expected):
    model = build_model(arch, 10, channels=3, size=64)
    sample = torch.zeros(2, 3, 64, 64)
    assert default_taps(model, sample) == expected
    with pytest.raises(ValueError, match="without a sample batch"):
        default_taps(model)


@pytest.mark.slow
@needs_torchvision
def test_every_torchvision_classifier_has_default_taps():
    import torchvision

    from auxhead._probe import resolve

    for arch in torchvision.models.list_models(module=torchvision.models):
        size = 96 if arch == "inception_v3" else 64
        if arch.startswith(("vit_h", "vit_l", "regnet_y_128", "regnet_y_32", "regnet_y_16")):
            continue  # gigabytes of parameters: the same code paths as their smaller siblings
        model = build_model(arch, 10, channels=3, size=size)
        taps = default_taps(model, torch.zeros(2, 3, size, size))
        assert len(taps) == 2 and taps[0] != taps[1], arch
        resolve(model, taps)
