"""The model zoo sweep: do auxiliary heads work on every torchvision classifier and on a spread
of timm families, untouched models, random init, small inputs?

    python benchmarks/zoo.py --threads 1 > /tmp/zoo_full.txt          # everything
    python benchmarks/zoo.py --only torchvision                        # one library
    python benchmarks/zoo.py --models resnet18,timm/vit_tiny_patch16_224 --kinds sdn

For each model (batch of 2, 7 classes, the smallest input it takes from 64 px up, no weights
downloaded; timm models with drop_rate and drop_path_rate 0.1 where they take them, so that
they draw random numbers in training), two taps are picked at about 1/3 and 2/3 of the rows
of `auxhead.list_layers` that a head can use (run once, not train-only, a 2-4 dim output
whose first dim is the batch). Then, for each head kind ("inception", "linear", "sdn"), on
a deep copy of the model:

    eval    `aux.eval()(x)` equals the bare twin's eval output, bit for bit.
    train   at one seed, `aux.train()(x)` equals the bare twin's `train()(x)`, bit for bit
            (heads draw their random numbers from their own streams).
    shapes  `aux.aux_outputs` holds one (B, K) tensor per tap.
    grads   `AuxLoss(nn.CrossEntropyLoss(), aux)(out, y).backward()` runs and gives every head
            parameter a gradient.
    strip   `aux.strip()` leaves no forward hook or pre-hook anywhere, and its `state_dict`
            equals the bare twin's (which saw the same forward passes).

`attach` may refuse a tap with a `ValueError` that names it (a tap folding windows into the
batch, one that runs under no_grad, a layout it cannot tell). Such a refusal is recorded and
counted apart, and the sweep tries the next usable row instead (up to 3 times), so the checks
still run. A refusal that does not name the tap, any other exception, a mismatch or a missing
gradient is a failure. One model's failure never stops the sweep: everything is caught per
model, and each model has a time limit (--timeout).

Output: a table of models x checks (✓ pass, ✗ fail, R every tap tried was refused, - not run;
a kind whose `attach` crashed shows ✗ with its checks not run),
a summary line per library, every failure grouped by cause (check and first line of the
error), every refusal, and the models left out with the reason. Progress goes to stderr.

Options: --only torchvision|timm, --models a,b,c (torchvision names, or timm names with or
without a "timm/" prefix), --kinds inception,linear,sdn, --threads N (torch threads, default
1), --timeout S (per model, default 900), --fractions 0.1,0.5,0.9 (tap positions, default
0.333,0.667; more positions stress more layers), --list (print the models and their sizes).

The functions (`torchvision_specs`, `timm_specs`, `check_model`) are imported by
tests/test_zoo.py, which runs a one-per-family subset.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import re
import signal
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Random init only: never reach for pretrained weights (timm would ask the Hugging Face hub).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import auxhead

KINDS = ("inception", "linear", "sdn")
CHECKS = ("eval", "train", "shapes", "grads", "strip")
BATCH = 2
NUM_CLASSES = 7
SEED = 1234  # the seed both twins see before their training-mode forward
MAX_FALLBACKS = 3  # other rows tried for a tap that attach refuses
FRACTIONS = (1 / 3, 2 / 3)  # where the taps are, as fractions of the usable rows

PASS, FAIL, REFUSED, SKIPPED = "✓", "✗", "R", "-"


@dataclass(frozen=True)
class ModelSpec:
    """One model of the sweep: how to build it and the input size it gets."""

    library: str  # "torchvision" or "timm"
    name: str
    size: int  # input is (BATCH, 3, size, size)
    build: Callable[[], nn.Module]

    @property
    def label(self) -> str:
        return self.name if self.library == "torchvision" else f"timm/{self.name}"


@dataclass
class KindResult:
    """The checks for one head kind on one model."""

    kind: str
    taps: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=lambda: dict.fromkeys(CHECKS, SKIPPED))
    errors: dict[str, str] = field(default_factory=dict)  # check -> first line of the error
    refusals: list[str] = field(default_factory=list)  # "tap: message" for each refused tap

    @property
    def status(self) -> str:
        values = set(self.checks.values())
        if FAIL in values or self.errors:
            return FAIL
        if REFUSED in values:
            return REFUSED
        return PASS if values == {PASS} else SKIPPED

    def fail(self, check: str, error: BaseException | str) -> None:
        self.checks[check] = FAIL
        self.errors[check] = first_line(error)


@dataclass
class ZooResult:
    """Every check of one model, for every head kind."""

    spec: ModelSpec
    kinds: dict[str, KindResult] = field(default_factory=dict)
    error: str = ""  # a failure before any head was attached (build, list_layers, no taps)
    stage: str = ""  # where that failure happened
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.error and all(k.status == PASS for k in self.kinds.values())

    @property
    def failed(self) -> bool:
        return bool(self.error) or any(k.status == FAIL for k in self.kinds.values())

    @property
    def refused(self) -> bool:
        return any(k.refusals for k in self.kinds.values())

    def column(self, check: str) -> str:
        if self.error:
            return FAIL
        values = {k.checks[check] for k in self.kinds.values()}
        for mark in (FAIL, REFUSED, SKIPPED):
            if mark in values:
                return mark
        return PASS


# --- the models --------------------------------------------------------------------------------

# torchvision builders that need more than 64 px or a size keyword (read from their sources):
# maxvit_t partitions every stage into 7x7 windows (stage inputs size/4 ... size/32 must all be
# multiples of 7: 224 px is the least); inception_v3's train-only AuxLogits pools a 5x5 window
# from Mixed_6e, which must be 17x17 (299 px is the least); ViTs take the image size as a
# keyword (a multiple of the patch size).
TORCHVISION_SIZES: dict[str, tuple[int, dict[str, Any]]] = {
    "maxvit_t": (224, {"input_size": (224, 224)}),
    "inception_v3": (299, {}),
    "vit_b_16": (64, {"image_size": 64}),
    "vit_b_32": (64, {"image_size": 64}),
    "vit_l_16": (64, {"image_size": 64}),
    "vit_l_32": (64, {"image_size": 64}),
    "vit_h_14": (56, {"image_size": 56}),
}

# One small variant per timm family (per timm module, and per family within the big modules),
# at 64 px unless the model needs more (the least size, from 64 px up, on which it runs in
# train and eval mode); `img_size=` is passed to the models that take it.
TIMM_SIZES: dict[str, int] = {
    # CNNs
    "resnet18": 64,
    "resnet10t": 64,
    "ecaresnet26t": 64,
    "resnetv2_18": 64,
    "resnext26ts": 64,
    "seresnet18": 64,
    "legacy_seresnet18": 64,
    "densenet121": 64,
    "dla46_c": 64,
    "dpn48b": 64,
    "efficientnet_b0": 64,
    "efficientnet_lite0": 64,
    "efficientnetv2_rw_t": 64,
    "tf_efficientnetv2_b0": 64,
    "mixnet_s": 64,
    "fbnetc_100": 64,
    "hardcorenas_a": 64,
    "mobilenetv3_small_050": 64,
    "lcnet_035": 64,
    "mobilenetv4_conv_small_035": 64,
    "mobilenetv4_hybrid_medium": 64,
    "mnasnet_small": 64,
    "ghostnet_050": 64,
    "ghostnetv2_100": 64,
    "repghostnet_050": 64,
    "hrnet_w18_small": 64,
    "inception_v3": 96,
    "inception_v4": 96,
    "inception_resnet_v2": 96,
    "legacy_xception": 64,
    "xception41": 64,
    "regnetx_002": 64,
    "regnety_002": 64,
    "regnetz_005": 64,
    "regnetz_b16": 64,
    "repvgg_a0": 64,
    "mobileone_s0": 64,
    "gernet_s": 64,
    "res2net50_14w_8s": 64,
    "resnest14d": 64,
    "rexnet_100": 64,
    "selecsls42b": 64,
    "skresnet18": 64,
    "vgg11": 64,
    "ese_vovnet19b_slim_dw": 64,
    "cspresnet50": 64,
    "cs3darknet_s": 64,
    "cspnext_tiny": 64,
    "darknet17": 64,
    "nf_regnet_b0": 64,
    "nf_resnet26": 64,
    "dm_nfnet_f0": 64,
    "tresnet_m": 64,
    "botnet26t_256": 64,
    "halonet26t": 256,  # 8x8 blocks with halos, sized for 256 px
    "lambda_resnet26t": 64,
    "hgnet_tiny": 64,
    "hgnetv2_b0": 64,
    "rdnet_tiny": 64,
    "convmixer_768_32": 64,
    "starnet_s050": 64,
    "fasternet_t0": 64,
    "cpubone_nano": 64,
    "lcnetv2_small": 64,
    # transformers, MLPs and hybrids
    "vit_tiny_patch16_224": 64,
    "vit_small_patch16_rope_224": 64,
    "vit_relpos_small_patch16_224": 64,
    "vit_small_r26_s32_224": 64,
    "flexivit_small": 64,
    "deit_tiny_patch16_224": 64,
    "deit_tiny_distilled_patch16_224": 64,
    "beit_base_patch16_224": 64,
    "cait_xxs24_224": 64,
    "coat_lite_mini": 64,
    "coat_tiny": 64,
    "convit_tiny": 64,
    "convnext_atto": 64,
    "convnextv2_atto": 64,
    "inception_next_atto": 64,
    "davit_tiny": 64,
    "edgenext_xx_small": 64,
    "efficientformer_l1": 224,  # attention biases sized for a 7x7 last stage
    "efficientformerv2_s0": 64,
    "eva02_tiny_patch14_224": 64,
    "fastvit_t8": 64,
    "focalnet_tiny_srf": 64,
    "gcvit_xxtiny": 64,
    "hiera_tiny_224": 64,
    "hieradet_small": 64,
    "levit_128s": 64,
    "levit_conv_128s": 64,
    "maxvit_pico_rw_256": 64,
    "maxvit_tiny_tf_224": 64,
    "coatnet_pico_rw_224": 64,
    "mixer_s32_224": 64,
    "gmlp_ti16_224": 64,
    "resmlp_12_224": 64,
    "mobilevit_xxs": 64,
    "mobilevitv2_050": 64,
    "mvitv2_tiny": 64,
    "nest_tiny": 64,
    "pit_ti_224": 64,
    "pvt_v2_b0": 64,
    "poolformer_s12": 64,
    "caformer_s18": 64,
    "repvit_m0_9": 64,
    "sequencer2d_s": 64,
    "swin_tiny_patch4_window7_224": 64,
    "swinv2_tiny_window8_256": 64,
    "swinv2_cr_tiny_224": 64,
    "tiny_vit_5m_224": 64,
    "twins_svt_small": 64,
    "twins_pcpvt_small": 64,
    "visformer_tiny": 64,
    "volo_d1_224": 64,
    "xcit_nano_12_p16_224": 64,
    "mambaout_femto": 64,
    "efficientvit_b0": 64,
    "efficientvit_m0": 64,
    "efficientvim_m1": 64,
    "nextvit_small": 64,
    "shvit_s1": 64,
    "swiftformer_xs": 64,
    "tnt_s_patch16_224": 64,
    "vitamin_small_224": 64,
    "iformer_t": 64,
    "lowformer_b0": 64,
    "csatv2": 64,
    "crossvit_tiny_240": 120,  # two branches, 12 and 16 px patches: 120 and 112 px
    "nasnetalarge": 64,
    "pnasnet5large": 64,
    "samvit_base_patch16": 64,
    "mobilenetv5_300m": 64,
    "naflexvit_base_patch16_gap": 64,
    "gemma4_vit_167m": 64,
    "qwen3_vit_88m": 64,
    "resnet50_clip_gap": 64,
    "efficientvit_l1": 64,
}


def torchvision_specs(names: Iterable[str] | None = None) -> list[ModelSpec]:
    """Every torchvision classification builder (or the named ones), random init, 7 classes."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    chosen = available if names is None else list(names)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"not torchvision classification builders: {unknown}")
    specs = []
    for name in chosen:
        size, kwargs = TORCHVISION_SIZES.get(name, (64, {}))
        specs.append(ModelSpec("torchvision", name, size, _torchvision_builder(name, kwargs)))
    return specs


