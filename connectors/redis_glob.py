"""Redis glob patterns, matched the way Redis itself matches them.

Key patterns are handed to Redis (PSUBSCRIBE, SCAN MATCH), so the feed must agree with Redis on what
a pattern means when it resolves a row room name back to its pattern. Python's `fnmatch` does not:
it negates with `[!...]` and has no backslash escape, while Redis negates with `[^...]` and escapes
with `\\`. This module translates Redis's rules (from `stringmatchlen` in util.c) into a regex.
"""

from __future__ import annotations

import re
from functools import lru_cache

GLOB_CHARS = frozenset("*?[\\")


class PatternError(ValueError):
    """A pattern Redis would misread (we refuse rather than guess what the user meant)."""


def is_glob(pattern: str) -> bool:
    return any(c in GLOB_CHARS for c in pattern)


@lru_cache(maxsize=256)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """A regex that full-matches exactly the keys `pattern` matches in Redis."""
    if not pattern:
        raise PatternError("a key pattern cannot be empty")
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            while i + 1 < n and pattern[i + 1] == "*":
                i += 1
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\":
            # Redis: a backslash escapes the next character; a trailing one is a literal backslash.
            if i + 1 < n:
                i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            i, cls = _char_class(pattern, i)
            out.append(cls)
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _char_class(pattern: str, start: int) -> tuple[int, str]:
    """Translate `[...]` starting at `start`; return the index of `]` and the regex class."""
    i = start + 1
    n = len(pattern)
    negate = i < n and pattern[i] == "^"
    if negate:
        i += 1
    parts: list[str] = []
    while True:
        if i >= n:
            raise PatternError(f"unclosed '[' at position {start} in key pattern {pattern!r}")
        c = pattern[i]
        if c == "]":
            break
        if c == "\\" and i + 1 < n:
            i += 1
            parts.append(re.escape(pattern[i]))
        elif i + 2 < n and pattern[i + 1] == "-" and pattern[i + 2] != "]":
            lo, hi = sorted((pattern[i], pattern[i + 2]))  # Redis accepts reversed ranges
            parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
            i += 2
        else:
            parts.append(re.escape(c))
        i += 1
    if not parts:
        # `[]` matches nothing in Redis and `[^]` anything: say so instead of building odd regexes.
        return i, "." if negate else "(?!)"
    return i, ("[^" if negate else "[") + "".join(parts) + "]"


def matches(pattern: str, key: str) -> bool:
    return compile_glob(pattern).fullmatch(key) is not None


def validate(pattern: str) -> None:
    """Raise PatternError with a one-line reason when Redis would misread `pattern`."""
    if pattern != pattern.strip():
        raise PatternError(f"key pattern {pattern!r} has leading or trailing whitespace")
    compile_glob(pattern)
