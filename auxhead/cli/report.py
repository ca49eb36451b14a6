"""Reports of an `auxhead train` run: a terminal table, report.md, report.json and plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from auxhead.train import TrainResult

__all__ = ["exit_table", "write_report"]


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))  # fmt: skip
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def exit_table(result: TrainResult, markdown: bool = False) -> str:
    """Each exit's test accuracy, FLOPs and parameters up to it, and its share of the full
    model's compute."""
    full = result.main.flops
    rows = [
        [e.name if e.name != "main" else "main (final layer)", f"{100 * e.accuracy:.2f}%",
         _human(e.flops), f"{100 * e.flops / full:.0f}%", _human(e.params)]
        for e in result.exits
    ]  # fmt: skip
    if result.baseline_accuracy is not None:
        rows.append(["baseline (no heads)", f"{100 * result.baseline_accuracy:.2f}%",
                     _human(full), "100%", "-"])  # fmt: skip
    header = ["exit", "test accuracy", "FLOPs/sample", "of full", "params"]
    return _table(header, rows, markdown)


def _timing_lines(result: TrainResult) -> list[str]:
    lines = [f"training time with heads: {result.train_seconds:.0f} s "
             f"({result.config.epochs} epochs)"]  # fmt: skip
    if result.baseline_seconds is not None:
        lines.append(f"training time without heads: {result.baseline_seconds:.0f} s")
    return lines


def _at_confidence(confidence: float | None) -> str:
    return "" if confidence is None else f" (with {confidence:.0%} confidence)"


def _early_exit_table(result: TrainResult, markdown: bool) -> str | None:
    ee = result.early_exit
    if ee is None:
        return None
    test = ee["test"]
    rows = []
    for i, name in enumerate(test["exits"]):
        rows.append([name, f"{test['thresholds'][i]:.3f}" if i < len(test["thresholds"]) else "-",
                     f"{100 * test['share'][i]:.1f}%", _human(test["flops"][i])])  # fmt: skip
    table = _table(["exit", "threshold", "samples leaving", "FLOPs/sample"], rows, markdown)
    summary = (
        f"early exit on the test set: accuracy {100 * test['accuracy']:.2f}% "
        f"(main head {100 * test['main_accuracy']:.2f}%), "
        f"mean {_human(test['mean_flops'])} FLOPs/sample = "
        f"{100 * (1 - test['mean_flops'] / test['full_flops']):.1f}% saved; "
        f"the oracle (first correct exit) saves "
        f"{100 * (1 - test['oracle_flops'] / test['full_flops']):.1f}%"
    )
    return f"{table}\n\n{summary}"


def _write_json(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)


