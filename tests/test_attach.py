import copy
import io

import pytest
import torch
from conftest import hook_count, tiny_cnn
from torch import nn

import auxhead


def test_output_is_bit_identical_in_train_and_eval(cnn, x):
    reference = copy.deepcopy(cnn)
    aux = auxhead.attach(cnn, ["1", "3"], num_classes=5, sample=x)
    for mode in (True, False):
        aux.train(mode)
        reference.train(mode)
        torch.testing.assert_close(aux(x), reference(x), rtol=0, atol=0)


def test_aux_outputs_in_at_order_and_replaced_each_forward(cnn, x):
    aux = auxhead.attach(cnn, ["3", "1"], sample=x)  # num_classes read from the output
    aux.train()
    aux(x)
    assert list(aux.aux_outputs) == ["3", "1"]
    assert all(v.shape == (4, 5) for v in aux.aux_outputs.values())
    first = aux.aux_outputs["1"]
    aux(x)
    assert aux.aux_outputs["1"] is not first
    aux.eval()
    aux(x)
    assert aux.aux_outputs == {}


def test_heads_enabled_in_eval_and_disabled_in_train(cnn, x):
    aux = auxhead.attach(cnn, ["1"], sample=x).eval()
    with aux.heads_enabled():
        aux(x)
        assert set(aux.aux_outputs) == {"1"}
    aux(x)
    assert aux.aux_outputs == {}
    aux.train()
    with aux.heads_enabled(False):
        aux(x)
    assert aux.aux_outputs == {}


def test_calling_the_inner_model_runs_no_heads(cnn, x):
    aux = auxhead.attach(cnn, ["1"], sample=x).train()
    aux.model(x)
    assert aux.aux_outputs == {}


def test_forward_with_aux(cnn, x):
    aux = auxhead.attach(cnn, ["1", "5"], sample=x).train()
    out, aux_outputs = aux.forward_with_aux(x)
    assert out.shape == (4, 5)
    assert list(aux_outputs) == ["1", "5"]


def test_heads_are_submodules(cnn, x):
    aux = auxhead.attach(cnn, ["1", "3"], sample=x)
    n_model = sum(p.numel() for p in cnn.parameters())
    n_heads = sum(p.numel() for p in aux.heads.parameters())
    assert sum(p.numel() for p in aux.parameters()) == n_model + n_heads > n_model
    keys = aux.state_dict().keys()
    assert any(k.startswith("heads.1.") for k in keys)
    assert any(k.startswith("model.0.") for k in keys)
    assert aux.head("3") is aux.heads["3"]


def test_strip_returns_the_original_model(cnn, x):
    before = copy.deepcopy(cnn.state_dict())
    expected = copy.deepcopy(cnn).eval()(x)
    aux = auxhead.attach(cnn, ["1", "3"], sample=x)
    aux.train()
    aux(x)
    model = aux.strip()
    assert model is cnn
    assert hook_count(model) == 0
    assert model.state_dict().keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(model.eval()(x), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="stripped"):
        aux(x)


def test_dotted_names_and_nested_modules(x):
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten(), nn.LazyLinear(3)
    )
    model(x)
    aux = auxhead.attach(model, ["0.0", "0"], head="linear", sample=x).train()
    aux(x)
    assert list(aux.aux_outputs) == ["0.0", "0"]
    assert "heads.0__0.fc.weight" in aux.state_dict()


@pytest.mark.parametrize("kind", ["inception", "linear", "sdn"])
def test_builtin_kinds_and_module_and_factory(cnn, x, kind):
    own = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    aux = auxhead.attach(
        cnn,
        {"1": own, "3": kind, "5": lambda shape, n: nn.Linear(shape[-1], n)},
        sample=x,
    ).train()
    aux(x)
    assert aux.head("1") is own
    assert [v.shape for v in aux.aux_outputs.values()] == [(4, 5)] * 3


