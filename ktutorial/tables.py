"""Markdown tables and number formatting: one writer for reports, docs, notebooks and the CLI.

A leaf module (it imports nothing of ktutorial's), so every layer above can use it. A result type
shows itself by building one `Markdown` text: a notebook renders it (`_repr_markdown_`), the CLI
prints it through rich (`__rich__`), a report or a page writes it as it is.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from rich.markdown import Markdown as RichMarkdown


class Markdown(str):
    """Markdown text that shows itself: rendered in a notebook, through rich in a terminal, and
    still a `str` wherever text is joined or written."""

    def _repr_markdown_(self) -> str:
        return str(self)

    def __rich__(self) -> RichMarkdown:
        return RichMarkdown(str(self))

    def __add__(self, other: str) -> Markdown:
        return Markdown(str(self) + str(other))


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


class ShowsItself:
    """A result type that builds its markdown once (`markdown()`) and is shown from it everywhere."""

    def markdown(self) -> Markdown:
        raise NotImplementedError

    def _repr_markdown_(self) -> str:
        return str(self.markdown())

    def __rich__(self) -> RichMarkdown:
        return self.markdown().__rich__()


def shows_markdown(fn: Callable[..., str]) -> Callable[..., Markdown]:
    """For a function that writes markdown text: its result shows itself (see Markdown)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Markdown:
        return Markdown(fn(*args, **kwargs))

    return wrapper


def md_cell(value: Any) -> str:
    """One markdown table cell: a '|' inside would end the cell, a newline the row."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]) -> Markdown:
    """The one markdown-table writer for reports, docs and notebooks (headers escaped too)."""
    lines = ["| " + " | ".join(md_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(md_cell(c) for c in row) + " |")
    return Markdown("\n".join(lines))


def cell(value: Any) -> str:
    """A value as table text: '-' for None, yes/no, 3 figures for floats, lists and dicts flat."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    return str(value)  # markdown_table escapes '|' and newlines


def table(rows: Sequence[Mapping] | Mapping, columns: Optional[Sequence[str]] = None) -> Markdown:
    """A markdown table from dicts (one row each), or from one dict (two columns: name, value)."""
    if isinstance(rows, Mapping):
        rows = [{"": k, "value": v} for k, v in rows.items()]
        columns = columns or ["", "value"]
    rows = list(rows)
    if not rows:
        return Markdown("(nothing to show)")
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    return markdown_table(columns, ([cell(r.get(c)) for c in columns] for r in rows))


def bullets(lines: Iterable[str]) -> Markdown:
    return Markdown("\n".join(f"- {line}" for line in lines))


def join(*parts: Optional[str]) -> Markdown:
    """Paragraphs and tables, one blank line apart (None and empty parts left out)."""
    return Markdown("\n\n".join(str(p) for p in parts if p))
