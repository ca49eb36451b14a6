"""Reports of an `auxhead train` run: a terminal table, report.md, report.json and plots.

Everything is written when the run has completed, each file through a temporary file and a
rename, report.md last: a report in `--out` is always a whole run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from auxhead._format import count, percent
from auxhead._format import si as _human
from auxhead._format import table as _table
from auxhead.cli._common import atomic_path, write_text_atomic
from auxhead.cli.acgan import TARGETS, ACGANResult
from auxhead.cli.train import TrainResult

if TYPE_CHECKING:
    from auxhead.cli.segment import SegmentResult

__all__ = [
    "exit_table",
    "per_class_iou_table",
    "per_class_table",
    "segment_scores_table",
    "segment_summary",
    "terminal_summary",
    "write_acgan_report",
    "write_report",
    "write_segment_report",
]


def exit_table(result: TrainResult, *, markdown: bool = False) -> str:
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


NO_HELD_OUT = "no held-out image: not in any test figure"


def per_class_table(result: TrainResult, *, markdown: bool = False) -> str:
    """Each class's test images and each exit's accuracy on them; a class without a held-out
    image gets a row that says so instead of figures."""
    exits = [e.name for e in result.exits]
    rows = []
    for c in result.per_class:
        if c.accuracy is None:
            rows.append([c.name, "0", NO_HELD_OUT, *["-"] * (len(exits) - 1)])
        else:
            figures = [f"{100 * c.accuracy[e]:.2f}%" for e in ["main", *exits[:-1]]]
            rows.append([c.name, str(c.n_test), *figures])
    header = ["class", "test images", "main (final layer)", *exits[:-1]]
    return _table(header, rows, markdown)


def _timing_lines(result: TrainResult) -> list[str]:
    b = result.budget
    lines = [f"training time with heads: {_seconds(result.train_seconds)} s "
             f"({count(len(result.history), 'epoch')}, {count(b.steps, 'step')} of {b.bs} "
             "images)"]  # fmt: skip
    if result.baseline_seconds is not None:
        lines.append(f"training time without heads: {_seconds(result.baseline_seconds)} s")
    return lines


def _at_confidence(confidence: float | None) -> str:
    return "" if confidence is None else f" (with {confidence:.0%} confidence)"


# Why the two tables' FLOPs differ for the same exit (both from `auxhead.exits.FlopProfile`).
EARLY_EXIT_FLOPS_NOTE = (
    "FLOPs to leave here: the backbone up to the exit plus every head that runs on the way "
    "(a head with threshold 1 is never run), so they differ from the exits table above, "
    "which counts each exit alone: the backbone up to it plus its own head."
)


def _early_exit_table(result: TrainResult, markdown: bool) -> str | None:
    ee = result.early_exit
    if ee is None:
        return None
    test = ee["test"]
    rows = []
    for i, name in enumerate(test["exits"]):
        rows.append([name, f"{test['thresholds'][i]:.3f}" if i < len(test["thresholds"]) else "-",
                     f"{100 * test['share'][i]:.1f}%", _human(test["flops"][i])])  # fmt: skip
    header = ["exit", "threshold", "samples leaving", "FLOPs to leave here"]
    table = _table(header, rows, markdown)
    summary = (
        f"early exit on the test set: accuracy {100 * test['accuracy']:.2f}% "
        f"(main head {100 * test['main_accuracy']:.2f}%), "
        f"mean {_human(test['mean_flops'])} FLOPs/sample = "
        f"{100 * (1 - test['mean_flops'] / test['full_flops']):.1f}% saved; "
        f"the oracle (first correct exit) saves "
        f"{100 * (1 - test['oracle_flops'] / test['full_flops']):.1f}%"
    )
    return f"{table}\n\n{EARLY_EXIT_FLOPS_NOTE}\n\n{summary}"


def _write_json(path: Path, document: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")


def _savefig(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


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
    _savefig(fig, path)
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
    _savefig(fig, path)
    plt.close(fig)


def _markdown(result: TrainResult) -> str:
    c = result.config
    lines = [
        f"# auxhead train: {result.arch} on {result.data}",
        "",
        f"{result.n_train} training and {result.n_test} test images, {len(result.classes)} "
        f"classes. Heads ({c.head}, weight {c.aux_weight}, schedule {c.schedule}) at "
        f"{', '.join(f'`{t}`' for t in result.taps)}; {_training(result)}, seed {c.seed}.",
        "",
        *_warning_lines(result),
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
        if result.early_exit.get("fallback_to_main"):
            lines += ["**No exit met the target on the held-out images: calibration fell back "
                      "to the main head for every sample (no saving).** Train the heads longer, "
                      "allow a larger --max-drop, or hold out more images.", ""]  # fmt: skip
    if result.per_class:
        lines += ["## Per class", "", "Each exit's accuracy on the test images of each class.",
                  "", per_class_table(result, markdown=True), ""]  # fmt: skip
    lines += ["## Training log", "", _history_table(result), "", "## Files", ""]
    lines += [f"- `{Path(p).name}`: {what}" for what, p in _describe_files(result)]
    return "\n".join(lines) + "\n"


def _training(result: TrainResult) -> str:
    b, c = result.budget, result.config
    start = "pretrained weights" if c.pretrained else f"`{c.init}`" if c.init else None
    how = f"fine-tuned from {start} with fastai's fine_tune (1 epoch frozen, then " if start else ""
    return (
        f"{how}{count(b.epochs, 'epoch')} of one-cycle{')' if start else ''} at lr {b.lr:g}, "
        f"batch size {b.bs}, {count(b.steps_per_epoch, 'step')} an epoch (budget: {b.why})"
    )


def _warning_lines(result: TrainResult) -> list[str]:
    lines = []
    if result.data_notes:
        lines += ["**About the data:**", "", *[f"- {n}" for n in result.data_notes], ""]
    if result.warnings:
        lines += ["**Warnings during the run:**", "", *[f"- {w}" for w in result.warnings], ""]
    return lines


def _describe_files(result: TrainResult) -> list[tuple[str, str]]:
    notes = {
        "model": "the trained model without heads, exported with fastai: "
        "`fastai.learner.load_learner(path)` opens it without auxhead",
        "checkpoint": "state_dict with heads (and arch, taps, classes), saved every epoch",
        "report_json": "every figure of this report",
        "heads_png": "accuracy of each exit per epoch",
        "compute_png": "accuracy against compute",
        "report_md": "this report",
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
    write_text_atomic(files["report_md"], _markdown(result))
    return {k: str(v) for k, v in files.items()}


def terminal_summary(result: TrainResult) -> str:
    """What the CLI prints at the end of a run."""
    parts = [exit_table(result), "", *_timing_lines(result)]
    ee = _early_exit_table(result, markdown=False)
    if ee is not None:
        parts += ["", ee]
    parts += [f"warning: {w}" for w in result.warnings]
    return "\n".join(parts)


# auxhead acgan -------------------------------------------------------------------------------


def _ratio(value: float | None, floor: float | None) -> str:
    return "-" if value is None or not floor else f"{value / floor:.1f} x floor"


def _epoch_span(collapse: dict[str, Any]) -> str:
    """When a class was collapsed: "epoch 3" or "epochs 3-9" (old reports: one epoch each)."""
    first, last = collapse["epoch"], collapse.get("last_epoch", collapse["epoch"])
    return f"epoch {first}" if last == first else f"epochs {first}-{last}"


def _gan_value(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "-"
    return percent(value, 1) if pct else f"{value:.3f}"


def _seconds(seconds: float) -> str:
    """Seconds for a report: 0.04 -> '<0.1', 0.4 -> '0.4', 12.3 -> '12' (never '0')."""
    if seconds < 0.05:
        return "<0.1"
    return f"{seconds:.1f}" if seconds < 9.95 else f"{seconds:.0f}"


def _class_loss(run: dict[str, Any]) -> str:
    """How one GAN of the report uses the class: its conditioning's class loss and options."""
    loss, name = run["loss"], f"{run['variant']} (`{run['conditioning']}`)"
    if run["conditioning"] == "projection" or loss.get("class_weight") is None:
        return f"{name}: no class loss, the class enters the discriminator's real/generated logit"
    if run["conditioning"] == "adc":
        on = "real class k and generated class k told apart (2K classes)"
    else:
        on = "real and generated images" if loss["class_on_fake"] else "real images only"
    twin = ", and a twin classifier of generated images" if run["conditioning"] == "tac" else ""
    return f"{name}: class loss weight {loss['class_weight']:g}, on {on}{twin}"


