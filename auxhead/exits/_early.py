"""`EarlyExit`: answer from the first auxiliary head that is confident enough, and skip the rest
of the network for that sample; `calibrate` picks the thresholds on held-out data, with a
guaranteed accuracy drop.

How compute is saved depends on the model (`EarlyExit.mode`):
- "staged": the model is cut into stages at the taps: nn.Sequential (fastai vision learners
  too), torchvision and timm ResNets by their known forward, any other model that torch.fx
  can trace by splitting its graph at the taps. A sample that exits leaves the batch; later
  stages run on the samples still undecided only.
- "generic": any other model (untraceable, or a value other than the tap's output crossing a
  cut) runs whole, with hooks at the taps, and the forward stops as soon as every sample in
  the batch has exited (`EarlyExit.mode_reason` says why). That saves compute for batch size
  1 (latency) and for batches that all exit together.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auxhead._probe import batch_size, eval_mode
from auxhead._spread import per_name
from auxhead._tokens import forward_signature
from auxhead.attach import AuxModel
from auxhead.exits._calibrate import (
    METHODS,
    Calibration,
    check_budget,
    check_targets,
    choose_budget_thresholds,
    choose_thresholds,
)
from auxhead.exits._export import GraphRouted, Routed, check_path, export_program
from auxhead.exits._forward import Decide, forward_generic, forward_staged
from auxhead.exits._fx import plan_stages
from auxhead.exits._graph import (
    GraphPlan,
    OutsideTrace,
    as_keywords,
    forward_graph,
    graph_cut,
    key,
)
from auxhead.exits._patience import PatienceRule, choose_patience
from auxhead.exits._route import CRITERIA, MAIN, Criterion, leaves, score_logits
from auxhead.exits._stages import NotStageable, Plan
from auxhead.exits._summary import (
    LABELS,
    ExitSummary,
    Seen,
    collect,
    seconds_per_sample,
    summarise,
)

__all__ = ["MODES", "EarlyExit"]

logger = logging.getLogger(__name__)

MODES = ("auto", "staged", "generic")

MAX_PLANS = 8  # lengths cut per set of inputs when a token model's trace fixes the length

PATIENCE = "patience"  # PABEE's criterion: heads in a row that agree (`EarlyExit.patience`)

PerTap = float | list[float] | tuple[float, ...] | Mapping[str, float]  # one value, or one per tap


def _per_tap(value: Any, taps: list[str], what: str) -> list[Any]:
    """One value per tap from a number, a sequence in `at` order or a dict by tap name."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, bool) or not isinstance(value, (int, float, list, tuple, Mapping)):
        raise TypeError(
            f"{what} must be a number, a list (one per tap) or a dict by tap name, "
            f"got {type(value).__name__}"
        )
    return list(per_name(value, taps, what, "exits").values())


def _check_thresholds(value: Any, taps: list[str]) -> tuple[float, ...]:
    """One threshold in [0, 1] per tap."""
    values = _per_tap(value, taps, "thresholds")
    for tap, threshold in zip(taps, values, strict=True):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold for {tap!r} must be a number, got {threshold!r}")
        if not 0.0 <= threshold <= 1.0:  # NaN fails too
            raise ValueError(
                f"threshold for {tap!r} is {threshold!r}; thresholds lie in [0, 1] "
                "(0: every sample exits there, 1: none does)"
            )
    return tuple(float(threshold) for threshold in values)


def _check_temperatures(value: Any, taps: list[str]) -> tuple[float, ...]:
    """One temperature > 0 per tap."""
    values = _per_tap(value, taps, "temperatures")
    for tap, t in zip(taps, values, strict=True):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ValueError(f"temperature for {tap!r} must be a number > 0, got {t!r}")
    return tuple(float(t) for t in values)


def _plan(aux_model: AuxModel) -> tuple[Plan | None, str]:
    return plan_stages(aux_model.model, aux_model.taps)


