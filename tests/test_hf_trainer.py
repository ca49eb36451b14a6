"""The Hugging Face Trainer integration (issue #22, item 4): `auxhead.hf.AuxTrainer` adds the
heads' losses (as `AuxLoss` computes them), logs each head's loss and accuracy in
`state.log_history`, and `save_model` writes the model alone, which `from_pretrained` loads in
a Python without auxhead."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from _hf_tiny import LAYERS, batch, sentences, tiny
from conftest import hook_count
from torch import nn

import auxhead
from auxhead.data import load_mr

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from auxhead.hf import AuxTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny steps: threads only hand off

TAPS = LAYERS["bert"]
COLUMNS = ["bert_encoder_layer_0", "bert_encoder_layer_1"]


def _args(tmp_path, **overrides):
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "learning_rate": 1e-3,
        "logging_steps": 5,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
    return transformers.TrainingArguments(**(settings | overrides))


@pytest.fixture(scope="module")
def mr():
    return load_mr(vocab_size=500, max_length=32)


def _aux_bert(mr, **attach):
    config = transformers.BertConfig(
        vocab_size=mr.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(config)
    sample = mr.train.batch(range(4))
    return auxhead.attach(model, TAPS, num_classes=2, pool="cls", sample=sample, **attach)


def test_the_trainer_logs_each_heads_loss_and_accuracy(mr, tmp_path):
    aux = _aux_bert(mr)
    aux_loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, weights=0.3, schedule="linear_decay")
    trainer = AuxTrainer(
        aux,
        _args(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=10),
        aux_loss=aux_loss,
        train_dataset=mr.train,
        eval_dataset=mr.valid,
        data_collator=mr.collate,
    )
    trainer.train()
    history = trainer.state.log_history
    train_logs = [log for log in history if "loss" in log]
    assert len(train_logs) == 2  # steps 5 and 10
    for log in train_logs:
        for column in COLUMNS:
            assert 0 <= log[f"acc_{column}"] <= 1
            assert log[f"loss_{column}"] > 0
    evaluated = next(log for log in history if "eval_loss" in log)
    for column in COLUMNS:
        assert 0 <= evaluated[f"eval_acc_{column}"] <= 1
    assert aux_loss.progress == pytest.approx(9 / 10)  # the last step's progress
    metrics = trainer.evaluate()
    assert f"eval_acc_{COLUMNS[0]}" in metrics
    assert not aux.heads_active  # evaluate put the heads back as they were


def test_the_loss_is_the_models_plus_aux_loss(mr, tmp_path):
    aux = _aux_bert(mr, head="linear")  # no dropout in the heads: the same logits twice
    aux_loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux, weights=[0.2, 0.5], distill=0.5)
    trainer = AuxTrainer(aux, _args(tmp_path, max_steps=1), aux_loss=aux_loss)
    inputs = mr.train.batch(range(8))
    aux.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(aux, dict(inputs))
    torch.manual_seed(0)
    out = aux(**inputs)
    expected = out.loss + sum(
        weight
        * (
            0.5 * F.cross_entropy(aux.aux_outputs[tap], inputs["labels"])
            + 0.5 * auxhead.distillation_loss(aux.aux_outputs[tap], out.logits, temperature=3.0)
        )
        for tap, weight in zip(TAPS, [0.2, 0.5], strict=True)
    )
    torch.testing.assert_close(loss, expected)


def test_the_trainer_refuses_what_it_cannot_train(mr, tmp_path):
    model = tiny("bert")
    with pytest.raises(TypeError, match="AuxTrainer trains the AuxModel"):
        AuxTrainer(model, _args(tmp_path))
    aux = _aux_bert(mr)
    other = _aux_bert(mr)
    with pytest.raises(ValueError, match="aux_loss must be an auxhead.AuxLoss built on this"):
        AuxTrainer(aux, _args(tmp_path), aux_loss=auxhead.AuxLoss(nn.CrossEntropyLoss(), other))


@pytest.mark.slow  # a subprocess: a Python without auxhead
def test_save_model_writes_the_model_alone_loadable_without_auxhead(mr, tmp_path):
    aux = _aux_bert(mr)
    trainer = AuxTrainer(
        aux, _args(tmp_path, max_steps=4), train_dataset=mr.train, data_collator=mr.collate
    )
    trainer.train()
    out_dir = tmp_path / "saved"
    trainer.save_model(str(out_dir))
    assert trainer.model is aux and aux.hooked  # training can go on
    assert hook_count(aux.model) == len(TAPS) + 1  # the taps and the attention-mask pre-hook
    inputs = batch(sentences([7, 3], seed=1), "bert")
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = aux.eval()(**inputs).logits
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["auxhead"] = None  # any import of auxhead now fails
        import torch
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(out_dir)!r}).eval()
        assert type(model).__name__ == "BertForSequenceClassification", type(model)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            out = model(**inputs).logits
        torch.testing.assert_close(out, torch.load({str(tmp_path / "expected.pt")!r}))
        print("ok", sorted(model.state_dict())[0])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


def test_checkpoints_keep_the_heads_and_resume_where_they_were(mr, tmp_path):
    def run(resume=None):
        torch.manual_seed(0)
        aux = _aux_bert(mr)
        args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = AuxTrainer(aux, args, train_dataset=mr.train, data_collator=mr.collate)
        trainer.train(resume_from_checkpoint=resume)
        return aux

    straight = run()
    resumed = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    expected = straight.state_dict()
    for key, value in resumed.state_dict().items():  # heads, their random streams and all
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
