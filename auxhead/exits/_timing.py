"""`exit_timing`: where an exit would save wall-clock on this machine, at this input size.

FLOPs say little about time: early layers on large maps take more time per FLOP than late
ones (at 128 px, ResNet-50 up to layer2 is about two thirds of its batch-64 CPU time but 45% of
its FLOPs), and no exit can save the time spent before it. So the model is timed up to each
candidate tap, cut into stages as `EarlyExit` cuts it (`plan_stages`: the stages run one after
the other, a clock read after each), and a head is timed on each tap's output. Then, for a
share p of the images leaving at one exit (only that head running), the time saved is

    saved(p) = (p * (T - t_tap) - t_head) / T

of the full model's time T, where t_tap is the time up to and including the tap: every image
pays the prefix and the head, and those that stay (1 - p) pay the rest of the model. The same
formula on FLOPs is the saving the FLOPs predict. It is the saving of routing that costs
nothing; `EarlyExit`'s own overhead comes on top (`benchmarks/exit_speed.py` measures both).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from auxhead._hooks import HookSet
from auxhead._probe import batch_size, call_model, eval_mode, list_layers, resolve
from auxhead.attach import AuxModel, attach
from auxhead.exits._flops import flop_profile
from auxhead.exits._fx import plan_stages
from auxhead.exits._stages import Plan

__all__ = ["ExitTiming", "TapTiming", "candidate_taps", "exit_timing", "time_saved"]

SHARES = (0.25, 0.5, 0.75)


def time_saved(share: float, full: float, prefix: float, head: float) -> float:
    """The share of `full` saved when a share `share` of the inputs leaves at an exit that
    costs `prefix` (the model up to the tap) plus `head`: (share * (full - prefix) - head) /
    full. Negative when the head costs more than the leavers save. Seconds or FLOPs alike."""
    return (share * (full - prefix) - head) / full


@dataclass(frozen=True)
class TapTiming:
    """Per image, what an exit at one tap costs."""

    tap: str
    seconds: float  # the model up to and including the tap
    head_seconds: float  # the head on the tap's output
    flops: int  # the model up to and including the tap
    head_flops: int


@dataclass(frozen=True)
class ExitTiming:
    """The timing of each candidate exit against the full model; `str()` is a table."""

    taps: tuple[TapTiming, ...]
    seconds: float  # the full model per image
    flops: int  # the full model per image
    shares: tuple[float, ...]  # shares of the inputs leaving, for `saved` and the table
    batch_size: int
    method: str  # "staged" (the stages EarlyExit runs) or "hooks" (a clock read at each tap)

    def tap(self, name: str) -> TapTiming:
        for timing in self.taps:
            if timing.tap == name:
                return timing
        raise KeyError(f"no timing for {name!r}; taps are {[t.tap for t in self.taps]}")

    def saved(self, tap: str, share: float) -> float:
        """The share of the full model's wall-clock saved when `share` of the inputs leave at
        `tap` (its head the only one running), by `time_saved`."""
        t = self.tap(tap)
        return time_saved(share, self.seconds, t.seconds, t.head_seconds)

    def saved_flops(self, tap: str, share: float) -> float:
        """The same saving in FLOPs: what the FLOPs predict."""
        t = self.tap(tap)
        return time_saved(share, self.flops, t.flops, t.head_flops)

    def rows(self) -> list[list[str]]:
        """The table's rows (`headers()` names the columns)."""
        rows = []
        for t in self.taps:
            row = [
                t.tap,
                _percent(t.flops / self.flops),
                _percent(t.seconds / self.seconds),
                f"{t.head_seconds * 1e3:.3f}",
            ]
            row += [
                f"{_percent(self.saved(t.tap, p))} ({_percent(self.saved_flops(t.tap, p))})"
                for p in self.shares
            ]
            rows.append(row)
        return rows

    def headers(self) -> list[str]:
        leaving = [f"saved, {p:.0%} leave" for p in self.shares]
        return ["tap", "FLOPs to tap", "time to tap", "head ms", *leaving]

    def __str__(self) -> str:
        from auxhead._format import table

        return "\n".join(
            [
                f"full model: {self.seconds * 1e3:.3f} ms and {self.flops / 1e6:.1f} MFLOPs per "
                f"image at batch size {self.batch_size} ({self.method}); saved: wall-clock "
                "(FLOPs) with one exit, routing free",
                "",
                table(self.headers(), self.rows(), align="l" + "r" * (len(self.shares) + 3)),
            ]
        )


