"""Hugging Face adapter: auxiliary heads trained by the `transformers` `Trainer`.

`AuxTrainer` is a `Trainer` whose model is an `AuxModel`: the model's own loss (its
`outputs.loss`, or the Trainer's label smoothing or `compute_loss_func`) stays the main loss,
and in training `compute_loss` adds the heads' weighted losses from an `AuxLoss` (weights,
schedule over progress = step / max_steps, self-distillation from `outputs.logits`). Each
logging step adds every head's mean loss and accuracy since the last one (`loss_<tap>`,
`acc_<tap>`, '.' in tap names written '_') to `trainer.state.log_history`; evaluation adds
`eval_loss_<tap>` and `eval_acc_<tap>`. `save_model` writes the model without its heads, as
`save_pretrained` does: `from_pretrained` loads it with no auxhead installed. (Checkpoints
written during training keep the heads, so `train(resume_from_checkpoint=...)` resumes them.)

This is the only module of the package that imports `transformers.Trainer`.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any

import torch
from torch import nn

from auxhead._extras import raise_missing_extra

try:
    from transformers import Trainer
    from transformers.utils import can_return_loss, find_labels
except ModuleNotFoundError as error:
    raise_missing_extra(error, "auxhead.hf")
    raise

from auxhead.attach import AuxModel
from auxhead.losses import AuxLoss

__all__ = ["AuxTrainer"]


def _column(name: str) -> str:
    """A log key suffix from a tap name: 'bert.encoder.layer.0' -> 'bert_encoder_layer_0'."""
    return re.sub(r"\W", "_", name)


class _HeadTally:
    """Each head's summed loss, correct predictions and samples since the last log, kept as
    tensors on the model's device (no synchronisation per step); read and reset by `log`."""

    def __init__(self) -> None:
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.samples = 0

    def add(self, losses: dict[str, torch.Tensor], correct: dict[str, torch.Tensor], n: int):
        for tap, loss in losses.items():
            total = self.sums.setdefault(tap, [torch.zeros(()), torch.zeros(())])
            total[0] = total[0].to(loss.device) + loss.detach().float() * n
            total[1] = total[1].to(loss.device) + correct[tap].detach().float()
        self.samples += n

    def pop(self, prefix: str) -> dict[str, float]:
        """`{prefix}loss_<tap>` and `{prefix}acc_<tap>`: means over the samples seen."""
        sums, samples = self.sums, self.samples
        self.sums, self.samples = {}, 0
        logs = {}
        for tap, (loss, correct) in sums.items():
            logs[f"{prefix}loss_{_column(tap)}"] = float(loss) / samples
            logs[f"{prefix}acc_{_column(tap)}"] = float(correct) / samples
        return logs


