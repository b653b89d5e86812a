"""Plain-text tables for the command line: one formatter for every ``ai-saas`` table."""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["table"]


def table(rows: Sequence[Sequence[str]], *, right: Collection[int] = ()) -> str:
    """``rows`` of cells (the first row the header) as columns two spaces apart.

    Cells are left-aligned, except in the columns whose index is in ``right``
    (right-aligned: numbers line up by their last digit). Each line's trailing spaces
    are dropped. Every row must have as many cells as the header.
    """
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                  for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows)