def _percent(value: float) -> str:
    text = f"{value:.0%}"
    return "0%" if text == "-0%" else text


def candidate_taps(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """The blocks of the shallowest level that has at least three (modules with children,
    run once, whose output is batch-first with 3 or 4 dimensions), in the order they run:
    ResNet's layer1-4, EfficientNet's and MobileNet's features.0-8, a ViT's encoder layers."""
    modules = dict(model.named_modules())
    batch = sample.shape[0]
    blocks = [
        info.name
        for info in list_layers(model, sample)
        if info.name
        and not info.train_only
        and info.calls == 1
        and info.shape is not None
        and len(info.shape) in (3, 4)
        and info.shape[0] == batch
        and any(True for _ in modules[info.name].children())
    ]
    for depth in range(6):
        level = [name for name in blocks if name.count(".") == depth]
        if len(level) >= 3:
            return level
    return blocks


def exit_timing(
    model: nn.Module | AuxModel,
    sample: torch.Tensor,
    taps: Sequence[str] | None = None,
    *,
    head: str | Mapping[str, Any] = "sdn",
    num_classes: int = 10,
    shares: Sequence[float] = SHARES,
    repeats: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> ExitTiming:
    """Time the model up to each candidate tap and a head there, on this machine and `sample`.

    The model runs in eval mode without gradients (modes put back), cut into stages at the taps
    as `EarlyExit` cuts it, a clock read after each stage; a model that cannot be cut runs
    whole with a clock read at each tap (a forward hook). Each figure is the median of
    `repeats` runs, after one warm-up run; FLOPs are counted as `exit_flops` counts them.
    Measure at the batch size you serve: the time per FLOP of early layers changes with it.

    Args:
        model: an `nn.Module` (heads of kind `head` are attached for the timing and removed
            after), or an `AuxModel` (its own taps and heads are timed).
        sample: an input batch (B, ...), at the batch size and input size to measure.
        taps: the candidate layers, in the order they run; default `candidate_taps` (or the
            `AuxModel`'s taps).
        head: the head kind to time (as `attach` takes it), for an `nn.Module`.
        num_classes: the heads' width, for an `nn.Module`.
        shares: the shares of inputs leaving at an exit, for the table's savings.
        repeats: timed runs per figure (>= 1).
        clock: seconds as a float; `time.perf_counter` (tests pass a fake one).

    Returns:
        An `ExitTiming`: per tap the seconds and FLOPs per image up to it and of its head;
        `saved(tap, share)` and `saved_flops(tap, share)`; `print()` shows the table.

    Raises:
        ValueError: a sample that is not a batch tensor, shares outside [0, 1], repeats < 1,
            taps that are not layers of the model (see `auxhead.list_layers`).

    Example:
        >>> model = torchvision.models.resnet50(num_classes=10)
        >>> print(auxhead.exits.exit_timing(model, torch.randn(64, 3, 128, 128)))  # doctest: +SKIP
    """
    if not isinstance(sample, torch.Tensor) or sample.dim() == 0 or sample.shape[0] == 0:
        got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ValueError(f"exit_timing needs a sample batch (B, ...), B >= 1, got {got}")
    bad = [p for p in shares if isinstance(p, bool) or not 0.0 <= p <= 1.0]
    if bad or not shares:
        raise ValueError(f"shares are fractions in [0, 1] (0.5: half leave), got {list(shares)}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a whole number >= 1, got {repeats!r}")
    if isinstance(model, AuxModel):
        if taps is not None and list(taps) != list(model.taps):
            raise ValueError(
                f"an AuxModel is timed at its own taps {model.taps}, got taps={list(taps)}; "
                "pass aux_model.model to time other layers"
            )
        return _measure(model, sample, tuple(shares), repeats, clock)
    # A sample of one is doubled for the dry runs (BatchNorm in training mode).
    dry = sample[:2] if sample.shape[0] > 1 else torch.cat([sample, sample])
    chosen = list(taps) if taps is not None else candidate_taps(model, dry)
    if not chosen:
        raise ValueError(
            f"no candidate taps found in {type(model).__name__}; pass taps= "
            "(see auxhead.list_layers(model, sample))"
        )
    aux_model = attach(model, chosen, head=head, num_classes=num_classes, sample=dry)
    try:
        return _measure(aux_model, sample, tuple(shares), repeats, clock)
    finally:
        aux_model.strip()


def _measure(
    aux_model: AuxModel,
    sample: torch.Tensor,
    shares: tuple[float, ...],
    repeats: int,
    clock: Callable[[], float],
) -> ExitTiming:
    taps = list(aux_model.taps)
    profile = flop_profile(aux_model, sample[:2])  # per image: two are enough
    plan, _ = plan_stages(aux_model.model, taps)
    batch = batch_size(sample)
    with eval_mode(aux_model), torch.no_grad():
        run = _staged(plan, taps, clock) if plan is not None else _hooked(aux_model, taps, clock)
        _, outputs = run(sample, keep=True)  # warm-up, keeping copies of the tap outputs
        runs = [run(sample)[0] for _ in range(repeats)]
        heads = {}
        for tap in taps:
            features = aux_model.head_input(tap, outputs[tap])
            _timed(aux_model, tap, features, clock)  # warm-up
            times = [_timed(aux_model, tap, features, clock) for _ in range(repeats)]
            heads[tap] = statistics.median(times)
    median = {key: statistics.median(marks[key] for marks in runs) for key in runs[0]}
    timings = tuple(
        TapTiming(
            tap=tap,
            seconds=median[tap] / batch,
            head_seconds=heads[tap] / batch,
            flops=profile.backbone[tap],
            head_flops=profile.heads[tap],
        )
        for tap in taps
    )
    full = median[None] / batch
    if not full > 0 or not math.isfinite(full):  # a clock that does not move
        raise ValueError(f"the clock measured {full!r} s for the model; pass a real clock")
    return ExitTiming(
        taps=timings,
        seconds=full,
        flops=profile.full,
        shares=shares,
        batch_size=batch,
        method="staged" if plan is not None else "hooks",
    )


Run = Callable[..., tuple[dict[Any, float], dict[str, Any]]]


def _staged(plan: Plan, taps: list[str], clock: Callable[[], float]) -> Run:
    """One run of the stages: seconds from the start to the end of each tap's stage (key
    None: the last stage, the whole model), and with `keep` a copy of each tap's output (a
    later stage may change it in place)."""
    at_end = {plan.ends[i]: tap for i, tap in enumerate(taps)}

    def run(x: torch.Tensor, keep: bool = False) -> tuple[dict[Any, float], dict[str, Any]]:
        marks: dict[Any, float] = {}
        outputs: dict[str, Any] = {}
        h: Any = x
        start = clock()
        for position, stage in enumerate(plan.stages):
            h = stage.run(h)
            if position in at_end:
                marks[at_end[position]] = clock() - start
                if keep:
                    outputs[at_end[position]] = _copy(h)
        marks[None] = clock() - start
        return marks, outputs

    return run


def _hooked(aux_model: AuxModel, taps: list[str], clock: Callable[[], float]) -> Run:
    """One run of the whole model, a clock read at each tap by a forward hook."""
    modules = resolve(aux_model.model, taps)

    def run(x: torch.Tensor, keep: bool = False) -> tuple[dict[Any, float], dict[str, Any]]:
        marks: dict[Any, float] = {}
        outputs: dict[str, Any] = {}

        def mark(tap: str):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                marks[tap] = clock() - start
                if keep:
                    outputs[tap] = _copy(output)

            return hook

        with HookSet() as hooks:
            for tap in taps:
                hooks.forward(modules[tap], mark(tap))
            start = clock()
            call_model(aux_model.model, x)
            marks[None] = clock() - start
        return marks, outputs

    return run


def _copy(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, (tuple, list)):
        return type(output)(_copy(item) for item in output)
    return output


def _timed(
    aux_model: AuxModel, tap: str, features: torch.Tensor, clock: Callable[[], float]
) -> float:
    """Seconds of the head at `tap` on `features`, run as `EarlyExit` runs it."""
    start = clock()
    aux_model.run_head(tap, features)
    return clock() - start
