"""Cut any `torch.fx`-traceable model into stages at its taps, for `EarlyExit`'s per-sample
routing (the `_stages` cutter knows only nn.Sequential and ResNets).

The model is traced with its taps kept as leaf modules, so each tap is one node of the graph;
the graph is split at those nodes into one `GraphModule` per stage, each running the model's
own operations in their order. A cut is only valid where the tap's output is the one value
that crosses it (the case at block boundaries of EfficientNet, MobileNet, RegNet, ConvNeXt,
DenseNet, ViT, Swin, ...): a later stage that needs anything else computed before the tap
(a skip connection around the tap, a batch size read earlier) would see it with the exited
samples still in, so such a model is refused with the reason, and runs in generic mode.
Parameters and buffers (get_attr nodes) are not values: each stage reads its own.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

from torch import fx, nn

from auxhead._probe import eval_mode
from auxhead.exits._stages import NotStageable, Plan, Stage, cut

__all__ = ["fx_cut", "plan_stages"]


def plan_stages(model: nn.Module, taps: Sequence[str]) -> tuple[Plan | None, str]:
    """Stages for per-sample routing, and why (not): the known forwards first (nn.Sequential,
    ResNets: the modules themselves run), then any model torch.fx can trace and split."""
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


class _TapTracer(fx.Tracer):
    """torch.fx's tracer, with the taps kept as leaves (one call_module node each)."""

    def __init__(self, taps: Sequence[str]) -> None:
        super().__init__()
        self.taps = set(taps)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.taps or super().is_leaf_module(
            m, module_qualified_name
        )


def _trace(model: nn.Module, taps: Sequence[str]) -> fx.Graph:
    before = _dict_keys(model)
    try:
        graph = _TapTracer(taps).trace(model)
    except Exception as error:  # fx raises many kinds (TraceError, TypeError, ...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise NotStageable(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {first[:200]})"
        ) from None
    finally:
        _forget_proxies(model, before)
    own = set(graph.nodes)
    for node in graph.nodes:
        stale = [arg.name for arg in node.all_input_nodes if arg not in own]
        if stale:
            raise NotStageable(
                f"the torch.fx graph of {type(model).__name__} uses {stale[0]!r}, a value left "
                "from an earlier trace (its forward caches computed tensors, as timm's LeViT "
                "does its attention biases)"
            )
    return graph


def _dict_keys(model: nn.Module) -> dict[tuple[int, str], set]:
    """The keys of each dict a module of `model` keeps as an attribute (a cache)."""
    return {
        (id(module), attr): set(value)
        for module in model.modules()
        for attr, value in vars(module).items()
        if isinstance(value, dict) and not attr.startswith("_")
    }


def _forget_proxies(model: nn.Module, before: dict[tuple[int, str], set]) -> None:
    """Drop what tracing cached in the model's dicts (a per-device cache keyed by a traced
    device stores a traced value): the model stays as it was, and a later trace does not
    reuse a value of this one."""
    for module in model.modules():
        for attr, value in vars(module).items():
            if (id(module), attr) not in before or not isinstance(value, dict):
                continue
            for key in [k for k, v in value.items() if isinstance(v, fx.Proxy)]:
                if key not in before[(id(module), attr)]:
                    del value[key]


def fx_cut(model: nn.Module, taps: Sequence[str]) -> Plan:
    """Stages of `model` ending at each tap, then one to the output, as `GraphModule`s.

    Raises:
        NotStageable: the model cannot be traced, takes more than one input, calls a tap more
            than once, or needs a value other than the tap's output across a cut.
        ValueError: the taps are not listed in the order they run.
    """
    graph = _trace(model, taps)
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    required = [n for n in inputs if not n.args]  # placeholders without a default
    if len(required) != 1:
        raise NotStageable(
            f"{type(model).__name__}.forward takes {len(required)} required inputs; "
            "staging needs exactly one"
        )
    tap_nodes: dict[str, fx.Node] = {}
    for node in nodes:
        if node.op == "call_module" and node.target in taps:
            if node.target in tap_nodes:
                raise NotStageable(f"tap {node.target!r} runs more than once in the forward")
            tap_nodes[node.target] = node
    missing = [tap for tap in taps if tap not in tap_nodes]
    if missing:
        raise NotStageable(f"taps {missing} do not run in the traced forward")
    position = {node: index for index, node in enumerate(nodes)}
    order = sorted(taps, key=lambda tap: position[tap_nodes[tap]])
    if order != list(taps):
        raise ValueError(
            f"early exits need the taps in the order they run: attach with at={order}, "
            f"not {list(taps)}"
        )
    for tap, node in tap_nodes.items():
        if any(
            user.op == "call_function" and user.target is operator.getitem for user in node.users
        ):
            raise NotStageable(
                f"tap {tap!r} outputs a tuple or dict; only a tensor output can cross a cut"
            )
    cuts = [position[tap_nodes[tap]] for tap in taps]
    bounds = list(zip([-1, *cuts], [*cuts, len(nodes)], strict=True))  # (after, up to incl.)
    stages = []
    for index, (start, end) in enumerate(bounds):
        incoming = None if index == 0 else tap_nodes[taps[index - 1]]
        name = taps[index] if index < len(taps) else "(output)"
        part = nodes[start + 1 : end + 1]
        optional = [node for node in inputs if node.args]
        stage_graph = _stage_graph(part, incoming, optional, position, start, name)
        module = fx.GraphModule(model, stage_graph, class_name=f"Stage_{index}")
        stages.append(Stage(name, module))
    return Plan(tuple(stages), tuple(range(len(taps))), traced=True)


def _stage_graph(
    part: list[fx.Node],
    incoming: fx.Node | None,
    defaults: list[fx.Node],
    position: dict[fx.Node, int],
    start: int,
    name: str,
) -> fx.Graph:
    """A graph running `part` (nodes after position `start`) on `incoming` (the previous
    tap's output; None for the first stage, which keeps the model's placeholders). Its output
    is the last node of `part` (the tap), or the model's output for the last stage."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if incoming is not None:
        env[incoming] = graph.placeholder("x")
        # The forward's optional arguments keep their defaults (EarlyExit passes one tensor).
        for node in defaults:
            env[node] = graph.placeholder(node.name, default_value=node.args[0])

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op == "get_attr":  # a parameter or buffer: every stage reads its own
            env[node] = graph.node_copy(node, lookup)
            return env[node]
        if node not in position:  # not of this graph (`_trace` refuses those first)
            raise NotStageable(
                f"the stage ending at {name!r} needs {node.name!r}, not in the graph"
            )
        assert position[node] <= start  # values of this stage are copied in order
        raise NotStageable(
            f"the stage ending at {name!r} needs {node.name!r}, computed before the previous "
            "tap; only the tap's output may cross a cut"
        )

    output_node = None
    for node in part:
        if node.op == "output":
            output_node = node
            graph.output(fx.map_arg(node.args[0], lookup))
            continue
        env[node] = graph.node_copy(node, lookup)
    if output_node is None:
        graph.output(env[part[-1]])
    graph.lint()
    return graph
