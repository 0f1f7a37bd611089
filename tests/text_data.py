"""Real offline text for the tests: lines of Python's own docstrings."""

from __future__ import annotations

import builtins


def docstring_lines(min_chars: int = 16) -> list[str]:
    """Every line of the builtins' docstrings with at least ``min_chars`` characters, stripped, in
    a fixed order (sorted by builtin name)."""
    return [
        line.strip()
        for name in sorted(dir(builtins))
        for line in (getattr(builtins, name).__doc__ or "").splitlines()
        if len(line.strip()) >= min_chars
    ]