class AuxTrainer(Trainer):
    """A Hugging Face `Trainer` that trains an `AuxModel`'s heads beside the model.

    Args:
        model: the `AuxModel` that `auxhead.attach` returned for a Hugging Face model (or any
            model called with keyword arguments that returns `loss` and `logits`).
        args: the `TrainingArguments`, as for `Trainer`.
        aux_loss: the `AuxLoss` giving the heads' weights, schedule, loss and distillation.
            Its main loss is not used (the model's own is); its `head_loss` is, on the
            `labels`. Default: `AuxLoss(nn.CrossEntropyLoss(), model)`, weights 0.3.
        eval_heads: also run the heads in `evaluate`, logging each one's loss and accuracy.
        **kwargs: the rest of `Trainer`'s arguments (`train_dataset`, `eval_dataset`,
            `data_collator`, `compute_metrics`, `callbacks`, ...).

    Attributes:
        aux_loss: the `AuxLoss`; its `progress` follows `state.global_step / state.max_steps`.

    Example:
        >>> model = BertForSequenceClassification(config)
        >>> aux = auxhead.attach(model, layers, num_classes=2, pool="cls", sample=batch)
        >>> trainer = AuxTrainer(aux, args, train_dataset=data.train,
        ...                      data_collator=data.collate,
        ...                      aux_loss=auxhead.AuxLoss(nn.CrossEntropyLoss(), aux,
        ...                                               weights=0.3, schedule="linear_decay"))
        >>> trainer.train()
        >>> trainer.save_model("out")  # no heads: BertForSequenceClassification.from_pretrained
    """

    def __init__(
        self,
        model: AuxModel,
        args: Any = None,
        *,
        aux_loss: AuxLoss | None = None,
        eval_heads: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, AuxModel):
            raise TypeError(
                f"AuxTrainer trains the AuxModel that auxhead.attach returned, got "
                f"{type(model).__name__}: aux = auxhead.attach(model, layers, num_classes=..., "
                "sample=batch), then AuxTrainer(aux, args, ...)."
            )
        if "model_init" in kwargs:
            raise TypeError("AuxTrainer takes its AuxModel, not model_init (hyperparameter search)")
        if aux_loss is None:
            aux_loss = AuxLoss(nn.CrossEntropyLoss(), model)
        elif not isinstance(aux_loss, AuxLoss) or aux_loss.aux_model is not model:
            raise ValueError(
                "aux_loss must be an auxhead.AuxLoss built on this AuxModel: "
                "AuxLoss(nn.CrossEntropyLoss(), aux_model, weights=..., schedule=...)"
            )
        super().__init__(model=model, args=args, **kwargs)
        self.aux_loss = aux_loss
        self.eval_heads = eval_heads
        self._train_tally, self._eval_tally = _HeadTally(), _HeadTally()
        self._eval_prefix: str | None = None
        # What the Trainer read from the model's forward, read from the wrapped model's: an
        # AuxModel forwards *args, **kwargs, which would hide its labels and loss kwargs.
        inner = model.model
        if self.args.label_names is None:
            self.label_names = find_labels(inner.__class__)
        self.can_return_loss = can_return_loss(inner.__class__)
        if hasattr(inner, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = inner.accepts_loss_kwargs
        else:
            parameters = inspect.signature(inner.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(
                p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters
            )

    def _set_signature_columns_if_needed(self) -> None:
        # The dataset columns the model takes: those of the wrapped model's forward.
        if self._signature_columns is None:
            names = list(inspect.signature(self.model.model.forward).parameters)
            self._signature_columns = [*names, "label", "label_ids", *self.label_names]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The Trainer's loss, plus (in training) the heads' terms from `aux_loss`."""
        labels = inputs.get("labels")  # the Trainer's label smoother pops it from `inputs`
        if model.training:
            max_steps = max(int(self.state.max_steps or 0), 1)
            self.aux_loss.progress = min(self.state.global_step / max_steps, 1.0)
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        aux_model = self.aux_loss.aux_model
        heads = aux_model.aux_outputs
        if heads and labels is not None:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            if aux_model.training:
                term = self.aux_loss.aux_term(logits, labels)
                if term is not None:
                    loss = loss + term
                losses = {tap: self.aux_loss.components[tap] for tap in heads}
                self._tally(self._train_tally, heads, losses, labels)
            else:  # evaluate with eval_heads: each head's own loss, not added
                with torch.no_grad():
                    losses = {
                        tap: self.aux_loss.head_loss(h.float(), labels) for tap, h in heads.items()
                    }
                self._tally(self._eval_tally, heads, losses, labels)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _tally(
        tally: _HeadTally,
        heads: dict[str, torch.Tensor],
        losses: dict[str, torch.Tensor],
        labels: torch.Tensor,
    ) -> None:
        correct = {tap: (logits.argmax(-1) == labels).sum() for tap, logits in heads.items()}
        # A loss that is not one number per batch (reduction="none") is averaged for the log.
        losses = {tap: loss.detach().float().mean() for tap, loss in losses.items()}
        tally.add(losses, correct, int(labels.numel()))

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """`Trainer.evaluate`, with the heads run too (`eval_heads`): the metrics get each
        head's `eval_loss_<tap>` and `eval_acc_<tap>` (with the metric key prefix given)."""
        prefix = kwargs.get("metric_key_prefix", args[2] if len(args) > 2 else "eval")
        self._eval_prefix = prefix
        aux_model = self.aux_loss.aux_model
        context = aux_model.heads_enabled() if self.eval_heads else contextlib.nullcontext()
        try:
            with context:
                return super().evaluate(*args, **kwargs)
        finally:
            self._eval_prefix = None
            self._eval_tally = _HeadTally()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """`Trainer.log`, with each head's loss and accuracy since the last log."""
        if "loss" in logs and self._train_tally.samples:
            logs.update(self._train_tally.pop(""))
        prefix = self._eval_prefix
        if prefix is not None and f"{prefix}_loss" in logs and self._eval_tally.samples:
            logs.update(self._eval_tally.pop(f"{prefix}_"))
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model without its heads (`save_pretrained`, with the tokenizer and the
        training arguments as `Trainer.save_model` writes them): `from_pretrained` loads it
        with no auxhead installed. Checkpoints during training (`_internal_call`) keep the
        heads, for `resume_from_checkpoint`."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        aux_model = self.model
        # The Trainer saves `self.model` with save_pretrained when it is a PreTrainedModel:
        # the wrapped model is; its hooks are not part of what it writes.
        self.model = aux_model.model
        try:
            super().save_model(output_dir, _internal_call=False)
        finally:
            self.model = aux_model