def _acgan_markdown(report: dict[str, Any], threads: int) -> str:
    ref, runs, config = report["reference"], report["runs"], report["config"]
    names = [run["variant"] for run in runs]
    classes = report["data"]["classes"]
    data = report["data"]
    real_cas = runs[0]["cas"]["real_accuracy"] if runs and runs[0]["cas"] else None
    summary = [
        ["generated classified as their class", f">= {percent(TARGETS['accuracy'], 0)}",
         *[_gan_value(r["accuracy"]["overall"], True) for r in runs]],
        [f"Frechet distance to real test (floor {ref['fid_floor']:.3f})",
         f"<= {TARGETS['fid_ratio']:g} x floor",
         *[f"{_gan_value(r['fid'])} ({_ratio(r['fid'], ref['fid_floor'])})" for r in runs]],
        [f"mean intra-class Frechet distance (floor {_gan_value(ref['intra_fid_floor']['mean'])})",
         "near the floor",
         *[f"{_gan_value(r['intra_fid']['mean'])} "
           f"({_ratio(r['intra_fid']['mean'], ref['intra_fid_floor']['mean'])})" for r in runs]],
        [f"precision, k = 3 (real: {_gan_value(ref['precision'])})", "",
         *[_gan_value(r["precision"]) for r in runs]],
        [f"recall, k = 3 (real: {_gan_value(ref['recall'])})", f">= {TARGETS['recall']:g}",
         *[_gan_value(r["recall"]) for r in runs]],
        [f"classification accuracy score (real-trained: {_gan_value(real_cas, True)})",
         f">= {percent(TARGETS['cas'], 0)}",
         *[_gan_value(r["cas"]["accuracy"] if r["cas"] else None, True) for r in runs]],
        ["min per-class diversity, generated / real",
         f">= {percent(TARGETS['diversity_ratio'], 0)}",
         *[_gan_value(r["min_diversity_ratio"], True) for r in runs]],
        ["classes found collapsed during training", "0",
         *[str(len({c["class_index"] for c in r["collapses"]})) for r in runs]],
        ["train time (s)", "", *[_seconds(r["train_seconds"]) for r in runs]],
    ]  # fmt: skip
    grids = [
        f"![{r['variant']} samples]({r['folder'] + '/' if r['folder'] else ''}grid.png)"
        for r in runs
    ]
    per_class = []
    for k, name in enumerate(classes):
        cells = [name, _gan_value(ref["classifier_test_accuracy"]["per_class"][k], True)]
        for run in runs:
            cells += [_gan_value(run["accuracy"]["per_class"][k], True),
                      _gan_value(run["diversity_ratio"][k], True),
                      _gan_value(run["intra_fid"]["per_class"][k])]  # fmt: skip
        per_class.append(cells)
    lines = [
        "# AC-GAN report",
        "",
        f"Data: {data['name']}, {data['n_train']} train / {data['n_valid']} held-out images of "
        f"{data['shape']}, {len(classes)} classes. Seed {config['seed']}, "
        f"{count(config['epochs'], 'epoch')} ({report['epochs_why']}), width {config['width']}, "
        f"mode-seeking weight {config['mode_seeking']}, "
        f"{config['loss']} loss, spectral norm {'on' if config['spectral_norm'] else 'off'}, "
        f"generator EMA {config['ema'] or 'off'}, DiffAugment {config['augment']}.",
        "",
        *[f"- {_class_loss(run)}" for run in runs],
        "",
        *[line for w in report["warnings"] for line in (f"**Warning:** {w}", "")],
        f"Independent classifier (trained on the real train split, "
        f"{_seconds(report['classifier_seconds'])} s): real test accuracy "
        f"{_gan_value(ref['classifier_test_accuracy']['overall'], True)}.",
        f"Frechet distance floor (real train vs real test, {ref['floor_samples']} images, "
        f"classifier features): {ref['fid_floor']:.3f}.",
        "",
        _table(["metric", "target", *names], summary, markdown=True),
        "",
        "## Samples",
        "",
        f"One row per class ({', '.join(classes)}), one column per fixed noise vector; the "
        "grid of every epoch is in `grids/`"
        + "".join(f" and `{r['folder']}/grids/`" for r in runs if r["folder"])
        + ".",
        "",
        _table(names, [grids], markdown=True),
        "",
        "## Per class",
        "",
        "Accuracy: share of generated samples classified as their conditioning class (the real "
        "test images' accuracy beside it). Diversity: mean pairwise distance of classifier "
        "features within the class, generated / real. Intra-FD: Frechet distance from the "
        "class's samples to its real test images (its floor, real train vs real test: "
        + ", ".join(_gan_value(v) for v in ref["intra_fid_floor"]["per_class"])
        + ").",
        "",
        *[
            line
            for r in runs
            for c in r["collapses"]
            for line in (
                f"**{r['variant']}, {_epoch_span(c)}:** class {c['class_name']} "
                f"collapsed ({c['reason']}).",
                "",
            )
        ],
        _table(
            [
                "class",
                "real acc",
                *[f"{n} {what}" for n in names for what in ("acc", "diversity", "intra-FD")],
            ],
            per_class,
            markdown=True,
        ),
    ]
    for run in runs:
        columns = list(run["history"][0]) if run["history"] else []
        rows = [[str(epoch), *[_gan_value(row[c]) for c in columns]]
                for epoch, row in enumerate(run["history"], 1)]  # fmt: skip
        lines += ["", f"## {run['variant']} training (validation columns per epoch)", "",
                  _table(["epoch", *columns], rows, markdown=True)]  # fmt: skip
    lines += [
        "",
        f"Samples: `samples.npz` ({config['n_per_class']} per class; `images` float32 "
        "N x C x H x W in [0, 1], `labels` int64)"
        + "".join(f", {r['variant']}'s in `{r['folder']}/samples.npz`" for r in runs if r["folder"])
        + ".",
        f"Total time: {_seconds(report['total_seconds'])} s on {threads} CPU thread(s); timings "
        "depend on what else runs on the machine.",
        "",
    ]
    return "\n".join(lines)


