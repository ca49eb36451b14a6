"""Weights from caches and files (auxhead._weights): every file that cannot be read and every
download that cannot happen is one line naming the file or repository and the way out, with
no network retry. The tests build the caches' layouts in tmp folders and never touch the
network: the functions that would are replaced by ones that fail the test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import auxhead._weights as weights
from auxhead._weights import WeightsUnavailable, read_init, timm_pretrained
from auxhead.cli import main
from auxhead.models import build_model

RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's DEFAULT weights' file name
TIMM_REPO = "timm/test_vit.r160_in1k"  # timm's test_vit: a tiny model with a hub copy
QUICK = ["--data", "digits", "--limit", "64", "--epochs", "1", "--bs", "32", "--threads", "1"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download or connection attempt fails the test."""
    import huggingface_hub
    import torch.hub

    def forbidden(*args, **kwargs):
        pytest.fail("the network was used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", forbidden)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    monkeypatch.setattr(weights, "_reachable", lambda url: False)


def error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and "bug in auxhead" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# torchvision: torch.hub's cache -----------------------------------------------------------------


def _torch_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.mark.parametrize("content", [b"", b"hello world" * 10, "truncated"])
def test_corrupt_torchvision_cache_is_one_line_naming_the_file(
    tmp_path, monkeypatch, capsys, content
):
    cached = _torch_cache(tmp_path, monkeypatch) / RESNET18_FILE
    if content == "truncated":
        torch.save({"w": torch.zeros(100)}, cached)
        content = cached.read_bytes()[:200]
    cached.write_bytes(content)
    with pytest.raises(WeightsUnavailable, match="delete it and run again") as caught:
        build_model("resnet18", 3, channels=3, pretrained=True)
    assert str(cached) in str(caught.value) and "\n" not in str(caught.value)
    line = error_line(capsys, ["train", *QUICK, "--arch", "resnet18", "--pretrained",
                               "--out", tmp_path / "run"])  # fmt: skip
    assert line.startswith("auxhead: error: --pretrained:") and str(cached) in line


def test_torchvision_cache_of_pickled_objects_is_not_torchs_essay(tmp_path, monkeypatch):
    cached = _torch_cache(tmp_path, monkeypatch) / RESNET18_FILE
    torch.save(nn.Linear(2, 2), cached)
    with pytest.raises(WeightsUnavailable, match=r"pickled Python object \(torch.nn") as caught:
        build_model("resnet18", 3, pretrained=True)
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)


def test_torchvision_offline_names_the_file_and_the_way_out(tmp_path, monkeypatch):
    cached = _torch_cache(tmp_path, monkeypatch) / RESNET18_FILE
    with pytest.raises(WeightsUnavailable, match="cannot be reached") as caught:
        build_model("resnet18", 3, pretrained=True)
    message = str(caught.value)
    assert str(cached) in message and "download.pytorch.org" in message and "--init" in message


# timm: the Hugging Face hub cache, and torch.hub's for models without a hub copy -------------


