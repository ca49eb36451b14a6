"""What auxiliary heads cost: training-step time, inference time and peak memory, measured in
one process with the runs interleaved, reported as medians and ratios in a markdown table.

    python benchmarks/overhead.py                                  # GPU if there is one
    python benchmarks/overhead.py --device cpu --size 64 --batch 2 --repeats 10 --threads 1

Rows:
- GoogLeNet, training step (forward, loss, backward, SGD step): auxhead with torchvision's own
  `InceptionAux` heads attached at inception4a and inception4d, against torchvision's
  `googlenet(aux_logits=True)` with the same weights, inputs and loss (main + 0.3 * each head).
  Target ratio <= 1.03. The auxhead row uses `AuxLoss` as shipped (check_finite=True, which
  reads one bool per step for all heads, a device sync on a GPU); the `check_finite=False` row shows
  what that check costs.
- GoogLeNet, inference: the stripped model against a bare `googlenet(aux_logits=False)` with the
  same weights. Target ratio <= 1.01.
- Peak memory of a training step: no heads, torchvision's aux heads, auxhead's heads. On a GPU,
  `torch.cuda.max_memory_allocated` over the step; on a CPU, the high-water mark of the
  allocations made during the step, from torch.profiler's allocation events.
- The same for a ResNet-50 with three "inception" heads (layer1, layer2, layer3) against the
  bare ResNet-50: what the heads cost.

Timings on a shared or busy machine are noisy: compare ratios from one run, not across runs,
and rerun with more --repeats when the spread is wide. This script measures; no test times it.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import auxhead

AUX_WEIGHT = 0.3  # GoogLeNet's


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _googlenets(num_classes: int, device: torch.device):
    """torchvision's GoogLeNet with aux heads, and a bare one with the same weights plus copies
    of those heads for auxhead to attach."""
    from torchvision.models import GoogLeNet

    torch.manual_seed(0)
    with_aux = GoogLeNet(num_classes=num_classes, aux_logits=True, init_weights=True)
    bare = GoogLeNet(num_classes=num_classes, aux_logits=False, init_weights=False)
    bare.load_state_dict(
        {k: v for k, v in with_aux.state_dict().items() if not k.startswith(("aux1.", "aux2."))}
    )
    heads = {
        "inception4a": copy.deepcopy(with_aux.aux1),
        "inception4d": copy.deepcopy(with_aux.aux2),
    }
    return with_aux.to(device), bare.to(device), heads


def _resnets(num_classes: int, device: torch.device, sample: torch.Tensor):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    bare = resnet50(num_classes=num_classes).to(device)
    with_heads = copy.deepcopy(bare)
    aux_model = auxhead.attach(
        with_heads, ["layer1", "layer2", "layer3"], head="inception", sample=sample[:2]
    )
    return bare, aux_model


def _train_step(
    model: nn.Module, loss_of: Callable[[object, torch.Tensor], torch.Tensor], x, y
) -> Callable[[], torch.Tensor]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> torch.Tensor:
        loss = loss_of(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def _inference(model: nn.Module, x) -> Callable[[], torch.Tensor]:
    model.eval()

    def infer() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return infer


def _torchvision_loss(outputs, y: torch.Tensor) -> torch.Tensor:
    logits, aux2, aux1 = outputs
    aux = F.cross_entropy(aux1, y) + F.cross_entropy(aux2, y)
    return F.cross_entropy(logits, y) + AUX_WEIGHT * aux


def _time(fns: dict[str, Callable], repeats: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per call of each fn, calls interleaved (ABC, CBA, ABC...) so that drift
    in the machine's speed hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _cpu_peak_bytes(fn: Callable) -> int:
    """High-water mark of the CPU allocations made while `fn` runs (profiler allocation events;
    tensors that existed before, such as the weights, are not counted)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (node.start_time_ns, node.extra_fields.alloc_size)
        for node in walk(events)
        if node.tag == _EventType.Allocation
    )
    current = peak = 0
    for _, size in allocations:
        current += size
        peak = max(peak, current)
    return peak


def _peak_bytes(fn: Callable, device: torch.device) -> int:
    fn()  # optimizer state and caches exist before the measured step
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


def _row(
    model: str,
    measure: str,
    base: tuple[str, float],
    ours: tuple[str, float],
    unit: str,
    target: str = "",
) -> str:
    scale = 1e3 if unit == "ms" else 1 / 2**20
    (base_name, b), (ours_name, o) = base, ours
    return (
        f"| {model} | {measure} | {base_name}: {b * scale:.2f} {unit} "
        f"| {ours_name}: {o * scale:.2f} {unit} | {o / b:.3f} | {target} |"
    )


