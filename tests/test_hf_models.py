"""Hugging Face encoders (issue #22, item 2): BERT, DistilBERT, RoBERTa and ELECTRA built from
tiny configs (no download), called with keyword arguments, returning `ModelOutput`. Heads on
every encoder layer; the model's output unchanged bit for bit; padding never changes a head's
logits; strip gives back the model `save_pretrained` writes and `from_pretrained` reads."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _hf_tiny import FAMILIES, LAYERS, batch, sentences, tiny
from conftest import hook_count
from torch import nn

import auxhead

transformers = pytest.importorskip("transformers")

KINDS = ["inception", "linear", "sdn"]
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32 attention over 12 tokens vs the same over 5


@pytest.mark.parametrize("family", FAMILIES)
def test_list_layers_names_each_encoder_layer_from_a_keyword_sample(family):
    model = tiny(family)
    table = auxhead.list_layers(model, batch(sentences([5, 3]), family))
    rows = {info.name: info for info in table}
    for name in LAYERS[family]:
        assert rows[name].shape == (2, 5, 32)
        assert rows[name].layout == "channels_last"
    assert model.training  # the dry run put the mode back


@pytest.mark.parametrize("family", FAMILIES)
def test_attach_leaves_the_model_output_as_it_was_bit_for_bit(family):
    model = tiny(family)
    inputs = batch(sentences([6, 4, 2]), family) | {"labels": torch.tensor([0, 1, 1])}
    torch.manual_seed(3)
    expected = model(**inputs)  # dropout on: the random stream matters
    aux = auxhead.attach(model, LAYERS[family], num_classes=2, pool="cls", sample=inputs)
    torch.manual_seed(3)
    out = aux(**inputs)
    assert type(out) is type(expected)
    assert list(out.keys()) == list(expected.keys())
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=0, atol=0)
    assert set(aux.aux_outputs) == set(LAYERS[family])
    assert all(logits.shape == (3, 2) for logits in aux.aux_outputs.values())


@pytest.mark.parametrize("pool", [None, "cls", "mean"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_never_changes_a_head(family, pool):
    model = tiny(family).eval()
    sentence, *others = sentences([5, 3, 12, 7])
    aux = auxhead.attach(
        model, LAYERS[family], num_classes=2, pool=pool, sample=batch([sentence, *others], family)
    )
    for kind_sample, kind in enumerate(KINDS):
        if kind_sample:  # one attach per head kind, on the same model
            aux = auxhead.attach(
                aux.strip(),
                LAYERS[family],
                num_classes=2,
                head=kind,
                pool=pool,
                sample=batch([sentence, *others], family),
            )
        aux.eval()
        seen = []
        with aux.heads_enabled(), torch.no_grad():
            for inputs in (
                batch([sentence], family),  # alone, no padding
                batch([sentence, others[0]], family),  # no padding needed, 5 vs 3
                batch([sentence, *others], family),  # padded to 12
                batch([sentence], family, width=20),  # padded alone
            ):
                aux(**inputs)
                seen.append({tap: logits[0] for tap, logits in aux.aux_outputs.items()})
        for other in seen[1:]:
            for tap in LAYERS[family]:
                torch.testing.assert_close(other[tap], seen[0][tap], **TOL)
    aux.strip()


def test_the_attention_mask_given_positionally_counts_too():
    model = tiny("bert").eval()
    sentence, other = sentences([4, 9])
    aux = auxhead.attach(
        model, LAYERS["bert"], num_classes=2, pool="mean", sample=batch([sentence, other], "bert")
    )
    with aux.heads_enabled(), torch.no_grad():
        alone = batch([sentence], "bert")
        aux(alone["input_ids"], alone["attention_mask"])
        expected = aux.aux_outputs
        padded = batch([sentence, other], "bert")
        aux(padded["input_ids"], padded["attention_mask"])
    for tap in LAYERS["bert"]:
        torch.testing.assert_close(aux.aux_outputs[tap][0], expected[tap][0], **TOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_aux_loss_trains_the_heads_and_strip_gives_back_the_saved_model(family, tmp_path):
    model = tiny(family)
    inputs = batch(sentences([6, 4, 2, 5]), family)
    labels = torch.tensor([0, 1, 1, 0])
    aux = auxhead.attach(model, LAYERS[family], num_classes=2, pool="cls", sample=inputs)
    aux_loss = auxhead.AuxLoss(
        lambda out, y: F.cross_entropy(out.logits, y),
        aux,
        weights=0.3,
        head_loss=nn.CrossEntropyLoss(),
    )
    optimizer = torch.optim.AdamW(aux.parameters(), lr=1e-3)
    out = aux(**inputs)
    loss = aux_loss(out, labels)
    expected = F.cross_entropy(out.logits, labels) + 0.3 * sum(
        F.cross_entropy(logits, labels) for logits in aux.aux_outputs.values()
    )
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for tap in LAYERS[family]:
        assert all(p.grad is not None for p in aux.head(tap).parameters())
    optimizer.step()

    state = {k: v.clone() for k, v in model.state_dict().items()}
    bare = aux.strip()
    assert bare is model and hook_count(model) == 0
    assert state.keys() == bare.state_dict().keys()
    bare.eval().save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, bare(**inputs).logits, rtol=0, atol=0)


def test_distillation_runs_on_the_models_logits():
    model = tiny("bert")
    inputs = batch(sentences([6, 4]), "bert")
    labels = torch.tensor([0, 1])
    aux = auxhead.attach(model, LAYERS["bert"], num_classes=2, pool="cls", sample=inputs)
    aux_loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, distill=0.5, temperature=2.0)
    out = aux(**inputs)
    term = aux_loss.aux_term(out.logits, labels)
    expected = sum(
        0.3
        * (
            0.5 * F.cross_entropy(logits, labels)
            + 0.5 * auxhead.distillation_loss(logits, out.logits, temperature=2.0)
        )
        for logits in aux.aux_outputs.values()
    )
    torch.testing.assert_close(term, expected)


def test_a_copied_aux_model_reads_its_own_attention_mask():
    model = tiny("bert").eval()
    sentence, other = sentences([4, 9])
    aux = auxhead.attach(
        model, LAYERS["bert"], num_classes=2, pool="mean", sample=batch([sentence, other], "bert")
    )
    clone = copy.deepcopy(aux).eval()
    assert clone.model is not model
    with clone.heads_enabled(), torch.no_grad():
        clone(**batch([sentence], "bert"))
        alone = clone.aux_outputs
        clone(**batch([sentence, other], "bert"))
    for tap in LAYERS["bert"]:
        torch.testing.assert_close(clone.aux_outputs[tap][0], alone[tap][0], **TOL)
