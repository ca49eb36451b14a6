"""Early exits on token models (issue #22, item 3): Hugging Face encoders (BERT, DistilBERT,
RoBERTa, ELECTRA from tiny configs) and `nn.TransformerEncoder` stacks called with a padding
mask. `EarlyExit` routes them at any batch size with stages cut from the torch.export graph:
each sample's logits and exit must equal a full reference computation (every head and the main
output on the whole batch, the routing rule applied by hand); the samples that exit leave the
batch (fewer FLOPs, in proportion to the rows still running); padding changes nothing;
`calibrate` reads Hugging Face dict batches; the exported program routes like the eager one."""

import pytest
import torch
from _hf_tiny import FAMILIES, LAYERS, batch, sentences, tiny
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import auxhead
from auxhead.exits import exit_indices

pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-5}
LENGTHS = [5, 9, 3, 7, 4, 8, 6, 2]


class Encoder(nn.Module):
    """Token ids and their attention mask through post-norm layers called one by one with a
    key padding mask, the masked mean classified (the model of benchmarks/text_exits.py)."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
            for _ in range(depth)
        )
        self.fc = nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h, pad = self.emb(input_ids), attention_mask == 0
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.fc((h * keep).sum(1) / keep.sum(1).clamp(min=1))


class Stack(nn.Module):
    """An `nn.TransformerEncoder` (nested tensors in eval) read at its first token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 3)
        self.fc = nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.fc(h[:, 0])


def _model(kind: str) -> tuple[nn.Module, list[str], str]:
    """A fresh model, its taps and the family its batches are padded for."""
    torch.manual_seed(0)
    if kind == "encoder":
        return Encoder(), ["layers.0", "layers.1"], "bert"
    if kind == "stack":
        return Stack(), ["enc.layers.0", "enc.layers.1"], "bert"
    return tiny(kind), LAYERS[kind], kind


KINDS = [*FAMILIES, "encoder", "stack"]
# The default run routes one Hugging Face family and both torch stacks; the rest run slow.
FAST = ["bert", "encoder", "stack"]
ROUTED = [kind if kind in FAST else pytest.param(kind, marks=pytest.mark.slow) for kind in KINDS]


def _attached(kind: str, pool: str = "mean"):
    model, taps, family = _model(kind)
    inputs = batch(sentences(LENGTHS, seed=1), family)
    aux = auxhead.attach(model, taps, num_classes=2, head="linear", pool=pool, sample=inputs)
    return aux.eval(), inputs, family


