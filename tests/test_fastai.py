import subprocess
import sys
import textwrap

import fastai.callback.all  # noqa: F401  (patches fine_tune, lr_find, to_fp16 onto Learner)
import pytest
import torch
from conftest import hook_count
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
from fastai.callback.training import GradientAccumulation
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.learner import vision_learner
from torch import nn
from torchvision.models import resnet18

from auxhead import AuxModel
from auxhead.data import dataloaders, load_data
from auxhead.fastai import AuxHeads, aux_learner, export_learner, plot_heads


@pytest.fixture(scope="module")
def dls():
    data = load_data("digits", seed=0).subset(384, 128, seed=0)
    return dataloaders(data, bs=64, seed=0, device="cpu")


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # 0
        nn.ReLU(),  # 1: (B, 16, 8, 8)
        nn.Conv2d(16, 32, 3, padding=1, stride=2),  # 2
        nn.ReLU(),  # 3: (B, 32, 4, 4)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def learner(dls, **kwargs) -> Learner:
    torch.manual_seed(0)
    cb = AuxHeads(["1", "3"], head=kwargs.pop("head", "linear"), **kwargs)
    return Learner(dls, cnn(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb)


class Capture(Callback):
    """Records the loss and its parts after AuxHeads (order -5) and before GradientAccumulation."""

    order = 0

    def __init__(self):
        self.rows = []

    def after_loss(self):
        if self.training:
            main = self.learn.loss_func(self.learn.pred, *self.learn.yb)
            cb = getattr(self.learn, "aux_heads", None)
            self.rows.append((self.learn.loss_grad.detach().clone(), main.detach(), cb))


def test_per_head_columns_and_main_predictions(dls):
    learn = learner(dls)
    learn.fit(2, 3e-3)
    names = learn.recorder.metric_names
    assert names[:4] == ["epoch", "train_loss", "valid_loss", "accuracy"]
    assert {"acc_1", "loss_1", "acc_3", "loss_3"} <= set(names)
    last = learn.recorder.values[-1]
    assert all(v is not None for v in last)
    assert len(learn.aux_heads.history) == 2
    preds, targets = learn.get_preds()
    assert preds.shape == (128, 10) and isinstance(learn.model, AuxModel)
    # validation loss is the main loss alone
    valid_loss = learn.validate()[0]
    manual = nn.functional.cross_entropy(torch.log(preds), targets)
    assert valid_loss == pytest.approx(manual.item(), rel=1e-4)
    # the acc_<tap> columns are each head's accuracy on the validation set, recomputed by hand
    aux_model = learn.model.eval()
    correct = {"1": 0, "3": 0}
    with aux_model.heads_enabled(), torch.no_grad():
        for x, y in dls.valid:
            aux_model(x)
            for tap in correct:
                correct[tap] += (aux_model.aux_outputs[tap].argmax(1) == y).sum().item()
    for tap, n in correct.items():
        assert learn.aux_heads.history[-1][f"acc_{tap}"] == pytest.approx(n / 128)


def test_train_loss_includes_weighted_aux_terms(dls):
    capture = Capture()
    learn = learner(dls, weights=0.5)
    learn.fit(1, 1e-3, cbs=capture)
    for loss, main, _ in capture.rows[:3]:
        assert loss.item() > main.item()
    # at the last step: loss = main + 0.5 * (ce_1 + ce_3), components by name
    loss, main, cb = capture.rows[-1]
    parts = cb.aux_loss.components
    torch.testing.assert_close(loss, main + 0.5 * (parts["1"] + parts["3"]))


def test_schedule_follows_pct_train(dls):
    scales = []

    class Spy(Callback):
        def after_loss(self):
            if self.training:
                scales.append(self.learn.aux_heads.aux_loss.scale)

    learn = learner(dls, schedule="linear_decay")
    learn.fit(2, 1e-3, cbs=Spy())
    assert scales[0] == 1.0
    assert scales == sorted(scales, reverse=True)
    assert scales[-1] == pytest.approx(1 / len(scales), abs=1e-6)


def test_interpretation_predict_show_results(dls):
    learn = learner(dls)
    learn.fit(1, 1e-3)
    interp = ClassificationInterpretation.from_learner(learn)
    assert interp.confusion_matrix().sum() == 128
    x, _ = dls.valid.one_batch()
    _label, index, probs = learn.predict(x[0].cpu())
    assert probs.shape == (10,) and int(index) == int(probs.argmax())
    learn.show_results(max_n=4)


def test_vision_learner_freeze_and_param_groups(dls):
    learn = vision_learner(
        dls, resnet18, pretrained=False, n_in=1, metrics=accuracy, cbs=AuxHeads(["0.5", "0.6"])
    )
    learn.freeze()
    assert len(learn.opt.param_lists) == 3  # resnet body in two groups, then the new head
    head_params = {id(p) for p in learn.model.heads.parameters()}
    assert head_params <= {id(p) for p in learn.opt.param_lists[-1]}
    assert all(p.requires_grad for p in learn.model.heads.parameters())
    body_conv = learn.model.model[0][0].weight
    assert not body_conv.requires_grad
    before = [p.detach().clone() for p in learn.model.heads.parameters()]
    learn.fit(1, slice(1e-4, 1e-3))
    moved = [
        not torch.equal(b, p) for b, p in zip(before, learn.model.heads.parameters(), strict=True)
    ]
    assert all(moved)
    assert "acc_0_5" in learn.recorder.metric_names


@pytest.mark.slow  # trains at notebook scale: fine_tune, lr_find, two precisions
def test_fine_tune_lr_find_and_mixed_precision(dls, tmp_path):
    learn = aux_learner(
        dls, resnet18, ["0.5"], pretrained=False, n_in=1, metrics=accuracy, path=tmp_path
    )  # lr_find saves and removes path/models/_tmp.pth
    learn.fine_tune(1, freeze_epochs=1)
    assert len(learn.aux_heads.history) == 2
    learn.lr_find(num_it=5, show_plot=False)
    for to_half in (learn.to_fp16, learn.to_bf16):
        to_half()
        learn.fit(1, 1e-4)
        assert all(v is not None for v in learn.recorder.values[-1])


def test_gradient_accumulation_scales_aux_terms_like_main(dls):
    class AfterAccumulation(Callback):
        order = 7  # GradientAccumulation is 6

        def __init__(self):
            self.rows = []

        def after_loss(self):
            if self.training:
                self.rows.append(self.learn.loss_grad.detach().clone())

    capture, after = Capture(), AfterAccumulation()
    learn = learner(dls)
    learn.fit(1, 1e-3, cbs=[capture, GradientAccumulation(n_acc=128), after])
    for (loss, _, _), scaled in zip(capture.rows, after.rows, strict=True):
        torch.testing.assert_close(scaled, loss / 2)  # n_acc / bs = 128 / 64


def test_save_load_and_tracker_callbacks(dls, tmp_path):
    learn = learner(dls)
    learn.path = tmp_path
    learn.fit(
        2,
        1e-3,
        cbs=[SaveModelCallback(fname="best"), EarlyStoppingCallback(patience=5)],
    )
    saved = {k: v.clone() for k, v in learn.model.state_dict().items()}
    assert any(k.startswith("heads.") for k in saved)
    other = learner(dls)
    other.path = tmp_path
    other.load("best")
    for key, value in other.model.state_dict().items():
        torch.testing.assert_close(value, saved[key])


class Boom(Callback):
    def __init__(self, error):
        self.error = error

    def after_batch(self):
        if self.training and self.iter == 2:
            raise self.error


@pytest.mark.parametrize("error", [RuntimeError("data went away"), CancelFitException()])
def test_error_or_cancel_leaves_learner_usable(dls, error):
    learn = learner(dls)
    loss_func = learn.loss_func
    hooks = hook_count(learn.model.model)
    if isinstance(error, CancelFitException):
        learn.fit(1, 1e-3, cbs=Boom(error))
    else:
        with pytest.raises(RuntimeError, match="data went away"):
            learn.fit(1, 1e-3, cbs=Boom(error))
    assert learn.loss_func is loss_func
    assert hook_count(learn.model.model) == hooks == 2
    learn.fit(1, 1e-3)
    assert all(v is not None for v in learn.recorder.values[-1])
    assert len([m for m in learn.metrics if m.name == "acc_1"]) == 1


def test_removing_the_callback_removes_its_effect(dls):
    capture = Capture()
    learn = learner(dls)
    bare = learn.model.model
    splitter = learn.aux_heads._splitter
    learn.remove_cb(learn.aux_heads)
    assert learn.model is bare and hook_count(bare) == 0  # the Learner's own model again
    assert learn.splitter is splitter
    learn.fit(1, 1e-3, cbs=capture)
    for loss, main, _ in capture.rows:
        torch.testing.assert_close(loss, main)
    assert learn.recorder.metric_names == ["epoch", "train_loss", "valid_loss", "accuracy", "time"]


def test_removed_cbs_brings_the_same_heads_back(dls):
    learn = learner(dls)
    callback = learn.aux_heads
    aux_model = learn.model
    with learn.removed_cbs(callback):
        assert learn.model is aux_model.model and hook_count(learn.model) == 0
    learn.fit(1, 1e-3)
    assert learn.model is aux_model and aux_model.hooked  # the same heads, not new ones
    assert "acc_1" in learn.recorder.metric_names


@pytest.mark.slow  # a subprocess: a Python without auxhead
def test_export_loads_without_auxhead(dls, tmp_path):
    learn = learner(dls, head="inception")
    learn.fit(1, 1e-3)
    path = export_learner(learn, tmp_path / "export.pkl")
    x = dls.valid.one_batch()[0][:8].cpu().as_subclass(torch.Tensor)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = learn.model.eval()(x)
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["auxhead"] = None  # any import of auxhead now fails
        import torch
        from fastai.learner import load_learner
        learn = load_learner({str(path)!r})
        assert type(learn.model).__name__ == "Sequential", type(learn.model)
        assert not any(type(cb).__name__ == "AuxHeads" for cb in learn.cbs)
        assert sum(len(m._forward_hooks) for m in learn.model.modules()) == 0
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            out = learn.model.eval()(x)
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok", learn.dls.vocab[:3])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
    # the learner still has its heads and trains on
    assert isinstance(learn.model, AuxModel) and hook_count(learn.model.model) == 2
    learn.fit(1, 1e-3)


def test_timm_model_and_plot(dls):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1)
    learn = aux_learner(dls, model, ["layer2", "layer3"], metrics=accuracy)
    learn.fit(1, 1e-3)
    fig = plot_heads(learn)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["main", "layer2", "layer3"]


