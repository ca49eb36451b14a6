"""Losses that combine several outputs: `AuxLoss` for an `AuxModel`'s heads, `MultiLoss` for
models that already return several outputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from auxhead._spread import per_name
from auxhead.attach import AuxModel
from auxhead.dense import check_resize, deep_supervision_weights, match_size, target_size
from auxhead.schedules import Schedule, get_schedule

__all__ = ["AuxLoss", "MultiLoss", "distillation_loss"]

LossFunc = Callable[..., torch.Tensor]
Weights = float | Sequence[float] | Mapping[str, float]
# Weight presets by name: computed from the heads' output shapes.
WEIGHT_PRESETS = ("nnunet",)


def _preset_weights(preset: str, aux_model: AuxModel) -> tuple[float, dict[str, float]]:
    """(main weight, head weights) of a weight preset, from the shapes attach recorded."""
    if preset not in WEIGHT_PRESETS:
        raise ValueError(
            f"unknown weights preset {preset!r}; choose one of {list(WEIGHT_PRESETS)}, a number, "
            "a list in `at` order or a dict by tap name"
        )
    missing = [name for name in aux_model.taps if name not in aux_model.head_shapes]
    if missing or aux_model.output_shape is None:
        raise ValueError(
            f"weights={preset!r} ranks the heads by the resolution of their outputs, which "
            "attach measures on its sample: attach with `sample=`, or pass the weights "
            "yourself (auxhead.deep_supervision_weights)."
        )
    main = ""  # no tap has an empty name
    shapes = {main: aux_model.output_shape, **aux_model.head_shapes}
    weights = deep_supervision_weights(shapes)
    return weights.pop(main), weights


def _check_weights(weights: dict[str, Any]) -> dict[str, float]:
    for name, weight in weights.items():
        if (
            not isinstance(weight, (int, float))
            or isinstance(weight, bool)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(f"weight for {name!r} must be a finite number >= 0, got {weight!r}")
    return {name: float(weight) for name, weight in weights.items()}


def _check_number(value: Any, what: str, low: float, high: float, *, low_open: bool) -> float:
    """`value` as a float in [low, high] ((low, high] with `low_open`), or a ValueError
    naming `what`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(
            f"{what} must be a finite number in {bracket}{low}, {high}], got {value!r}"
        )
    return float(value)


def _get_reduction(funcs: Sequence[LossFunc]) -> str | None:
    return getattr(funcs[0], "reduction", None)


def _set_reduction(funcs: Sequence[LossFunc], value: str) -> None:
    for func in funcs:
        if hasattr(func, "reduction"):
            func.reduction = value


