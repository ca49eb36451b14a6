"""`EarlyExit.export`: a `torch.export` program, or an ONNX file, that routes.

The exported forward runs the stages of a staged `EarlyExit` with the calibrated thresholds
and temperatures baked in, and narrows the batch as the eager forward does: at each active
exit, a `torch.cond` on "every sample leaves" returns at once; otherwise its branch picks the
samples that stay (`nonzero`, `index_select`: a data-dependent batch size, an unbacked symbol
to torch.export) and runs the rest of the network on them only, and their results are written
back into the (B, K) output by batch index (`index_copy`). So a batch of 64 saves compute as
the eager forward does, and batch size 1 routes per sample. It returns what the eager forward
returns: the logits (B, K), or with `return_exits` the logits and each sample's exit index
(B,), `len(taps)` for the main head.

The narrowing happens inside the branch, not before the `torch.cond`: there the branch can
state that at least one sample stays (`torch._check`), which the operators of the later stages
need (a convolution asks whether its input is empty); stated outside, export turns it into a
runtime assertion that fails when the whole batch leaves.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auxhead.attach import AuxModel
from auxhead.exits._forward import head_copy
from auxhead.exits._graph import GraphPlan, two_or_more
from auxhead.exits._route import Criterion, leaves, model_logits
from auxhead.exits._stages import Plan

__all__ = ["GraphRouted", "Routed", "export_program"]


class Routed(nn.Module):
    """The staged forward of an `EarlyExit`, as one module torch.export can trace: (B, ...)
    inputs -> (B, K) logits, or (logits, (B,) exit indices) with `return_exits`."""

    def __init__(
        self,
        plan: Plan,
        aux_model: AuxModel,
        *,
        thresholds: Sequence[float],
        temperatures: Sequence[float],
        criterion: Criterion,
        return_exits: bool,
    ) -> None:
        super().__init__()
        taps = list(aux_model.taps)
        self.stages = nn.ModuleList(_as_module(stage.run) for stage in plan.stages)
        self.ends = list(plan.ends)
        active = [i for i, t in enumerate(thresholds) if t < 1.0]
        self.exits = active  # exit indices that can take samples, in order
        self.heads = nn.ModuleList(aux_model.head(taps[i]) for i in active)
        self.thresholds = [thresholds[i] for i in active]
        self.temperatures = [temperatures[i] for i in active]
        self.n_exits = len(taps)
        self.criterion = criterion
        self.head_inputs = [_HeadInput(aux_model, taps[i]) for i in active]
        self.return_exits = return_exits

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(x.shape[0], device=x.device)  # (B,) batch index of each sample
        logits, exits = self._from(0, 0, x, rows, None, None)
        return (logits, exits) if self.return_exits else logits

    def _run(self, start: int, stop: int, h: torch.Tensor) -> torch.Tensor:
        for index in range(start, stop):
            h = self.stages[index](h)
        return h

    def _from(
        self,
        k: int,
        position: int,
        h: torch.Tensor,
        rows: torch.Tensor,
        out: torch.Tensor | None,
        exits: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the n samples `h` (batch indices `rows`, (n,)) from stage `position` on,
        deciding at active exit `k` and after; `out` (B, K) and `exits` (B,) hold what the
        earlier exits wrote (None before the first). Returns them with these samples' rows
        written."""
        if k == len(self.exits):  # no exit left: the main output
            logits = self._run(position, len(self.stages), h)
            if out is None:  # no exit is active: the model's own output
                return logits, _filled(logits, self.n_exits)
            out = out.index_copy(0, rows, logits.to(out.dtype))
            return out, exits.index_fill(0, rows, self.n_exits)
        end = self.ends[self.exits[k]]
        h = self._run(position, end + 1, h)
        logits = self.heads[k](self.head_inputs[k](h))
        t = self.temperatures[k]
        leave = leaves(self.criterion(logits if t == 1.0 else logits / t), self.thresholds[k])
        # Every sample here takes this exit's logits; those that stay are overwritten later.
        if out is None:  # the first exit sees the whole batch, in order
            out = logits
            exits = _filled(logits, self.exits[k])
        else:
            out = out.index_copy(0, rows, logits.to(out.dtype))
            exits = exits.index_fill(0, rows, self.exits[k])

        def everyone_leaves(h, leave, rows, out, exits):
            return out.clone(), exits.clone()

        def some_stay(h, leave, rows, out, exits):
            stay = torch.nonzero(~leave).squeeze(1)  # (m,), m >= 1 data-dependent
            torch._check(stay.shape[0] >= 1)  # true in this branch; later stages need it
            h, rows = h.index_select(0, stay), rows.index_select(0, stay)
            return self._from(k + 1, end + 1, h, rows, out, exits)

        return torch.cond(leave.all(), everyone_leaves, some_stay, (h, leave, rows, out, exits))