def _hf_snapshot(cache, repo=TIMM_REPO):
    """The hub cache's layout: models--org--name/refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_timm_loads_from_the_hub_cache_offline(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from timm import create_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    reference = create_model("test_vit")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(_hf_snapshot(tmp_path / "hf") / "model.safetensors"))
    model = build_model("timm:test_vit", 3, channels=3, pretrained=True)
    body = [k for k in state if not k.startswith("head")]
    for key in body:
        torch.testing.assert_close(model.state_dict()[key], state[key], rtol=0, atol=0)
    assert model.get_classifier().out_features == 3


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_corrupt_timm_hub_cache_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, env):
    monkeypatch.setenv(env, str(tmp_path / "hf"))
    cache = tmp_path / "hf" / ("hub" if env == "HF_HOME" else "")
    cached = _hf_snapshot(cache) / "model.safetensors"
    cached.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsUnavailable, match="delete it and run again") as caught:
        timm_pretrained("test_vit", num_classes=3)
    assert str(cached) in str(caught.value)
    line = error_line(capsys, ["train", *QUICK, "--arch", "timm:test_vit", "--size", "32",
                               "--pretrained", "--out", tmp_path / "run"])  # fmt: skip
    assert line.startswith("auxhead: error: --pretrained:") and str(cached) in line


def test_corrupt_hub_blob_is_named_beside_its_snapshot_link(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    snapshot = _hf_snapshot(tmp_path / "hf")
    blob = snapshot.parents[1] / "blobs" / "0a1b2c"
    blob.parent.mkdir()
    blob.write_bytes(b"\x00" * 64)
    (snapshot / "model.safetensors").symlink_to(blob)
    with pytest.raises(WeightsUnavailable, match="delete it and the file it links to") as caught:
        timm_pretrained("test_vit", num_classes=3)
    assert str(snapshot / "model.safetensors") in str(caught.value)
    assert str(blob) in str(caught.value)


def test_timm_offline_names_the_repo_and_the_cache_without_retrying(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailable, match="cannot be reached") as caught:
        timm_pretrained("test_vit", num_classes=3)
    message = str(caught.value)
    assert TIMM_REPO in message and str(tmp_path / "hf") in message and "hf download" in message


def test_timm_with_hf_hub_offline_set_does_not_try_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "_reachable", lambda url: pytest.fail("network probed"))
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE"):
        timm_pretrained("test_vit", num_classes=3)


def test_timm_without_a_hub_copy_reads_torch_hubs_cache(tmp_path, monkeypatch):
    from timm.models import get_pretrained_cfg

    name = "gcvit_xxtiny.in1k"  # weights at a URL only, kept in torch.hub's cache
    url = get_pretrained_cfg(name).url
    cached = _torch_cache(tmp_path, monkeypatch) / url.rsplit("/", 1)[-1]
    cached.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="delete it and run again") as caught:
        timm_pretrained(name, num_classes=3)
    assert str(cached) in str(caught.value)
    cached.unlink()
    with pytest.raises(WeightsUnavailable, match="cannot be reached") as caught:
        timm_pretrained(name, num_classes=3)
    assert str(cached) in str(caught.value)


# --init: the files a user brings -------------------------------------------------------------


def test_read_init_splits_an_auxhead_checkpoint(tmp_path):
    from auxhead import attach
    from auxhead.models import small_cnn

    model = small_cnn(3, size=8)
    aux = attach(model, ["stage1"], sample=torch.rand(2, 1, 8, 8))
    torch.save({"state_dict": aux.state_dict(), "arch": "small_cnn", "taps": ["stage1"]},
               tmp_path / "checkpoint.pth")  # fmt: skip
    init = read_init(tmp_path / "checkpoint.pth")
    assert init.model.keys() == model.state_dict().keys()
    assert init.heads.keys() == aux.heads.state_dict().keys()
    assert init.meta == {"arch": "small_cnn", "taps": ["stage1"]}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"not a state_dict", "not a torch.save or safetensors file"),
        (nn.Linear(2, 2), r"pickled Python object \(torch.nn.modules.linear.Linear\)"),
        ([1, 2], "holds a list, not a state_dict"),
        ({"epochs": 3}, r"holds a dict without tensors \(keys 'epochs'\)"),
        ({"generator": {}, "discriminator": {}}, "auxhead acgan"),
    ],
)
def test_init_that_cannot_be_read_is_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "start.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsUnavailable, match=expected):
        read_init(path)
    line = error_line(capsys, ["train", *QUICK, "--init", path, "--out", tmp_path / "run"])
    assert line.startswith(f"auxhead: error: --init {path}") and "checkpoint.pth" in line
    assert "weights_only" not in line


def test_init_of_another_architecture_names_both(tmp_path, capsys):
    path = tmp_path / "start.pth"
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(2, 2), "heads.x": torch.zeros(1)},
                "arch": "resnet18"}, path)  # fmt: skip
    line = error_line(capsys, ["train", *QUICK, "--init", path, "--out", tmp_path / "run"])
    assert "--arch small_cnn" in line and "saved from --arch resnet18" in line