def write_acgan_report(result: ACGANResult, out: Path) -> dict[str, str]:
    """Write report.json and report.md (last) into `out`; returns them by kind."""
    import torch

    out = Path(out)
    report = result.as_json()
    files = {"report_json": out / "report.json", "report_md": out / "report.md"}
    _write_json(files["report_json"], report)
    write_text_atomic(files["report_md"], _acgan_markdown(report, torch.get_num_threads()))
    return {k: str(v) for k, v in files.items()}


# auxhead train --task segment ------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}%"


def segment_scores_table(result: SegmentResult, *, markdown: bool = False) -> str:
    """mIoU, pixel accuracy and mean Dice of the model (with and without heads) and of each
    head, on the test split."""
    rows = [["with heads (main output)", *_score_cells(result.main)]]
    if result.baseline is not None:
        rows.append(["without heads", *_score_cells(result.baseline)])
    rows += [[f"head at {s.name}", *_score_cells(s)] for s in result.head_scores]
    return _table(["model", "mIoU", "pixel accuracy", "mean Dice"], rows, markdown)


def _score_cells(scores: Any) -> list[str]:
    return [_pct(scores.miou), _pct(scores.pixel_accuracy), _pct(scores.mean_dice)]


NOT_IN_TEST = "in neither the test labels nor the predictions"


