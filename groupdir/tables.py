"""Markdown tables, the form every benchmark and sweep table is printed and saved in."""

from __future__ import annotations


def markdown_row(cells) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(header, rows, text_columns: int = 1) -> list[str]:
    """The table's lines: the first `text_columns` columns left-aligned, the others (numbers) right."""
    rule = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    return [markdown_row(header), rule, *(markdown_row(row) for row in rows)]