def test_one_module_for_several_taps_is_refused_naming_the_ways_out(cnn, x):
    shared = nn.Sequential(nn.Flatten(), nn.LazyLinear(5))
    ways_out = r"\['1', '3'\].*share it and its weights.*at=\{tap: module.*head='inception'.*lambda"
    with pytest.raises(ValueError, match=ways_out):
        auxhead.attach(cnn, ["1", "3"], head=shared, sample=x)
    with pytest.raises(ValueError, match=ways_out):
        auxhead.attach(cnn, {"1": shared, "3": shared, "5": "linear"}, sample=x)
    assert hook_count(cnn) == 0
    # One module for one tap is fine.
    aux = auxhead.attach(cnn, ["5"], head=nn.Linear(32, 5), sample=x)
    assert aux.taps == ["5"]


def test_module_heads_need_no_sample(cnn, x):
    aux = auxhead.attach(cnn, {"5": nn.Linear(32, 5)}).train()
    aux(x)
    assert aux.aux_outputs["5"].shape == (4, 5)


def test_tuple_outputs_use_first_tensor_or_select():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)

        def forward(self, x):
            y = self.conv(x)
            return y, y[:, :2].mean(dim=(2, 3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.pair(x)[0].mean(dim=(2, 3)))

    x = torch.randn(2, 3, 5, 5)
    aux = auxhead.attach(Net(), ["pair"], head="linear", sample=x).train()
    aux(x)
    assert aux.head("pair").fc.in_features == 6
    aux2 = auxhead.attach(
        Net(), ["pair"], head="linear", sample=x, select=lambda out: out[1]
    ).train()
    aux2(x)
    assert aux2.head("pair").fc.in_features == 2


def _no_hooks_after(model, fn, error, match):
    before = hook_count(model)
    with pytest.raises(error, match=match):
        fn()
    assert hook_count(model) == before == 0


def test_unknown_layer_names_close_matches(x):
    model = tiny_cnn()
    named = nn.Sequential()
    named.add_module("layer1", model)
    _no_hooks_after(
        named,
        lambda: auxhead.attach(named, ["layer1.33"], num_classes=5, sample=x),
        ValueError,
        r"no layer named 'layer1.33'.*Did you mean: layer1.3.*auxhead.list_layers",
    )


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_cnn()
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.body(x)


def test_layer_that_does_not_run(x):
    model = WithUnused()
    _no_hooks_after(
        model,
        lambda: auxhead.attach(model, ["body.1", "unused"], sample=x),
        ValueError,
        "'unused' exists but did not run",
    )


def test_builtin_head_needs_sample_and_num_classes(cnn, x):
    _no_hooks_after(cnn, lambda: auxhead.attach(cnn, ["1"], num_classes=5), ValueError, "sample=")
    model = nn.Sequential(nn.Conv2d(3, 4, 1))  # output is a map, not (B, K)
    _no_hooks_after(
        model, lambda: auxhead.attach(model, ["0"], sample=x), ValueError, "num_classes="
    )


def test_same_layer_twice_and_empty(cnn, x):
    _no_hooks_after(
        cnn, lambda: auxhead.attach(cnn, ["1", "1"], sample=x), ValueError, "more than once"
    )
    _no_hooks_after(cnn, lambda: auxhead.attach(cnn, [], sample=x), ValueError, "empty")


def test_shared_module_is_refused(x):
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu)
    _no_hooks_after(
        model,
        lambda: auxhead.attach(model, ["1"], num_classes=2, sample=torch.randn(2, 3)),
        ValueError,
        "runs 2 times",
    )


def test_unknown_head_kind_and_bad_types(cnn, x):
    _no_hooks_after(
        cnn,
        lambda: auxhead.attach(cnn, ["1"], head="dense", sample=x),
        ValueError,
        "unknown head kind 'dense'",
    )
    _no_hooks_after(cnn, lambda: auxhead.attach(cnn, {"1": 3}, sample=x), TypeError, "int")
    with pytest.raises(TypeError, match="already has heads"):
        auxhead.attach(auxhead.attach(cnn, ["1"], sample=x), ["model.1"], sample=x)