def per_class_iou_table(result: SegmentResult, *, markdown: bool = False) -> str:
    """Each class's IoU (and Dice) on the test split, with heads and, when compared, without;
    a class absent from both labels and predictions says so."""
    header = ["class", "IoU with heads"]
    if result.baseline is not None:
        header += ["IoU without heads", "difference"]
    header.append("Dice with heads")
    rows = []
    for k, name in enumerate(result.codes):
        iou = result.main.iou[k]
        row = [name, _pct(iou) if iou is not None else NOT_IN_TEST]
        if result.baseline is not None:
            base = result.baseline.iou[k]
            gap = "-" if iou is None or base is None else f"{100 * (iou - base):+.2f}"
            row += [_pct(base), gap]
        row.append(_pct(result.main.dice[k]))
        rows.append(row)
    return _table(header, rows, markdown)


def _head_lines(result: SegmentResult) -> list[str]:
    how = {"logits": "its logits upsampled to the labels", "targets": "the labels downsampled "
           "to its output"}  # fmt: skip
    return [
        f"- `{tap}`: {h['kind']} head, weight {h['weight']:.3g}, {how.get(h['resize'], 'as is')}"
        for tap, h in result.heads.items()
    ]


def _segment_markdown(result: SegmentResult) -> str:
    c, b = result.config, result.budget
    encoder = f" ({result.encoder})" if result.encoder else ""
    void = f"void (mask value {result.void}) left out" if result.void is not None else "no void"
    lines = [
        f"# auxhead train --task segment: {result.arch}{encoder} on {result.data}",
        "",
        f"{result.n_train} training and {result.n_test} {result.test_split} images, "
        f"{len(result.codes)} classes, {void}. {count(b.epochs, 'epoch')} of one-cycle at lr "
        f"{b.lr:g}, batch size {b.bs}, {count(b.steps_per_epoch, 'step')} an epoch (budget: "
        f"{b.why}), seed {c.seed}. Heads:",
        "",
        *_head_lines(result),
        "",
        *_warning_lines(result),
    ]
    if result.baseline is not None:
        gain = 100 * (result.main.miou - result.baseline.miou)
        lines += [
            f"**With heads the model reaches {_pct(result.main.miou)} mIoU, against "
            f"{_pct(result.baseline.miou)} without ({gain:+.2f} points), same seed and "
            "budget.** One seed: `benchmarks/segmentation.py` measures several.",
            "",
        ]
    lines += [
        f"## Scores on the {result.test_split} split",
        "",
        segment_scores_table(result, markdown=True),
        "",
        "Counted by torchmetrics over every labelled pixel: mIoU is the mean IoU over the classes "
        "present in the labels or the predictions; each head is scored with its logits "
        "upsampled to the labels' size (the model with heads is scored by its own output, "
        "which the heads do not change).",
        "",
        *[f"- {line}" for line in _segment_timing(result)],
        "",
        "## Per-class IoU",
        "",
        per_class_iou_table(result, markdown=True),
        "",
        "## Predictions",
        "",
        f"The first {len(result.figure.get('labels', []))} {result.test_split} images, their "
        "labels and the predicted classes (void in black).",
        "",
        "![predictions beside the labels](predictions.png)",
        "",
        "## Training log",
        "",
        _history_table(result),
        "",
        "## Files",
        "",
    ]
    notes = {
        "model": "the trained model without heads, exported with fastai: "
        "`fastai.learner.load_learner(path)` opens it without auxhead",
        "model_pth": "the model without heads as a module: `torch.load(path, weights_only=False)` "
        "(needs the model's library, not auxhead)",
        "checkpoint": "state_dict with heads (and arch, heads, codes), saved every epoch",
        "report_json": "every figure of this report",
        "predictions_png": "predictions beside the labels",
        "report_md": "this report",
    }
    lines += [f"- `{Path(p).name}`: {notes.get(k, k)}" for k, p in result.files.items()]
    return "\n".join(lines) + "\n"


