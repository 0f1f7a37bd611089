"""The summary table each job prints at the end: aligned columns, one header row."""

from __future__ import annotations

from typing import Any, Sequence


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value)


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[format_value(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(header)]
    lines = [
        title,
        "  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)),
        "  " + "  ".join("-" * w for w in widths),
    ]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print("\n" + format_table(title, header, rows), flush=True)


def print_facts(title: str, facts: Sequence[tuple[str, Any]]) -> None:
    """Key/value lines, as ``omniembed``'s own summary."""
    width = max(len(k) for k, _ in facts)
    print(f"\n{title}")
    for key, value in facts:
        print(f"  {key.ljust(width)}  {format_value(value)}")
