"""The plain-text tables the perf tools print (bench, cost, calibration, break-even)."""

from __future__ import annotations

from collections.abc import Iterable


def text_table(title: str | None, head: str, rows: Iterable[str], notes: Iterable[str] = ()) -> str:
    """`title` (when given), the header line `head`, a rule as wide as it, one line per row, then `notes`."""
    return "\n".join([*([title] if title else []), head, "-" * len(head), *rows, *notes])
