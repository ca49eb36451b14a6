"""Model kinds users bring (issue #20, item 8): each with its expected result.

A masked transformer (torch's nested-tensor fast path in eval), a two-input model on fastai
DataLoaders without `n_inp`, namedtuple and ModelOutput-style outputs with a loss written for
them, plain channels-first CNN taps whose neighbours are silent, torchvision models with their
own aux heads set to None, and a callback removed from a Learner.
"""

import warnings
from collections import OrderedDict, namedtuple

import pytest
import timm
import torch
import torchvision
from conftest import digits_cnn, hook_count
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset
from torchvision.models.segmentation import fcn_resnet50

import auxhead
from auxhead.data import dataloaders, load_data
from auxhead.fastai import AuxHeads

KINDS = ["inception", "linear", "sdn"]


def _loader(*tensors: torch.Tensor, bs: int = 8, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), bs=bs, shuffle=shuffle)


# A masked transformer: nested tensors between its layers in eval ----------------------------


class MaskedTransformer(nn.Module):
    """Token ids, 0 for padding, into `nn.TransformerEncoder` with torch's default fast path
    (`enable_nested_tensor=True`): in eval, under no grad, its layers pass one nested tensor
    of (N_i, C) sequences, the padding dropped."""

    def __init__(self, dropout: float = 0.1, vocab: int = 20, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=dropout, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." on CPU
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.fc = nn.Linear(width, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(tokens), src_key_padding_mask=tokens == 0)  # (B, N, C)
        return self.fc(h[:, 0])


def _tokens(lengths: list[int], width: int = 7, vocab: int = 20) -> torch.Tensor:
    tokens = torch.randint(1, vocab, (len(lengths), width))
    for row, length in enumerate(lengths):
        tokens[row, length:] = 0
    return tokens


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("kind", KINDS)
def test_heads_on_a_masked_transformer_pool_the_real_tokens_only(kind):
    model = MaskedTransformer()
    taps = ["enc.layers.0", "enc.layers.1.linear2"]
    x = _tokens([7, 4, 2, 4])
    aux = auxhead.attach(model, taps, head=kind, sample=x)
    aux.train()
    torch.manual_seed(1)
    out = aux(x)
    assert set(aux.aux_outputs) == set(taps)
    torch.manual_seed(1)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # dropout masks and all

    aux.eval()
    seen = {}

    def record(_module, _args, output):
        seen.setdefault("output", output)  # the batch's, not the samples' run alone

    handle = aux.model.enc.layers[0].register_forward_hook(record)
    with aux.heads_enabled(), torch.no_grad():
        out = aux(x)
        batched = aux.aux_outputs
        # Reference: each sample alone, cut to its real tokens, no padding anywhere.
        alone = []
        for row, length in enumerate([7, 4, 2, 4]):
            aux(x[row : row + 1, :length])
            alone.append(aux.aux_outputs)
        # What a caller of run_head (early exits) holds: the tap's nested output.
        torch.testing.assert_close(aux.run_head(taps[0], seen["output"]), batched[taps[0]])
    handle.remove()
    assert seen["output"].is_nested  # the fast path ran: the heads saw a nested tensor
    assert out.shape == (4, 3)
    for tap in taps:
        assert batched[tap].shape == (4, 3)
        reference = torch.cat([a[tap] for a in alone])
        torch.testing.assert_close(batched[tap], reference, rtol=1e-5, atol=1e-5)
    assert auxhead.list_layers(aux.model, x)[1].name == "enc"  # the eval dry run works too


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("kind", ["linear", "sdn"])  # no dropout in the head
def test_heads_on_a_masked_transformer_see_the_real_tokens_in_train_and_eval(kind):
    model = MaskedTransformer(dropout=0.0)
    taps = ["enc.layers.0.self_attn", "enc.layers.1", "enc"]  # "enc": padded with 0 in eval
    x = _tokens([7, 4, 2, 4])
    aux = auxhead.attach(model, taps, head=kind, sample=x)
    aux.train()
    aux(x)  # dense, the padding mask beside it
    trained = aux.aux_outputs
    aux.eval()
    with aux.heads_enabled(), torch.no_grad():
        aux(x)  # nested between the layers
        evaluated = aux.aux_outputs
        aux(x[1:2, :4])  # the second sample alone, no padding
        alone = aux.aux_outputs
    for tap in taps:
        torch.testing.assert_close(trained[tap].detach(), evaluated[tap], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(evaluated[tap][1:2], alone[tap], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_masked_transformer_trains_and_validates_in_a_learner():
    tokens = _tokens([7, 5, 3, 2] * 8)
    y = torch.randint(0, 3, (32,))
    dls = DataLoaders(_loader(tokens, y, shuffle=True), _loader(tokens, y))
    learn = Learner(
        dls,
        MaskedTransformer(),
        loss_func=nn.CrossEntropyLoss(),
        cbs=AuxHeads(["enc.layers.0", "enc.layers.1"], head="linear", num_classes=3),
    )
    learn.fit(1, 1e-3)
    names = learn.recorder.metric_names
    assert "acc_enc_layers_0" in names and "loss_enc_layers_1" in names
    values = learn.recorder.log[1:-1]  # train loss, valid loss, the heads' columns
    assert all(torch.isfinite(torch.tensor(float(v))) for v in values)


# Two inputs, DataLoaders without n_inp ----------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.b = nn.Linear(3, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.fc(self.a(x1) + self.b(x2))


def test_two_inputs_without_n_inp_use_fastais_own_rule():
    data = (torch.randn(32, 5), torch.randn(32, 3), torch.randint(0, 2, (32,)))
    dls = DataLoaders(_loader(*data, shuffle=True), _loader(*data))
    assert not hasattr(dls, "n_inp")  # fastai itself splits (x1, x2, y) as 2 inputs, 1 target
    learn = Learner(
        dls, TwoInputs(), loss_func=nn.CrossEntropyLoss(), cbs=AuxHeads(["a"], head="linear")
    )
    learn.fit(1, 1e-3)
    assert learn.model.head("a").fc.in_features == 8
    assert "acc_a" in learn.recorder.metric_names


# Outputs that are not tensors, with a main loss written for them -----------------------------

Output = namedtuple("Output", ["logits", "features"])


class ModelOutput(OrderedDict):
    """What transformers' ModelOutput is, for this purpose: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Wrapped(nn.Module):
    def __init__(self, output: type) -> None:
        super().__init__()
        self.body = digits_cnn()
        self.output = output

    def forward(self, x):
        logits = self.body(x)
        if self.output is Output:
            return Output(logits, x)
        return ModelOutput(logits=logits)


def main_loss(out, y):
    return F.cross_entropy(out.logits, y)


@pytest.mark.parametrize("output", [Output, ModelOutput], ids=["namedtuple", "ModelOutput"])
def test_a_loss_written_for_the_output_type_asks_for_head_loss(output):
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    aux = auxhead.attach(Wrapped(output), ["body.3"], head="linear", num_classes=10, sample=x)
    loss = auxhead.AuxLoss(main_loss, aux)
    with pytest.raises(ValueError, match=rf"model's output is a {output.__name__}.*head_loss="):
        loss(aux(x), y)
    loss = auxhead.AuxLoss(main_loss, aux, head_loss=nn.CrossEntropyLoss())
    loss(aux(x), y).backward()
    assert aux.head("body.3").fc.weight.grad is not None


@pytest.fixture(scope="module")
def dls():
    data = load_data("digits", seed=0).subset(128, 64, seed=0)
    return dataloaders(data, bs=32, seed=0, device="cpu")


@pytest.mark.parametrize("output", [Output, ModelOutput], ids=["namedtuple", "ModelOutput"])
def test_a_learner_on_such_outputs_asks_for_head_loss(dls, output):
    cb = AuxHeads(["body.3"], head="linear", num_classes=10)
    learn = Learner(dls, Wrapped(output), loss_func=main_loss, cbs=cb)
    with pytest.raises(ValueError, match=rf"model's output is a {output.__name__}.*head_loss="):
        learn.fit(1, 1e-3)
    learn.remove_cb(cb)
    cb = AuxHeads(["body.3"], head="linear", num_classes=10, head_loss=nn.CrossEntropyLoss())
    learn = Learner(dls, Wrapped(output), loss_func=main_loss, cbs=cb)
    learn.fit(1, 1e-3)
    assert "loss_body_3" in learn.recorder.metric_names


# Plain channels-first CNN taps whose neighbours are silent -----------------------------------

# case: (model, tap, the tap's channel count)
SILENT = {
    # a concat of four branches: no single layer writes 832 channels
    "googlenet-inception4e": (
        lambda: torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False),
        "inception4e",
        832,
    ),
    "squeezenet1_0-features.5": (
        lambda: torchvision.models.squeezenet1_0(weights=None),
        "features.5",
        256,
    ),
    "resnest14d-layer3.0.conv2": (lambda: timm.create_model("resnest14d"), "layer3.0.conv2", 256),
    "resnest14d-layer3.0.drop_block": (
        lambda: timm.create_model("resnest14d"),
        "layer3.0.drop_block",
        256,
    ),
    "ghostnet_100-shortcut": (lambda: timm.create_model("ghostnet_100"), "blocks.4.0.shortcut", 40),
    "hrnet_w18_small-fuse": (
        lambda: timm.create_model("hrnet_w18_small"),
        "stage3.0.fuse_layers.0.1",
        16,
    ),
}


@pytest.mark.parametrize("case", list(SILENT))
def test_silent_taps_of_channels_first_models_are_channels_first(case):
    make, tap, channels = SILENT[case]
    model = make()
    x = torch.randn(2, 3, 32, 32)
    for kind in KINDS:
        aux = auxhead.attach(model, [tap], head=kind, num_classes=5, sample=x)
        assert aux._permute == {}  # channels first: the heads take the map as it is
        if kind == "linear":
            assert aux.head(tap).fc.in_features == channels
        aux.train()
        torch.manual_seed(1)
        out = aux(x)
        assert aux.aux_outputs[tap].shape == (2, 5)
        if kind == "inception":
            torch.manual_seed(1)
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)  # the model is untouched
        aux.eval()
        with aux.heads_enabled(), torch.no_grad():
            aux(x)
        assert aux.aux_outputs[tap].shape == (2, 5)
        assert aux.strip() is model and hook_count(model) == 0


# A model's own aux heads set to None --------------------------------------------------------


def _googlenet():
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    model.aux1 = model.aux2 = None
    return model, ["inception4a", "inception4d"], "aux1", 64


def _inception_v3():
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.AuxLogits = None
    return model, ["Mixed_6a", "Mixed_6e"], "AuxLogits", 96


def _fcn():
    model = fcn_resnet50(weights=None, weights_backbone=None, aux_loss=True, num_classes=5)
    model.aux_classifier = None
    return model, ["backbone.layer2", "backbone.layer3"], "aux_classifier", 64


@pytest.mark.parametrize("make", [_googlenet, _inception_v3, _fcn], ids=lambda f: f.__name__[1:])
def test_submodules_set_to_none_are_skipped(make):
    model, taps, gone, size = make()
    x = torch.randn(2, 3, size, size)
    names = auxhead.list_layers(model, x).names
    assert gone not in names and not any(n.startswith(gone + ".") for n in names)
    aux = auxhead.attach(model, taps, head="linear", num_classes=5, sample=x)
    aux.train()
    aux(x)
    assert set(aux.aux_outputs) == set(taps)
    aux.eval()
    with torch.no_grad():
        torch.testing.assert_close(aux(x), model(x), rtol=0, atol=0)
    assert aux.strip() is model and hook_count(model) == 0
    with pytest.raises(auxhead.AttachError, match=rf"layer '{gone}' of \w+ is None"):
        auxhead.attach(model, [gone], head="linear", num_classes=5, sample=x)


# A callback removed from a Learner ------------------------------------------------------------


def test_a_removed_callback_leaves_the_heads_untouched(dls):
    cb = AuxHeads(["1", "3"], head="linear")
    learn = Learner(dls, digits_cnn(), loss_func=nn.CrossEntropyLoss(), cbs=cb)
    learn.fit(1, 1e-2)  # Adam: momentum and weight decay for every parameter with a gradient
    heads = cb.aux_model.heads
    before = {k: v.clone() for k, v in heads.state_dict().items()}
    body = learn.model.model[0].weight.clone()
    learn.remove_cb(cb)
    learn.fit(1, 1e-2)
    for key, value in heads.state_dict().items():
        assert torch.equal(value, before[key]), key  # bit for bit
    assert not torch.equal(learn.model[0].weight, body)  # the model itself did train
    learn.add_cb(cb)
    learn.fit(1, 1e-2)
    assert not torch.equal(heads["1"].fc.weight, before["1.fc.weight"])  # back: they train