def _googlenet_rows(x, y, classes: int, repeats: int, warmup: int, device) -> list[str]:
    with_aux, bare, heads = _googlenets(classes, device)
    aux_model = auxhead.attach(copy.deepcopy(bare), heads, sample=x[:2])
    aux_loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model, weights=AUX_WEIGHT)
    unchecked = auxhead.attach(copy.deepcopy(bare), copy.deepcopy(heads), sample=x[:2])
    unchecked_loss = auxhead.AuxLoss(
        nn.CrossEntropyLoss(), unchecked, weights=AUX_WEIGHT, check_finite=False
    )
    # Same weights and inputs, dropout held still, so the first losses agree: the same
    # computation. (With dropout on they differ: auxhead's heads draw from their own stream,
    # torchvision's from the model's.)
    for model in (with_aux, aux_model):
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
    reference = _torchvision_loss(with_aux(x), y).item()
    ours = aux_loss(aux_model(x), y).item()
    print(f"GoogLeNet first-step loss: torchvision {reference:.6f}, auxhead {ours:.6f}")

    steps = {
        "torchvision": _train_step(with_aux, _torchvision_loss, x, y),
        "auxhead": _train_step(aux_model, aux_loss, x, y),
        "unchecked": _train_step(unchecked, unchecked_loss, x, y),
        "bare": _train_step(bare, F.cross_entropy, x, y),
    }
    train = _time(steps, repeats, warmup, device)
    stripped = copy.deepcopy(aux_model).strip()
    infer = _time(
        {"bare": _inference(bare, x), "stripped": _inference(stripped, x)}, repeats, warmup, device
    )
    peak = {name: _peak_bytes(step, device) for name, step in steps.items()}

    tv, ours_name = "torchvision aux_logits=True", "InceptionAux at 4a, 4d"
    return [
        _row(
            "GoogLeNet",
            "train step",
            (tv, train["torchvision"]),
            (ours_name, train["auxhead"]),
            "ms",
            "<= 1.03",
        ),
        _row(
            "GoogLeNet",
            "train step",
            (tv, train["torchvision"]),
            ("same, check_finite=False", train["unchecked"]),
            "ms",
        ),
        _row(
            "GoogLeNet",
            "train step",
            ("no heads", train["bare"]),
            (ours_name, train["auxhead"]),
            "ms",
        ),
        _row(
            "GoogLeNet",
            "inference",
            ("bare", infer["bare"]),
            ("stripped", infer["stripped"]),
            "ms",
            "<= 1.01",
        ),
        _row(
            "GoogLeNet",
            "peak train memory",
            (tv, peak["torchvision"]),
            (ours_name, peak["auxhead"]),
            "MiB",
        ),
        _row(
            "GoogLeNet",
            "peak train memory",
            ("no heads", peak["bare"]),
            (ours_name, peak["auxhead"]),
            "MiB",
        ),
    ]


def _resnet_rows(x, y, classes: int, repeats: int, warmup: int, device) -> list[str]:
    bare, aux_model = _resnets(classes, device, x)
    aux_loss = auxhead.AuxLoss(nn.CrossEntropyLoss(), aux_model, weights=AUX_WEIGHT)
    steps = {
        "bare": _train_step(bare, F.cross_entropy, x, y),
        "heads": _train_step(aux_model, aux_loss, x, y),
    }
    train = _time(steps, repeats, warmup, device)
    stripped = copy.deepcopy(aux_model).strip()
    infer = _time(
        {"bare": _inference(bare, x), "stripped": _inference(stripped, x)}, repeats, warmup, device
    )
    peak = {name: _peak_bytes(step, device) for name, step in steps.items()}
    heads = "3 inception heads"
    return [
        _row("ResNet-50", "train step", ("no heads", train["bare"]), (heads, train["heads"]), "ms"),
        _row(
            "ResNet-50",
            "inference",
            ("bare", infer["bare"]),
            ("stripped", infer["stripped"]),
            "ms",
            "<= 1.01",
        ),
        _row(
            "ResNet-50",
            "peak train memory",
            ("no heads", peak["bare"]),
            (heads, peak["heads"]),
            "MiB",
        ),
    ]


def build_parser() -> argparse.ArgumentParser:
    """The script's options (the docs' commands are parsed with it in tests/test_commands.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--size", type=int, default=None, help="image side (224 GPU, 96 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (32 GPU, 4 CPU)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (50 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--models", nargs="+", choices=["googlenet", "resnet50"], default=["googlenet", "resnet50"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    size = args.size or (224 if on_gpu else 96)
    batch = args.batch or (32 if on_gpu else 4)
    repeats = args.repeats or (50 if on_gpu else 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_gpu:
        torch.backends.cudnn.benchmark = True

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device)
    y = torch.randint(0, args.classes, (batch,), generator=generator).to(device)
    where = (
        torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"{where}; torch {torch.__version__}; batch {batch} x 3 x {size} x {size}; "
        f"medians of {repeats} interleaved calls"
    )
    rows = []
    if "googlenet" in args.models:
        rows += _googlenet_rows(x, y, args.classes, repeats, args.warmup, device)
    if "resnet50" in args.models:
        rows += _resnet_rows(x, y, args.classes, repeats, args.warmup, device)
    print()
    print("| model | measure | baseline | auxhead | ratio | target |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
