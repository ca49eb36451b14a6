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