def _token_model(aux_model: AuxModel) -> bool:
    """Whether the model reads a padding mask from its inputs (Hugging Face's `attention_mask`,
    or the mask given to attach), or takes more than one input: then it is cut from its
    export graph, where the mask can follow the samples."""
    model = aux_model.model
    if aux_model.reads_padding:
        return True
    signature = forward_signature(model)
    if signature is None:
        return False
    parameters = signature.parameters.values()
    required = [
        p
        for p in parameters
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) > 1


def _one_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        got = ", ".join([*(type(a).__name__ for a in args), *kwargs])
        raise TypeError(f"EarlyExit takes one input tensor for this model, got ({got})")
    return args[0]


RISKS = ("drop", "disagreement")  # what calibrate's max_accuracy_drop bounds


class EarlyExit(nn.Module):
    """Inference that stops at the first head confident enough for each sample.

    Sample by sample, the logits come from the first exit (in `at` order) whose score is
    strictly greater than its threshold, else from the main output. Runs in eval mode without
    gradients and leaves the `AuxModel`'s modes as they were.

    Args:
        aux_model: the `AuxModel` whose heads are the exits; each head must predict the same
            classes as the model. Its taps must be listed in the order they run.
        thresholds: one per tap (a list in `at` order or a dict by name), or one number for
            all. 0: every sample exits there; 1: none does (and the head is not run). All 1
            (the default): the main head answers until `calibrate` sets them.
        criterion: "confidence" (max softmax probability), "entropy" (1 - entropy / log K) or
            a callable (B, K) logits -> (B,) scores in [0, 1], higher meaning surer; or
            "patience" (PABEE: a sample leaves once `patience` heads in a row predict the
            class of the head before them; thresholds are not used, every head runs).
        patience: for criterion="patience"; `calibrate` chooses it.
        mode: "auto" (staged if the model can be cut, else generic), "staged" or "generic".
        return_exits: the forward (and the exported program) returns `(logits, exits)`,
            with each sample's exit index, instead of the logits alone.

    Attributes:
        mode: "staged" or "generic" (see the module docstring).
        mode_reason: why: the stages found, or why the model cannot be cut.
        return_exits: as given; can be changed.
        summary: the last `calibrate` (or `evaluate`) result, or None.
        last_exits: each sample's exit index (B,) in the latest forward (`len(taps)`: the
            main head), whatever `return_exits` says; None before the first.

    Example:
        >>> aux = auxhead.attach(resnet, ["layer2", "layer3"], sample=x[:2])  # then train it
        >>> early = auxhead.EarlyExit(aux, return_exits=True)
        >>> print(early.calibrate(valid_dl, max_accuracy_drop=0.01, confidence=0.9))
        >>> logits, exits = early(x)  # exits: tensor([0, 2, 1, ...]), 2 is the main head
    """

    def __init__(
        self,
        aux_model: AuxModel,
        *,
        thresholds: PerTap = 1.0,
        criterion: str | Criterion = "confidence",
        mode: str = "auto",
        return_exits: bool = False,
        patience: int = 2,
    ) -> None:
        super().__init__()
        if not isinstance(aux_model, AuxModel):
            raise TypeError(
                f"EarlyExit needs the AuxModel that auxhead.attach returned, "
                f"got {type(aux_model).__name__}"
            )
        if isinstance(criterion, str):
            if criterion not in (*CRITERIA, PATIENCE):
                raise ValueError(
                    f"unknown criterion {criterion!r}; choose one of "
                    f"{sorted([*CRITERIA, PATIENCE])} or pass a callable (B, K) logits -> (B,) "
                    "scores in [0, 1]"
                )
            if criterion == PATIENCE and len(aux_model.taps) < 2:
                raise ValueError(
                    "criterion='patience' needs two heads or more (a sample leaves when "
                    f"heads in a row agree); this AuxModel has {aux_model.taps}"
                )
            # Patience routes by agreement; the scores summaries keep are max softmax.
            self._criterion = CRITERIA.get(criterion, CRITERIA["confidence"])
        elif callable(criterion):
            self._criterion = criterion
        else:
            raise TypeError(f"criterion must be a name or a callable, got {criterion!r}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        if MAIN in aux_model.taps:
            raise ValueError(f"a tap is named {MAIN!r}, the name EarlyExit keeps for the model")
        self.aux_model = aux_model
        self.criterion = criterion if isinstance(criterion, str) else "custom"
        self.thresholds = thresholds
        self.temperatures = 1.0
        self.patience = patience
        self.return_exits = return_exits
        self.summary: ExitSummary | None = None
        self.last_exits: torch.Tensor | None = None  # (B,) of the latest forward
        self._plan: Plan | None = None
        # Token models: stages cut from the export graph, by input names and dtypes.
        self._graphs: dict[tuple, list[GraphPlan]] = {}
        self._warned_lengths = False
        self._asked = mode
        self._tokens = _token_model(aux_model)
        self._cut_error: str | None = None  # why the export graph could not be cut
        self.mode_reason = "mode='generic' was asked for"
        if mode != "generic" and self._tokens:
            self.mode_reason = (
                "a token model: stages are cut from its torch.export graph at the first batch, "
                "and the padding mask narrows with the samples that stay"
            )
        elif mode != "generic":
            self._plan, self.mode_reason = _plan(aux_model)
            if self._plan is None and mode == "staged":
                raise ValueError(
                    f"cannot route samples through {type(aux_model.model).__name__} stage "
                    f"by stage: {self.mode_reason}. Use mode='generic' (or 'auto')."
                )
        self.mode = "staged" if self._plan is not None or self._graph_mode else "generic"
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
        if self._plan is not None and self._plan.traced:
            self._plan, self.mode_reason = _plan(self.aux_model)
        self._graphs = {}  # cut again at the next batch, from the moved tensors
        return self

    @property
    def _graph_mode(self) -> bool:
        """A token model routed by stages cut from its export graph (or to be, at the first
        batch)."""
        return self._tokens and self._asked != "generic" and self._cut_error is None

    def _graph_plan(self, kwargs: dict[str, Any]) -> GraphPlan | None:
        """The stages for a call with these keyword inputs: cut at the first such call (and
        again for each new length when the trace fixes the length, up to `MAX_PLANS`); None
        once cutting has failed (mode "auto": generic from then on) or for a batch past
        that many lengths (it runs whole)."""
        plans = self._graphs.setdefault(key(kwargs), [])
        for plan in plans:
            if plan.fits(kwargs):
                return plan
        model = self.aux_model.model
        if len(plans) >= MAX_PLANS:
            if not self._warned_lengths:
                self._warned_lengths = True
                warnings.warn(
                    f"{type(model).__name__}'s export graph fixes the sequence length, and "
                    f"{MAX_PLANS} lengths have been cut already; batches of other lengths run "
                    "whole (no saving). Pad batches to a few fixed lengths.",
                    stacklevel=4,
                )
            return None
        if not plans:
            model(**kwargs)  # the inputs' own errors first, as the model reports them
        try:
            plan = graph_cut(self.aux_model, kwargs)
        except NotStageable as error:
            if self._asked == "staged":
                raise ValueError(
                    f"cannot route samples through {type(model).__name__} stage by stage: "
                    f"{error}. Use mode='generic' (or 'auto')."
                ) from None
            self._cut_error = str(error)
            self.mode = "generic"
            self.mode_reason = f"it stops only once the whole batch has exited ({error})"
            logger.info("EarlyExit runs %s in generic mode: %s", type(model).__name__, error)
            return None
        plans.append(plan)
        self.mode_reason = (
            f"{len(plan.stages)} stages cut from the torch.export graph; the padding mask and "
            "every batch-first value narrow with the samples that stay"
        )
        if plan.fixes_sizes:
            self.mode_reason += (
                f"; its trace fixes the input sizes, so each new length is cut again (up to "
                f"{MAX_PLANS})"
            )
        return plan

    def __getstate__(self) -> dict[str, Any]:
        # Stages cut from an export graph do not pickle; they are cut again after loading.
        return {**self.__dict__, "_graphs": {}}

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
    def thresholds(self, value: PerTap) -> None:
        self._thresholds = _check_thresholds(value, self.taps)

    @property
    def patience(self) -> int:
        """With criterion="patience" (PABEE): a sample leaves at the first head that agrees
        with the `patience` heads before it, each predicting the class of the one before it
        (so the first exit possible is head `patience`); else the main head answers. Ignored
        by the other criteria; `calibrate` chooses it."""
        return self._patience

    @patience.setter
    def patience(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"patience must be a whole number >= 1 (how many heads in a row must agree "
                f"with the one before them), got {value!r}"
            )
        self._patience = value

    @property
    def temperatures(self) -> tuple[float, ...]:
        """One temperature per tap, in `at` order: a head's score is the criterion of its
        logits / T (the logits it answers with are its own). `calibrate(temperature=True)`
        fits them; assign a list, a dict by name or a number (1: unscaled)."""
        return self._temperatures

    @temperatures.setter
    def temperatures(self, value: PerTap) -> None:
        self._temperatures = _check_temperatures(value, self.taps)

    def get_extra_state(self) -> dict[str, Any]:
        # Calibrated thresholds and temperatures travel with the state_dict.
        return {"thresholds": list(self._thresholds), "temperatures": list(self._temperatures)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.thresholds = state["thresholds"]
        self.temperatures = state.get("temperatures", 1.0)

    def extra_repr(self) -> str:
        scaled = "" if set(self.temperatures) == {1.0} else f", temperatures={self.temperatures}"
        return (
            f"mode={self.mode!r}, criterion={self.criterion!r}, "
            f"thresholds={self.thresholds}{scaled}, return_exits={self.return_exits}"
        )

    def forward(
        self, *args: Any, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, ...) inputs, as the model takes them -> (B, K) logits, each sample's from its
        exit; with `return_exits`, `(logits, exits)`: exits (B,) the exit index of each
        sample, `len(taps)` the main head. A token model takes its keyword inputs
        (`early(input_ids=ids, attention_mask=mask)`, or `early(**batch)`); the logits are
        its `logits`, whatever its output type."""
        active = [threshold < 1.0 for threshold in self._thresholds]
        decide = self._decide
        if self.criterion == PATIENCE:  # every head runs; the rule keeps state per call
            active, decide = [True] * len(active), self._patience_rule(PatienceRule(self.patience))
        with eval_mode(self.aux_model), torch.no_grad():
            if self._tokens:
                logits, exits = self._forward_tokens(args, kwargs, active, decide)
            elif self._plan is not None:
                x = _one_input(args, kwargs)
                logits, exits = forward_staged(x, self._plan, self.aux_model, active, decide)
            else:
                logits, exits = forward_generic((args, kwargs), self.aux_model, active, decide)
        self.last_exits = exits
        return (logits, exits) if self.return_exits else logits

    def _forward_tokens(
        self, args: tuple, kwargs: dict, active: list[bool], decide: Decide
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = as_keywords(self.aux_model.model, args, kwargs)
        # One sentence: the model's own forward, stopped where it exits, beats the stages
        # (torch's fused layer kernels, and nothing to narrow).
        single = batch_size(inputs) == 1
        if not single and self._graph_mode and (plan := self._graph_plan(inputs)) is not None:
            keep = self.aux_model.real_tokens((), inputs)
            try:
                return forward_graph(inputs, plan, self.aux_model, active, decide, keep)
            except OutsideTrace as error:
                # Shapes the trace did not cover: this batch runs whole, as the model takes it
                # (the model's own error, if it does not).
                logger.info("EarlyExit runs this batch generic: %s", error)
        return forward_generic(((), inputs), self.aux_model, active, decide)

    def _patience_rule(self, rule: PatienceRule) -> Decide:
        def decide(
            index: int, features: torch.Tensor, keep: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.aux_model.run_head(self.taps[index], features, keep)
            return logits, rule(logits)

        return decide

    def _decide(
        self, index: int, features: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's logits (b, K) and which of the b samples exit at tap `index` (b,); `keep`
        (b, N): the real tokens of a sequence tap."""
        logits = self.aux_model.run_head(self.taps[index], features, keep)
        scores = score_logits(self._criterion, logits, self._temperatures[index])
        return logits, leaves(scores, self._thresholds[index])

    def export(self, path: str | Path, sample: torch.Tensor | dict[str, Any]) -> Path:
        """Save a `torch.export` program (.pt2), or one self-contained ONNX file (.onnx), that
        routes like this `EarlyExit`, with its thresholds and temperatures baked in, and
        returns what its forward returns: the logits (B, K), or with `return_exits` the
        logits and each sample's exit index (B,).

        The batch narrows as in the eager forward: at each exit a `torch.cond` returns when
        every sample of the batch leaves there, and otherwise runs the rest of the network on
        the samples that stay only (picked with `nonzero`, a data-dependent batch size),
        writing their results back by batch index. Needs a staged `EarlyExit`. In the ONNX
        file each `torch.cond` is an `If` node with `NonZero`/`Gather`/`ScatterND` inside;
        writing it needs the onnx and onnxscript packages (`pip install 'auxhead[onnx]'`),
        running it onnxruntime.

        Args:
            path: where to write, ending in .pt2 or .onnx.
            sample: an input batch to trace with, one input or more (the batch size stays
                dynamic whatever the sample's size and the thresholds).

        Returns:
            `path`; load a .pt2 with `torch.export.load(path).module()`, run a .onnx with
            `onnxruntime.InferenceSession(path)` (input "x", outputs "logits" and, with
            `return_exits`, "exit").

        Raises:
            ValueError: a path not ending in .pt2 or .onnx, a generic-mode `EarlyExit`, an
                empty sample, .onnx without the onnx/onnxscript packages, or an ONNX file
                whose batch size torch's exporter fixed (not written).
        """
        if self.criterion == PATIENCE:
            raise ValueError(
                "export routes by thresholds; the patience rule is eager only. Calibrate "
                "thresholds with criterion='confidence' or 'entropy' to export"
            )
        check_path(path)  # before the tracing, which takes a while
        if self._tokens and self._graph_mode:
            inputs = sample if isinstance(sample, dict) else {}
            if not isinstance(sample, dict):
                raise ValueError(
                    f"export of {type(self.aux_model.model).__name__} traces with a dict of its "
                    f"keyword inputs (input_ids, attention_mask, ...), got "
                    f"{type(sample).__name__}; pass a batch such as `early.export(path, batch)`"
                )
            # Targets in an evaluation batch are not inputs of the served model.
            inputs = {name: value for name, value in inputs.items() if name not in LABELS}
            inputs = as_keywords(self.aux_model.model, (), inputs)
            plan = self._graph_plan(inputs)
            if plan is not None:
                graph = GraphRouted(
                    plan,
                    self.aux_model,
                    thresholds=self.thresholds,
                    temperatures=self.temperatures,
                    criterion=self._criterion,
                    return_exits=self.return_exits,
                )
                with eval_mode(self.aux_model):
                    return export_program(graph, path, inputs)
        if self._plan is None:
            raise ValueError(
                f"export needs a staged EarlyExit (this one is generic: {self.mode_reason})"
            )
        routed = Routed(
            self._plan,
            self.aux_model,
            thresholds=self.thresholds,
            temperatures=self.temperatures,
            criterion=self._criterion,
            return_exits=self.return_exits,
        )
        return export_program(routed, path, sample)

    # ---- calibration ----

    def calibrate(
        self,
        data: Iterable[Any],
        *,
        max_accuracy_drop: float = 0.005,
        confidence: float = 0.9,
        method: str = "ltt",
        risk: str = "drop",
        temperature: bool = False,
        timing_batches: int = 8,
        seed: int = 0,
    ) -> ExitSummary:
        """Choose the thresholds that save the most FLOPs while the accuracy drop against the
        main head stays within `max_accuracy_drop` on new data, with probability at least
        `confidence` (`calibrate_budget` asks for a compute budget instead).

        One pass runs every head and the main output on `data` and keeps each exit's score and
        correctness; the search then needs no more forwards. The cost of an exit counts the
        heads that run before it, so a head that saves too little is turned off (threshold 1).
        With "ltt-harm" and "empirical", thresholds lie midway between neighbouring scores of
        `data`, so a new sample that scores like one of them, give or take float noise,
        routes the same way; "ltt" takes them from a grid fixed before `data` is seen.

        method="ltt" (the default) gives a distribution-free, finite-sample guarantee by
        Learn then Test (Angelopoulos et al. 2021): if `data` and the data served are i.i.d.
        draws from one distribution, then with probability >= `confidence` over the draw of
        `data`, the accuracy drop of the chosen thresholds on that distribution is at most
        `max_accuracy_drop`. One threshold shared by the exits steps down from 1 along a
        grid fixed in advance; each step is tested on all of `data` with a Waudby-Smith-Ramdas
        betting test of "drop > max_accuracy_drop" at level 1 - confidence (samples an exit
        gets right where the main head is wrong count in its favour), stopping at the first
        that fails; of those that passed, the cheapest is kept. Not covered: data from
        another distribution (another camera, month or class balance), and recalibrating on
        the same data until the result pleases. method="ltt-harm" (the default before this
        release) bounds the share of samples the exits harm (main head right, exit wrong)
        instead, with an exact binomial test on 70% of `data` after ordering thresholds on
        30%: the same promise, kept more conservatively. method="empirical" just meets the
        drop on `data` itself: cheaper thresholds, and on new data the drop is over the
        target about as often as not.

        Args:
            data: an iterable of `(inputs, targets)` batches with class-index targets, such as
                a torch or fastai validation DataLoader; held-out data, never trained on.
            max_accuracy_drop: the accuracy the exits may lose against the main head, as a
                fraction (0.005 is half a percentage point).
            confidence: the probability, over the draw of `data`, that the target holds on
                new data ("ltt", "ltt-harm").
            method: "ltt" (guaranteed, by the drop), "ltt-harm" (guaranteed, by the harm
                rate) or "empirical" (met on `data` only).
            risk: what `max_accuracy_drop` bounds. "drop": the accuracy lost against the main
                head (samples an exit gets right where the main head is wrong count in its
                favour). "disagreement": the share of samples whose answer differs from the
                main head's, right or wrong; it is never below the drop, so its bound bounds
                the drop too, and it holds whatever the labels' quality (the labels are only
                used for the summary's accuracies and temperature fits).
            temperature: fit one temperature per head (the NLL of softmax(logits / T) on a
                random 30% of `data`, which the test then does not use; all of it with
                "empirical") before choosing the thresholds; scores then come from the
                scaled logits.
            timing_batches: how many of the first batches to keep for timing the early exit
                against the full model after the search; 0 skips the timing.
            seed: the random order (and split) of `data` the test reads.

        Returns:
            An `ExitSummary` on all of `data` (also kept as `self.summary`), with the bound
            the test held and the observed drop with its interval; the thresholds (and
            temperatures) are set. Evaluate on a separate test set for unbiased numbers.

        Raises:
            ValueError: batches without labels, targets that are not class indices, empty data,
                a drop outside [0, 1], a confidence outside (0, 1) or an unknown method.

        Warns:
            UserWarning: when no thresholds meet the target; every sample then goes to the
                main head (thresholds 1). With `temperature=True`, for each head whose fit
                runs to a search bound (0.02 or 50: too few samples, all of them right or
                wrong at that head); its temperature stays 1.0.

        Example:
            >>> early = auxhead.EarlyExit(aux_model)
            >>> summary = early.calibrate(valid_dl, max_accuracy_drop=0.005, confidence=0.9)
            >>> summary.saving, summary.bound  # FLOPs saved on valid_dl, the tested bound
        """
        check_targets(max_accuracy_drop, confidence)
        if risk not in RISKS:  # before the pass over the data
            raise ValueError(f"unknown risk {risk!r}; choose one of {list(RISKS)}")
        if self.criterion == PATIENCE:
            return self._calibrate_patience(
                data, max_accuracy_drop, confidence, method, risk, temperature, timing_batches, seed
            )
        choose = functools.partial(choose_thresholds, max_accuracy_drop=max_accuracy_drop)
        seen, choice = self._search(
            data, choose, confidence, method, temperature, timing_batches, seed, risk=risk
        )
        if choice.fallback:
            main_accuracy = seen.correct[:, -1].float().mean().item()
            self._warn_fallback(
                f"no exit keeps the accuracy within max_accuracy_drop={max_accuracy_drop} "
                f"of the main head's {main_accuracy:.2%} while saving FLOPs",
                "allow a larger drop",
                choice,
            )
        return self._calibrated(seen, choice, drop=max_accuracy_drop)

    def _calibrate_patience(
        self,
        data: Iterable[Any],
        drop: float,
        confidence: float,
        method: str,
        risk: str,
        temperature: bool,
        timing_batches: int,
        seed: int,
    ) -> ExitSummary:
        """`calibrate` for criterion="patience": it picks the patience (`choose_patience`)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        if temperature:
            raise ValueError(
                "temperature scaling does not change which class a head predicts, so it does "
                "not change the patience rule: pass temperature=False"
            )
        seen = collect(
            self.aux_model, data, self._score, timing_batches=timing_batches, keep_logits=True
        )
        assert seen.logits is not None
        choice = choose_patience(
            seen.logits.argmax(dim=-1),
            seen.agree if risk == "disagreement" else seen.correct,
            seen.profile.exit_costs([True] * len(self.taps)),
            max_accuracy_drop=drop,
            confidence=confidence,
            method=method,
            full=seen.profile.full,
            seed=seed,
        )
        self.patience = choice.patience
        guaranteed = method != "empirical"
        if choice.fallback:
            main_accuracy = seen.correct[:, -1].float().mean().item()
            margin = f" at {confidence:.0%} confidence" if guaranteed else ""
            warnings.warn(
                f"no patience keeps the accuracy within max_accuracy_drop={drop} of the main "
                f"head's {main_accuracy:.2%} while saving FLOPs{margin}, so every sample goes "
                f"to the main head (patience {choice.patience}). Train the heads longer, allow "
                "a larger drop" + (", a lower confidence or more data." if guaranteed else "."),
                stacklevel=2,
            )
        n = len(seen.correct)
        calibration = Calibration(
            thresholds=(0.0,) * len(self.taps),
            temperatures=(1.0,) * len(self.taps),
            method=method,
            target="drop",
            fallback=choice.fallback,
            confidence=confidence if guaranteed else None,
            bound=choice.bound,
            path_samples=0,
            test_samples=n,
            path_length=len(self.taps) - 1,
            passed=choice.passed,
        )
        self.summary = self._summarise(seen, calibration=calibration, drop=drop)
        logger.info("calibrated early exits\n%s", self.summary)
        return self.summary

    def calibrate_budget(
        self,
        data: Iterable[Any],
        *,
        max_flops: float,
        confidence: float = 0.9,
        method: str = "ltt",
        temperature: bool = False,
        timing_batches: int = 8,
        seed: int = 0,
    ) -> ExitSummary:
        """Choose the most accurate thresholds whose mean FLOPs per sample stay within a
        compute budget: with "ltt" (or "ltt-harm", the same test here), on new data with
        probability >= `confidence` (Hoeffding-Bentkus test of the mean cost on 70% of
        `data`, after ordering thresholds on 30%); with "empirical", on `data`.

        Args:
            data: labelled held-out batches, as in `calibrate`.
            max_flops: the budget, a share of the full model's FLOPs per sample (0.4: 40%).
            confidence: the probability that the budget holds on new data ("ltt" only).
            method: "ltt" or "ltt-harm" (guaranteed) or "empirical" (met on `data` only).
            temperature: fit one temperature per head first, as in `calibrate`.
            timing_batches: batches kept for timing, as in `calibrate`.
            seed: the random split of `data` ("ltt").

        Returns:
            An `ExitSummary` on all of `data` (also kept as `self.summary`).

        Raises:
            ValueError: as `calibrate`, and a budget that is not a positive share.

        Example:
            >>> early.calibrate_budget(valid_dl, max_flops=0.4)  # best accuracy at 40% FLOPs
        """
        check_budget(max_flops)
        check_targets(0.0, confidence)
        if self.criterion == PATIENCE:
            raise ValueError(
                "calibrate_budget chooses thresholds; with criterion='patience' use calibrate "
                "(it chooses the patience for an accuracy drop)"
            )
        choose = functools.partial(choose_budget_thresholds, max_flops=max_flops)
        seen, choice = self._search(
            data, choose, confidence, method, temperature, timing_batches, seed
        )
        if choice.fallback:
            self._warn_fallback(
                f"no exit keeps the mean FLOPs within max_flops={max_flops}",
                "allow more FLOPs",
                choice,
            )
        return self._calibrated(seen, choice, max_flops=max_flops)

    def evaluate(self, data: Iterable[Any], *, timing_batches: int = 8) -> ExitSummary:
        """The `ExitSummary` of the current thresholds on `data` (e.g. a test set after
        `calibrate` on a validation set), without changing them. Arguments as in `calibrate`.
        """
        scaled = any(t != 1.0 for t in self.temperatures) or self.criterion == PATIENCE
        seen = collect(
            self.aux_model, data, self._score, timing_batches=timing_batches, keep_logits=scaled
        )
        self.summary = self._summarise(seen)
        return self.summary

    def _score(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        return score_logits(self._criterion, logits, temperature)

    def _search(
        self,
        data: Iterable[Any],
        choose: Callable[..., Calibration],
        confidence: float,
        method: str,
        temperature: bool,
        timing_batches: int,
        seed: int,
        *,
        risk: str = "drop",
    ) -> tuple[Seen, Calibration]:
        """One pass over `data`, then the thresholds `choose` picks from it: on each exit's
        correctness (risk "drop"), or on its agreement with the main head ("disagreement":
        the main head's answers stand in for the labels)."""
        if method not in METHODS:  # before the pass over the data
            raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
        seen = collect(
            self.aux_model,
            data,
            self._score,
            timing_batches=timing_batches,
            keep_logits=temperature,
        )
        choice = choose(
            seen.scores,
            seen.agree if risk == "disagreement" else seen.correct,
            seen.profile,
            confidence=confidence,
            method=method,
            logits=seen.logits,
            targets=seen.targets,
            score_fn=self._score if temperature else None,
            seed=seed,
        )
        for index, bound in choice.pinned:
            warnings.warn(
                f"the temperature of head {self.taps[index]!r} ran to its search bound "
                f"T={bound:g} on {choice.path_samples} calibration samples (its loss has no "
                "minimum inside the range, as when a head is right on every one of a few "
                "samples), so it stays 1.0. Calibrate on more held-out data, or pass "
                "temperature=False.",
                stacklevel=3,
            )
        return seen, choice

    def _warn_fallback(self, target: str, remedy: str, choice: Calibration) -> None:
        guaranteed = choice.method != "empirical"
        margin = f" at {choice.confidence:.0%} confidence" if guaranteed else ""
        extra = ", a lower confidence or more data" if guaranteed else ""
        warnings.warn(
            f"{target}{margin}, so every sample goes to the main head (thresholds 1). "
            f"Train the heads longer, {remedy}{extra}.",
            stacklevel=3,
        )

    def _calibrated(self, seen: Seen, choice: Calibration, **target: float) -> ExitSummary:
        """Set the chosen thresholds and temperatures; their summary on `seen`."""
        self.thresholds = list(choice.thresholds)
        self.temperatures = list(choice.temperatures)
        self.summary = self._summarise(seen, calibration=choice, **target)
        logger.info("calibrated early exits\n%s", self.summary)
        return self.summary

    def _summarise(self, seen: Seen, **calibration: Any) -> ExitSummary:
        seconds = None
        if seen.timing_inputs:
            early_s = seconds_per_sample(self, seen.timing_inputs)
            with eval_mode(self.aux_model), torch.no_grad():
                full_s = seconds_per_sample(self.aux_model.model, seen.timing_inputs)
            seconds = (early_s, full_s)
        return summarise(
            seen,
            patience=self.patience if self.criterion == PATIENCE else None,
            thresholds=self.thresholds,
            temperatures=self.temperatures,
            criterion=self.criterion,
            score=self._score,
            seconds=seconds,
            **calibration,
        )
