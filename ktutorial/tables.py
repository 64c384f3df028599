"""Markdown tables and number formatting: one writer for reports, docs, notebooks and the model.

A leaf module (it imports nothing of ktutorial's), so every layer above can use it.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence


def fmt(x: Optional[float]) -> str:
    """3 significant figures or so; "-" for missing."""
    if x is None:
        return "-"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def md_cell(value: Any) -> str:
    """One markdown table cell: a '|' inside would end the cell, a newline the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """The one markdown-table writer for reports, docs and notebooks (headers escaped too)."""
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(md_cell(c) for c in row) + " |")
    return "\n".join(lines)