def _torchvision_builder(name: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=NUM_CLASSES, **kwargs)

    return build


def timm_specs(names: Iterable[str] | None = None) -> list[ModelSpec]:
    """The timm models of the sweep (or the named ones, any timm name), random init."""
    import timm

    chosen = list(TIMM_SIZES) if names is None else list(names)
    unknown = sorted(set(chosen) - set(timm.list_models()))
    if unknown:
        raise ValueError(f"not timm models: {unknown}")
    return [
        ModelSpec(
            "timm", name, TIMM_SIZES.get(name, 64), _timm_builder(name, TIMM_SIZES.get(name, 64))
        )
        for name in chosen
    ]


# Dropout and stochastic depth on (timm's defaults are 0 for most models): the "train" check
# is about the heads leaving the model's random numbers alone, which needs the model to draw
# some. Dropped for the models whose constructor takes no such keyword.
TIMM_KWARGS = {"img_size": None, "drop_rate": 0.1, "drop_path_rate": 0.1}


def _timm_builder(name: str, size: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        kwargs = {key: size if value is None else value for key, value in TIMM_KWARGS.items()}
        while True:
            try:
                return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
            except TypeError as error:  # e.g. a CNN: no img_size keyword, any size works
                refused = [key for key in kwargs if f"'{key}'" in str(error)]
                if not refused:
                    raise
                del kwargs[refused[0]]

    return build


# --- the checks --------------------------------------------------------------------------------


def first_line(error: BaseException | str) -> str:
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else text


def tensors(output: Any) -> list[torch.Tensor | None]:
    """The tensors of a model output, flattened in order (tuples, namedtuples, lists, dicts)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if output is None:
        return [None]
    if isinstance(output, dict):
        return [t for key in output for t in tensors(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    raise TypeError(f"cannot compare a model output of type {type(output).__name__}")


def main_logits(output: Any) -> torch.Tensor:
    found = [t for t in tensors(output) if t is not None]
    if not found:
        raise TypeError(f"model output {type(output).__name__} holds no tensor")
    return found[0]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        # Bit for bit, NaNs in the same places included.
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return False


def compare(expected: Any, got: Any) -> str:
    """'' if `got` is `expected` bit for bit, else what differs."""
    if type(expected) is not type(got):
        return f"output type {type(got).__name__}, expected {type(expected).__name__}"
    a, b = tensors(expected), tensors(got)
    if len(a) != len(b):
        return f"{len(b)} output tensors, expected {len(a)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if (x is None) != (y is None):
            return f"output {i}: None in one output only"
        if x is None or _equal(x, y):
            continue
        if x.shape != y.shape:
            return f"output {i}: shape {tuple(y.shape)}, expected {tuple(x.shape)}"
        diff = (x.double() - y.double()).abs().nan_to_num(nan=math.inf).max().item()
        return f"output {i}: differs, max |diff| {diff:.3g}"
    return ""


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def compare_state(expected: dict[str, Any], got: dict[str, Any]) -> str:
    """'' if two state dicts hold the same keys and the same values bit for bit."""
    if list(expected) != list(got):
        extra = sorted(set(got) - set(expected))[:3]
        missing = sorted(set(expected) - set(got))[:3]
        return f"state_dict keys differ: extra {extra}, missing {missing}"
    for key, value in expected.items():
        other = got[key]
        if isinstance(value, torch.Tensor):
            if not isinstance(other, torch.Tensor) or not _equal(value, other):
                return f"state_dict[{key!r}] differs"
        elif value != other:
            return f"state_dict[{key!r}] differs"
    return ""


def usable_rows(table: Sequence[auxhead.LayerInfo], batch: int = BATCH) -> list[str]:
    """Rows a head could use: run once, not train-only, a 2-4 dim output led by the batch."""
    return [
        info.name
        for info in table
        if info.calls == 1
        and not info.train_only
        and info.shape is not None
        and 2 <= len(info.shape) <= 4
        and info.shape[0] == batch
    ]


def pick_taps(rows: Sequence[str], fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """Indices of distinct rows at about these fractions of `rows` (1/3 and 2/3 by default),
    moved apart where two would fall on one row."""
    if len(rows) < len(fractions):
        raise ValueError(f"{len(rows)} usable row(s) for a head, need {len(fractions)}")
    picks: list[int] = []
    for f in sorted(fractions):
        lowest = picks[-1] + 1 if picks else 0
        highest = len(rows) - (len(fractions) - len(picks))  # room for the ones after it
        picks.append(min(max(round(f * len(rows)), lowest), highest))
    return picks


def _names_tap(message: str, tap: str) -> bool:
    return f"'{tap}'" in message or f'"{tap}"' in message


def attach_taps(
    model: nn.Module,
    rows: Sequence[str],
    picks: Sequence[int],
    kind: str,
    x: torch.Tensor,
    result: KindResult,
) -> auxhead.AuxModel | None:
    """`attach` at the picked rows. A tap refused with a ValueError that names it is recorded
    in `result.refusals` and replaced by the next usable row (then the previous ones), at most
    MAX_FALLBACKS times per tap. Returns None when every try was refused; any other error
    (a refusal that names no tap included) propagates."""
    picks = list(picks)
    tried = {rows[i] for i in picks}
    while True:
        taps = [rows[i] for i in picks]
        try:
            return auxhead.attach(model, taps, head=kind, sample=x, num_classes=NUM_CLASSES)
        except ValueError as error:
            slots = [i for i, tap in enumerate(taps) if _names_tap(str(error), tap)]
            if not slots:
                raise
            result.refusals.append(f"{taps[slots[0]]}: {first_line(str(error))}")
            replacement = _next_row(rows, picks, slots[0], tried)
            if replacement is None or len(result.refusals) > MAX_FALLBACKS * len(picks):
                return None
            picks[slots[0]] = replacement
            tried.add(rows[replacement])


def _next_row(rows: Sequence[str], picks: Sequence[int], slot: int, tried: set[str]) -> int | None:
    start = picks[slot]
    others = set(picks) - {start}
    order = [*range(start + 1, len(rows)), *range(start - 1, -1, -1)]
    for i in order:
        if i not in others and rows[i] not in tried:
            return i
    return None


@dataclass
class Reference:
    """What the bare model does, computed once per model and compared against for each kind:
    its eval output, its training-mode output at SEED, and its state after both."""

    eval_output: Any
    train_output: Any
    state: dict[str, Any]
    hooks: int

    @classmethod
    def of(cls, model: nn.Module, x: torch.Tensor) -> Reference:
        bare = copy.deepcopy(model)
        with torch.no_grad():
            eval_output = bare.eval()(x)
        torch.manual_seed(SEED)
        train_output = _detach(bare.train()(x))  # with autograd on, as the twin runs
        return cls(eval_output, train_output, bare.state_dict(), hook_count(bare))


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return type(output)(*(_detach(item) for item in output))
    if isinstance(output, (tuple, list)):
        return type(output)(_detach(item) for item in output)
    if isinstance(output, dict):
        return type(output)((key, _detach(value)) for key, value in output.items())
    return output


def check_kind(
    twin: nn.Module,
    reference: Reference,
    x: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    rows: Sequence[str],
    fractions: Sequence[float] = FRACTIONS,
) -> KindResult:
    """The five checks for one head kind. `twin` is a fresh copy of the model, which gets the
    heads; `reference` is what the bare model did with the same passes."""
    result = KindResult(kind)
    try:
        aux = attach_taps(twin, rows, pick_taps(rows, fractions), kind, x, result)
    except Exception as error:
        result.errors["attach"] = first_line(error)
        return result
    if aux is None:
        result.checks = dict.fromkeys(CHECKS, REFUSED)
        return result
    result.taps = list(aux.taps)

    try:
        with torch.no_grad():
            diff = compare(reference.eval_output, aux.eval()(x))
        result.checks["eval"] = PASS
        if diff:
            result.fail("eval", diff)
    except Exception as error:
        result.fail("eval", error)

    out = None
    try:
        torch.manual_seed(SEED)
        out = aux.train()(x)
        diff = compare(reference.train_output, out)
        result.checks["train"] = PASS
        if diff:
            result.fail("train", diff)
    except Exception as error:
        result.fail("train", error)

    if out is not None:
        try:
            shapes = {name: tuple(t.shape) for name, t in aux.aux_outputs.items()}
            wanted = dict.fromkeys(aux.taps, (BATCH, NUM_CLASSES))
            result.checks["shapes"] = PASS
            if shapes != wanted:
                result.fail("shapes", f"aux_outputs shapes {shapes}, expected {wanted}")
        except Exception as error:
            result.fail("shapes", error)
        try:
            loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux)(main_logits(out), y)
            loss.backward()
            missing = [n for n, p in aux.heads.named_parameters() if p.grad is None]
            result.checks["grads"] = PASS
            if missing:
                result.fail("grads", f"no gradient for head parameter(s) {missing[:4]}")
        except Exception as error:
            result.fail("grads", error)
        del out

    try:
        stripped = aux.strip()
        problems = []
        if stripped is not twin:
            problems.append("strip() did not return the original model")
        hooks = hook_count(stripped)
        if hooks != reference.hooks:
            problems.append(
                f"{hooks} forward (pre-)hooks left, the bare model has {reference.hooks}"
            )
        diff = compare_state(reference.state, stripped.state_dict())
        if diff:
            problems.append(diff)
        result.checks["strip"] = PASS
        if problems:
            result.fail("strip", "; ".join(problems))
    except Exception as error:
        result.fail("strip", error)
    return result


class _Timeout(Exception):
    pass


def _on_alarm(_signum: int, _frame: Any) -> None:
    raise _Timeout()


def check_model(
    spec: ModelSpec,
    kinds: Sequence[str] = KINDS,
    timeout: int = 0,
    fractions: Sequence[float] = FRACTIONS,
) -> ZooResult:
    """Build `spec`'s model (seed 0) and run every check for each head kind, with taps at
    `fractions` of the usable rows; never raises for a model's own failure (it is recorded),
    with `timeout` seconds at most (0: no limit, and the limit needs the main thread)."""
    result = ZooResult(spec)
    start = time.perf_counter()
    stage = "build"
    if timeout:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(timeout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = spec.build()
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(BATCH, 3, spec.size, spec.size, generator=generator)
            y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=generator)
            stage = "list_layers"
            rows = usable_rows(auxhead.list_layers(model, x))
            stage = "taps"
            pick_taps(rows, fractions)
            stage = "bare model"
            reference = Reference.of(model, x)
            big = sum(p.numel() for p in model.parameters()) > 100e6
            for i, kind in enumerate(kinds):
                stage = kind
                # The last kind gets the model itself: one deep copy fewer.
                twin = model if i == len(kinds) - 1 else copy.deepcopy(model)
                result.kinds[kind] = check_kind(twin, reference, x, y, kind, rows, fractions)
                del twin
                if big:  # an AuxModel and its hooks form a cycle: free big models now
                    gc.collect()
    except _Timeout:
        result.error, result.stage = f"timed out after {timeout} s", stage
    except Exception as error:
        result.error, result.stage = first_line(error), stage
    finally:
        if timeout:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        gc.collect()
    result.seconds = time.perf_counter() - start
    return result


# --- the report --------------------------------------------------------------------------------


def format_table(results: Sequence[ZooResult], kinds: Sequence[str]) -> str:
    header = ["model", "px", *CHECKS, *kinds, "refused", "s", "taps"]
    rows = [header]
    for r in results:
        kind_marks = [
            r.kinds[k].status if k in r.kinds else (FAIL if r.error else SKIPPED) for k in kinds
        ]
        refused = sum(len(k.refusals) for k in r.kinds.values())
        rows.append(
            [
                r.spec.label,
                str(r.spec.size),
                *(r.column(c) for c in CHECKS),
                *kind_marks,
                str(refused) if refused else "",
                f"{r.seconds:.1f}",
                ", ".join(next((k.taps for k in r.kinds.values() if k.taps), [])),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_lines(results: Sequence[ZooResult]) -> list[str]:
    lines = []
    for library in ("torchvision", "timm"):
        mine = [r for r in results if r.spec.library == library]
        if not mine:
            continue
        passed = sum(r.passed for r in mine)
        failed = sum(r.failed for r in mine)
        refused = sum(r.refused for r in mine)
        seconds = sum(r.seconds for r in mine)
        lines.append(
            f"{library}: {passed}/{len(mine)} pass all checks, {failed} fail, "
            f"{refused} with a refused tap ({seconds / 60:.1f} min)"
        )
    return lines


def _cause(text: str) -> str:
    # Group errors that differ only by numbers, layer names or shapes.
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", text)
    return text[:160]


def failure_report(results: Sequence[ZooResult]) -> str:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    examples: dict[tuple[str, str], str] = {}
    for r in results:
        if r.error:
            key = (
                r.stage if r.stage in ("build", "list_layers", "taps") else "model",
                _cause(r.error),
            )
            groups[key].append(f"{r.spec.label} [{r.stage}]")
            examples.setdefault(key, r.error)
        for k in r.kinds.values():
            for check, error in k.errors.items():
                key = (check, _cause(error))
                groups[key].append(f"{r.spec.label} [{k.kind} at {', '.join(k.taps) or '?'}]")
                examples.setdefault(key, error)
    if not groups:
        return "Failures: none"
    lines = [f"Failures ({sum(r.failed for r in results)} models), grouped by check and cause:"]
    for key in sorted(groups, key=lambda k: (-len({m.split(" ")[0] for m in groups[k]}), k)):
        check, _ = key
        models = groups[key]
        lines.append(f"\n[{check}] {examples[key]}")
        lines.append(f"  {len(models)} case(s): " + "; ".join(models))
    return "\n".join(lines)


def refusal_report(results: Sequence[ZooResult]) -> str:
    lines = []
    for r in results:
        for k in r.kinds.values():
            for refusal in k.refusals:
                lines.append(f"  {r.spec.label} [{k.kind}] {refusal}")
    if not lines:
        return "Refusals: none"
    return f"Refusals ({len(lines)}; the next usable row was tried instead):\n" + "\n".join(lines)


# The timm families (modules) left out, and why. Every other timm module has a model above.
LEFT_OUT: dict[str, str] = {
    "deepseek_vit (deepseek_vit_412m*)": "a 412M-parameter VLM encoder that ran at none of the "
    "sizes tried (64, 96, 120, 128, 240, 331 px: patch 14 and a fixed grid), ~100 s to build",
    "test_* models (test_vit, test_convnext, test_byobnet, ...)": "timm's tiny test configs of "
    "families swept above",
}


def _kinds(text: str) -> list[str]:
    kinds = [k for k in text.split(",") if k]
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown kinds {bad or text!r}; choose from {list(KINDS)}"
        )
    return kinds


def _fractions(text: str) -> list[float]:
    try:
        fractions = [float(f) for f in text.split(",") if f]
    except ValueError:
        fractions = []
    if not fractions or not all(0 <= f <= 1 for f in fractions):
        raise argparse.ArgumentTypeError(f"must be numbers in [0, 1], got {text!r}")
    return fractions


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["torchvision", "timm"])
    parser.add_argument("--models", help="comma-separated names (timm ones may be 'timm/<name>')")
    parser.add_argument("--kinds", type=_kinds, default=list(KINDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per model")
    parser.add_argument(
        "--fractions",
        type=_fractions,
        default=[0.333, 0.667],
        help="where the taps are, as fractions of the usable rows (one head per fraction)",
    )
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kinds, fractions = args.kinds, args.fractions
    torch.set_num_threads(args.threads)

    specs = _select(args.only, args.models)
    gc.freeze()  # the libraries' own objects: keeps each model's gc.collect() short
    if args.list:
        for spec in specs:
            print(f"{spec.label}\t{spec.size}")
        return 0
    results = []
    start = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        result = check_model(spec, kinds, timeout=args.timeout, fractions=fractions)
        results.append(result)
        marks = " ".join(f"{k}:{result.kinds[k].status}" for k in result.kinds)
        print(f"[{i}/{len(specs)}] {spec.label} {result.seconds:.1f}s {marks}", file=sys.stderr)
        if result.failed:  # the details now, in case the sweep dies before its report
            print(failure_report([result]), file=sys.stderr)
        sys.stderr.flush()
    minutes = (time.perf_counter() - start) / 60

    print(
        f"auxhead zoo sweep: {len(results)} models, batch {BATCH}, {NUM_CLASSES} classes, "
        f"kinds {kinds}, taps at {fractions} of the usable rows, {args.threads} thread(s), "
        f"torch {torch.__version__}, {minutes:.1f} min"
    )
    print()
    print(format_table(results, kinds))
    print()
    for line in summary_lines(results):
        print(line)
    print()
    print(failure_report(results))
    print()
    print(refusal_report(results))
    if args.models is None and args.only != "torchvision":
        print()
        print("Left out (timm):")
        for family, why in LEFT_OUT.items():
            print(f"  {family}: {why}")
    return 1 if any(r.failed for r in results) else 0


def _select(only: str | None, models: str | None) -> list[ModelSpec]:
    """The specs for --only / --models: a name torchvision builds is torchvision's unless it
    starts with "timm/" or --only timm is given."""
    if models is None:
        tv = torchvision_specs() if only in (None, "torchvision") else []
        return tv + (timm_specs() if only in (None, "timm") else [])
    import torchvision

    builders = set(torchvision.models.list_models(module=torchvision.models))
    names = [name.strip() for name in models.split(",") if name.strip()]
    tv = [n for n in names if n in builders and only != "timm"]
    tm = [n.removeprefix("timm/") for n in names if n not in tv]
    return torchvision_specs(tv) + (timm_specs(tm) if tm else [])


if __name__ == "__main__":
    sys.exit(main())
