"""`EarlyExit`: answer from the first auxiliary head that is confident enough, and skip the rest
of the network for that sample; `calibrate` picks the thresholds on held-out data, with a
guaranteed accuracy drop (the search and the guarantee: `auxhead._calibrate`; the summary,
data collection and timing: `auxhead._exit_summary`).

How compute is saved depends on the model (`EarlyExit.mode`):
- "staged": the model is cut into stages at the taps: nn.Sequential, fastai vision learners,
  torchvision and timm ResNets by their known forward, any other model that torch.fx can trace
  by splitting its graph at the taps (`auxhead._exit_fx`). A sample that exits leaves the
  batch; later stages run on the samples still undecided only.
- "generic": any other model (untraceable, or a value other than the tap's output crossing a
  cut) runs whole, with hooks at the taps, and the forward stops as soon as every sample in
  the batch has exited (`EarlyExit.mode_reason` says why). That saves compute for batch size
  1 (latency) and for batches that all exit together.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auxhead._calibrate import METHODS, _leaves, check_targets, choose_thresholds
from auxhead._exit_export import export_program
from auxhead._exit_fx import fx_cut
from auxhead._exit_summary import ExitSummary, collect, summarise
from auxhead._flops import MAIN
from auxhead._hooks import HookSet
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
        if output.dim() == 0 or output.shape[0] != keep.shape[0]:
            raise ValueError(
                f"a stage outputs shape {tuple(output.shape)}, whose first dimension is not the "
                f"batch ({keep.shape[0]}); use EarlyExit(..., mode='generic')"
            )
        return output[keep]
    if isinstance(output, (tuple, list)):
        return type(output)(_take(item, keep) for item in output)
    raise TypeError(
        f"a stage outputs {type(output).__name__}, which cannot be split by sample; "
        "use EarlyExit(..., mode='generic')"
    )


def _plan(aux_model: AuxModel) -> tuple[Plan | None, str]:
    """Stages for per-sample routing, and why (not): the known forwards first (nn.Sequential,
    ResNets: the modules themselves run), then any model torch.fx can trace and split."""
    model, taps = aux_model.model, aux_model.taps
    try:
        plan = cut(model, taps)
        return plan, f"{len(plan.stages)} stages, samples leave the batch as they exit"
    except NotStageable as error:
        known = str(error)
    try:
        with eval_mode(model):  # the forward served, not training's (aux branches, dropout)
            plan = fx_cut(model, taps)
    except NotStageable as error:
        return None, (f"it stops only once the whole batch has exited ({known}; and {error})")
    return plan, (
        f"{len(plan.stages)} stages split from the torch.fx graph, samples leave the batch as "
        "they exit"
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
        mode_reason: why: the stages found, or why the model cannot be cut.
        last_exits: each sample's exit index in the last forward; `len(taps)` is the main head.
        summary: the last `calibrate` (or `evaluate`) result, or None.
        temperatures: one per tap; a head's score is the criterion of its logits / T.

    Example:
        >>> aux = auxhead.attach(resnet, ["layer2", "layer3"], sample=x[:2])  # then train it
        >>> early = auxhead.EarlyExit(aux)
        >>> print(early.calibrate(valid_dl, max_accuracy_drop=0.01, confidence=0.9))
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
        self.temperatures = None
        self.last_exits: torch.Tensor | None = None
        self.summary: ExitSummary | None = None
        self._plan: Plan | None = None
        self.mode_reason = "mode='generic' was asked for"
        if mode != "generic":
            self._plan, self.mode_reason = _plan(aux_model)
            if self._plan is None and mode == "staged":
                raise ValueError(
                    f"cannot route samples through {type(aux_model.model).__name__} stage "
                    f"by stage: {self.mode_reason}. Use mode='generic' (or 'auto')."
                )
        self.mode = "staged" if self._plan is not None else "generic"
        logger.info(
            "EarlyExit runs %s in %s mode: %s",
            type(aux_model.model).__name__,
            self.mode,
            self.mode_reason,
        )

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> EarlyExit:
        # .to()/.half() replace the model's buffers with new tensors; stages split by torch.fx
        # hold the old ones (their get_attr copies), so cut again.
        super()._apply(fn, recurse)
        if self._plan is not None and "torch.fx" in self.mode_reason:
            self._plan, self.mode_reason = _plan(self.aux_model)
        return self

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

    @property
    def temperatures(self) -> tuple[float, ...]:
        """One temperature per tap, in `at` order: a head's score is the criterion of its
        logits / T (the logits it answers with are its own). `calibrate(temperature=True)`
        fits them; assign a list, a dict by name, a number, or None (all 1)."""
        return self._temperatures

    @temperatures.setter
    def temperatures(self, value: float | list[float] | Mapping[str, float] | None) -> None:
        if value is None:
            self._temperatures = (1.0,) * len(self.taps)
            return
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        values = list(per_name(value, self.taps, "temperatures", "exits").values())
        for tap, t in zip(self.taps, values, strict=True):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
                raise ValueError(f"temperature for {tap!r} must be a number > 0, got {t!r}")
        self._temperatures = tuple(float(t) for t in values)

    def get_extra_state(self) -> dict[str, Any]:
        # Calibrated thresholds and temperatures travel with the state_dict.
        return {"thresholds": list(self._thresholds), "temperatures": list(self._temperatures)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.thresholds = state["thresholds"]
        self.temperatures = state.get("temperatures")

    def extra_repr(self) -> str:
        scaled = "" if set(self.temperatures) == {1.0} else f", temperatures={self.temperatures}"
        return (
            f"mode={self.mode!r}, criterion={self.criterion!r}, "
            f"thresholds={self.thresholds}{scaled}"
        )

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
        scores = self._scores(logits, self._temperatures[index])
        return logits, _leaves(scores, self._thresholds[index])

    def _scores(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """(B, K) logits -> (B,) scores by the criterion, of logits / temperature."""
        scores = self._score(logits if temperature == 1.0 else logits / temperature)
        if not isinstance(scores, torch.Tensor) or scores.shape != logits.shape[:1]:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(
                f"the criterion gave {got} for logits of shape {tuple(logits.shape)}; it must "
                "give one score per sample, shape (B,)"
            )
        return scores

    def _exits_by_stage(self, plan: Plan) -> dict[int, list[int]]:
        """stage position -> the exits (tap indices) decided after it; an exit at threshold 1
        takes no one, so its head does not run."""
        at_stage: dict[int, list[int]] = {}
        for index, end in enumerate(plan.ends):
            if self._thresholds[index] < 1.0:
                at_stage.setdefault(end, []).append(index)
        return at_stage

    def _forward_one(self, x: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch size 1: the decisions of `_forward_staged`, without the masks and index
        copies a batch needs (about 0.1 ms an exit on a CPU): the sample leaves at the first
        exit it passes, with that head's logits."""
        taps, first = self.taps, None
        at_stage = self._exits_by_stage(plan)
        h: Any = x
        for position, stage in enumerate(plan.stages):
            h = stage.run(h)
            for index in at_stage.get(position, ()):
                logits, leave = self._exit_here(index, self.aux_model.head_input(taps[index], h))
                first = logits if first is None else first
                logits = self._like(logits, first, taps[index])
                if bool(leave[0]):
                    return logits, torch.full((1,), index, dtype=torch.long, device=x.device)
        exits = torch.full((1,), len(taps), dtype=torch.long, device=x.device)
        if first is None:  # no head ran: the model's own output, untouched
            return h, exits
        return self._like(h, first, MAIN).to(first.dtype), exits

    def _forward_staged(self, x: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        taps, batch = self.taps, x.shape[0]
        if batch == 1:
            return self._forward_one(x, plan)
        exits = torch.full((batch,), len(taps), dtype=torch.long, device=x.device)
        rows = torch.arange(batch, device=x.device)  # batch index of each sample still running
        out: torch.Tensor | None = None  # (B, K), filled as samples exit
        at_stage = self._exits_by_stage(plan)
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
        try:
            with HookSet() as hooks:
                for index, tap in enumerate(taps):
                    if self._thresholds[index] < 1.0:
                        hooks.forward(modules[tap], decide_at(index))
                main = self.aux_model.model(x)
        except _BatchExited:
            return state["out"], exits
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

    def export(self, path: str | Path, sample: torch.Tensor) -> Path:
        """Save a `torch.export` program (.pt2), or one self-contained ONNX file (.onnx), that
        routes like this `EarlyExit`, with its thresholds and temperatures baked in; it returns
        (logits (B, K), exit index (B,)).

        At each exit a `torch.cond` skips the rest of the network when every sample of the
        batch leaves there, so batch size 1 routes per sample as the eager forward does;
        larger batches run on whole and take each sample's logits from its exit (same
        outputs, compute saved only when a batch leaves together). Needs a staged
        `EarlyExit`. In the ONNX file each `torch.cond` is an `If` node; writing it needs the
        onnx and onnxscript packages (`pip install 'auxhead[onnx]'`), running it onnxruntime.

        Args:
            path: where to write, ending in .pt2 or .onnx.
            sample: an input batch to trace with (the batch size stays dynamic).

        Returns:
            `path`; load a .pt2 with `torch.export.load(path).module()`, run a .onnx with
            `onnxruntime.InferenceSession(path)` (input "x", outputs "logits", "exit").

        Raises:
            ValueError: a path not ending in .pt2 or .onnx, a generic-mode `EarlyExit`, or
                .onnx without the onnx/onnxscript packages.
        """
        return export_program(self, path, sample)

    # ---- calibration ----

    def calibrate(
        self,
        data: Iterable[Any],
        max_accuracy_drop: float | None = None,
        *,
        confidence: float | None = 0.9,
        method: str = "ltt",
        max_flops: float | None = None,
        temperature: bool = False,
        timing_batches: int = 8,
        seed: int = 0,
    ) -> ExitSummary:
        """Choose the thresholds that save the most FLOPs while the accuracy drop against the
        main head stays within `max_accuracy_drop` on new data, with probability at least
        `confidence` (or, with `max_flops`, the most accurate ones within a compute budget).

        One pass runs every head and the main output on `data` and keeps each exit's score and
        correctness; the search then needs no more forwards. The cost of an exit counts the
        heads that run before it, so a head that saves too little is turned off (threshold 1).

        method="ltt" (the default) gives a distribution-free, finite-sample guarantee by
        Learn then Test (Angelopoulos et al. 2021): `data` is split at random, 30% to order
        candidate thresholds from safe to aggressive (the FLOPs-optimal ones for growing
        numbers of harmed samples: main head right, exit wrong), 70% to test them in that
        order with an exact binomial test at level 1 - confidence, stopping at the first that
        fails. Then with probability >= `confidence` over the draw of `data`, the share of new
        samples the exits harm, which bounds the accuracy drop, is at most
        `max_accuracy_drop`. It assumes that `data` is exchangeable with the data served (for
        example a random held-out part of the same distribution), and it counts only harm, not
        the samples an exit gets right where the main head is wrong, so the measured drop is
        usually well below the target. method="empirical" just meets the drop on `data`
        itself: cheaper thresholds, and on new data the drop is over the target about as often
        as not.

        Args:
            data: an iterable of `(inputs, targets)` batches with class-index targets, such as
                a torch or fastai validation DataLoader; held-out data, never trained on.
            max_accuracy_drop: the accuracy the exits may lose against the main head, as a
                fraction (0.005 is half a percentage point). Default 0.005, unless `max_flops`
                is given.
            confidence: the probability, over the draw of `data`, that the target holds on
                new data ("ltt" only; None: the default, 0.9).
            method: "ltt" (guaranteed) or "empirical" (met on `data` only).
            max_flops: a compute budget instead of a drop, as a share of the full model's
                FLOPs per sample (0.4: 40%): the most accurate thresholds whose mean FLOPs stay
                within it; with "ltt", on new data with probability >= `confidence`
                (Hoeffding-Bentkus test of the mean cost).
            temperature: fit one temperature per head (the NLL of softmax(logits / T) on the
                path part of `data`, all of it with "empirical") before choosing the
                thresholds; scores then come from the scaled logits.
            timing_batches: how many of the first batches to keep for timing the early exit
                against the full model after the search; 0 skips the timing.
            seed: the random split of `data` ("ltt").

        Returns:
            An `ExitSummary` on all of `data` (also kept as `self.summary`), with the bound
            the test held and the observed drop with its interval; the thresholds (and
            temperatures) are set. Evaluate on a separate test set for unbiased numbers.

        Raises:
            ValueError: batches without labels, targets that are not class indices, empty data,
                a drop outside [0, 1], a confidence outside (0, 1), an unknown method, or both
                a drop and a budget.

        Warns:
            UserWarning: when no thresholds meet the target; every sample then goes to the
                main head (thresholds 1).

        Example:
            >>> early = auxhead.EarlyExit(aux_model)
            >>> summary = early.calibrate(valid_dl, max_accuracy_drop=0.005, confidence=0.9)
            >>> summary.saving, summary.bound  # FLOPs saved on valid_dl, the tested bound
            >>> early.calibrate(valid_dl, max_flops=0.4)  # best accuracy at 40% of the FLOPs
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        if max_flops is not None:
            if max_accuracy_drop is not None:
                raise ValueError(
                    "give either max_accuracy_drop or max_flops, not both: max_flops picks "
                    "the most accurate thresholds within the compute budget"
                )
            if isinstance(max_flops, bool) or not isinstance(max_flops, (int, float)):
                raise ValueError(f"max_flops is a share of the full FLOPs, got {max_flops!r}")
            if not 0.0 < max_flops <= 10.0:
                raise ValueError(
                    f"max_flops is a share of the full model's FLOPs such as 0.4, got {max_flops!r}"
                )
        elif max_accuracy_drop is None:
            max_accuracy_drop = 0.005
        confidence = 0.9 if confidence is None else confidence
        check_targets(0.0 if max_accuracy_drop is None else max_accuracy_drop, confidence)
        seen = collect(self, data, timing_batches, keep_logits=temperature)
        choice = choose_thresholds(
            seen.scores,
            seen.correct,
            seen.profile,
            max_accuracy_drop=max_accuracy_drop,
            max_flops=max_flops,
            confidence=confidence,
            method=method,
            logits=seen.logits,
            targets=seen.targets,
            score_fn=self._scores if temperature else None,
            seed=seed,
        )
        if choice.fallback:
            main_accuracy = seen.correct[:, -1].float().mean().item()
            if max_flops is not None:
                target = f"no exit keeps the mean FLOPs within max_flops={max_flops}"
                remedy = "allow more FLOPs"
            else:
                target = (
                    f"no exit keeps the accuracy within max_accuracy_drop={max_accuracy_drop} "
                    f"of the main head's {main_accuracy:.2%} while saving FLOPs"
                )
                remedy = "allow a larger drop"
            margin = "" if method == "empirical" else f" at {confidence:.0%} confidence"
            extra = "" if method == "empirical" else ", a lower confidence or more data"
            warnings.warn(
                f"{target}{margin}, so every sample goes to the main head (thresholds 1). "
                f"Train the heads longer, {remedy}{extra}.",
                stacklevel=2,
            )
        self.thresholds = list(choice.thresholds)
        self.temperatures = list(choice.temperatures)
        self.summary = summarise(
            self, seen, drop=max_accuracy_drop, calibration=choice, max_flops=max_flops
        )
        logger.info("calibrated early exits\n%s", self.summary)
        return self.summary

    def evaluate(self, data: Iterable[Any], *, timing_batches: int = 8) -> ExitSummary:
        """The `ExitSummary` of the current thresholds on `data` (e.g. a test set after
        `calibrate` on a validation set), without changing them. Arguments as in `calibrate`.
        """
        scaled = any(t != 1.0 for t in self.temperatures)
        self.summary = summarise(self, collect(self, data, timing_batches, keep_logits=scaled))
        return self.summary
