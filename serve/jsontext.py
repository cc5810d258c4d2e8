"""Bracket structure of JSON text, scanned without parsing it (text may be partial, or too deep to parse)."""

from __future__ import annotations

from collections.abc import Iterator


def bracket_depths(text: str, start: int = 0) -> Iterator[tuple[int, int]]:
    """(index, depth after it) for every bracket of text[start:] outside strings: "{" / "[" deepen, "}" / "]"
    return."""
    depth, in_str, esc = 0, False, False
    for j in range(start, len(text)):
        ch = text[j]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
            yield j, depth
        elif ch in "}]":
            depth -= 1
            yield j, depth
