"""`EarlyExit`: answer from the first auxiliary head that is confident enough, and skip the rest
of the network for that sample; `calibrate` picks the thresholds on held-out data.

How compute is saved depends on the model (`EarlyExit.mode`):
- "staged": the model is cut into stages at the taps (nn.Sequential, fastai vision learners,
  torchvision and timm ResNets). A sample that exits leaves the batch; later stages run on the
  samples still undecided only.
- "generic": any other model runs whole, with hooks at the taps, and the forward stops as soon
  as every sample in the batch has exited. That saves compute for batch size 1 (latency) and
  for batches that all exit together.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from auxhead._calibrate import (
    ExitSummary,
    _exit_indices,
    _first_true,
    _leaves,
    _search,
    check_targets,
)
from auxhead._flops import MAIN, FlopProfile, flop_profile
from auxhead._probe import eval_mode, resolve
from auxhead._spread import per_name
from auxhead._stages import NotStageable, Plan, cut
from auxhead.attach import AuxModel

__all__ = ["CRITERIA", "EarlyExit", "ExitSummary"]

logger = logging.getLogger(__name__)

Criterion = Callable[[torch.Tensor], torch.Tensor]


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability, (B, K) -> (B,), in [0, 1]."""
    return logits.float().softmax(dim=-1).amax(dim=-1)


def entropy_confidence(logits: torch.Tensor) -> torch.Tensor:
    """1 - H(p) / log K, (B, K) -> (B,): 1 for a one-hot prediction, 0 for a uniform one."""
    log_p = logits.float().log_softmax(dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)
    return 1.0 - entropy / math.log(logits.shape[-1])


CRITERIA: dict[str, Criterion] = {"confidence": confidence, "entropy": entropy_confidence}
MODES = ("auto", "staged", "generic")


class _BatchExited(BaseException):
    # Raised from a tap's hook to stop the forward once every sample has exited. A
    # BaseException, so that an `except Exception` in the user's forward cannot swallow it.
    pass


def _check_thresholds(value: Any, taps: list[str]) -> tuple[float, ...]:
    """One threshold in [0, 1] per tap, from None (all 1), a number, a sequence or a dict."""
    if value is None:
        return (1.0,) * len(taps)
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple, Mapping)):
        raise TypeError(
            f"thresholds must be a number, a list (one per tap) or a dict by tap name, "
            f"got {type(value).__name__}"
        )
    value = list(per_name(value, taps, "thresholds", "exits").values())
    for tap, threshold in zip(taps, value, strict=True):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold for {tap!r} must be a number, got {threshold!r}")
        if not 0.0 <= threshold <= 1.0:  # NaN fails too
            raise ValueError(
                f"threshold for {tap!r} is {threshold!r}; thresholds lie in [0, 1] "
                "(0: every sample exits there, 1: none does)"
            )
    return tuple(float(threshold) for threshold in value)


def _take(output: Any, keep: torch.Tensor) -> Any:
    """The samples `keep` (a bool mask over the batch) of a stage's output."""
    if isinstance(output, torch.Tensor):
        return output[keep]
    if isinstance(output, (tuple, list)):
        return type(output)(_take(item, keep) for item in output)
    raise TypeError(
        f"a stage outputs {type(output).__name__}, which cannot be split by sample; "
        "use EarlyExit(..., mode='generic')"
    )


