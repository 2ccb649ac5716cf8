"""How messages show text a user typed: invisible characters escaped, long text shortened.

A prompt or expression can hold characters that print as nothing (zero-width spaces, direction
marks) or that move the terminal's cursor (escape, carriage return): a message echoing them raw
shows something other than what was typed, or nothing at all. They are written as Python writes
them in a ``repr`` (``\\u200b``, ``\\x1b``). A message also never echoes more than a window of a
long input around the place it points at.
"""

from __future__ import annotations

import unicodedata

__all__ = ["escape_invisible", "shorten", "excerpt"]

INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))
"""Unicode categories escaped: controls, format characters (zero-width, direction marks), surrogates,
private-use and unassigned code points, line and paragraph separators."""


def escape_invisible(text: str, keep: str = "") -> str:
    """``text`` with each character of an :data:`INVISIBLE` category (but those in ``keep``, e.g.
    a message's own newlines) written as its ``repr`` escape: ``"a\\u200bb"`` → ``a\\u200bb``."""
    return "".join(
        repr(c)[1:-1] if c not in keep and unicodedata.category(c) in INVISIBLE else c for c in text
    )


def shorten(text: str, limit: int = 60, quote: bool = True) -> str:
    """``repr(text)`` (``quote=False``: the text with invisible characters escaped), the middle of a
    text longer than ``limit`` characters replaced by the number of characters left out."""
    show = repr if quote else escape_invisible
    if len(text) <= limit:
        return show(text)
    half = limit // 2
    return f"{show(text[:half])}…({len(text) - 2 * half} characters)…{show(text[-half:])}"


def _width(text: str) -> int:
    """Terminal columns of ``text``: 2 for East Asian wide characters, 0 for combining marks."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text
    )


def excerpt(text: str, position: int, radius: int = 40) -> tuple[str, int]:
    """One line of ``text`` around ``position`` (at most ``radius`` characters either side, an
    ellipsis where cut), invisible characters, newlines and tabs escaped, and the column under which
    the character at ``position`` is shown there (for a caret line)."""
    start, end = max(0, position - radius), min(len(text), position + radius + 1)
    before = ("…" if start > 0 else "") + escape_invisible(text[start:position])
    after = escape_invisible(text[position:end]) + ("…" if end < len(text) else "")
    return before + after, _width(before)