def test_state_dict_round_trip_with_heads(x):
    aux = auxhead.attach(tiny_cnn(), ["1", "3"], sample=x)
    buffer = io.BytesIO()
    torch.save(aux.state_dict(), buffer)
    buffer.seek(0)
    fresh = auxhead.attach(tiny_cnn(), ["1", "3"], sample=x)
    fresh.load_state_dict(torch.load(buffer))
    aux.eval(), fresh.eval()
    with aux.heads_enabled(), fresh.heads_enabled():
        torch.testing.assert_close(aux(x), fresh(x))
        for name in ("1", "3"):
            aux(x)
            a = aux.aux_outputs[name]
            fresh(x)
            torch.testing.assert_close(a, fresh.aux_outputs[name])


def test_stripped_state_dict_loads_into_plain_model(x):
    aux = auxhead.attach(tiny_cnn(), ["1", "3"], sample=x)
    with torch.no_grad():
        for p in aux.parameters():
            p.add_(0.1)
    stripped = aux.strip()
    buffer = io.BytesIO()
    torch.save(stripped.state_dict(), buffer)
    buffer.seek(0)
    plain = tiny_cnn()
    plain.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(plain.eval()(x), stripped.eval()(x))


def test_deepcopy_has_its_own_hooks(cnn, x):
    aux = auxhead.attach(cnn, ["1", "3"], sample=x).train()
    clone = copy.deepcopy(aux)
    clone(x)
    assert list(clone.aux_outputs) == ["1", "3"]
    assert clone.model is not aux.model
    assert hook_count(clone.strip()) == 0
    aux(x)  # the original still works
    assert list(aux.aux_outputs) == ["1", "3"]


def test_autocast_bfloat16_on_cpu(cnn, x):
    aux = auxhead.attach(cnn, ["1", "3"], sample=x).train()
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)
    y = torch.randint(0, 5, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aux(x)
        loss = loss_func(out, y)
    assert aux.aux_outputs["1"].dtype == torch.bfloat16
    loss.backward()
    assert all(p.grad is not None for p in aux.heads.parameters())


# Every tap trains: in-place ops after it, layouts, randomness, taps that cannot train -------


def _grads_reach_every_head(aux, x, y):
    aux.train()
    loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)(aux(x), y)
    loss.backward()
    missing = [n for n, p in aux.heads.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("kind", ["inception", "linear", "sdn"])
def test_taps_changed_in_place_later_are_copied_and_train(kind):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=4)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    # bn1 is followed by ReLU(inplace=True), layer1.0.bn2 by `out += identity`; layer2 by
    # nothing in place.
    aux = auxhead.attach(model, ["bn1", "layer1.0.bn2", "layer2"], head=kind, sample=x)
    assert aux._copy == {"bn1", "layer1.0.bn2"}
    _grads_reach_every_head(aux, x, y)


