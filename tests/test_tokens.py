"""Token heads that respect padding (issue #22, item 1): `pool="cls"|"mean"` on (B, N, C) taps,
the real tokens read from the mask the model was called with. The reference for a padded
sample is the same sample alone, cut to its real tokens: no padding anywhere."""

import copy
import pickle
import warnings

import pytest
import torch
from conftest import hook_count
from torch import nn

import auxhead
from auxhead._tokens import keep_from, pool_tokens

KINDS = ["inception", "linear", "sdn"]
POOLS = [None, "cls", "mean"]
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 attention over 9 tokens vs the same over 5


def test_pool_tokens_against_hand_computation():
    x = torch.arange(24.0).reshape(2, 3, 4)  # (B, N, C)
    keep = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(pool_tokens(x, keep, "cls"), x[:, 0])
    torch.testing.assert_close(
        pool_tokens(x, keep, "mean"), torch.stack([x[0, :2].mean(0), x[1].mean(0)])
    )
    torch.testing.assert_close(pool_tokens(x, None, "mean"), x.mean(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor API's prototype warning
        nested = torch.nested.nested_tensor([x[0, :2], x[1]])
    torch.testing.assert_close(pool_tokens(nested, None, "mean"), pool_tokens(x, keep, "mean"))
    torch.testing.assert_close(pool_tokens(nested, None, "cls"), x[:, 0])


def test_keep_from_reads_attention_masks_and_keeps_all_of_an_empty_row():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    expected = torch.tensor([[True, True, False], [True, True, True]])
    assert torch.equal(keep_from(mask), expected)
    assert torch.equal(keep_from(mask.bool()), expected)
    assert keep_from(None) is None and keep_from(torch.ones(3)) is None


class Encoder(nn.Module):
    """Token ids, 0 for padding, into a batch-first `nn.TransformerEncoder`, the padding mask
    passed by keyword; the first token is the classifier's."""

    def __init__(self, vocab: int = 30, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.randn(1, 16, width) * 0.1)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." on CPU
            self.enc = nn.TransformerEncoder(layer, 2)
        self.fc = nn.Linear(width, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens) + self.pos[:, : tokens.shape[1]]  # (B, N, C)
        h = self.enc(h, src_key_padding_mask=tokens == 0)
        return self.fc(h[:, 0])


def _padded(sentence: torch.Tensor, others: list[int], vocab: int = 30) -> torch.Tensor:
    """`sentence` as row 0 of a batch padded (0) to the longest of it and `others`' lengths."""
    width = max([len(sentence), *others])
    batch = torch.zeros(1 + len(others), width, dtype=torch.long)
    batch[0, : len(sentence)] = sentence
    for row, length in enumerate(others, start=1):
        batch[row, :length] = torch.randint(1, vocab, (length,))
    return batch


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_changes_a_transformer_encoders_heads(kind, pool):
    model = Encoder()
    taps = ["enc.layers.0", "enc.layers.1"]
    sentence = torch.randint(1, 30, (5,))
    aux = auxhead.attach(model, taps, head=kind, pool=pool, sample=_padded(sentence, [3, 7]))
    outputs = {}
    for train in (True, False):  # dense with the mask beside it; nested between layers in eval
        aux.train(train)
        with aux.heads_enabled(), torch.no_grad():
            for others in ([], [9], [2, 12]):
                aux(_padded(sentence, others))
                outputs[train, len(others)] = {t: aux.aux_outputs[t][0] for t in taps}
    if kind == "inception":  # dropout in training: compare the eval runs alone
        outputs = {key: value for key, value in outputs.items() if not key[0]}
    reference = outputs[False, 0]  # alone, no padding
    for seen in outputs.values():
        for tap in taps:
            torch.testing.assert_close(seen[tap], reference[tap], **TOL)


class TokenMLP(nn.Module):
    """Tokens embedded and mixed per token, then averaged over the real ones: no transformer,
    so only a `mask=` callable can say which tokens are real."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.mix = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.emb(tokens))  # (B, N, C)
        keep = (tokens != 0).unsqueeze(-1)
        return self.fc((h * keep).sum(1) / keep.sum(1))


@pytest.mark.parametrize("pool", [None, "mean"])
def test_a_mask_callable_says_which_tokens_are_real(pool):
    model = TokenMLP()
    sentence = torch.randint(1, 30, (4,))
    aux = auxhead.attach(
        model,
        ["mix"],
        head="linear",
        pool=pool,
        sample=_padded(sentence, [6]),
        mask=lambda args, kwargs: args[0] != 0,
        layout="channels_last",
    ).eval()
    with aux.heads_enabled():
        aux(_padded(sentence, []))
        alone = aux.aux_outputs["mix"][0]
        aux(_padded(sentence, [11]))
        padded = aux.aux_outputs["mix"][0]
    torch.testing.assert_close(padded, alone, **TOL)
    # Without the mask the padding is averaged in: the callable is what makes them equal.
    plain = auxhead.attach(
        aux.strip(), ["mix"], head="linear", pool=pool, sample=_padded(sentence, [6])
    ).eval()
    plain.load_state_dict(aux.state_dict())
    with plain.heads_enabled():
        plain(_padded(sentence, [11]))
    assert not torch.allclose(plain.aux_outputs["mix"][0], alone, atol=1e-3)


def test_pool_gives_any_head_one_vector_per_sample():
    model = Encoder()
    x = _padded(torch.randint(1, 30, (5,)), [3])
    seen = {}

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 2)

        def forward(self, features):
            seen["shape"] = tuple(features.shape)
            return self.fc(features)

    aux = auxhead.attach(model, {"enc.layers.0": Probe()}, pool="cls", sample=x).train()
    aux(x)
    assert seen["shape"] == (2, 16)
    aux.strip()
    factory_shapes = []

    def factory(shape, num_classes):
        factory_shapes.append(shape)
        return nn.Linear(shape[-1], num_classes)

    auxhead.attach(model, ["enc.layers.1"], head=factory, pool="mean", sample=x).strip()
    assert factory_shapes == [(2, 16)]


def test_pool_is_refused_where_it_cannot_work():
    model = Encoder()
    x = _padded(torch.randint(1, 30, (5,)), [3])
    with pytest.raises(auxhead.AttachError, match="pool= needs a sequence"):
        auxhead.attach(model, ["fc"], pool="cls", sample=x)
    with pytest.raises(auxhead.AttachError, match=r"'cls', 'mean'\] \(or None\); got 'max'$"):
        auxhead.attach(model, ["enc.layers.0"], pool="max", sample=x)
    # a dense kind predicts per token: pooling first would leave it nothing to predict on
    with pytest.raises(auxhead.AttachError, match=r"needs the sequence itself, not pool='mean'"):
        auxhead.attach(model, ["enc.layers.0"], head="fcn", pool="mean", num_classes=2, sample=x)
    with pytest.raises(TypeError, match="mask must be a callable"):
        auxhead.attach(model, ["enc.layers.0"], mask="attention_mask", sample=x)
    assert hook_count(model) == 0


def test_pooled_heads_copy_pickle_and_strip():
    model = Encoder()
    x = _padded(torch.randint(1, 30, (5,)), [3])
    aux = auxhead.attach(model, ["enc.layers.0"], pool="cls", head="linear", sample=x).eval()
    with aux.heads_enabled():
        aux(x)
        expected = aux.aux_outputs["enc.layers.0"]
        for clone in (copy.deepcopy(aux), pickle.loads(pickle.dumps(aux))):
            with clone.heads_enabled():
                clone(x)
            torch.testing.assert_close(clone.aux_outputs["enc.layers.0"], expected)
    bare = aux.strip()
    assert bare is model and hook_count(model) == 0


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("pool", POOLS)
def test_the_padding_mask_given_to_the_encoder_itself_counts(pool):
    # The model is the nn.TransformerEncoder, called as encoder(x, src_key_padding_mask=pad).
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = nn.TransformerEncoder(layer, 2)
    sentence = torch.randn(1, 5, 16)

    def padded(width):
        x = torch.cat([sentence, torch.randn(1, width - 5, 16)], dim=1)
        x = torch.cat([x, torch.randn(1, width, 16)])  # a second, full-length sample
        pad = torch.zeros(2, width, dtype=torch.bool)
        pad[0, 5:] = True
        return x, pad

    x, pad = padded(8)
    aux = auxhead.attach(
        encoder,
        ["layers.0", "layers.1"],
        head="linear",
        num_classes=3,
        pool=pool,
        sample={"src": x, "src_key_padding_mask": pad},
    )
    for train in (True, False):
        aux.train(train)
        with aux.heads_enabled(), torch.no_grad():
            aux(sentence)
            alone = {tap: logits[0] for tap, logits in aux.aux_outputs.items()}
            for width in (6, 11):
                x, pad = padded(width)
                aux(x, src_key_padding_mask=pad)
                for tap, logits in aux.aux_outputs.items():
                    torch.testing.assert_close(logits[0], alone[tap], **TOL)
