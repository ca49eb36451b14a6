"""Per-sample routing through torch.fx stages (`auxhead.exits._fx`): on torchvision and timm
families that the known-forward cutter cannot cut, thresholds 1 give exactly the model's
logits, thresholds 0 exactly the first head's, and mixed thresholds give each sample the logits
a full reference computation (every head on the whole batch) picks for it."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import auxhead
from auxhead.exits._fx import fx_cut
from auxhead.exits._stages import NotStageable


def _tv(name: str, **kwargs):
    return lambda: getattr(torchvision.models, name)(num_classes=10, **kwargs)


def _tiny_vit():
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10,
    )  # fmt: skip


def _tiny_swin():
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=[4, 4], num_classes=10,
    )  # fmt: skip


def _tiny_swin_v2():
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2

    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=[4, 4], num_classes=10, block=SwinTransformerBlockV2,
        downsample_layer=PatchMergingV2,
    )  # fmt: skip


def _timm(name: str, **kwargs):
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


# (builder, input size, two taps in run order)
FAMILIES = {
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64, ["features.3", "features.8"]),
    "mobilenet_v2": (_tv("mobilenet_v2"), 64, ["features.4", "features.10"]),
    "efficientnet_b0": (_tv("efficientnet_b0"), 64, ["features.3", "features.5"]),
    "regnet_x_400mf": (_tv("regnet_x_400mf"), 64, ["trunk_output.block2", "trunk_output.block3"]),
    "convnext_tiny": (_tv("convnext_tiny"), 64, ["features.3", "features.5"]),
    "densenet121": (_tv("densenet121"), 64, ["features.denseblock2", "features.denseblock3"]),
    "vgg11": (_tv("vgg11"), 32, ["features.5", "features.10"]),
    "squeezenet1_0": (_tv("squeezenet1_0"), 64, ["features.4", "features.8"]),
    "shufflenet_v2_x0_5": (_tv("shufflenet_v2_x0_5"), 64, ["stage2", "stage3"]),
    "mnasnet0_5": (_tv("mnasnet0_5"), 64, ["layers.8", "layers.10"]),
    "googlenet": (
        _tv("googlenet", aux_logits=False, init_weights=True),
        64,
        ["inception4a", "inception4d"],
    ),
    "inception_v3": (
        _tv("inception_v3", aux_logits=False, init_weights=True),
        96,
        ["Mixed_5d", "Mixed_6e"],
    ),
    "alexnet": (_tv("alexnet"), 64, ["features.5", "features.9"]),
    "regnet_y_400mf": (_tv("regnet_y_400mf"), 64, ["trunk_output.block2", "trunk_output.block3"]),
    "efficientnet_v2_s": (_tv("efficientnet_v2_s"), 64, ["features.3", "features.5"]),
    "swin_v2": (_tiny_swin_v2, 64, ["features.3", "features.5"]),
    "maxvit_t": (_tv("maxvit_t"), 224, ["blocks.0", "blocks.2"]),
    "vit": (_tiny_vit, 32, ["encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2"]),
    "swin": (_tiny_swin, 64, ["features.3", "features.5"]),
    "timm efficientnet_b0": (_timm("efficientnet_b0"), 64, ["blocks.2", "blocks.4"]),
    "timm mobilenetv3_small_100": (_timm("mobilenetv3_small_100"), 64, ["blocks.2", "blocks.4"]),
    "timm convnext_atto": (_timm("convnext_atto"), 64, ["stages.1", "stages.2"]),
    "timm regnetx_002": (_timm("regnetx_002"), 64, ["s2", "s3"]),
    "timm vit_tiny": (
        _timm("vit_tiny_patch16_224", img_size=32, patch_size=8),
        32,
        ["blocks.3", "blocks.8"],
    ),
}


def _with_batch_statistics(model: nn.Module, size: int) -> nn.Module:
    """`model` in eval mode, its BatchNorm statistics those of one random batch: at random
    init some families' features barely differ between samples (head scores 1e-8 apart,
    within float noise), so no threshold could part them reliably; normalised, they do."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average: one batch sets the statistics
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.randn(16, 3, size, size))
    return model.eval()


def _reference(aux: auxhead.AuxModel, x: torch.Tensor):
    """Every head and the main output on the whole batch: (E + 1, B, K) logits."""
    with torch.no_grad(), aux.heads_enabled():
        main = aux(x)
        heads = [aux.aux_outputs[tap] for tap in aux.taps]
    aux.clear_aux()
    return torch.stack([*heads, main])