def _plot_history(result: TrainResult, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(result.history) + 1)
    ax.plot(epochs, [row.get("accuracy") for row in result.history], "o-", lw=2.5, label="main")
    for tap in result.taps:
        column = "acc_" + "".join(c if c.isalnum() else "_" for c in tap)
        ax.plot(epochs, [row.get(column) for row in result.history], "o-", label=tap)
    if result.baseline_history:
        base = [row.get("accuracy") for row in result.baseline_history]
        ax.plot(epochs, base, "s--", color="gray", label="baseline (no heads)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="test accuracy", title="Accuracy of each exit per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_compute(result: TrainResult, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    flops = [e.flops / 1e6 for e in result.exits]
    acc = [100 * e.accuracy for e in result.exits]
    ax.plot(flops, acc, "o-", lw=2, label="each exit alone")
    for e, x, y in zip(result.exits, flops, acc, strict=True):
        ax.annotate(e.name, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    if result.early_exit is not None:
        test = result.early_exit["test"]
        ax.plot([test["mean_flops"] / 1e6], [100 * test["accuracy"]], "*", ms=14,
                label="calibrated early exit")  # fmt: skip
        ax.plot([test["oracle_flops"] / 1e6], [100 * test["oracle_accuracy"]], "D", ms=8,
                label="oracle (first correct exit)")  # fmt: skip
    ax.set(xlabel="MFLOPs per sample", ylabel="test accuracy (%)",
           title="Accuracy against compute")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(result: TrainResult) -> str:
    c = result.config
    lines = [
        f"# auxhead train: {result.arch} on {result.data}",
        "",
        f"{result.n_train} training and {result.n_test} test images, {len(result.classes)} "
        f"classes. Heads ({c.head}, weight {c.weights}, schedule {c.schedule}) at "
        f"{', '.join(f'`{t}`' for t in result.taps)}; {c.epochs} epochs of one-cycle at lr "
        f"{c.lr}, batch size {c.bs}, seed {c.seed}.",
        "",
        "## Exits",
        "",
        exit_table(result, markdown=True),
        "",
        "FLOPs are per sample, counted by `torch.utils.flop_counter` (matrix multiplies and "
        "convolutions); an exit's FLOPs and parameters are the backbone's up to its layer plus "
        "its head's.",
        "",
        *[f"- {line}" for line in _timing_lines(result)],
        "",
        "![accuracy per epoch](heads.png)",
        "",
        "![accuracy against compute](compute.png)",
        "",
    ]
    if result.baseline_accuracy is not None:
        gain = 100 * (result.main.accuracy - result.baseline_accuracy)
        lines[lines.index("## Exits") - 1 : lines.index("## Exits") - 1] = [
            "",
            f"**With heads the main exit reaches {100 * result.main.accuracy:.2f}%, against "
            f"{100 * result.baseline_accuracy:.2f}% without ({gain:+.2f} points), "
            "same seed and budget.**",
        ]
    ee = _early_exit_table(result, markdown=True)
    if ee is not None:
        lines += ["## Early exit", "",
                  f"Thresholds calibrated on {result.early_exit['n_calibration']} held-out "
                  f"training images for at most {100 * c.max_drop:.1f} points of accuracy "
                  f"lost{_at_confidence(c.confidence)}; routing mode: "
                  f"{result.early_exit['mode']}.", "", ee, ""]  # fmt: skip
    lines += ["## Training log", "", _history_table(result), "", "## Files", ""]
    lines += [f"- `{Path(p).name}`: {what}" for what, p in _describe_files(result)]
    return "\n".join(lines) + "\n"


def _describe_files(result: TrainResult) -> list[tuple[str, str]]:
    notes = {
        "model": "the trained model without heads, exported with fastai: "
        "`fastai.learner.load_learner(path)` opens it without auxhead",
        "checkpoint": "state_dict with heads (and arch, taps, classes), saved every epoch",
        "report_json": "every figure of this report",
        "heads_png": "accuracy of each exit per epoch",
        "compute_png": "accuracy against compute",
    }
    return [(notes.get(key, key), path) for key, path in result.files.items()]


def _history_table(result: TrainResult) -> str:
    if not result.history:
        return "(no epochs)"
    names = list(result.history[0])
    rows = [[str(i + 1)] + ["-" if row.get(n) is None else f"{row[n]:.4f}" for n in names]
            for i, row in enumerate(result.history)]  # fmt: skip
    return _table(["epoch", *names], rows, markdown=True)


def write_report(result: TrainResult, out: Path) -> dict[str, str]:
    """Write report.md, report.json, heads.png and compute.png into `out`.

    Returns:
        The files written, by kind (added to `result.files` too).
    """
    out = Path(out)
    files = {"report_json": out / "report.json", "heads_png": out / "heads.png",
             "compute_png": out / "compute.png", "report_md": out / "report.md"}  # fmt: skip
    _plot_history(result, files["heads_png"])
    _plot_compute(result, files["compute_png"])
    result.files.update({k: str(v) for k, v in files.items()})
    _write_json(files["report_json"], result.as_json())
    files["report_md"].write_text(_markdown(result))
    return {k: str(v) for k, v in files.items()}


def terminal_summary(result: TrainResult) -> str:
    """What the CLI prints at the end of a run."""
    parts = [exit_table(result), "", *_timing_lines(result)]
    ee = _early_exit_table(result, markdown=False)
    if ee is not None:
        parts += ["", ee]
    return "\n".join(parts)