def head_loss_term(
    head_loss: LossFunc,
    name: str,
    logits: torch.Tensor,
    targets: Sequence[Any],
    pred: Any,
    *,
    resize: str | None = None,
) -> torch.Tensor:
    """`head_loss(logits, *targets)` for the head at `name`, or a ValueError naming the head,
    the shapes and `head_loss=`: a main loss written for the model's own output (a dict, a
    namedtuple, a `ModelOutput` with `.logits`) fails on the heads' plain logits."""
    try:
        return head_loss(logits, *targets)
    except (RuntimeError, ValueError, IndexError, AttributeError, KeyError, TypeError) as error:
        shapes = [
            tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in targets
        ]
        hint = "Check num_classes, or pass head_loss= for these targets."
        sizes = {target_size(t, logits) for t in targets} - {None}
        if logits.dim() > 2 and resize is None and sizes and sizes != {tuple(logits.shape[2:])}:
            hint = (
                "The head predicts at its tap's resolution, the targets are larger: pass "
                "resize='logits' (to AuxLoss, or to the fastai callback AuxHeads) to upsample "
                "the logits, or resize='targets' to downsample the targets."
            )
        elif not isinstance(pred, torch.Tensor):
            hint = (
                f"The model's output is a {type(pred).__name__} and the loss may be written for "
                "it, but each head gives a logits tensor: pass head_loss= a loss that takes "
                "(logits, *targets), e.g. head_loss=nn.CrossEntropyLoss()."
            )
        raise ValueError(
            f"the loss of head {name!r} failed: its output has shape {tuple(logits.shape)}, "
            f"the targets {shapes}. {hint} ({type(error).__name__}: {error})"
        ) from error


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float,
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton's knowledge-distillation term T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The teacher is detached: the head learns from the final classifier, not the reverse (Be Your
    Own Teacher, Zhang et al., ICCV 2019). The classes are in dim 1: (B, K), or dense
    (B, K, H, W) / (B, K, L), where the term is taken at every place.

    Args:
        mask: for dense logits, True at the places that count, (B, H, W): the others (the
            targets' ignore label) add nothing, and "mean" averages over the kept places only,
            as `nn.CrossEntropyLoss(ignore_index=...)` does.
    """
    log_p = F.log_softmax(student / temperature, dim=1)  # (B, K, ...)
    q = F.softmax(teacher.detach() / temperature, dim=1)  # (B, K, ...)
    per_place = F.kl_div(log_p, q, reduction="none").sum(dim=1) * temperature**2  # (B, ...)
    if mask is not None:
        per_place = per_place.masked_fill(~mask, 0.0)
    if reduction == "none":
        return per_place
    if reduction == "sum":
        return per_place.sum()
    if mask is not None:
        return per_place.sum() / mask.sum().clamp(min=1)
    return per_place.mean()


def _ignore_index(head_loss: LossFunc) -> int | None:
    """The ignore label of a loss: `nn.CrossEntropyLoss`'s own, or that of the loss a fastai
    `BaseLoss` wraps (`.func`); None if it has none."""
    for func in (head_loss, getattr(head_loss, "func", None)):
        value = getattr(func, "ignore_index", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _teacher(pred: Any) -> torch.Tensor | None:
    """The main output's logits, the self-distillation teacher: the output itself, a Hugging
    Face `ModelOutput`'s `logits`, or torchvision segmentation's `{"out": ...}`."""
    if isinstance(pred, torch.Tensor):
        return pred
    for key in ("logits", "out"):
        found = pred.get(key) if isinstance(pred, Mapping) else getattr(pred, key, None)
        if isinstance(found, torch.Tensor):
            return found
    return None


class AuxLoss:
    """main loss + sum_i w_i * s(t) * head_loss(aux_i, *targets).

    A loss callable `loss(pred, *targets)` for an `AuxModel`: `pred` is the model's own output;
    the heads' logits come from `aux_model.aux_outputs`. The aux terms are added only while the
    model is in training mode, so a validation loss is the main loss alone, even with
    `heads_enabled()`.

    Args:
        loss_func: the main loss, e.g. `nn.CrossEntropyLoss()`.
        aux_model: the `AuxModel` whose heads to supervise.
        weights: one weight for every head, a list in `at` order, or a dict by tap name.
            GoogLeNet used 0.3, Inception v3 0.4, torchvision's segmentation recipe 0.5,
            mmsegmentation 0.4. "nnunet": nnU-Net's deep-supervision weights from the heads'
            and the main output's resolutions (`auxhead.deep_supervision_weights`: 1/2^i for
            the i-th distinct resolution among the main output and the heads attached, so a
            skipped scale is not counted; the lowest 0, normalised to sum 1 with the main
            output's weight, which becomes `main_weight`); needs dense heads attached with a
            `sample`.
        schedule: multiplier s(t) of training progress t in [0, 1] (set `.progress`): a name
            from `auxhead.SCHEDULES` ("constant", "linear_decay", "linear_ramp", "cosine") or a
            callable.
        head_loss: loss for the heads; None: `loss_func`.
        distill: weight alpha of self-distillation (BYOT): each head's term becomes
            (1 - alpha) * head_loss + alpha * T^2 * KL(main || head). 0 turns it off.
        temperature: the distillation temperature T.
        check_finite: raise naming the head if an aux loss is NaN or infinite. Costs one
            device synchronisation per step (one check over every head's term). Heads
            weighted 0 are not checked (their term adds nothing).
        resize: for dense heads (B, K, h, w) on dense targets (B, H, W): None (the head's loss
            sees them as they are), "logits" (each head's logits upsampled to the targets'
            size, bilinear, align_corners=False: torchvision's and mmsegmentation's recipe) or
            "targets" (the targets downsampled to each head's size, nearest neighbour, labels
            and the ignore label kept exact: nnU-Net's). Pooled (B, K) heads are untouched.
            The ignore label is the loss's own (`nn.CrossEntropyLoss(ignore_index=255)`).
        main_weight: the main loss's weight in training (1: the main loss as it is); a
            validation loss is the main loss alone, unweighted. A trainer that adds
            `aux_term` to its own main loss applies it itself.

    Attributes:
        progress: training progress t in [0, 1]; a trainer sets it (the fastai callback does).
        components: the last call's terms, detached: {"main": ..., tap name: ...} (unweighted).

    Example:
        >>> loss_func = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model, weights=0.3)
        >>> loss = loss_func(aux_model(x), y)  # main + 0.3 * (sum of head losses)

        Segmentation, torchvision's recipe (an FCN head on layer3, out + 0.5 * aux):

        >>> ce = nn.CrossEntropyLoss(ignore_index=255)
        >>> loss_func = auxhead.AuxLoss(lambda out, y: ce(out["out"], y), aux_model,
        ...                             head_loss=ce, weights=0.5, resize="logits")
    """

    def __init__(
        self,
        loss_func: LossFunc,
        aux_model: AuxModel,
        *,
        weights: Weights | str = 0.3,
        schedule: str | Schedule = "constant",
        head_loss: LossFunc | None = None,
        distill: float = 0.0,
        temperature: float = 3.0,
        check_finite: bool = True,
        resize: str | None = None,
        main_weight: float = 1.0,
    ) -> None:
        if not isinstance(aux_model, AuxModel):
            raise TypeError(
                f"AuxLoss needs the AuxModel that auxhead.attach returned, "
                f"got {type(aux_model).__name__}"
            )
        distill = _check_number(distill, "distill", 0.0, 1.0, low_open=False)
        temperature = _check_number(temperature, "temperature", 0.0, math.inf, low_open=True)
        self.resize = check_resize(resize)
        self.main_weight = _check_number(main_weight, "main_weight", 0.0, math.inf, low_open=False)
        self.loss_func = loss_func
        self.aux_model = aux_model
        if isinstance(weights, str):
            self.main_weight, weights = _preset_weights(weights, aux_model)
        self.weights = _check_weights(per_name(weights, aux_model.taps, "weights", "heads"))
        self.schedule = get_schedule(schedule)
        self.head_loss = head_loss if head_loss is not None else loss_func
        self.distill = float(distill)
        self.temperature = float(temperature)
        self.check_finite = check_finite
        self.progress = 0.0
        self.components: dict[str, torch.Tensor] = {}

    @property
    def scale(self) -> float:
        """The schedule's multiplier at the current progress."""
        t = min(max(float(self.progress), 0.0), 1.0)
        value = self.schedule(t)
        try:
            scale = float(value)
        except (TypeError, ValueError):
            scale = math.nan
        if not math.isfinite(scale) or scale < 0:
            name = getattr(self.schedule, "__name__", repr(self.schedule))
            raise ValueError(
                f"schedule {name} gave {value!r} at progress {t:.3f}; a schedule must return a "
                "finite number >= 0 (the multiplier of every head's weight)"
            )
        return scale

    def __call__(self, pred: Any, *targets: Any) -> torch.Tensor:
        main = self.loss_func(pred, *targets)
        aux = self.aux_term(pred, *targets)
        self.components = {"main": main.detach(), **self.components}
        if not self.aux_model.training:
            return main  # a validation loss is the main loss alone, unweighted
        if self.main_weight != 1.0:
            main = self.main_weight * main
        return main if aux is None else main + aux

    def aux_term(
        self, pred: Any, *targets: Any, head_loss: LossFunc | None = None
    ) -> torch.Tensor | None:
        """sum_i w_i * s(t) * head_loss(aux_i, *targets); None in eval mode.

        In training mode, a head that did not run (`set_heads(False)`) adds a zero tied to its
        parameters, so each still gets a (zero) gradient and `DistributedDataParallel` finds no
        unused parameters on the next step.

        `head_loss` overrides the heads' loss for this call: the fastai callback passes the
        Learner's current `loss_func`, so wrappers such as MixUp's apply to the heads too.
        """
        self.components = {}
        if not self.aux_model.training:
            return None
        aux = self.aux_model.aux_outputs
        scale = self.scale
        total = self._zero_term([name for name in self.aux_model.taps if name not in aux])
        resized: dict = {}  # targets resized once per size for all heads (resize="targets")
        for name, logits in aux.items():
            term = self._head_term(
                name, logits, pred, targets, head_loss or self.head_loss, resized
            )
            self.components[name] = term.detach()
            weight = self.weights[name] * scale
            if weight == 0:
                # A zero weight adds a zero tied to the head's parameters, so each gets a
                # (zero) gradient and DistributedDataParallel sees no unused parameters; not
                # 0 * term, which a term of NaN (a map of ignored pixels only) would poison.
                weighted = self._zero_term([name])
                if weighted is None:
                    continue
            else:
                weighted = weight * term
            total = weighted if total is None else total + weighted
        checked = {name: self.components[name] for name in aux if self.weights[name] * scale}
        if self.check_finite and checked:
            self._check_finite(checked)
        return total

    @staticmethod
    def _check_finite(terms: Mapping[str, torch.Tensor]) -> None:
        """Raise naming the first head whose term is NaN or infinite. One reading of one bool
        for all heads: on an accelerator, one synchronisation per step, not one per head."""
        finite = torch.stack([torch.isfinite(term).all() for term in terms.values()])
        if bool(finite.all()):
            return
        pairs = zip(terms.items(), finite.tolist(), strict=True)
        name, term = next(named for named, ok in pairs if not ok)
        raise FloatingPointError(
            f"the aux loss of head {name!r} is not finite ({term.flatten()[:4]}); "
            "lower the learning rate or the head's weight, or check its inputs"
        )

    def _zero_term(self, names: list[str]) -> torch.Tensor | None:
        """0 * (sum of the trainable parameters of the heads at `names`): adds nothing to the
        loss, but puts each of those parameters in the graph. None if there are none."""
        params = [
            p for name in names for p in self.aux_model.head(name).parameters() if p.requires_grad
        ]
        if not params:
            return None
        return sum(p.sum() for p in params) * 0.0

    def _head_term(
        self,
        name: str,
        logits: torch.Tensor,
        pred: Any,
        targets: tuple,
        head_loss: LossFunc,
        resized: dict | None = None,
    ) -> torch.Tensor:
        logits = logits.float()  # heads may have run under autocast
        logits, targets = match_size(logits, targets, self.resize, cache=resized)
        term = head_loss_term(head_loss, name, logits, targets, pred, resize=self.resize)
        if self.distill:
            teacher = _teacher(pred)
            if teacher is None or teacher.shape != logits.shape:
                hint = ""
                if logits.dim() > 2 and teacher is not None and self.resize != "logits":
                    hint = " (dense heads: pass resize='logits', so both are at the targets' size)"
                raise ValueError(
                    f"self-distillation needs the main output shaped like head {name!r}'s "
                    f"logits {tuple(logits.shape)}{hint}"
                )
            mask = self._kept_places(name, logits, targets, head_loss)
            kd = distillation_loss(
                logits,
                teacher,
                temperature=self.temperature,
                reduction=self.reduction or "mean",
                mask=mask,
            )
            term = (1 - self.distill) * term + self.distill * kd
        return term

    @staticmethod
    def _kept_places(
        name: str, logits: torch.Tensor, targets: tuple, head_loss: LossFunc
    ) -> torch.Tensor | None:
        """For dense logits on class-index targets, True where the target is not the loss's
        ignore label (the distillation term skips the rest); None for pooled logits or
        per-class map targets, which have no ignore label."""
        if logits.dim() < 3:
            return None
        size = tuple(logits.shape[2:])
        labels = next(
            (t for t in targets if target_size(t, logits) == size and t.dim() == logits.dim() - 1),
            None,
        )
        if labels is None:
            return None
        ignore = _ignore_index(head_loss)
        if ignore is None:
            raise ValueError(
                f"self-distillation on the dense head {name!r} must leave out the pixels the "
                f"loss ignores, but {type(head_loss).__name__} has no `ignore_index`: use a "
                "loss that has one (nn.CrossEntropyLoss(ignore_index=255)), or distill=0."
            )
        return labels != ignore

    @property
    def reduction(self) -> str | None:
        return _get_reduction([self.loss_func])

    @reduction.setter
    def reduction(self, value: str) -> None:
        # fastai's get_preds(with_loss=True) sets 'none' to get one loss per sample.
        _set_reduction([self.loss_func, self.head_loss], value)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        activation = getattr(self.loss_func, "activation", None)
        return activation(x) if activation is not None else x

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        decodes = getattr(self.loss_func, "decodes", None)
        return decodes(x) if decodes is not None else x

    def __repr__(self) -> str:
        schedule = getattr(self.schedule, "__name__", repr(self.schedule))
        return f"AuxLoss({self.loss_func!r}, weights={self.weights}, schedule={schedule})"


class MultiLoss:
    """A weighted sum of one loss per output, for models that return several outputs.

    The reusable form of "write a custom loss that unpacks every output": YOLO-style
    multi-scale outputs, multi-task heads, or any tuple, list or dict of outputs.

    Args:
        losses: one loss for every output, a list in output order, or a dict by output key.
        weights: one number for every output, a list, or a dict by key.
        targets: which targets each output is scored against: a list or dict by key of target
            indices (an int or a tuple of ints). Default: every output against all targets if
            there is one target, output i against target i if there are as many targets as
            outputs.

    Attributes:
        components: the last call's unweighted losses by output key ("0", "1", ... for tuples).

    Example:
        >>> loss_func = MultiLoss(nn.CrossEntropyLoss(), weights=[1.0, 0.5])
        >>> loss = loss_func((logits_a, logits_b), y)
    """

    def __init__(
        self,
        losses: LossFunc | Sequence[LossFunc] | Mapping[str, LossFunc],
        *,
        weights: Weights = 1.0,
        targets: Sequence[int | tuple[int, ...]]
        | Mapping[str, int | tuple[int, ...]]
        | None = None,
    ) -> None:
        self.losses = losses
        self.weights = weights
        self.targets = targets
        self.components: dict[str, torch.Tensor] = {}

    @staticmethod
    def _named_outputs(preds: Any) -> dict[str, Any]:
        if isinstance(preds, Mapping):
            return {str(key): value for key, value in preds.items()}
        if isinstance(preds, (tuple, list)):
            return {str(i): value for i, value in enumerate(preds)}
        raise TypeError(
            f"MultiLoss needs a tuple, list or dict of outputs, got {type(preds).__name__}; "
            "for a single output use the loss directly"
        )

    def _target_indices(self, names: list[str], n_targets: int) -> dict[str, tuple[int, ...]]:
        if self.targets is None:
            if n_targets == 1:
                return dict.fromkeys(names, (0,))
            if n_targets == len(names):
                return {name: (i,) for i, name in enumerate(names)}
            raise ValueError(
                f"{len(names)} outputs {names} and {n_targets} targets: pass targets= to say "
                "which target(s) each output is scored against"
            )
        spread = per_name(self.targets, names, "targets")
        indices = {}
        for name, index in spread.items():
            index = (index,) if isinstance(index, int) else tuple(index)
            bad = [i for i in index if not 0 <= i < n_targets]
            if bad:
                raise ValueError(
                    f"output {name!r} names target index {bad}, but there are {n_targets} targets"
                )
            indices[name] = index
        return indices

    def _loss_funcs(self) -> list[LossFunc]:
        if isinstance(self.losses, Mapping):
            return list(self.losses.values())
        if isinstance(self.losses, (list, tuple)):
            return list(self.losses)
        return [self.losses]

    def __call__(self, preds: Any, *targets: Any) -> torch.Tensor:
        outputs = self._named_outputs(preds)
        if not outputs:
            raise ValueError("MultiLoss got an empty collection of outputs")
        names = list(outputs)
        if isinstance(self.losses, (Mapping, list, tuple)):
            losses = per_name(self.losses, names, "losses")
        else:
            losses = dict.fromkeys(names, self.losses)
        weights = _check_weights(per_name(self.weights, names, "weights"))
        indices = self._target_indices(names, len(targets))
        total: torch.Tensor | None = None
        self.components = {}
        for name in names:
            term = losses[name](outputs[name], *(targets[i] for i in indices[name]))
            self.components[name] = term.detach()
            weighted = weights[name] * term
            total = weighted if total is None else total + weighted
        assert total is not None  # outputs is not empty
        return total

    @property
    def reduction(self) -> str | None:
        return _get_reduction(self._loss_funcs())

    @reduction.setter
    def reduction(self, value: str) -> None:
        _set_reduction(self._loss_funcs(), value)
