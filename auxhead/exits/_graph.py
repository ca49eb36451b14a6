"""Stages cut from a model's `torch.export` graph, for early exits on token models: Hugging Face
encoders and `nn.TransformerEncoder` stacks, called with keyword inputs and a padding mask,
which neither the known cuts nor torch.fx can split (`_stages`, `_fx`).

torch.export traces the model in eval mode on a sample batch with a dynamic batch size, so
every value in the graph says whether its first dimension is the batch. The graph is cut
after each tap's last operation. Unlike the fx cut, any value may cross a cut, as one slot of
the state handed from stage to stage: the tap's output (slot 0), the attention mask the model
built before its first layer, position ids, the sequence length. When samples exit, a slot whose
first dimension is the batch narrows with them; a slot without the batch (position ids
(1, N)) goes on as it is; the batch size itself, where it crosses a cut, is read again from a
narrowed slot. A value that mixes the batch into another dimension ((B * heads, N, N)) cannot
be narrowed by rows: such a model is refused, with the value named.

Cutting checks itself on the sample: each tap's slot must equal what the tap's head reads in
the model's own forward, and the stages run one after the other must give the model's output.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from auxhead._hooks import HookSet
from auxhead._probe import batch_size, eval_mode, first_tensor, resolve
from auxhead._tokens import forward_signature
from auxhead.attach import AuxModel
from auxhead.exits._route import MAIN, check_logits, model_logits
from auxhead.exits._stages import NotStageable

__all__ = [
    "GraphPlan",
    "OutsideTrace",
    "as_keywords",
    "forward_graph",
    "graph_cut",
    "key",
    "two_or_more",
]

from auxhead.exits._forward import Decide

TOLERANCE = 1e-4  # the graph's operators against the model's eager ones (SDPA, fast paths)


@dataclass(frozen=True)
class GraphPlan:
    """A model as `len(taps) + 1` stages cut from its export graph. Stage 0 takes the model's
    keyword inputs (`names`, in order) and returns the state at the first tap; stage i
    (0 < i <= len(taps) - 1) the state at tap i; the last returns the model's outputs,
    flattened (`out_spec` rebuilds them). Slot 0 of the state at a tap is its output."""

    stages: tuple[nn.Module, ...]
    narrow: tuple[tuple[bool, ...], ...]  # per tap: which slots of its state are batch-first
    names: tuple[str, ...]  # the keyword inputs, in stage 0's order (the forward's)
    out_spec: pytree.TreeSpec
    # per input, per dimension: the size the trace fixed it at, or None (dynamic; the batch)
    fixed: tuple[tuple[int | None, ...], ...] = ()

    def output(self, flat: Sequence[Any]) -> Any:
        """The model's output from the last stage's flat outputs."""
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def fits(self, kwargs: dict[str, Any]) -> bool:
        """Whether a call's inputs have the sizes the trace fixed (a model whose forward fixes
        the sequence length is cut once per length)."""
        for name, sizes in zip(self.names, self.fixed, strict=True):
            shape = tuple(kwargs[name].shape)
            if len(shape) != len(sizes) or any(
                size is not None and size != got for size, got in zip(sizes, shape, strict=True)
            ):
                return False
        return True

    @property
    def fixes_sizes(self) -> bool:
        """Whether the trace fixed a dimension of an input (beyond any of size 1)."""
        return any(size is not None and size > 1 for sizes in self.fixed for size in sizes)


def as_keywords(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call `model(*args, **kwargs)` as keyword arguments only, by `model.forward`'s
    parameter names and in their order (so a dict's key order changes nothing); a TypeError
    naming the model when they do not bind, or when no input is a tensor."""
    name = type(model).__name__
    if len(args) == 1 and isinstance(args[0], Mapping) and not kwargs:
        raise TypeError(
            f"{name} takes its inputs by keyword: call early(**batch), not early(batch)"
        )
    signature = forward_signature(model)
    if args:
        if signature is None:
            raise TypeError(f"{name}'s inputs must be given by keyword")
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{name}.forward does not take these inputs: {error}") from None
        var = [p.name for p in signature.parameters.values() if p.kind is p.VAR_POSITIONAL]
        if any(param in bound.arguments for param in var):
            raise TypeError(
                f"{name}.forward takes *{var[0]}; early exits on token models pass inputs by name"
            )
        kwargs = dict(bound.arguments)
    if not any(isinstance(value, torch.Tensor) for value in kwargs.values()):
        got = ", ".join(f"{k}={type(v).__name__}" for k, v in kwargs.items()) or "nothing"
        raise TypeError(f"{name} got no tensor input ({got}); call early(input_ids=..., ...)")
    order = list(signature.parameters) if signature is not None else []
    first = {key: kwargs[key] for key in order if key in kwargs}
    return first | {key: value for key, value in kwargs.items() if key not in first}