SLOW = {"vgg11", "maxvit_t"}  # 130M parameters to initialise; 224 px only


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES],
)
def test_fx_stages_are_exact(family, one_thread):
    build, size, taps = FAMILIES[family]
    torch.manual_seed(0)
    model = _with_batch_statistics(build(), size)
    x = torch.randn(6, 3, size, size)
    aux = auxhead.attach(model, taps, head="linear", sample=x[:2]).eval()
    early = auxhead.EarlyExit(aux, return_exits=True)
    assert early.mode == "staged", early.mode_reason
    assert "torch.fx" in early.mode_reason
    outputs = _reference(aux, x)  # (3, B, K)
    with torch.no_grad():
        expected_main = model(x)
    torch.testing.assert_close(outputs[-1], expected_main, rtol=0, atol=0)

    early.thresholds = 1.0  # nobody leaves, no head runs: the model's own logits
    logits, exits = early(x)
    torch.testing.assert_close(logits, expected_main, rtol=0, atol=0)
    assert exits.tolist() == [2] * 6

    early.thresholds = 0.0  # everybody leaves at the first head
    logits, exits = early(x)
    torch.testing.assert_close(logits, outputs[0], rtol=0, atol=0)
    assert exits.tolist() == [0] * 6

    # Mixed: about half leave at head 0; of the rest, all but the least sure at head 1. Each
    # threshold lies midway between two scores, far from both (float noise is ~1e-8).
    scores = outputs[:2].softmax(-1).amax(-1)  # (2, B)
    first = midway(scores[0], range(2, 5))
    rest = scores[1][scores[0] <= first]
    early.thresholds = [first, midway(rest, range(1, 2))]
    logits, exits = early(x)
    assert 0 in exits and 2 in exits
    picked = outputs[exits, torch.arange(6)]  # each sample's logits from its exit
    # Later stages run on fewer samples: the same arithmetic, batched differently.
    torch.testing.assert_close(logits, picked, rtol=1e-4, atol=1e-5)

    # Batch size 1 takes its own path (no masks, no index copies): each sample leaves where
    # the rule says on its own scores, with that exit's logits.
    for i in range(0, 6, 2):
        one = _reference(aux, x[i : i + 1])  # (3, 1, K)
        score = one[:2, 0].softmax(-1).amax(-1)
        thresholds = early.thresholds
        expected = 0 if score[0] > thresholds[0] else 1 if score[1] > thresholds[1] else 2
        logits, exits = early(x[i : i + 1])
        torch.testing.assert_close(logits, one[expected], rtol=1e-4, atol=1e-5)
        assert exits.tolist() == [expected]


def midway(scores: torch.Tensor, stay: range) -> float:
    """A threshold midway between two neighbouring sorted `scores`, the k lowest staying for
    the k in `stay` with the widest gap; refuses a gap that float noise could cross."""
    ordered = scores.sort().values.tolist()
    k = max(stay, key=lambda k: ordered[k] - ordered[k - 1])
    assert ordered[k] - ordered[k - 1] > 1e-6, f"no gap between scores {ordered}"
    return (ordered[k - 1] + ordered[k]) / 2


def test_a_value_crossing_a_cut_is_refused():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            return self.out(self.b(h) + x)  # x goes around the tap "a"... and "b"

    with pytest.raises(NotStageable, match="needs 'x', computed before the previous tap"):
        fx_cut(Skip(), ["a", "b"])
    with pytest.raises(ValueError, match=r"attach with at=\['a', 'b'\]"):
        fx_cut(Skip(), ["b", "a"])


def test_a_batch_size_read_before_a_cut_is_refused():
    class Reshape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            n = x.shape[0]
            return self.out(self.a(x).reshape(n, -1))

    with pytest.raises(NotStageable, match="needs 'getitem', computed before the previous tap"):
        fx_cut(Reshape(), ["a"])


def test_a_copy_runs_its_own_layers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.relu(self.b(torch.relu(self.a(x)))))

    net = Net()
    aux = auxhead.attach(net, ["a", "b"], head="linear", sample=torch.zeros(2, 4))
    early = auxhead.EarlyExit(aux, thresholds=[0.6, 0.5])
    x = torch.randn(8, 4)
    expected = early(x)
    clone = copy.deepcopy(early)
    with torch.no_grad():
        net.a.weight.zero_()  # the copy's stages must use the copy's layers
    torch.testing.assert_close(clone(x), expected)
    assert not torch.equal(early(x), expected)


