"""Measurement for `EarlyExit`: one pass over labelled data that keeps each head's score and
correctness (`collect`), the `ExitSummary` of a set of thresholds on it (`summarise`), and
wall-clock timing against the full model.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from auxhead._probe import batch_size, eval_mode, first_tensor
from auxhead.attach import AuxModel
from auxhead.exits._calibrate import Calibration
from auxhead.exits._flops import FlopProfile, flop_profile
from auxhead.exits._patience import patience_exits
from auxhead.exits._route import MAIN, check_logits, exit_indices, first_true, model_logits

__all__ = [
    "ExitSummary",
    "Seen",
    "as_call",
    "collect",
    "seconds_per_sample",
    "split_batch",
    "summarise",
]

Score = Callable[[torch.Tensor, float], torch.Tensor]  # (B, K) logits, temperature -> (B,)

INTERVAL = 0.95  # level of the observed drop's interval


def _si(flops: float) -> str:
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if flops >= factor:
            return f"{flops / factor:.2f}{unit}"
    return f"{flops:.0f}"


@dataclass(frozen=True)
class ExitSummary:
    """How the early exits do on a data set; `print()` shows a table, `as_dict()` a dict."""

    exits: list[str]  # the taps in `at` order, then "main"
    thresholds: list[float]  # one per tap; 1 means the exit is off
    criterion: str
    samples: int
    accuracy: float  # with early exits
    main_accuracy: float  # the main head alone
    max_accuracy_drop: float | None  # the calibration target; None from `evaluate`
    fallback: bool  # calibration found no usable exit: every sample goes to the main head
    share: list[float]  # share of the samples leaving at each exit (sums to 1)
    exit_accuracy: list[float | None]  # accuracy of the samples leaving there; None: none did
    flops: list[int]  # per-sample FLOPs of leaving at each exit, heads run on the way included
    mean_flops: float  # per sample, with early exits
    full_flops: int  # per sample, the wrapped model alone
    oracle_flops: float  # per sample, exiting at the first correct head, running only that head
    oracle_accuracy: float  # share of samples some exit gets right
    seconds_per_sample: float | None  # wall-clock with early exits; None if not timed
    full_seconds_per_sample: float | None  # wall-clock of the wrapped model alone
    confidence: float | None = None  # "ltt": the target holds with this probability
    method: str | None = None  # "ltt", "ltt-harm" or "empirical"; None from `evaluate`
    max_flops: float | None = None  # the calibration's compute budget, share of full FLOPs
    bound: float | None = None  # "ltt": the upper confidence bound the test held to the
    # target, on the test part of the data: of the drop ("ltt") or the harm rate, which bounds
    # it ("ltt-harm"), for max_accuracy_drop; of the mean FLOPs share for max_flops
    harm: float = 0.0  # share of samples the main head gets right and their exit wrong
    drop_interval: tuple[float, float] = (0.0, 0.0)  # 95% interval of the drop (normal approx.)
    temperatures: list[float] | None = None  # per head, when fitted
    calibration_samples: tuple[int, int] | None = None  # "ltt": (path part, test part)
    patience: int | None = None  # criterion "patience": heads in a row that must agree

    @property
    def drop(self) -> float:
        """Accuracy of the main head alone minus that with early exits, on these samples."""
        return self.main_accuracy - self.accuracy

    @property
    def saving(self) -> float:
        """Share of the full model's FLOPs the early exits save."""
        return 1.0 - self.mean_flops / self.full_flops if self.full_flops else 0.0

    @property
    def oracle_saving(self) -> float:
        """Share of the full model's FLOPs saved by exiting at the first correct head."""
        return 1.0 - self.oracle_flops / self.full_flops if self.full_flops else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "drop": self.drop,
            "saving": self.saving,
            "oracle_saving": self.oracle_saving,
        }

    def __str__(self) -> str:
        rows = [("exit", "threshold", "share", "accuracy", "FLOPs/sample")]
        for index, name in enumerate(self.exits):
            threshold = self.thresholds[index] if index < len(self.thresholds) else None
            threshold = None if self.patience is not None else threshold
            accuracy = self.exit_accuracy[index]
            rows.append(
                (
                    name,
                    "-" if threshold is None else "off" if threshold >= 1 else f"{threshold:.4f}",
                    f"{self.share[index]:.1%}",
                    "-" if accuracy is None else f"{accuracy:.2%}",
                    _si(self.flops[index]),
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(5)]
        lines = [
            "  ".join(
                cell.ljust(w) if c == 0 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        rule = self.criterion if self.patience is None else f"patience {self.patience}"
        lines.insert(0, f"early exits on {self.samples} samples (criterion: {rule})")
        low, high = self.drop_interval
        lines.append(
            f"accuracy {self.accuracy:.2%} (main head alone {self.main_accuracy:.2%}): drop "
            f"{self.drop * 100:.2f} pt, {INTERVAL:.0%} interval {low * 100:.2f} to "
            f"{high * 100:.2f} pt; main right and exit wrong on {self.harm:.2%}"
        )
        lines.append(self._target_line())
        lines.append(
            f"FLOPs/sample {_si(self.mean_flops)}: {self.saving:.1%} saved vs the full model "
            f"({_si(self.full_flops)}); the oracle saves {self.oracle_saving:.1%} "
            f"({_si(self.oracle_flops)}, accuracy {self.oracle_accuracy:.2%})"
        )
        if self.temperatures is not None:
            scaled = ", ".join(f"{t:.3f}" for t in self.temperatures)
            lines.append(f"head temperatures (fitted on the calibration data): {scaled}")
        if self.seconds_per_sample is not None and self.full_seconds_per_sample is not None:
            speedup = self.full_seconds_per_sample / max(self.seconds_per_sample, 1e-12)
            lines.append(
                f"wall-clock/sample {self.seconds_per_sample * 1e3:.3f} ms vs "
                f"{self.full_seconds_per_sample * 1e3:.3f} ms for the full model ({speedup:.2f}x)"
            )
        if self.fallback:
            lines.append("no exit met the target: every sample goes to the main head")
        return "\n".join(line.rstrip() for line in lines if line)

    def _target_line(self) -> str:
        if self.method is None:
            return ""
        if self.max_flops is not None:
            target = f"target: at most {self.max_flops:.0%} of the full model's FLOPs"
        else:
            target = f"target: accuracy drop at most {self.max_accuracy_drop * 100:.2f} pt"
        if self.method == "empirical":
            return f"{target}, met on these samples (empirical: no guarantee on new data)"
        assert self.confidence is not None and self.calibration_samples is not None
        path, test = self.calibration_samples
        held = "" if self.bound is None else (
            f"; upper bound on the test part {self.bound:.2%} of FLOPs"
            if self.max_flops is not None
            else f"; upper bound on the test part {self.bound * 100:.2f} pt"
        )  # fmt: skip
        return (
            f"{target} with {self.confidence:.0%} confidence on new data exchangeable with "
            f"these (Learn then Test: "
            f"{f'path from {path} samples' if path else 'a path fixed in advance'}, "
            f"tested on {test}{held})"
        )


@dataclass
class Seen:
    """What one pass over labelled data keeps."""

    exits: list[str]  # the taps in `at` order, then "main"
    scores: torch.Tensor  # (N, E) each head's score, by the criterion (at temperature 1)
    correct: torch.Tensor  # (N, E + 1) bool: each head, then the main output, is right
    profile: FlopProfile
    timing_inputs: list[Any]  # the first batches' inputs, as `split_batch` gives them
    logits: torch.Tensor | None = None  # (N, E, K) head logits, kept to fit temperatures
    targets: torch.Tensor | None = None  # (N,)
    agree: torch.Tensor | None = None  # (N, E + 1) bool: each head predicts the main's class


LABELS = ("labels", "label")  # where a Hugging Face batch (a dict) keeps its targets


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, class-index targets) from one batch, or a ValueError saying what is wrong.
    A batch is `(inputs, targets)`, inputs one tensor, a tuple of them or a dict of keyword
    inputs; or a dict of keyword inputs with the targets under "labels" (Hugging Face's)."""
    if isinstance(batch, Mapping):
        found = [name for name in LABELS if name in batch]
        if not found:
            raise ValueError(
                f"calibration needs labelled batches; this dict has {sorted(batch)} and no "
                "'labels'. Pass batches with their labels, as a validation DataLoader gives them."
            )
        inputs = {name: value for name, value in batch.items() if name not in LABELS}
        targets = batch[found[0]]
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
    else:
        got = type(batch).__name__
        got += f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise ValueError(
            f"calibration needs labelled batches (inputs, targets), got a {got}. "
            "Pass a DataLoader over (input, label) pairs, such as the validation DataLoader."
        )
    if not isinstance(inputs, (torch.Tensor, Mapping, tuple, list)):
        raise TypeError(
            "EarlyExit takes a tensor, a tuple of tensors or a dict of keyword inputs per "
            f"batch, got {type(inputs).__name__}"
        )
    targets = torch.as_tensor(targets).as_subclass(torch.Tensor)  # drop fastai's subclasses
    if targets.dim() != 1 or targets.is_floating_point():
        raise ValueError(
            f"targets must be class indices of shape (B,), got {targets.dtype} of shape "
            f"{tuple(targets.shape)}"
        )
    return inputs, targets


def as_call(inputs: Any) -> tuple[tuple, dict]:
    """A batch's inputs as the `(args, kwargs)` of the model's call."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def _moved(inputs: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, inputs)


def _first(inputs: Any, batch: int) -> Any:
    """The first sample of a batch's inputs, as a batch of one."""
    return pytree.tree_map(
        lambda v: v[:1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v,
        inputs,
    )


def _every_head(aux_model: AuxModel, inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The model's logits and each head's, from the AuxModel's own forward with its heads on
    (eval mode: each head on a copy of its tap's output taken as the tap returns, as
    `EarlyExit`'s forward runs it; a token model's heads pool over its real tokens)."""
    args, kwargs = as_call(inputs)
    with aux_model.heads_enabled():
        main = aux_model(*args, **kwargs)
    by_tap, aux_model.aux_outputs = aux_model.aux_outputs, {}
    return model_logits(main), by_tap


def collect(
    aux_model: AuxModel,
    data: Iterable[Any],
    score: Score,
    *,
    timing_batches: int,
    keep_logits: bool = False,
) -> Seen:
    """Run every head and the main output on `data` once (eval mode, no grad), scoring each
    head with `score` at temperature 1; keep the first `timing_batches` inputs for timing."""
    taps = list(aux_model.taps)
    names = [*taps, MAIN]
    device = next(aux_model.parameters(), torch.empty(0)).device
    scores, correct, agree, kept, logits, labels = [], [], [], [], [], []
    first: Any = None
    with eval_mode(aux_model), torch.no_grad():
        for batch in data:
            inputs, targets = split_batch(batch)
            inputs, targets = _moved(inputs, device), targets.to(device)
            main, by_tap = _every_head(aux_model, inputs)
            missing = [tap for tap in taps if tap not in by_tap]
            if missing:
                raise ValueError(f"taps {missing} did not run on the calibration inputs")
            heads = [by_tap[tap] for tap in taps]
            pairs = zip([*heads, main], names, strict=True)
            outputs = [check_logits(out, heads[0], name) for out, name in pairs]  # (B, K)
            if targets.shape[0] != main.shape[0]:
                raise ValueError(
                    f"a batch has {main.shape[0]} inputs but {targets.shape[0]} targets"
                )
            classes = outputs[-1].shape[-1]
            outside = targets[(targets < 0) | (targets >= classes)]
            if outside.numel():  # would count as wrong everywhere: a silent 0% accuracy
                raise ValueError(
                    f"targets must be class indices in [0, {classes}) for the model's "
                    f"{classes} outputs, got {outside[0].item()}; check the labels (or "
                    "num_classes)"
                )
            scores.append(torch.stack([score(h, 1.0) for h in heads], dim=1).cpu())
            hits = [out.argmax(dim=-1) == targets for out in outputs]
            correct.append(torch.stack(hits, dim=1).cpu())  # (B, E + 1)
            main_class = outputs[-1].argmax(dim=-1)
            same = [out.argmax(dim=-1) == main_class for out in outputs]
            agree.append(torch.stack(same, dim=1).cpu())  # (B, E + 1), main always True
            if keep_logits:
                logits.append(torch.stack(heads, dim=1).float().cpu())  # (B, E, K)
                labels.append(targets.cpu())
            first = _first(inputs, main.shape[0]) if first is None else first
            if len(kept) < timing_batches:
                kept.append(inputs)
    if first is None:
        raise ValueError("the calibration data yielded no batches")
    return Seen(
        exits=names,
        scores=torch.cat(scores),
        correct=torch.cat(correct),
        agree=torch.cat(agree),
        profile=flop_profile(aux_model, first),
        timing_inputs=kept,
        logits=torch.cat(logits) if keep_logits else None,
        targets=torch.cat(labels) if keep_logits else None,
    )


def _drop_interval(differences: torch.Tensor) -> tuple[float, float]:
    """Two-sided INTERVAL normal-approximation interval of the mean of paired differences."""
    n = differences.numel()
    mean = differences.mean().item()
    if n < 2:
        return (-1.0, 1.0)
    half = statistics.NormalDist().inv_cdf(0.5 + INTERVAL / 2) * differences.std().item()
    half /= math.sqrt(n)
    return (max(-1.0, mean - half), min(1.0, mean + half))


def summarise(
    seen: Seen,
    *,
    thresholds: Sequence[float],
    temperatures: Sequence[float],
    criterion: str,
    score: Score,
    seconds: tuple[float, float] | None = None,
    drop: float | None = None,
    calibration: Calibration | None = None,
    max_flops: float | None = None,
    patience: int | None = None,
) -> ExitSummary:
    """The `ExitSummary` of these thresholds and temperatures on `seen` (or of the patience
    rule, every head running); `seconds` is the wall-clock per sample (with early exits, of
    the model alone), if timed."""
    n_exits = len(seen.exits) - 1
    if patience is not None:
        thresholds, temperatures = [0.0] * n_exits, [1.0] * n_exits  # every head runs
    fitted = any(t != 1.0 for t in temperatures)
    scores = seen.scores
    if fitted:
        assert seen.logits is not None, "temperatures need the logits"  # keep_logits=True
        scores = torch.stack(
            [score(seen.logits[:, e], temperatures[e]) for e in range(n_exits)], dim=1
        )
    limits = torch.tensor(thresholds, dtype=torch.float64)
    if patience is None:
        exits = exit_indices(scores, limits)  # (N,)
    else:
        assert seen.logits is not None, "the patience rule needs the logits"
        exits = patience_exits(list(seen.logits.unbind(1)), patience)
    costs = seen.profile.exit_costs((limits < 1).tolist())
    oracle = first_true(seen.correct[:, :n_exits])  # (N,)
    oracle_costs = seen.profile.direct_costs()
    hit = seen.correct.gather(1, exits[:, None]).squeeze(1)
    main = seen.correct[:, -1]
    share, exit_accuracy = [], []
    for index in range(n_exits + 1):
        here = exits == index
        share.append(here.float().mean().item())
        exit_accuracy.append(hit[here].float().mean().item() if here.any() else None)
    timed, full_timed = seconds if seconds is not None else (None, None)
    return ExitSummary(
        exits=list(seen.exits),
        thresholds=limits.tolist(),
        criterion=criterion,
        samples=len(exits),
        accuracy=hit.float().mean().item(),
        main_accuracy=main.float().mean().item(),
        max_accuracy_drop=drop,
        fallback=calibration.fallback if calibration is not None else False,
        share=share,
        exit_accuracy=exit_accuracy,
        flops=costs,
        mean_flops=torch.tensor(costs, dtype=torch.float64)[exits].mean().item(),
        full_flops=seen.profile.full,
        oracle_flops=torch.tensor(oracle_costs, dtype=torch.float64)[oracle].mean().item(),
        oracle_accuracy=seen.correct.any(dim=1).float().mean().item(),
        seconds_per_sample=timed,
        full_seconds_per_sample=full_timed,
        confidence=calibration.confidence if calibration is not None else None,
        method=calibration.method if calibration is not None else None,
        max_flops=max_flops,
        bound=calibration.bound if calibration is not None else None,
        harm=(main & ~hit).float().mean().item(),
        drop_interval=_drop_interval(main.double() - hit.double()),
        temperatures=list(temperatures) if fitted else None,
        calibration_samples=(
            (calibration.path_samples, calibration.test_samples)
            if calibration is not None and calibration.method != "empirical"
            else None
        ),
        patience=patience,
    )


def seconds_per_sample(model: Callable[..., Any], batches: list[Any]) -> float:
    """Wall-clock seconds per sample of `model` over `batches` (each a tensor, a tuple or a
    dict of keyword inputs), after one warm-up call."""
    first = first_tensor(pytree.tree_leaves(batches[0]))

    def sync() -> None:
        if first is not None and first.is_cuda:
            torch.cuda.synchronize(first.device)

    def run(inputs: Any) -> None:
        args, kwargs = as_call(inputs)
        model(*args, **kwargs)

    run(batches[0])
    sync()
    start = time.perf_counter()
    for batch in batches:
        run(batch)
    sync()
    samples = sum(batch_size(batch) for batch in batches)
    return (time.perf_counter() - start) / samples