class OutsideTrace(Exception):
    """A batch the export graph was not traced for (its guards refuse the shapes)."""


def key(kwargs: dict[str, Any]) -> tuple:
    """Which plans a call may use: its inputs by name, with each tensor's dtype and number of
    dimensions and each other value itself (the trace bakes those in)."""
    return tuple(
        sorted(
            (name, (str(value.dtype), value.dim()))
            if isinstance(value, torch.Tensor)
            else (name, ("value", repr(value)))
            for name, value in kwargs.items()
        )
    )


def two_or_more(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A tracing sample of batch size >= 2 (torch.export specialises a dimension of size 1):
    a batch of one, each batch-first input twice over."""
    batch = batch_size(kwargs)
    if batch > 1:
        return kwargs
    return {
        name: torch.cat([value, value]) if _batch_first(value, batch) else value
        for name, value in kwargs.items()
    }


def _batch_first(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch


def _export(model: nn.Module, kwargs: dict[str, Any]) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=65536)
    size = batch_size(kwargs)
    shapes = {
        name: (
            {0: batch, **{d: torch.export.Dim.AUTO for d in range(1, value.dim())}}
            if _batch_first(value, size)
            else None
        )
        for name, value in kwargs.items()
    }
    quiet = logging.getLogger("torch._export.non_strict_utils")  # "0/1 specialized" notes
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with eval_mode(model), torch.no_grad():
            return torch.export.export(model, (), kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as error:  # export raises many kinds; the first line says which
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise NotStageable(
            f"torch.export cannot trace {type(model).__name__} with a dynamic batch size "
            f"({type(error).__name__}: {first[:200]})"
        ) from None
    finally:
        quiet.setLevel(level)


def _scope(node: fx.Node) -> set[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return {path for path, _ in stack.values()}


def _symbol(value: Any) -> Any:
    """The sympy expression of a SymInt (or an int)."""
    return value.node.expr if isinstance(value, torch.SymInt) else value


def graph_cut(aux_model: AuxModel, kwargs: dict[str, Any]) -> GraphPlan:
    """Stages of `aux_model.model` ending at each tap, cut from its export graph traced on the
    keyword inputs `kwargs` (a sample batch), checked on that batch.

    Raises:
        NotStageable: the model does not export with a dynamic batch size, a tap does not run
            (or runs twice) in the graph, or a value crossing a cut mixes the batch into
            another dimension; or the stages do not reproduce the model on the sample.
        ValueError: the taps are not listed in the order they run.
    """
    model, taps = aux_model.model, list(aux_model.taps)
    sample = two_or_more(kwargs)
    program = _export(model, sample)
    module = program.module()
    nodes = list(module.graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    inputs = [node for node in nodes if node.op == "placeholder"]
    batch_symbol = _symbol(inputs[0].meta["val"].shape[0])

    # Each tap's scope in the graph; the cut goes after its last operation.
    ends: list[int] = []
    for tap in taps:
        inside = [position[node] for node in nodes if tap in _scope(node)]
        if not inside:
            raise NotStageable(f"tap {tap!r} runs no operation in the export graph")
        ends.append(max(inside))
    if ends != sorted(ends):
        order = [tap for _, tap in sorted(zip(ends, taps, strict=True))]
        raise ValueError(
            f"early exits need the taps in the order they run: attach with at={order}, not {taps}"
        )
    tap_nodes = _tap_nodes(aux_model, module, nodes, sample)

    def is_value(node: fx.Node) -> bool:
        return node.op not in ("get_attr", "output")

    crossing: list[list[fx.Node]] = []
    read: list[dict[fx.Node, int]] = []  # per cut: sizes read from the tap's output, by dim
    narrow: list[tuple[bool, ...]] = []
    for tap, end in zip(taps, ends, strict=True):
        tap_node = tap_nodes[tap]
        if not _batch_first_value(tap_node, batch_symbol):
            raise NotStageable(f"tap {tap!r} outputs no batch-first tensor")
        slots: list[fx.Node] = [tap_node]
        sizes: dict[fx.Node, int] = {}
        dims = [_symbol(d) for d in tap_node.meta["val"].shape]

        def carry(
            node: fx.Node,
            tap: str = tap,
            slots: list[fx.Node] = slots,
            sizes: dict[fx.Node, int] = sizes,
            dims: list[Any] = dims,
        ) -> None:
            """Make `node` available after the cut: as a slot, or recomputed there."""
            value = node.meta.get("val")
            if isinstance(value, torch.SymInt) and _symbol(value) in dims:
                sizes[node] = dims.index(_symbol(value))  # a size of the tap's output: read
                return
            kind = _kind(node, batch_symbol)
            if kind in ("batch", "shared"):
                if node not in slots:
                    slots.append(node)
            elif kind == "derived":  # size arithmetic with the batch in it: redone after
                for arg in node.all_input_nodes:
                    carry(arg)
            elif kind is None:
                value = node.meta.get("val")
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else value
                raise NotStageable(
                    f"{node.name!r} ({shape}) crosses the cut after tap {tap!r} with the "
                    "batch mixed into another dimension, so it cannot follow the samples that "
                    "stay"
                )

        for node in nodes[: end + 1]:
            if is_value(node) and any(position[user] > end for user in node.users):
                carry(node)
        crossing.append(slots)
        read.append(sizes)
        narrow.append(tuple(_kind(node, batch_symbol) == "batch" for node in slots))

    stages = []
    bounds = list(zip([-1, *ends], [*ends, len(nodes) - 1], strict=True))
    for index, (start, end) in enumerate(bounds):
        incoming = crossing[index - 1] if index else inputs
        sizes = read[index - 1] if index else {}
        outgoing = crossing[index] if index < len(taps) else None
        part = nodes[start + 1 : end + 1]
        kind = functools.partial(_kind, batch_symbol=batch_symbol)
        graph = _stage_graph(part, incoming, sizes, outgoing, kind)
        stages.append(fx.GraphModule(module, graph, class_name=f"Stage_{index}"))
    names = tuple(node.name for node in inputs)
    fixed = tuple(
        tuple(None if index == 0 or _free(d) else int(_symbol(d)) for index, d in enumerate(shape))
        for shape in (node.meta["val"].shape for node in inputs)
    )
    plan = GraphPlan(tuple(stages), tuple(narrow), names, program.call_spec.out_spec, fixed)
    _check(plan, aux_model, sample)
    return plan


def _kind(node: fx.Node, batch_symbol: Any) -> str | None:
    """How a value crossing a cut follows the samples: "batch" (narrowed by rows), "shared"
    (no batch in it: passed on), "derived" (size arithmetic with the batch in it: computed
    again from its inputs; the batch size itself is read from the tap's output), or None (it
    cannot follow)."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        if _batch_first_value(node, batch_symbol):
            return None if any(batch_symbol in _free(d) for d in value.shape[1:]) else "batch"
        return None if any(batch_symbol in _free(d) for d in value.shape) else "shared"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
        if batch_symbol not in _free(value):
            return "shared"
        return "derived" if node.op == "call_function" else None
    return "shared" if value is None else None


def _free(value: Any) -> set:
    expr = _symbol(value)
    return set(getattr(expr, "free_symbols", ()))


def _batch_first_value(node: fx.Node, batch_symbol: Any) -> bool:
    value = node.meta.get("val")
    return (
        isinstance(value, torch.Tensor)
        and value.dim() > 0
        and _symbol(value.shape[0]) == batch_symbol
    )


def _stage_graph(
    part: list[fx.Node],
    incoming: list[fx.Node],
    sizes: dict[fx.Node, int],
    outgoing: list[fx.Node] | None,
    kind: Callable[[fx.Node], str | None],
) -> fx.Graph:
    """A graph running `part` on `incoming` (one placeholder each, slot 0 the previous tap's
    output; the model's inputs for the first stage). The sizes in `sizes` (the batch size,
    the sequence length) are read again from slot 0, by dimension, and size arithmetic with
    the batch computed again. It returns the values of `outgoing`, or the model's outputs
    (flat) when `outgoing` is None."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for slot, node in enumerate(incoming):
        env[node] = graph.placeholder(node.name if node.op == "placeholder" else f"slot_{slot}")
    for node, dim in sizes.items():
        env[node] = graph.call_function(torch.ops.aten.sym_size.int, (env[incoming[0]], dim))

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr" or kind(node) == "derived":  # every stage reads (or redoes)
            env[node] = graph.node_copy(node, lookup)
        else:
            raise NotStageable(f"a stage needs {node.name!r}, which does not cross the cut")
        return env[node]

    for node in part:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], lookup))
            return graph
        if node.op == "placeholder":
            continue
        env[node] = graph.node_copy(node, lookup)
    assert outgoing is not None
    graph.output(tuple(lookup(node) for node in outgoing))
    return graph


def _tap_nodes(
    aux_model: AuxModel, module: fx.GraphModule, nodes: list[fx.Node], sample: dict[str, Any]
) -> dict[str, fx.Node]:
    """The node of each tap whose value is what the tap's head reads (before any permute),
    found by running the graph on the sample beside the model's own forward."""
    taps = list(aux_model.taps)
    wanted: dict[str, torch.Tensor] = {}

    def grab(tap: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            wanted[tap] = aux_model.tap_tensor(tap, output).detach().clone()

        return hook

    with eval_mode(aux_model.model), torch.no_grad():
        with HookSet() as hooks:
            for tap, layer in resolve(aux_model.model, taps).items():
                hooks.forward(layer, grab(tap))
            aux_model.model(**sample)
        values = _interpret(module, sample)
    keep = aux_model.real_tokens((), sample)
    found = {}
    for tap in taps:
        target = wanted.get(tap)
        candidates = [
            node
            for node in nodes
            if tap in _scope(node)
            and target is not None
            and isinstance(values.get(node), torch.Tensor)
            and _same(values[node], target, keep)
        ]
        if not candidates:
            raise NotStageable(f"no value in the export graph matches the output of tap {tap!r}")
        found[tap] = candidates[-1]
    return found


def _same(dense: torch.Tensor, target: torch.Tensor, keep: torch.Tensor | None) -> bool:
    """Whether a graph value equals a tap's output: a dense tensor, or a nested one (one
    sequence of real tokens per sample, as `nn.TransformerEncoder` passes them in eval),
    against the rows of `keep`."""
    if not target.is_nested:
        return dense.shape == target.shape and torch.allclose(
            dense.float(), target.float(), atol=TOLERANCE
        )
    samples = target.unbind()
    if keep is None or dense.dim() != 3 or len(samples) != dense.shape[0]:
        return False
    return all(
        row[mask].shape == sample.shape
        and torch.allclose(row[mask].float(), sample.float(), atol=TOLERANCE)
        for row, mask, sample in zip(dense, keep, samples, strict=True)
    )


def _interpret(module: fx.GraphModule, sample: dict[str, Any]) -> dict[fx.Node, Any]:
    """Every node's value, the graph run on the sample's inputs."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            values[node] = result = super().run_node(node)
            return result

    placeholders = [node.name for node in module.graph.nodes if node.op == "placeholder"]
    Recorder(module).run(*(sample[name] for name in placeholders))
    return values


def _check(plan: GraphPlan, aux_model: AuxModel, sample: dict[str, Any]) -> None:
    """The stages, run one after the other on the sample, give the model's output, and each
    head on its stage's slot 0 (pooled over `real_tokens`) the logits it gives in the
    AuxModel's own forward."""
    keep = aux_model.real_tokens((), sample)
    with eval_mode(aux_model), torch.no_grad():
        with aux_model.heads_enabled():
            expected = model_logits(aux_model(**sample))
        heads, aux_model.aux_outputs = aux_model.aux_outputs, {}
        state = plan.stages[0](*(sample[name] for name in plan.names))
        for index, tap in enumerate(aux_model.taps):
            if index:
                state = plan.stages[index](*state)
            got = aux_model.run_head(tap, aux_model.arrange(tap, state[0]).clone(), keep)
            if not _close(got, heads[tap]):
                raise NotStageable(
                    f"the head at {tap!r} reads other tokens in the stages than in the model's "
                    "forward (attach with mask=, saying which tokens are real)"
                )
        got = model_logits(plan.output(plan.stages[-1](*state)))
    if not _close(got, expected):
        raise NotStageable("the stages cut from the export graph do not reproduce the model")


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.shape == expected.shape and torch.allclose(got, expected, atol=TOLERANCE)


def forward_graph(
    kwargs: dict[str, Any],
    plan: GraphPlan,
    aux_model: AuxModel,
    active: Sequence[bool],
    decide: Decide,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) keyword inputs -> (B, K) logits and (B,) exit indices, stage by stage; the
    samples that exit leave the batch, with their rows of every batch-first slot and of
    `keep` (the real tokens the heads pool over)."""
    taps = aux_model.taps
    missing = [name for name in plan.names if name not in kwargs]
    if missing:
        raise TypeError(f"the model was cut for inputs {list(plan.names)}; {missing} missing")
    flat = [kwargs[name] for name in plan.names]
    batch = batch_size(flat)
    device = first_tensor(flat).device
    exits = torch.full((batch,), len(taps), dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)
    out: torch.Tensor | None = None
    try:
        state = plan.stages[0](*flat)
    except AssertionError as error:  # the graph's input guards (a length it was fixed at)
        if "Guard failed" in str(error):
            raise OutsideTrace(str(error)) from None
        raise
    for index, tap in enumerate(taps):
        if index:
            state = plan.stages[index](*state)
        if not active[index]:
            continue
        features = aux_model.arrange(tap, state[0]).clone()
        logits, leave = decide(index, features, keep)
        if out is None:
            out = logits.new_empty((batch, *logits.shape[1:]))
        logits = check_logits(logits, out, tap)
        if not bool(leave.any()):
            continue
        out[rows[leave]] = logits[leave]
        exits[rows[leave]] = index
        stay = ~leave
        rows = rows[stay]
        if rows.numel() == 0:
            return out, exits
        keep = keep[stay] if keep is not None else None
        state = tuple(
            value[stay] if flag else value
            for value, flag in zip(state, plan.narrow[index], strict=True)
        )
    logits = model_logits(plan.output(plan.stages[-1](*state)))
    if out is None:
        return logits, exits
    out[rows] = check_logits(logits, out, MAIN).to(out.dtype)
    return out, exits