def _segment_timing(result: SegmentResult) -> list[str]:
    lines = [f"training time with heads: {_seconds(result.train_seconds)} s"]
    if result.baseline_seconds is not None:
        lines.append(f"training time without heads: {_seconds(result.baseline_seconds)} s")
    return lines


def class_colours(n: int) -> list[tuple[float, float, float]]:
    """One colour per class, matplotlib's tab20 (tab10 up to 10 classes)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [tuple(cmap(k % cmap.N)[:3]) for k in range(n)]


def _colour(mask: Any, colours: list) -> Any:
    import numpy as np

    palette = np.array([*colours, (0.0, 0.0, 0.0)])  # void and anything else: black
    index = mask.numpy().copy()
    index[(index < 0) | (index >= len(colours))] = len(colours)
    return palette[index]


def _plot_predictions(result: SegmentResult, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figure = result.figure
    images, labels = figure["images"], figure["labels"]
    columns = [("image", None), ("labels", labels)]
    columns += [(name, figure[name]) for name in ("with heads", "without heads") if name in figure]
    colours = class_colours(len(result.codes))
    n = len(labels)
    fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), 2.2 * n + 0.8),
                             squeeze=False)  # fmt: skip
    for i in range(n):
        for j, (title, masks) in enumerate(columns):
            ax = axes[i][j]
            if masks is None:
                ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                ax.imshow(_colour(masks[i], colours), interpolation="nearest")
            ax.set_axis_off()
            if i == 0:
                ax.set_title(title, fontsize=9)
    handles = [Patch(color=c, label=name) for c, name in zip(colours, result.codes, strict=True)]
    if result.void is not None:
        handles.append(Patch(color=(0, 0, 0), label="void"))
    legend_rows = -(-len(handles) // 6)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / fig.get_figheight(), 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=7,
               frameon=False)  # fmt: skip
    _savefig(fig, path)
    plt.close(fig)


def write_segment_report(result: SegmentResult, out: Path) -> dict[str, str]:
    """Write predictions.png, report.json and report.md (last) into `out`.

    Returns:
        The files written, by kind (added to `result.files` too).
    """
    out = Path(out)
    files = {"predictions_png": out / "predictions.png", "report_json": out / "report.json",
             "report_md": out / "report.md"}  # fmt: skip
    _plot_predictions(result, files["predictions_png"])
    result.files.update({k: str(v) for k, v in files.items()})
    _write_json(files["report_json"], result.as_json())
    write_text_atomic(files["report_md"], _segment_markdown(result))
    return {k: str(v) for k, v in files.items()}


def segment_summary(result: SegmentResult) -> str:
    """What the CLI prints at the end of a segment run."""
    parts = [segment_scores_table(result), "", per_class_iou_table(result), ""]
    parts += _segment_timing(result)
    parts += [f"warning: {w}" for w in result.warnings]
    return "\n".join(parts)
