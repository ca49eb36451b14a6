"""Export paths: the stripped model scripts (TorchScript) and exports (`torch.export`) like the
bare model; `torch.compile` of an `AuxModel` trains like eager."""

import warnings

import pytest
import torch
from conftest import hook_count, tiny_cnn
from torch import nn

import auxhead

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_and_stripped(x: torch.Tensor) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny CNN trained a few steps with heads, then stripped; and its state before attach."""
    model = tiny_cnn()
    aux_model = auxhead.attach(model, ["1", "3"], sample=x)
    loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model)
    optimizer = torch.optim.SGD(aux_model.parameters(), lr=0.1)
    y = torch.arange(len(x)) % 5
    for _ in range(3):
        loss = loss_func(aux_model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    bare = aux_model.strip().eval()
    assert bare is model and hook_count(bare) == 0
    return bare, {k: v.clone() for k, v in bare.state_dict().items()}


def test_stripped_model_scripts(x):
    bare, state = _trained_and_stripped(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(bare)
    assert scripted.state_dict().keys() == state.keys()
    torch.testing.assert_close(scripted(x), bare(x), rtol=0, atol=0)


def test_stripped_model_exports(x):
    bare, state = _trained_and_stripped(x)
    exported = torch.export.export(bare, (x,))
    assert exported.state_dict.keys() <= state.keys()
    assert not any("heads" in name for name in exported.state_dict)
    module = exported.module()
    torch.testing.assert_close(module(x), bare(x), rtol=0, atol=0)
    other = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(module(other), bare(other), rtol=0, atol=0)


def _compiled_vs_eager(x: torch.Tensor, backend: str, fullgraph: bool = False) -> None:
    """Train the same model with heads eagerly and compiled, switching the heads off for one
    step; losses, gradients (heads included) and aux outputs agree."""
    y = torch.arange(len(x)) % 5
    # Dynamo remembers code it gave up on (AuxModel.forward, after its graph break) for the
    # whole process; start from a clean slate so each test sees its own compile.
    torch._dynamo.reset()

    def build():
        torch.manual_seed(0)
        aux_model = auxhead.attach(tiny_cnn(), ["1", "3"], head="linear", sample=x)
        loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model, schedule="linear_decay")
        return aux_model, loss_func, torch.optim.SGD(aux_model.parameters(), lr=0.1)

    eager, eager_loss, eager_opt = build()
    compiled, compiled_loss, compiled_opt = build()
    forward = torch.compile(compiled, backend=backend, fullgraph=fullgraph)
    for step, heads_on in enumerate([None, False, None]):
        losses = []
        for model, run, loss_func, optimizer in (
            (eager, eager, eager_loss, eager_opt),
            (compiled, forward, compiled_loss, compiled_opt),
        ):
            model.set_heads(heads_on)
            loss_func.progress = step / 3
            loss = loss_func(run(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        # Compiled kernels fuse and reorder float sums: explicit tolerances, a few float32 ulps
        # of these magnitudes (losses ~2, logits ~1), far below what a wrong graph changes.
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        assert list(compiled.aux_outputs) == list(eager.aux_outputs)
        for name, logits in eager.aux_outputs.items():
            torch.testing.assert_close(compiled.aux_outputs[name], logits, rtol=1e-5, atol=1e-6)
        for (name, p_eager), p_compiled in zip(
            eager.named_parameters(), compiled.parameters(), strict=True
        ):
            torch.testing.assert_close(
                p_compiled.grad, p_eager.grad, rtol=1e-4, atol=1e-6, msg=name
            )
    assert compiled.aux_outputs and compiled.aux_outputs["1"].requires_grad


def test_compiled_aux_model_trains(x):
    # aot_eager: Dynamo's capture and AOTAutograd's joint graph, as inductor gets them, without
    # the minute of C++ code generation (see test_compiled_aux_model_trains_with_inductor).
    _compiled_vs_eager(x, "aot_eager")


def test_compiled_aux_model_is_one_graph(x):
    _compiled_vs_eager(x, "aot_eager", fullgraph=True)


@pytest.mark.slow  # inductor compiles C++ for ~45 s on a CPU
def test_compiled_aux_model_trains_with_inductor(x):
    _compiled_vs_eager(x, "inductor")
