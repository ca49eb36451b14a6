"""`EarlyExit.export`: a torch.export program (or ONNX file) that returns what the eager forward
returns, the logits or (logits, exits) with `return_exits`, equal to them at batch sizes 1, 7
and 64, on mixed batches and on batches whose remainder empties at an exit; and that narrows
the batch in-graph (nonzero / index_select inside the routing branches)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import auxhead


class Net(nn.Module):
    """Its own forward: staged through torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def conv_net() -> nn.Module:
    """Image maps of 14x14 and 7x7 at the taps: sizes the sdn head's 4x4 grid does not divide."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


# (model kind, head kind): vectors through Linear layers, and images with each pooling head.
KINDS = [("sequential", "linear"), ("fx", "linear"), ("conv", "sdn"), ("conv", "inception")]


def midway(scores: torch.Tensor, share: float) -> float:
    """A threshold midway between two neighbouring sorted `scores` near the `share` quantile
    (the widest gap of the three nearest), far from both: float noise, ~1e-8, cannot cross."""
    ordered = scores.sort().values.tolist()
    near = round(share * len(ordered))
    k = max(range(near - 1, near + 2), key=lambda k: ordered[k] - ordered[k - 1])
    assert ordered[k] - ordered[k - 1] > 1e-6, f"no gap between scores {ordered}"
    return (ordered[k - 1] + ordered[k]) / 2


def _mixed_early_exit(
    kind: str, head: str = "linear", return_exits: bool = True
) -> tuple[auxhead.EarlyExit, torch.Tensor]:
    """An EarlyExit (nn.Sequential or fx-staged) whose thresholds send some of `x` to each
    exit, and `x`."""
    torch.manual_seed(0)
    sample, x = torch.zeros(2, 6), torch.randn(64, 6) * 3
    if kind == "sequential":
        model = nn.Sequential(
            nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)
        )
        taps = ["1", "3"]
    elif kind == "conv":
        model, taps = conv_net(), ["1", "3"]
        sample, x = torch.zeros(2, 1, 14, 14), torch.randn(64, 1, 14, 14)
    else:
        model, taps = Net(), ["a", "b"]
    aux = auxhead.attach(model, taps, head=head, sample=sample).eval()

    early = auxhead.EarlyExit(aux, return_exits=return_exits)
    with torch.no_grad(), aux.heads_enabled():
        aux(x)
        temperatures = [1.5, 1.0]
        scores = [
            (aux.aux_outputs[tap] / t).softmax(-1).amax(-1)
            for tap, t in zip(taps, temperatures, strict=True)
        ]
    early.thresholds = [midway(scores[0], 0.6), midway(scores[1], 0.5)]
    early.temperatures = temperatures
    return early, x


def batches(early: auxhead.EarlyExit, x: torch.Tensor) -> list[torch.Tensor]:
    """Batch sizes 64, 7 and 1 (four single images), and two mixed batches whose remainder
    empties: one where every sample leaves at an exit (none reaches the main head), one where
    every sample leaves at the second exit or later (none leaves at the first)."""
    _, exits = early(x)
    assert set(exits.tolist()) == {0, 1, 2}, "thresholds that send samples to every exit"
    return [x, x[:7], x[:1], x[1:2], x[2:3], x[3:4], x[exits < 2], x[exits > 0]]


def exported_ops(program: torch.export.ExportedProgram) -> set[str]:
    """The aten operators of the program's graph and of every subgraph (cond branches)."""
    return {
        str(node.target)
        for module in program.graph_module.modules()
        if isinstance(module, torch.fx.GraphModule)
        for node in module.graph.nodes
        if node.op == "call_function"
    }


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "head"), KINDS)
def test_exported_program_routes_like_the_eager_forward(kind, head, tmp_path, one_thread):
    early, x = _mixed_early_exit(kind, head)
    path = early.export(tmp_path / "early.pt2", x[:4])
    loaded = torch.export.load(path)
    # The batch narrows in-graph: the staying rows are picked, the rest run on them only.
    assert {"aten.nonzero.default", "aten.index_select.default"} <= exported_ops(loaded)
    program = loaded.module()
    seen = set()
    for batch in batches(early, x):
        logits, exits = program(batch)
        expected, expected_exits = early(batch)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(exits, expected_exits)
        seen |= set(exits.tolist())
    assert seen == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "head"), KINDS)