class Doubling(nn.Module):
    """A head that changes its input in place before classifying it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(x.mul_(2), 1))


def test_a_head_that_changes_its_input_in_place_gets_a_copy(cnn, x):
    reference = copy.deepcopy(cnn)
    aux = auxhead.attach(cnn, {"1": Doubling()}, sample=x).train()
    assert aux._copy == {"1"}
    torch.testing.assert_close(aux(x), reference.train()(x), rtol=0, atol=0)


class ChannelsLast(nn.Module):
    """A ConvNeXt/Swin-like net whose stage outputs (B, H, W, C)."""

    def __init__(self, channels: int = 6, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 2, stride=2)
        self.stage = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels))
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.stage(x)
        return self.fc(x.mean(dim=(1, 2)))


@pytest.mark.parametrize("kind", ["inception", "linear", "sdn"])
def test_channels_last_maps_are_read_as_channels_last(kind):
    x = torch.randn(2, 3, 16, 16)  # stage output (2, 8, 8, 6): C = 6 is last
    aux = auxhead.attach(ChannelsLast(), ["stage"], head=kind, sample=x)
    table = {info.name: info for info in auxhead.list_layers(aux.model, x)}
    assert table["stage"].layout == "channels_last" and table["stem"].layout == "channels_first"
    head = aux.head("stage")
    if kind == "linear":
        assert head.fc.in_features == 6
        aux.eval()
        with aux.heads_enabled():
            aux(x)
        features = aux.model.stage(aux.model.stem(x).permute(0, 2, 3, 1))
        torch.testing.assert_close(aux.aux_outputs["stage"], head.fc(features.mean(dim=(1, 2))))
    _grads_reach_every_head(aux, x, torch.tensor([0, 2]))


def test_layout_that_cannot_be_told_needs_layout():
    class Square(nn.Module):  # (B, 4, 4, 4) from a layer with no channel count: no evidence
        def forward(self, x):
            return x.reshape(-1, 4, 4, 4)

    model = nn.Sequential(Square(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(2, 64)
    _no_hooks_after(
        model,
        lambda: auxhead.attach(model, ["0"], sample=x),
        ValueError,
        r"layer '0' outputs \(2, 4, 4, 4\), and the layers around it do not tell where its "
        r"channels are: pass layout='channels_first'",
    )
    aux = auxhead.attach(model, ["0"], sample=x, layout="channels_last", head="linear")
    assert aux._permute == {"0": (0, 3, 1, 2)}
    aux.strip()
    with pytest.raises(ValueError, match="layout must be one of"):
        auxhead.attach(model, ["0"], sample=x, layout="nhwc")


def test_sequences_either_way_round():
    conv1d = nn.Sequential(nn.Conv1d(3, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                           nn.Linear(5, 2))  # fmt: skip
    x = torch.randn(2, 3, 12)  # "1" outputs (B, C=5, L=10)
    aux = auxhead.attach(conv1d, ["1"], head="linear", sample=x)
    assert aux.head("1").fc.in_features == 5
    _grads_reach_every_head(aux, x, torch.tensor([0, 1]))


def test_sdn_head_on_tokens_and_vectors_leaves_no_parameter_unused():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8)
    x = torch.randn(2, 3, 32, 32)
    aux = auxhead.attach(model, ["blocks.2", "head_drop"], head="sdn", sample=x)
    assert aux.head("head_drop").alpha is None  # a (B, C) vector has nothing to pool
    _grads_reach_every_head(aux, x, torch.tensor([0, 2]))


class Dropping(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.drop(self.body(x)))


@pytest.mark.parametrize("kind", ["inception", "linear", "sdn"])
def test_heads_do_not_change_the_models_random_numbers(kind):
    bare = Dropping()
    model = copy.deepcopy(bare)
    x = torch.randn(4, 8)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    aux = auxhead.attach(model, ["body"], head=kind, sample=x).train()
    assert torch.equal(torch.rand(3), expected_next)  # building and sizing drew nothing
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = bare.train()(x)
        torch.manual_seed(seed)
        assert torch.equal(aux(x), expected)
        assert aux.aux_outputs["body"].shape == (4, 3)


def test_heads_streams_are_seeded_per_tap_and_resume_exactly():
    x = torch.randn(4, 8)
    build = lambda: auxhead.attach(Dropping(), ["body"], head="inception", sample=x).train()  # noqa: E731
    torch.manual_seed(0)
    one = build()
    torch.manual_seed(0)
    two = build()
    assert torch.equal(one.head("body").fc1.weight, two.head("body").fc1.weight)
    one(x)
    state = copy.deepcopy(one.state_dict())  # carries the heads' random streams
    one(x)
    two.load_state_dict(state)
    two(x)
    assert torch.equal(one.aux_outputs["body"], two.aux_outputs["body"])


def test_dry_run_leaves_batchnorm_statistics_alone(cnn, x):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(5))  # fmt: skip
    model(x)
    before = copy.deepcopy(model.state_dict())
    auxhead.attach(model, ["1"], sample=x * 10)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_batchnorm_hint_only_for_batchnorm_refusing_a_batch_of_one(x):
    bn = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))
    # A tuple sample of one is not doubled (only a tensor is): BatchNorm refuses it.
    with pytest.raises(ValueError, match="BatchNorm needs at least 2 samples") as caught:
        auxhead.attach(bn, ["2"], head="linear", sample=(x[:1],))
    assert "Expected more than 1 value per channel" in str(caught.value.__cause__)

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            raise RuntimeError("the model's own failure")

    for model in (Broken(), nn.Sequential(nn.BatchNorm2d(3), Broken())):
        with pytest.raises(RuntimeError, match="the model's own failure") as caught:
            auxhead.attach(model, ["fc"] if isinstance(model, Broken) else ["0"], sample=x)
        assert "BatchNorm" not in str(caught.value)
        assert any("auxhead.attach ran" in note for note in caught.value.__notes__)
        assert hook_count(model) == 0


def test_a_submodule_set_to_none_is_skipped(x):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_cnn()
            self.aux_classifier = nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    model = Net()
    model.aux_classifier = None  # stays in _modules, as None (torchvision: model.AuxLogits = None)
    assert "aux_classifier" in model._modules
    aux = auxhead.attach(model, ["body.1"], sample=x)
    assert "unused" not in auxhead.list_layers(model, x).names
    aux.train()
    aux(x)
    aux.eval()
    assert aux(x).shape == (4, 5)
    assert set(aux.aux_outputs) == set()


class Windows(nn.Module):
    """Window attention folds windows into the batch: (B * 4, N, C)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 6, 2, stride=2)
        self.attn = nn.Linear(6, 6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.embed(x)  # (B, 6, 8, 8)
        b = x.shape[0]
        windows = x.reshape(b, 6, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, 16, 6)
        x = self.attn(windows).reshape(b, 64, 6)
        return self.fc(x.mean(dim=1))


def test_a_tap_that_folds_windows_into_the_batch_is_refused(x):
    model = Windows()
    _no_hooks_after(
        model,
        lambda: auxhead.attach(model, ["attn"], sample=torch.randn(2, 3, 16, 16)),
        ValueError,
        r"layer 'attn' outputs shape \(8, 16, 6\), whose first dimension is not the batch \(2\)",
    )


def test_a_tap_run_without_gradients_is_refused():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            with torch.no_grad():
                x = self.stem(x)
            return self.fc(x)

    model = Frozen()
    _no_hooks_after(
        model,
        lambda: auxhead.attach(model, ["stem"], sample=torch.randn(2, 4)),
        ValueError,
        "layer 'stem' runs with gradients off",
    )


class TrainOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.side = nn.Linear(4, 4)  # runs in training only, like GoogLeNet's aux1
        self.late = nn.Linear(4, 4)  # runs in eval only
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.body(x)
        x = x + self.side(x) if self.training else self.late(x)
        return self.fc(x)


def test_train_only_branches_are_listed_and_eval_only_ones_refused():
    model = TrainOnly().eval()
    x = torch.randn(2, 4)
    table = {info.name: info for info in auxhead.list_layers(model, x)}
    assert table["side"].train_only and not table["late"].train_only
    assert not model.training  # modes put back
    aux = auxhead.attach(model, ["side"], sample=x).train()
    aux(x)
    assert aux.aux_outputs["side"].shape == (2, 2)
    aux.strip()
    _no_hooks_after(
        model,
        lambda: auxhead.attach(model, ["late"], sample=x),
        ValueError,
        "layer 'late' runs in eval mode only",
    )


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_num_classes_must_be_a_whole_number(cnn, x, bad):
    _no_hooks_after(
        cnn,
        lambda: auxhead.attach(cnn, ["1"], num_classes=bad, sample=x),
        ValueError,
        "num_classes must be a whole number >= 1",
    )


def test_names_that_would_share_a_head_key_are_refused(x):
    model = nn.Sequential()
    model.add_module("a", nn.Sequential(nn.Conv2d(3, 4, 1)))
    model.add_module("a__0", nn.Conv2d(4, 4, 1))
    model.add_module("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)))
    _no_hooks_after(
        model,
        lambda: auxhead.attach(model, ["a.0", "a__0"], sample=x),
        ValueError,
        "layers 'a.0' and 'a__0' would share one head",
    )


def test_a_module_head_that_does_not_fit_is_refused_at_attach(cnn, x):
    _no_hooks_after(
        cnn,
        lambda: auxhead.attach(cnn, {"5": nn.Linear(32, 5), "3": nn.Linear(32, 5)}, sample=x),
        ValueError,
        r"the head at '3' failed on its tap's output \(4, 16, 4, 4\)",
    )


def test_a_sample_of_one_is_enough(x):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 5))  # fmt: skip
    aux = auxhead.attach(model, ["3"], head="linear", sample=x[:1]).train()
    aux(x)
    assert aux.aux_outputs["3"].shape == (4, 5)