class GraphRouted(nn.Module):
    """The forward of an `EarlyExit` on a token model (stages cut from its export graph), as
    one module torch.export can trace: the model's keyword inputs, positionally in
    `plan.names` order -> (B, K) logits, or (logits, (B,) exit indices) with `return_exits`.
    As `Routed`, each active exit is a `torch.cond`; the samples that stay take their rows of
    every batch-first slot of the state, and of the real tokens the heads pool over."""

    def __init__(
        self,
        plan: GraphPlan,
        aux_model: AuxModel,
        *,
        thresholds: Sequence[float],
        temperatures: Sequence[float],
        criterion: Criterion,
        return_exits: bool,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.stages = nn.ModuleList(plan.stages)
        self.aux_model = [aux_model]  # in a list: not a submodule (its hooks stay out)
        self.heads = nn.ModuleDict(
            {str(i): aux_model.head(t) for i, t in enumerate(aux_model.taps)}
        )
        self.taps = list(aux_model.taps)
        self.exits = [i for i, t in enumerate(thresholds) if t < 1.0]
        self.thresholds = list(thresholds)
        self.temperatures = list(temperatures)
        self.criterion = criterion
        self.return_exits = return_exits

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        aux_model = self.aux_model[0]
        kwargs = dict(zip(self.plan.names, inputs, strict=True))
        keep = aux_model.real_tokens((), kwargs)
        state = self.stages[0](*inputs)
        batch = state[0].shape[0]
        rows = torch.arange(batch, device=state[0].device)
        logits, exits = self._from(0, 1, state, keep, rows, None, None)
        return (logits, exits) if self.return_exits else logits

    def _run(self, start: int, stop: int, state: tuple) -> tuple:
        """Stages `start` to `stop` - 1 (stage i ends at tap i; the last gives the outputs)."""
        for index in range(start, stop):
            state = self.stages[index](*state)
        return state

    def _from(
        self,
        k: int,
        position: int,
        state: tuple,
        keep: torch.Tensor | None,
        rows: torch.Tensor,
        out: torch.Tensor | None,
        exits: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `Routed._from`, on the state (slots) of the samples `rows` before stage
        `position`."""
        n_exits = len(self.taps)
        if k == len(self.exits):  # no exit left: the main output
            flat = self._run(position, len(self.stages), state)
            logits = model_logits(self.plan.output(flat))
            if out is None:
                return logits, _filled(logits, n_exits)
            out = out.index_copy(0, rows, logits.to(out.dtype))
            return out, exits.index_fill(0, rows, n_exits)
        index = self.exits[k]
        state = self._run(position, index + 1, state)
        tap = self.taps[index]
        aux_model = self.aux_model[0]
        features = aux_model.arrange(tap, state[0]).clone()
        logits = aux_model.head_logits(tap, features, keep)
        t = self.temperatures[index]
        scores = self.criterion(logits if t == 1.0 else logits / t)
        leave = leaves(scores, self.thresholds[index])
        if out is None:
            out, exits = logits, _filled(logits, index)
        else:
            out = out.index_copy(0, rows, logits.to(out.dtype))
            exits = exits.index_fill(0, rows, index)
        narrow = self.plan.narrow[index]
        tensors = [i for i, v in enumerate(state) if isinstance(v, torch.Tensor)]
        others = {i: v for i, v in enumerate(state) if i not in tensors}  # sizes: as they are
        has_keep = keep is not None

        def everyone_leaves(leave, out, exits, rows, keep, *slots):
            return out.clone(), exits.clone()

        def some_stay(leave, out, exits, rows, keep, *slots):
            stay = torch.nonzero(~leave).squeeze(1)  # (m,), m >= 1 data-dependent
            torch._check(stay.shape[0] >= 1)  # true in this branch; later stages need it
            full = dict(others)
            for i, value in zip(tensors, slots, strict=True):
                full[i] = value.index_select(0, stay) if narrow[i] else value
            narrowed = tuple(full[i] for i in range(len(state)))
            kept = keep.index_select(0, stay) if has_keep else None
            rows = rows.index_select(0, stay)
            return self._from(k + 1, index + 1, narrowed, kept, rows, out, exits)

        # Without real tokens, `rows` stands in for `keep` (an operand must be a tensor).
        slots = (state[i] for i in tensors)
        operands = (leave, out, exits, rows, keep if has_keep else rows, *slots)
        return torch.cond(leave.all(), everyone_leaves, some_stay, operands)


def _filled(logits: torch.Tensor, index: int) -> torch.Tensor:
    """(B,) exit indices, all `index`, dense (a `full_like` of a column would keep its stride,
    which `torch.cond` refuses in an output)."""
    return torch.full(logits.shape[:1], index, dtype=torch.long, device=logits.device)


class _HeadInput:
    """aux_model.head_input for one tap, copied as the eager forward copies it (`head_copy`)
    (a plain callable: not a submodule)."""

    def __init__(self, aux_model, tap: str) -> None:
        self.aux_model, self.tap = aux_model, tap

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return head_copy(self.aux_model, self.tap, output)


def _as_module(run: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    return run if isinstance(run, nn.Module) else _Call(run)


class _Call(nn.Module):
    """A functional stage (torchvision ResNet's flatten) as a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


def _two_or_more(sample: torch.Tensor) -> torch.Tensor:
    """A tracing sample of at least two: torch.export specialises a dimension of size 1 to 1
    (a .pt2 then fails its dynamic-batch check, an ONNX file takes batch size 1 only), so a
    one-image sample is traced twice over; the batch size stays dynamic either way."""
    if not isinstance(sample, torch.Tensor) or sample.dim() == 0 or sample.shape[0] == 0:
        got = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise ValueError(
            f"export traces with a sample batch (B, ...), B >= 1, got {got}; pass one or more "
            "inputs as the model takes them"
        )
    return torch.cat([sample, sample]) if sample.shape[0] == 1 else sample


def _check_dynamic_batch(path: Path, shown: str) -> None:
    """Refuse an ONNX file whose input batch came out fixed (torch's exporter may fall back to
    the sample's shapes without failing): it would reject every other batch size."""
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape
    first = dims.dim[0] if dims.dim else None
    if first is None or not first.dim_param:
        fixed = first.dim_value if first is not None else "none"
        path.unlink(missing_ok=True)
        raise ValueError(
            f"torch's ONNX exporter fixed the batch size of {shown} at {fixed}, so it would "
            "reject other batch sizes; the file is not written. Export to a .pt2 file, or "
            "report the model: its forward fixes the batch size somewhere"
        )


def export_program(
    routed: Routed | GraphRouted, path: str | Path, sample: torch.Tensor | dict[str, Any]
) -> Path:
    """Export `routed` to `path`, traced on `sample` with a dynamic batch size: a `torch.export`
    program for .pt2 (load it with `torch.export.load(path).module()`), or one self-contained
    ONNX file for .onnx (the `torch.cond`s become ONNX `If`s), written by torch's ONNX
    exporter, which needs the onnx and onnxscript packages (`pip install 'auxhead[onnx]'`).
    A `Routed` takes one input, "x"; a `GraphRouted` the model's keyword inputs, by name (the
    token dimension stays dynamic too)."""
    path = check_path(path)
    routed = routed.eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    if isinstance(routed, GraphRouted):
        inputs = _named_inputs(routed.plan.names, sample)
        names = list(routed.plan.names)
        # The sizes the model's own trace fixed stay fixed (the file says so); others dynamic.
        per_input = tuple(
            {
                0: batch,
                **{d: torch.export.Dim.AUTO for d, size in enumerate(sizes) if d and size is None},
            }
            for sizes in routed.plan.fixed
        )
        shapes = (per_input,)  # forward(*inputs): one varargs parameter
    else:
        inputs, names, shapes = (_two_or_more(sample),), ["x"], ({0: batch},)
    with _written(path) as partial:
        _write(routed, partial, inputs, names, shapes, shown=path.name)
    return path


def check_path(path: str | Path) -> Path:
    """`path` as a Path, refused (naming it) unless it ends in .pt2 or .onnx in a folder that
    exists and can be written to: checked before any tracing."""
    path = Path(path)
    if path.suffix not in (".pt2", ".onnx"):
        raise ValueError(
            f"export writes a torch.export program (.pt2) or an ONNX file (.onnx), got "
            f"{path.name!r}"
        )
    _partial(path).unlink()
    return path


def _partial(path: Path) -> Path:
    """A new empty file beside `path`, or a ValueError naming the folder."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=folder)
    except OSError as error:
        raise ValueError(
            f"cannot write {path}: {error.strerror or error} ({folder}); choose a folder that "
            "exists and that you can write to"
        ) from None
    os.close(handle)
    return Path(name)


@contextlib.contextmanager
def _written(path: Path) -> Iterator[Path]:
    """A partial file beside `path` to write to, renamed to `path` when the block ends
    without error, removed otherwise (an interrupt, a failed check): nothing half-written is
    left under the name asked for. A folder that is missing or not writable is refused
    first, naming it, before the (long) tracing."""
    partial = _partial(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write(
    routed: nn.Module, path: Path, inputs: tuple, names: list[str], shapes: tuple, shown: str
) -> None:
    """Export `routed` to `path` (a partial file; `shown` is the name asked for)."""
    if path.suffix == ".onnx":
        missing = [
            name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None
        ]
        if missing:
            raise ValueError(
                f"writing {shown} needs the {' and '.join(missing)} package(s): "
                "pip install 'auxhead[onnx]' (or export to a .pt2 file)"
            )
        with (
            torch.no_grad(),
            contextlib.redirect_stdout(io.StringIO()),  # its progress lines
            contextlib.redirect_stderr(io.StringIO()),  # and notes; failures still raise
            warnings.catch_warnings(),
        ):
            # One batch dimension shared by several inputs: the exporter names it once, and
            # says so.
            warnings.filterwarnings("ignore", message=r".*shares the same shape constraints")
            program = torch.onnx.export(
                routed,
                inputs,
                dynamo=True,
                dynamic_shapes=shapes,
                input_names=names,
                output_names=["logits", "exit"] if routed.return_exits else ["logits"],
                verbose=False,
            )
        program.save(str(path))
        _check_dynamic_batch(path, shown)
        return
    with torch.no_grad():
        program = torch.export.export(routed, inputs, dynamic_shapes=shapes)
    torch.export.save(program, path)


def _named_inputs(names: Sequence[str], sample: Any) -> tuple[torch.Tensor, ...]:
    """The sample's keyword inputs in `names` order, at batch size >= 2 (`two_or_more`)."""
    if not isinstance(sample, dict) or any(name not in sample for name in names):
        got = sorted(sample) if isinstance(sample, dict) else type(sample).__name__
        raise ValueError(
            f"export of this token model traces with a dict of its inputs {list(names)}, got "
            f"{got}; pass a batch such as `early.export(path, batch)` with those keys"
        )
    inputs = tuple(sample[name] for name in names)
    if any(not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] == 0 for v in inputs):
        raise ValueError(f"export traces with a sample batch: tensors {list(names)} of (B, ...)")
    doubled = two_or_more(dict(zip(names, inputs, strict=True)))
    return tuple(doubled[name] for name in names)