def test_onnx_file_routes_like_the_eager_forward_in_onnxruntime(kind, head, tmp_path, one_thread):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    early, x = _mixed_early_exit(kind, head)
    path = early.export(tmp_path / "early.onnx", x[:4])
    graph = onnx.load(path).graph
    assert "If" in {node.op_type for node in graph.node}  # it routes in-graph
    # and narrows the batch inside the branches: NonZero picks the rows that stay, Gather
    # takes them, a scatter writes their results back.
    inside = {
        node.op_type
        for branch in (a.g for node in graph.node for a in node.attribute if a.type == a.GRAPH)
        for node in _all_nodes(branch)
    }
    assert {"NonZero", "Gather"} <= inside and inside & {"ScatterND", "ScatterElements"}
    session = ort.InferenceSession(str(path))
    assert [output.name for output in session.get_outputs()] == ["logits", "exit"]
    seen = set()
    for batch in batches(early, x):
        logits, exits = session.run(None, {"x": batch.numpy()})
        expected, expected_exits = early(batch)
        torch.testing.assert_close(torch.from_numpy(logits), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.from_numpy(exits), expected_exits)
        seen |= set(exits.tolist())
    assert seen == {0, 1, 2}


def _all_nodes(graph) -> list:
    """The nodes of an ONNX graph and of the subgraphs (If branches) nested in it."""
    nodes = list(graph.node)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == attribute.GRAPH:
                nodes += _all_nodes(attribute.g)
    return nodes


def test_export_returns_what_the_forward_returns(tmp_path):
    """Without `return_exits`, the eager forward and the exported program both return the
    logits alone; with it, both return (logits, exits)."""
    for return_exits in (False, True):
        early, x = _mixed_early_exit("fx", return_exits=return_exits)
        program = torch.export.load(early.export(tmp_path / "early.pt2", x[:4])).module()
        for batch in (x, x[:1]):
            eager, exported = early(batch), program(batch)
            if return_exits:
                assert isinstance(eager, tuple) and isinstance(exported, tuple)
                torch.testing.assert_close(exported[0], eager[0], rtol=1e-5, atol=1e-5)
                assert torch.equal(exported[1], eager[1])
            else:
                assert isinstance(eager, torch.Tensor) and isinstance(exported, torch.Tensor)
                torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_file_without_exits_returns_the_logits_alone(tmp_path, one_thread):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    early, x = _mixed_early_exit("fx", return_exits=False)
    session = ort.InferenceSession(str(early.export(tmp_path / "early.onnx", x[:4])))
    assert [output.name for output in session.get_outputs()] == ["logits"]
    for batch in (x, x[:1]):
        (logits,) = session.run(None, {"x": batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(logits), early(batch), rtol=1e-5, atol=1e-5)


def test_export_refuses_what_it_cannot_write(tmp_path):
    aux = auxhead.attach(Net(), ["a", "b"], head="linear", sample=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"\(.pt2\) or an ONNX file \(.onnx\), got 'early.tf'"):
        auxhead.EarlyExit(aux).export(tmp_path / "early.tf", torch.zeros(2, 6))
    with pytest.raises(ValueError, match="needs a staged EarlyExit"):
        auxhead.EarlyExit(aux, mode="generic").export(tmp_path / "early.pt2", torch.zeros(2, 6))


def test_onnx_without_its_packages_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name)
    )
    aux = auxhead.attach(Net(), ["a", "b"], head="linear", sample=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"needs the onnxscript package\(s\): pip install"):
        auxhead.EarlyExit(aux).export(tmp_path / "early.onnx", torch.zeros(2, 6))


# An onnx export takes 3-7 s: the default run keeps one (the only onnx check outside the slow
# tests), the slow run has both.
@pytest.mark.parametrize(
    ("suffix", "thresholds"),
    [
        (".pt2", [0.0, 1.0]),
        (".pt2", [None, 0.0]),
        (".onnx", [0.0, 1.0]),
        pytest.param(".onnx", [None, 0.0], marks=pytest.mark.slow),
    ],
)
def test_one_image_sample_exports_a_dynamic_batch(suffix, thresholds, tmp_path, one_thread):
    """Traced on one image, with thresholds of 0 (everyone leaves, what `calibrate` returns
    when the first exit alone meets the target) and 1, the program takes any batch size and
    routes like the eager forward."""
    if suffix == ".onnx":
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    early, x = _mixed_early_exit("fx")
    early.thresholds = [
        t if t is not None else early.thresholds[i] for i, t in enumerate(thresholds)
    ]
    path = early.export(tmp_path / f"early{suffix}", x[:1])
    if suffix == ".pt2":
        program = torch.export.load(path).module()
    else:
        session = ort.InferenceSession(str(path))

        def program(batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(map(torch.from_numpy, session.run(None, {"x": batch.numpy()})))

    for batch in (x[:1], x[:7]):
        logits, exits = program(batch)
        expected, expected_exits = early(batch)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(exits, expected_exits)


def test_export_refuses_an_empty_sample(tmp_path):
    early, x = _mixed_early_exit("fx")
    with pytest.raises(ValueError, match=r"sample batch \(B, ...\), B >= 1, got \(0, 6\)"):
        early.export(tmp_path / "early.pt2", x[:0])