def test_attaching_twice_to_one_model_is_refused(cnn, x):
    first = auxhead.attach(cnn, ["1"], sample=x)
    with pytest.raises(ValueError, match="already has auxiliary heads from an earlier attach"):
        auxhead.attach(cnn, ["3"], sample=x)
    assert hook_count(cnn) == 1
    first.strip()
    auxhead.attach(cnn, ["3"], sample=x)


def test_the_aux_model_takes_the_models_mode(cnn, x):
    aux = auxhead.attach(cnn.eval(), ["1"], sample=x)
    assert not aux.training and not aux.head("1").training
    aux(x)
    assert aux.aux_outputs == {}


def test_module_heads_must_give_num_classes_columns(cnn, x):
    wide = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 7))
    _no_hooks_after(
        cnn,
        lambda: auxhead.attach(cnn, {"1": wide}, num_classes=5, sample=x),
        ValueError,
        r"the head at '1' outputs \(4, 7\).*\(4, 5\) logits",
    )
    # num_classes read from the model's (B, 5) output the same way
    _no_hooks_after(
        cnn, lambda: auxhead.attach(cnn, {"1": wide}, sample=x), ValueError, r"\(4, 5\) logits"
    )
    # other shapes are the user's business (a segmentation head with its own head_loss)
    dense = nn.Conv2d(8, 5, 1)
    aux = auxhead.attach(cnn, {"1": dense}, sample=x).train()
    aux(x)
    assert aux.aux_outputs["1"].shape == (4, 5, 8, 8)