def test_moving_the_early_exit_moves_its_stages():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
            self.register_buffer("scale", torch.full((4,), 2.0))

        def forward(self, x):
            return self.out(self.a(x) * self.scale)  # a buffer read in the forward: get_attr

    net = Scaled()
    aux = auxhead.attach(net, ["a"], head="linear", sample=torch.zeros(2, 4))
    early = auxhead.EarlyExit(aux, thresholds=0.6).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    assert early.mode == "staged" and early(x).dtype == torch.float64
    with torch.no_grad():
        net.scale.fill_(3.0)  # the stages read the model's buffer, not the one before .double()
    early.thresholds = 1.0
    torch.testing.assert_close(early(x), net(x))


class _CachedBias(nn.Module):
    """A tensor computed once per device and kept in a dict, as timm's LeViT keeps its
    attention biases: under torch.fx the key is a traced device, and the value a traced one."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.weight * 2
        return x + self.cache[key]


class _CachingNet(nn.Module):
    def __init__(self, bias: nn.Module) -> None:
        super().__init__()
        self.a, self.bias, self.b, self.out = (
            nn.Linear(6, 6),
            bias,
            nn.Linear(6, 6),
            nn.Linear(6, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.b(self.bias(self.a(x))))


def test_a_cache_filled_while_tracing_is_emptied_again():
    """The traced value does not stay in the model's cache, so cutting again (a second
    EarlyExit, or `.to()`, which cuts again) works, and routes exactly."""
    torch.manual_seed(0)
    model = _CachingNet(_CachedBias()).eval()
    aux = auxhead.attach(model, ["a", "b"], head="linear", sample=torch.zeros(2, 6)).eval()
    x = torch.randn(8, 6)
    for _ in range(2):
        early = auxhead.EarlyExit(aux, thresholds=[1.0, 1.0])
        assert early.mode == "staged", early.mode_reason
        assert list(model.bias.cache) == ["cpu"]  # the attach dry run's, no traced value
        with torch.no_grad():
            torch.testing.assert_close(early(x), model(x), rtol=0, atol=0)
    early.to(torch.float64).to(torch.float32)
    assert early.mode == "staged", early.mode_reason


class _SharedCacheBias(_CachedBias):
    """The cache on the class: shared, out of reach of the cleanup."""

    shared: dict[str, torch.Tensor] = {}  # noqa: RUF012

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in type(self).shared:
            type(self).shared[key] = self.weight * 2
        return x + type(self).shared[key]


def test_a_value_from_an_earlier_trace_is_refused_with_the_reason():
    """A traced value the cleanup cannot reach, met by a later trace: generic mode, with the
    reason, instead of an internal KeyError (timm levit_128s raised `KeyError: getitem_6`)."""
    torch.manual_seed(0)
    model = _CachingNet(_SharedCacheBias()).eval()
    try:
        with pytest.raises(NotStageable):  # the first trace leaves a traced value behind
            fx_cut(model, ["a", "b"])
            fx_cut(model, ["a", "b"])
        aux = auxhead.attach(model, ["a", "b"], head="linear", sample=torch.zeros(2, 6)).eval()
        early = auxhead.EarlyExit(aux, thresholds=[1.0, 1.0])
        assert early.mode == "generic"
        assert "a value left from an earlier trace" in early.mode_reason
        assert "caches computed tensors" in early.mode_reason
        x = torch.randn(4, 6)
        with torch.no_grad():
            torch.testing.assert_close(early(x), model(x), rtol=0, atol=0)
    finally:
        _SharedCacheBias.shared.clear()


@pytest.mark.slow
def test_levit_can_be_cut_twice():
    """timm's LeViT caches its attention biases per device: a second cut raised
    `KeyError: getitem_6` from the cutter."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    aux = auxhead.attach(model, ["stages.0.blocks.1", "stages.2.blocks.0"], sample=x).eval()
    with torch.no_grad():
        expected = model(x)
    for _ in range(2):
        early = auxhead.EarlyExit(aux, thresholds=[1.0, 1.0])
        assert early.mode == "staged", early.mode_reason
        with torch.no_grad():
            torch.testing.assert_close(early(x), expected, rtol=0, atol=0)