def test_bad_layer_name_is_reported_when_the_learner_is_built(dls):
    with pytest.raises(ValueError, match="no layer named '9'"):
        Learner(dls, cnn(), loss_func=CrossEntropyLossFlat(), cbs=AuxHeads(["9"]))


def test_add_cb_to_a_frozen_learner_keeps_it_frozen(dls):
    learn = vision_learner(dls, resnet18, pretrained=False, n_in=1, metrics=accuracy)
    learn.freeze()
    learn.add_cb(AuxHeads(["0.5"]))
    learn.fit(1, 1e-3)
    assert isinstance(learn.model, AuxModel)
    assert not learn.model.model[0][0].weight.requires_grad  # the body stays frozen
    head_params = {id(p) for p in learn.model.heads.parameters()}
    assert head_params <= {id(p) for p in learn.opt.param_lists[-1]}
    assert "acc_0_5" in learn.recorder.metric_names


def test_head_loss_for_a_model_whose_output_is_a_dict(dls):
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = cnn()

        def forward(self, x):
            return {"logits": self.body(x)}

    def main_loss(out, y):
        return nn.functional.cross_entropy(out["logits"], y)

    torch.manual_seed(0)
    cb = AuxHeads(["body.3"], head="linear", num_classes=10, head_loss=nn.CrossEntropyLoss())
    learn = Learner(dls, Named(), loss_func=main_loss, cbs=cb)
    learn.fit(1, 1e-3)
    assert "acc_body_3" in learn.recorder.metric_names
    assert learn.aux_heads.aux_model.head("body.3").fc.weight.grad is not None


# Without fastai ---------------------------------------------------------------------------------

WITHOUT_FASTAI = "import sys; sys.modules['fastai'] = None\n"  # `import fastai` now fails


@pytest.mark.parametrize("module", ["auxhead.fastai", "auxhead.gan.learner", "auxhead.gan.monitor"])
def test_without_fastai_the_adapters_name_the_extra(module):
    code = WITHOUT_FASTAI + (
        "import auxhead, auxhead.gan  # the core and the GAN's networks need torch alone\n"
        "try:\n"
        f"    import {module}\n"
        "except ModuleNotFoundError as error:\n"
        "    print(error.name, '|', error, '|', type(error.__cause__).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        f"fastai | {module} needs fastai, which is not installed: pip install 'auxhead[fastai]' "
        "| ModuleNotFoundError"
    )