def test_num_classes_is_not_guessed_from_a_dict_output(x):
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_cnn(num_classes=5)
            self.box = nn.Linear(5, 2)

        def forward(self, x):
            logits = self.body(x)
            return {"box": self.box(logits), "logits": logits}

    model = Detector()
    _no_hooks_after(
        model, lambda: auxhead.attach(model, ["body.1"], sample=x), ValueError, "num_classes="
    )
    aux = auxhead.attach(model, ["body.1"], num_classes=5, sample=x).train()
    aux(x)
    assert aux.aux_outputs["body.1"].shape == (4, 5)


def test_activation_checkpointing_trains_the_heads():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=3)
    model.set_grad_checkpointing(True)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    aux = auxhead.attach(model, ["layer3.0.conv1", "layer3.1"], sample=x)
    _grads_reach_every_head(aux, x, y)
    assert model.conv1.weight.grad.abs().sum() > 0
    aux.strip()
    with pytest.raises(ValueError, match="its children ran, e.g. 'layer3.0'"):
        auxhead.attach(model, ["layer3"], sample=x)


def test_hooks_removed_and_reattach(cnn, x):
    aux = auxhead.attach(cnn, ["1"], sample=x).train()
    with aux.hooks_removed() as bare:
        assert bare is cnn and hook_count(cnn) == 0
    assert hook_count(cnn) == 1
    aux.strip()
    assert not aux.hooked
    aux.reattach()(x)
    assert list(aux.aux_outputs) == ["1"]