class EarlyExit(nn.Module):
    """Inference that stops at the first head confident enough for each sample.

    Sample by sample, the logits come from the first exit (in `at` order) whose confidence is
    strictly greater than its threshold, else from the main output. Runs in eval mode without
    gradients and leaves the `AuxModel`'s modes as they were.

    Args:
        aux_model: the `AuxModel` whose heads are the exits; each head must predict the same
            classes as the model. Its taps must be listed in the order they run.
        thresholds: one per tap (a list in `at` order or a dict by name), or one number for
            all. 0: every sample exits there; 1: none does (and the head is not run). Default
            all 1: the main head answers until `calibrate` sets them.
        criterion: "confidence" (max softmax probability), "entropy" (1 - entropy / log K) or
            a callable (B, K) logits -> (B,) scores in [0, 1], higher meaning surer.
        mode: "auto" (staged if the model can be cut, else generic), "staged" or "generic".

    Attributes:
        mode: "staged" or "generic" (see the module docstring).
        last_exits: each sample's exit index in the last forward; `len(taps)` is the main head.
        summary: the last `calibrate` (or `evaluate`) result, or None.

    Example:
        >>> aux = auxhead.attach(resnet, ["layer2", "layer3"], sample=x[:2])  # then train it
        >>> early = auxhead.EarlyExit(aux)
        >>> print(early.calibrate(valid_dl, max_accuracy_drop=0.01))
        >>> logits = early(x); early.last_exits  # tensor([0, 2, 1, ...])
    """

    def __init__(
        self,
        aux_model: AuxModel,
        thresholds: float | list[float] | Mapping[str, float] | None = None,
        criterion: str | Criterion = "confidence",
        *,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(aux_model, AuxModel):
            raise TypeError(
                f"EarlyExit needs the AuxModel that auxhead.attach returned, "
                f"got {type(aux_model).__name__}"
            )
        if isinstance(criterion, str):
            if criterion not in CRITERIA:
                raise ValueError(
                    f"unknown criterion {criterion!r}; choose one of {sorted(CRITERIA)} or pass "
                    "a callable (B, K) logits -> (B,) scores in [0, 1]"
                )
            self._score = CRITERIA[criterion]
        elif callable(criterion):
            self._score = criterion
        else:
            raise TypeError(f"criterion must be a name or a callable, got {criterion!r}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        if MAIN in aux_model.taps:
            raise ValueError(f"a tap is named {MAIN!r}, the name EarlyExit keeps for the model")
        self.aux_model = aux_model
        self.criterion = criterion if isinstance(criterion, str) else "custom"
        self.thresholds = thresholds
        self.last_exits: torch.Tensor | None = None
        self.summary: ExitSummary | None = None
        self._plan: Plan | None = None
        reason = "mode='generic' was asked for"
        if mode != "generic":
            try:
                self._plan = cut(aux_model.model, aux_model.taps)
            except NotStageable as error:
                if mode == "staged":
                    raise ValueError(
                        f"cannot route samples through {type(aux_model.model).__name__} stage "
                        f"by stage: {error}. Use mode='generic' (or 'auto')."
                    ) from None
                reason = str(error)
        self.mode = "staged" if self._plan is not None else "generic"
        if self._plan is not None:
            reason = f"{len(self._plan.stages)} stages, samples leave the batch as they exit"
        else:
            reason = f"it stops only once the whole batch has exited ({reason})"
        logger.info(
            "EarlyExit runs %s in %s mode: %s", type(aux_model.model).__name__, self.mode, reason
        )

    @property
    def taps(self) -> list[str]:
        return list(self.aux_model.taps)

    @property
    def exit_names(self) -> list[str]:
        """The exits in index order: the taps, then "main"."""
        return [*self.aux_model.taps, MAIN]

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One threshold per tap, in `at` order. Assign a list, a dict by name or a number."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: float | list[float] | Mapping[str, float] | None) -> None:
        self._thresholds = _check_thresholds(value, self.taps)

    def get_extra_state(self) -> dict[str, Any]:
        # Calibrated thresholds travel with the state_dict.
        return {"thresholds": list(self._thresholds)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.thresholds = state["thresholds"]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, criterion={self.criterion!r}, thresholds={self.thresholds}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) inputs -> (B, K) logits, each sample's from its exit; sets `last_exits`."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"EarlyExit takes one input tensor, got {type(x).__name__}")
        with eval_mode(self.aux_model), torch.no_grad():
            if self._plan is not None:
                logits, exits = self._forward_staged(x, self._plan)
            else:
                logits, exits = self._forward_generic(x)
        self.last_exits = exits
        return logits

    def _exit_here(self, index: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's logits (b, K) and which of the b samples exit at tap `index` (b,)."""
        logits = self.aux_model.head(self.taps[index])(features)
        return logits, _leaves(self._scores(logits), self._thresholds[index])

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, K) logits -> (B,) scores by the criterion."""
        scores = self._score(logits)
        if not isinstance(scores, torch.Tensor) or scores.shape != logits.shape[:1]:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(
                f"the criterion gave {got} for logits of shape {tuple(logits.shape)}; it must "
                "give one score per sample, shape (B,)"
            )
        return scores

    def _forward_staged(self, x: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        taps, batch = self.taps, x.shape[0]
        exits = torch.full((batch,), len(taps), dtype=torch.long, device=x.device)
        rows = torch.arange(batch, device=x.device)  # batch index of each sample still running
        out: torch.Tensor | None = None  # (B, K), filled as samples exit
        at_stage: dict[int, list[int]] = {}
        for index, end in enumerate(plan.ends):
            if self._thresholds[index] < 1.0:  # an exit at 1 takes no one: skip its head
                at_stage.setdefault(end, []).append(index)
        h: Any = x
        for position, stage in enumerate(plan.stages):
            h = stage.run(h)
            for index in at_stage.get(position, ()):
                logits, leave = self._exit_here(index, self.aux_model.head_input(taps[index], h))
                if out is None:
                    out = logits.new_empty((batch, *logits.shape[1:]))
                logits = self._like(logits, out, taps[index])
                if not bool(leave.any()):
                    continue
                out[rows[leave]] = logits[leave]
                exits[rows[leave]] = index
                rows, h = rows[~leave], _take(h, ~leave)
                if rows.numel() == 0:
                    return out, exits
        if out is None:  # no head ran: the model's own output, untouched
            return h, exits
        out[rows] = self._like(h, out, MAIN).to(out.dtype)
        return out, exits

    def _forward_generic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taps, batch = self.taps, x.shape[0]
        exits = torch.full((batch,), len(taps), dtype=torch.long, device=x.device)
        decided = torch.zeros(batch, dtype=torch.bool, device=x.device)
        state: dict[str, Any] = {"out": None, "last": -1}

        def decide_at(index: int):
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                if index < state["last"]:
                    in_order = [taps[state["last"]], taps[index]]
                    raise ValueError(
                        f"taps {in_order} run in this order, but `at` lists them the other "
                        "way; early exits need the taps in the order they run: attach again"
                    )
                state["last"] = index
                features = self.aux_model.head_input(taps[index], output)
                if features.shape[0] != batch:
                    raise ValueError(
                        f"tap {taps[index]!r} outputs shape {tuple(features.shape)}, whose first "
                        f"dimension is not the batch ({batch}); early exits need batch-first taps"
                    )
                rows = (~decided).nonzero().squeeze(1)
                logits, leave = self._exit_here(index, features[rows])
                if state["out"] is None:
                    state["out"] = logits.new_empty((batch, *logits.shape[1:]))
                state["out"][rows[leave]] = self._like(logits, state["out"], taps[index])[leave]
                exits[rows[leave]] = index
                decided[rows[leave]] = True
                if bool(decided.all()):
                    raise _BatchExited

            return hook

        modules = resolve(self.aux_model.model, taps)
        handles = [
            modules[tap].register_forward_hook(decide_at(index))
            for index, tap in enumerate(taps)
            if self._thresholds[index] < 1.0
        ]
        try:
            main = self.aux_model.model(x)
        except _BatchExited:
            return state["out"], exits
        finally:
            for handle in handles:
                handle.remove()
        out = state["out"]
        if out is None:
            return main, exits
        rows = (~decided).nonzero().squeeze(1)
        out[rows] = self._like(main, out, MAIN)[rows].to(out.dtype)
        return out, exits

    def _like(self, logits: Any, like: torch.Tensor, name: str) -> torch.Tensor:
        """`logits`, checked to be a tensor of (B, K) logits like the first head's."""
        if not isinstance(logits, torch.Tensor) or logits.shape[1:] != like.shape[1:]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            first = f"(B, {', '.join(map(str, like.shape[1:]))})"
            raise ValueError(
                f"exit {name!r} outputs {got}, but the first head running gives {first} logits; "
                "early exits need heads that predict the model's classes, and a (B, K) output"
            )
        return logits

    # ---- calibration ----

    def calibrate(
        self,
        data: Iterable[Any],
        max_accuracy_drop: float = 0.005,
        *,
        confidence: float | None = None,
        timing_batches: int = 8,
    ) -> ExitSummary:
        """Choose the thresholds that minimise the expected FLOPs per sample while keeping the
        accuracy within `max_accuracy_drop` of the main head's, on held-out data.

        One pass runs every head and the main output on `data` and keeps each exit's score and
        correctness; the search then needs no more forwards. It tries one threshold shared by
        all exits, then improves the thresholds one exit at a time (each over up to 64
        candidates taken from the observed scores) while the accuracy stays within the drop.
        The cost of an exit counts the heads that run before it, so a head that would save
        too little is turned off (threshold 1). The summary's numbers are measured on `data`
        itself: evaluate on a separate test set for unbiased ones.

        The search picks the cheapest thresholds that just meet the drop on `data`, so on new
        data the drop is as often above the target as below, and more so on small calibration
        sets. `confidence` asks for a margin: the drop's upper confidence bound, from the
        standard error of the per-sample differences to the main head, must meet the target.

        Args:
            data: an iterable of `(inputs, targets)` batches with class-index targets, such as
                a torch or fastai validation DataLoader.
            max_accuracy_drop: the accuracy the exits may lose against the main head, as a
                fraction (0.005 is half a percentage point).
            confidence: None to hold the drop on `data` itself; a probability such as 0.9 to
                hold it with that one-sided confidence (normal approximation), which keeps
                fewer samples at the exits.
            timing_batches: how many of the first batches to keep for timing the early exit
                against the full model after the search; 0 skips the timing.

        Returns:
            An `ExitSummary`, also kept as `self.summary`; the thresholds are set.

        Raises:
            ValueError: batches without labels, targets that are not class indices, empty data,
                a drop outside [0, 1], or a confidence outside (0, 1).

        Warns:
            UserWarning: when no exit can be used within the drop; every sample then goes to
                the main head (thresholds 1).
        """
        check_targets(max_accuracy_drop, confidence)
        seen = self._collect(data, timing_batches)
        thresholds = _search(seen.scores, seen.correct, seen.profile, max_accuracy_drop, confidence)
        fallback = all(threshold >= 1.0 for threshold in thresholds)
        if fallback:
            main_accuracy = seen.correct[:, -1].float().mean().item()
            margin = "" if confidence is None else f" at {confidence:.0%} confidence"
            remedy = "" if confidence is None else ", a lower confidence or more data"
            warnings.warn(
                f"no exit keeps the accuracy within max_accuracy_drop={max_accuracy_drop} of "
                f"the main head's {main_accuracy:.2%}{margin} while saving FLOPs, so every "
                "sample goes to the main head (thresholds 1). Train the heads longer or allow "
                f"a larger drop{remedy}.",
                stacklevel=2,
            )
        self.thresholds = list(thresholds)
        self.summary = self._summarise(seen, max_accuracy_drop, fallback, confidence)
        logger.info("calibrated early exits\n%s", self.summary)
        return self.summary

    def evaluate(self, data: Iterable[Any], *, timing_batches: int = 8) -> ExitSummary:
        """The `ExitSummary` of the current thresholds on `data` (e.g. a test set after
        `calibrate` on a validation set), without changing them. Arguments as in `calibrate`.
        """
        self.summary = self._summarise(self._collect(data, timing_batches), None, False)
        return self.summary

    def _collect(self, data: Iterable[Any], timing_batches: int) -> _Seen:
        taps, aux_model = self.taps, self.aux_model
        device = next(aux_model.parameters(), torch.empty(0)).device
        scores, correct, kept = [], [], []
        first: torch.Tensor | None = None
        with eval_mode(aux_model), torch.no_grad(), aux_model.heads_enabled():
            try:
                for batch in data:
                    inputs, targets = _split_batch(batch)
                    inputs, targets = inputs.to(device), targets.to(device)
                    main = aux_model(inputs)
                    missing = [tap for tap in taps if tap not in aux_model.aux_outputs]
                    if missing:
                        raise ValueError(f"taps {missing} did not run on the calibration inputs")
                    heads = [aux_model.aux_outputs[tap] for tap in taps]
                    pairs = zip([*heads, main], self.exit_names, strict=True)
                    logits = [self._like(out, heads[0], name) for out, name in pairs]  # (B, K)
                    if targets.shape[0] != main.shape[0]:
                        raise ValueError(
                            f"a batch has {main.shape[0]} inputs but {targets.shape[0]} targets"
                        )
                    scores.append(torch.stack([self._scores(h) for h in heads], dim=1).cpu())
                    hits = [out.argmax(dim=-1) == targets for out in logits]
                    correct.append(torch.stack(hits, dim=1).cpu())  # (B, E + 1)
                    first = inputs[:1] if first is None else first
                    if len(kept) < timing_batches:
                        kept.append(inputs)
            finally:
                aux_model.clear_aux()
        if first is None:
            raise ValueError("the calibration data yielded no batches")
        return _Seen(
            scores=torch.cat(scores),
            correct=torch.cat(correct),
            profile=flop_profile(aux_model, first),
            timing_inputs=kept,
        )

    def _summarise(
        self,
        seen: _Seen,
        drop: float | None,
        fallback: bool,
        confidence: float | None = None,
    ) -> ExitSummary:
        n_exits = len(self.taps)
        thresholds = torch.tensor(self._thresholds)
        exits = _exit_indices(seen.scores, thresholds)  # (N,)
        costs = seen.profile.exit_costs((thresholds < 1).tolist())
        oracle = _first_true(seen.correct[:, :n_exits])  # (N,)
        oracle_costs = seen.profile.direct_costs()
        hit = seen.correct.gather(1, exits[:, None]).squeeze(1)
        share, exit_accuracy = [], []
        for index in range(n_exits + 1):
            here = exits == index
            share.append(here.float().mean().item())
            exit_accuracy.append(hit[here].float().mean().item() if here.any() else None)
        seconds = full_seconds = None
        if seen.timing_inputs:
            seconds = _seconds_per_sample(self, seen.timing_inputs)
            with eval_mode(self.aux_model), torch.no_grad():
                full_seconds = _seconds_per_sample(self.aux_model.model, seen.timing_inputs)
        return ExitSummary(
            exits=self.exit_names,
            thresholds=list(self._thresholds),
            criterion=self.criterion,
            samples=len(exits),
            accuracy=hit.float().mean().item(),
            main_accuracy=seen.correct[:, -1].float().mean().item(),
            max_accuracy_drop=drop,
            fallback=fallback,
            share=share,
            exit_accuracy=exit_accuracy,
            flops=costs,
            mean_flops=torch.tensor(costs, dtype=torch.float64)[exits].mean().item(),
            full_flops=seen.profile.full,
            oracle_flops=torch.tensor(oracle_costs, dtype=torch.float64)[oracle].mean().item(),
            oracle_accuracy=seen.correct.any(dim=1).float().mean().item(),
            seconds_per_sample=seconds,
            full_seconds_per_sample=full_seconds,
            confidence=confidence,
        )


@dataclass
class _Seen:
    """What one pass over the calibration data keeps."""

    scores: torch.Tensor  # (N, E) each head's score, by the criterion
    correct: torch.Tensor  # (N, E + 1) bool: each head, then the main output, is right
    profile: FlopProfile
    timing_inputs: list[torch.Tensor]


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        got = type(batch).__name__
        got += f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
        raise ValueError(
            f"calibration needs labelled batches (inputs, targets), got a {got}. "
            "Pass a DataLoader over (input, label) pairs, such as the validation DataLoader."
        )
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"EarlyExit takes one input tensor per batch, got {type(inputs).__name__}")
    targets = torch.as_tensor(targets).as_subclass(torch.Tensor)  # drop fastai's subclasses
    if targets.dim() != 1 or targets.is_floating_point():
        raise ValueError(
            f"targets must be class indices of shape (B,), got {targets.dtype} of shape "
            f"{tuple(targets.shape)}"
        )
    return inputs, targets


def _seconds_per_sample(model: Callable[[torch.Tensor], Any], batches: list[torch.Tensor]) -> float:
    """Wall-clock seconds per sample of `model` over `batches`, after one warm-up call."""

    def sync() -> None:
        if batches[0].is_cuda:
            torch.cuda.synchronize(batches[0].device)

    model(batches[0])
    sync()
    start = time.perf_counter()
    for batch in batches:
        model(batch)
    sync()
    return (time.perf_counter() - start) / sum(batch.shape[0] for batch in batches)