def _reference(aux, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(E + 1, B, K) logits of every head and the main output on the whole batch, and (B, E)
    max-softmax scores: the full computation the routing must agree with."""
    with torch.no_grad(), aux.heads_enabled():
        output = aux(**inputs)
    main = output if isinstance(output, torch.Tensor) else output.logits
    heads = [aux.aux_outputs[tap] for tap in aux.taps]
    scores = torch.stack([h.softmax(-1).amax(-1) for h in heads], dim=1)
    return torch.stack([*heads, main]), scores


def _routes_like_the_reference(early, aux, inputs) -> torch.Tensor:
    everything, scores = _reference(aux, inputs)
    logits, exits = early(**inputs)
    expected = exit_indices(scores, torch.tensor(early.thresholds))
    assert exits.tolist() == expected.tolist()
    rows = torch.arange(len(exits))
    torch.testing.assert_close(logits, everything[exits, rows], **TOL)
    return exits


def _median_thresholds(aux, inputs) -> list[float]:
    """Thresholds that send about half of the samples out at each exit (midway between
    neighbouring scores, so float noise cannot flip a sample)."""
    _, scores = _reference(aux, inputs)
    out = []
    for column in scores.T:
        ordered = column.sort().values
        middle = len(ordered) // 2
        out.append(float((ordered[middle - 1] + ordered[middle]) / 2))
    return out


@pytest.mark.parametrize("kind", ROUTED)
def test_each_sample_gets_the_logits_and_exit_of_a_full_computation(kind):
    aux, inputs, _ = _attached(kind)
    early = auxhead.EarlyExit(aux, return_exits=True)
    assert early.mode == "staged"
    early.thresholds = _median_thresholds(aux, inputs)
    exits = _routes_like_the_reference(early, aux, inputs)
    assert len(set(exits.tolist())) == 3  # every exit took samples: the narrowing ran
    assert "stages cut from the torch.export graph" in early.mode_reason
    assert early.last_exits.tolist() == exits.tolist()


@pytest.mark.parametrize("kind", ["bert", "encoder", "stack"])
def test_cls_pooling_and_a_single_sample_route_like_the_reference(kind):
    aux, inputs, family = _attached(kind, pool="cls")
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    _routes_like_the_reference(early, aux, inputs)
    one = batch(sentences([6], seed=5), family)
    for thresholds in ([0.0, 1.0], [1.0, 1.0], early.thresholds):
        early.thresholds = thresholds
        _routes_like_the_reference(early, aux, one)


@pytest.mark.parametrize("kind", ["bert", "encoder"])
def test_samples_that_exit_leave_the_batch(kind):
    """FLOPs fall with the rows still running after the first exit: linear in their count."""
    aux, inputs, _ = _attached(kind)
    early = auxhead.EarlyExit(aux)
    early(**inputs)  # the stages are cut at the first batch, outside the count
    _, scores = _reference(aux, inputs)
    ordered = scores[:, 0].sort().values.tolist()

    def flops(stay: int) -> int:  # the first exit lets all but `stay` samples out
        if stay == len(ordered):
            first = 1.0  # no one leaves; the head still runs, as in the other cases
            early.thresholds = [0.999999, 1.0]
            assert bool((scores[:, 0] <= 0.999999).all())
        else:
            first = (ordered[stay - 1] + ordered[stay]) / 2 if stay else 0.0
            early.thresholds = [first, 1.0]
        with FlopCounterMode(display=False) as counter:
            early(**inputs)
        return counter.get_total_flops()

    none, half, all_ = flops(0), flops(4), flops(8)
    assert none < half < all_
    per_row = (all_ - none) / 8
    assert abs((half - none) - 4 * per_row) <= 0.02 * (all_ - none)


def test_padding_changes_neither_logits_nor_exits():
    aux, inputs, family = _attached("bert")
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    words = sentences(LENGTHS, seed=1)
    narrow, narrow_exits = early(**batch(words, family))
    wide, wide_exits = early(**batch(words, family, width=20))
    assert narrow_exits.tolist() == wide_exits.tolist()
    torch.testing.assert_close(narrow, wide, **TOL)


def test_calibrate_reads_hugging_face_batches_and_tuples_alike():
    aux, inputs, _ = _attached("bert")
    labels = torch.tensor([0, 1] * 4)
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(
            inputs["input_ids"], inputs["attention_mask"], labels, strict=True
        )
    ]
    dicts = DataLoader(rows * 10, batch_size=16)
    tuples = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in dicts]
    early = auxhead.EarlyExit(aux)
    first = early.calibrate(dicts, max_accuracy_drop=0.2, method="empirical", timing_batches=2)
    second = auxhead.EarlyExit(aux).calibrate(
        tuples, max_accuracy_drop=0.2, method="empirical", timing_batches=0
    )
    assert first.samples == second.samples == 80
    assert first.thresholds == second.thresholds
    assert first.share == second.share
    assert first.seconds_per_sample is not None  # timed through the routed forward
    # The summary's accuracy is that of the routing itself on the same sentences.
    logits = early(**inputs)
    assert first.accuracy == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert early.evaluate(dicts).share == first.share


def test_a_batch_without_labels_is_refused_by_name():
    aux, inputs, _ = _attached("bert")
    with pytest.raises(ValueError, match="no 'labels'"):
        auxhead.EarlyExit(aux).calibrate([inputs])


class Branchy(Encoder):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if bool(attention_mask.sum() > 1000):
            attention_mask = attention_mask.clone()
        return super().forward(input_ids, attention_mask)


def test_an_untraceable_model_runs_generic_with_the_reason():
    torch.manual_seed(0)
    inputs = batch(sentences(LENGTHS, seed=1), "bert")
    aux = auxhead.attach(
        Branchy(), ["layers.0", "layers.1"], num_classes=2, pool="mean", sample=inputs
    ).eval()
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    _routes_like_the_reference(early, aux, inputs)  # generic: the heads see the same rows
    assert early.mode == "generic"
    assert "torch.export cannot trace Branchy" in early.mode_reason
    staged = auxhead.EarlyExit(aux, mode="staged")
    with pytest.raises(ValueError, match="cannot route samples through Branchy stage by stage"):
        staged(**inputs)


@pytest.mark.parametrize("kind", ["distilbert", "stack"])
def test_generic_mode_on_a_token_model_routes_like_the_reference(kind):
    aux, inputs, _ = _attached(kind)
    early = auxhead.EarlyExit(aux, mode="generic", return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    _routes_like_the_reference(early, aux, inputs)


def test_positional_inputs_route_as_keywords():
    aux, inputs, _ = _attached("encoder")
    early = auxhead.EarlyExit(aux)
    early.thresholds = _median_thresholds(aux, inputs)
    torch.testing.assert_close(
        early(inputs["input_ids"], inputs["attention_mask"]), early(**inputs), **TOL
    )


@pytest.mark.slow
def test_exported_program_routes_like_the_eager_forward(tmp_path):
    aux, inputs, family = _attached("bert")
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    path = early.export(tmp_path / "bert.pt2", inputs)
    program = torch.export.load(path).module()
    for lengths in (LENGTHS, [4, 12, 6], [7]):
        other = batch(sentences(lengths, seed=len(lengths)), family)
        logits, exits = early(**other)
        got, got_exits = program(other["input_ids"], other["attention_mask"])
        assert got_exits.tolist() == exits.tolist()
        torch.testing.assert_close(got, logits, **TOL)


def test_export_of_a_token_model_asks_for_its_keyword_inputs(tmp_path):
    aux, inputs, _ = _attached("bert")
    early = auxhead.EarlyExit(aux)
    with pytest.raises(ValueError, match="dict of its keyword inputs"):
        early.export(tmp_path / "bert.pt2", inputs["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_file_routes_like_the_eager_forward_in_onnxruntime(kind, tmp_path, one_thread):
    ort = pytest.importorskip("onnxruntime")
    aux, inputs, family = _attached(kind)
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    session = ort.InferenceSession(str(early.export(tmp_path / "m.onnx", inputs)))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    for lengths in (LENGTHS, [4, 12, 6], [7], [3] * 64):
        other = batch(sentences(lengths, seed=len(lengths)), family)
        logits, exits = early(**other)
        got, got_exits = session.run(None, {k: v.numpy() for k, v in other.items()})
        assert got_exits.tolist() == exits.tolist()
        torch.testing.assert_close(torch.from_numpy(got), logits, **TOL)


@pytest.mark.parametrize("mode", ["auto", "generic"])
def test_patience_routes_a_token_model_like_the_rule_on_the_whole_batch(mode):
    from auxhead.exits._patience import patience_logits

    torch.manual_seed(0)
    inputs = batch(sentences(LENGTHS * 4, seed=2), "bert")
    taps = ["layers.0", "layers.1", "layers.2"]
    aux = auxhead.attach(Encoder(depth=4), taps, num_classes=2, pool="mean", sample=inputs)
    aux.eval()
    early = auxhead.EarlyExit(aux, criterion="patience", patience=1, mode=mode)
    logits = early(**inputs)
    with torch.no_grad(), aux.heads_enabled():
        main = aux(**inputs)
    expected, exits = patience_logits([aux.aux_outputs[t] for t in taps], main, 1)
    assert early.mode == ("staged" if mode == "auto" else "generic")
    assert early.last_exits.tolist() == exits.tolist()
    assert len(set(exits.tolist())) >= 2
    torch.testing.assert_close(logits, expected, **TOL)


def test_a_first_batch_of_one_token_sentences_does_not_fix_the_length():
    """torch.export fixes a dimension traced at size 1: such a batch gets stages of its own,
    and longer sentences afterwards are cut again, not refused."""
    aux, inputs, family = _attached("bert")
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    _routes_like_the_reference(early, aux, batch(sentences([1, 1, 1], seed=3), family))
    _routes_like_the_reference(early, aux, inputs)
    assert early.mode == "staged"


class Recurrent(nn.Module):
    """GRUs: torch.export fixes the sequence length of their trace."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.grus = nn.ModuleList(nn.GRU(16, 16, batch_first=True) for _ in range(3))
        self.fc = nn.Linear(16, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        for gru in self.grus:
            h = gru(h)[0] * attention_mask.unsqueeze(-1)
        return self.fc(h.sum(1))


def test_a_trace_that_fixes_the_length_is_cut_again_for_each_length():
    torch.manual_seed(0)
    inputs = batch(sentences(LENGTHS, seed=1), "bert")
    aux = auxhead.attach(
        Recurrent(), ["grus.0", "grus.1"], num_classes=2, pool="mean", sample=inputs
    )
    early = auxhead.EarlyExit(aux.eval(), return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    _routes_like_the_reference(early, aux, inputs)
    assert "each new length is cut again" in early.mode_reason
    _routes_like_the_reference(early, aux, batch(sentences([3, 12, 5], seed=2), "bert"))
    assert early.mode == "staged"
    assert sorted(len(plans) for plans in early._graphs.values()) == [2]


def test_inputs_of_another_dtype_route_alike_and_a_dict_must_be_unpacked():
    aux, inputs, _ = _attached("bert")
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    logits, exits = early(**inputs)
    for dtype in (torch.float32, torch.bool):  # the model takes any of them
        mask = inputs["attention_mask"].to(dtype)
        got, got_exits = early(input_ids=inputs["input_ids"], attention_mask=mask)
        assert got_exits.tolist() == exits.tolist()
        torch.testing.assert_close(got, logits, **TOL)
    with pytest.raises(TypeError, match=r"call early\(\*\*batch\)"):
        early(inputs)


def test_a_cut_early_exit_saves_and_loads(tmp_path):
    aux, inputs, _ = _attached("encoder")
    early = auxhead.EarlyExit(aux)
    early.thresholds = _median_thresholds(aux, inputs)
    expected = early(**inputs)
    torch.save(early, tmp_path / "early.pt")
    loaded = torch.load(tmp_path / "early.pt", weights_only=False)
    torch.testing.assert_close(loaded(**inputs), expected, **TOL)


def test_export_to_a_folder_it_cannot_write_is_refused_before_tracing(tmp_path):
    aux, inputs, _ = _attached("bert")
    early = auxhead.EarlyExit(aux)
    with pytest.raises(ValueError, match=r"cannot write .*missing.*choose a folder"):
        early.export(tmp_path / "missing" / "m.onnx", inputs)
    assert early._graphs == {}  # refused before any tracing
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_ignores_labels_and_the_sample_key_order(tmp_path):
    aux, inputs, _ = _attached("bert")
    early = auxhead.EarlyExit(aux, return_exits=True)
    early.thresholds = _median_thresholds(aux, inputs)
    backwards = {"labels": torch.zeros(8, dtype=torch.long)} | dict(reversed(inputs.items()))
    path = early.export(tmp_path / "m.pt2", backwards)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no partial file left
    program = torch.export.load(path).module()
    logits, exits = early(**inputs)  # inputs in the model's own order: ids, then mask
    got, got_exits = program(inputs["input_ids"], inputs["attention_mask"])
    assert got_exits.tolist() == exits.tolist()
    torch.testing.assert_close(got, logits, **TOL)


@pytest.mark.slow
def test_onnx_of_a_trace_that_fixes_the_length_says_so(tmp_path, one_thread):
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    inputs = batch(sentences(LENGTHS, seed=1), "bert")
    aux = auxhead.attach(
        Recurrent(), ["grus.0", "grus.1"], num_classes=2, pool="mean", sample=inputs
    )
    early = auxhead.EarlyExit(aux.eval())
    early.thresholds = _median_thresholds(aux, inputs)
    path = early.export(tmp_path / "m.onnx", inputs)
    for declared in onnx.load(str(path)).graph.input:
        dims = declared.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_value == 9  # batch dynamic, length fixed
