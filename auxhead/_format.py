"""Number and table formatting for everything that prints or writes a report: the command
line's reports, and the core's `print()`-able tables (`list_layers`, `ExitSummary`) can use it.

No imports beyond the standard library; `recorder_history` reads a fastai Learner by duck
typing, without importing fastai.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["count", "percent", "recorder_history", "si", "table"]


def count(n: int, noun: str) -> str:
    """3, "epoch" -> '3 epochs'; 1, "step" -> '1 step'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def si(n: float) -> str:
    """A count with an SI suffix: 1234567 -> '1.23M', 950 -> '950'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def percent(value: float | None, digits: int = 2) -> str:
    """0.9211 -> '92.11%'; None -> '-'."""
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    markdown: bool = False,
    align: str | None = None,
) -> str:
    """A Markdown table, or a plain one for the terminal with a dashed rule under the header:
    column i aligned by `align[i]` ("l" or "r"; default: the first left, the others right)."""
    header = [str(h) for h in header]
    rows = [[str(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(cells, widths, align, strict=True)
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def recorder_history(learn: Any) -> list[dict[str, float | None]]:
    """fastai's Recorder as one dict per epoch: column name -> value (None where fastai logged
    nothing), without the epoch and time columns."""
    names = [n for n in learn.recorder.metric_names[1:] if n != "time"]
    return [
        {n: (None if v is None else float(v)) for n, v in zip(names, row, strict=False)}
        for row in learn.recorder.values
    ]
