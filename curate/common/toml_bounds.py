"""Bounds on a TOML text, checked before tomllib parses it.

tomllib has no limits of its own: deeply nested arrays or inline tables end in a
RecursionError, and a 200 KB dotted key (`a.a.a...`) builds 100,000 nested tables (GBs,
minutes, then MemoryError). Config and query files are small and shallow, so a file over
MAX_BYTES, nested deeper than MAX_DEPTH brackets, or with a key of more than MAX_DEPTH
dotted parts is refused with one line before parsing.
"""

from __future__ import annotations

import re

from curate.errors import CurateError

MAX_BYTES = 1 << 20   # 1 MiB: the largest real config is a few KB
MAX_DEPTH = 32        # nested [ / { and dotted key parts

_NUMBER = re.compile(r"[+-]?\d[\d_]*\.\d[\d_]*(?:[eE][+-]?\d+)?")  # a float's dot is no key part


def check(text: str, label: str) -> None:
    """Raise a one-line CurateError when `text` is over the bounds."""
    if len(text) > MAX_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise CurateError(f"{label}: too large for a config file (over {MAX_BYTES // 1024} KiB)")
    depth = deepest = 0
    bare: list[str] = []  # the line's text outside strings and comments
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            i += len(quote)
            while i < n and not text.startswith(quote, i):
                if quote == c and text[i] == "\n":
                    break  # an unclosed one-line string: tomllib says what is wrong
                i += 2 if c == '"' and text[i] == "\\" else 1
            i += len(quote)
            bare.append("s")
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
        elif c == "\n":
            _check_line("".join(bare), label)
            bare = []
        if c != "\n":
            bare.append(c)
        if deepest > MAX_DEPTH:
            raise CurateError(f"{label}: nested deeper than {MAX_DEPTH} levels (arrays / tables)")
        i += 1
    _check_line("".join(bare), label)


def _check_line(line: str, label: str) -> None:
    if line.count(".") > MAX_DEPTH and _NUMBER.sub("", line).count(".") > MAX_DEPTH:
        raise CurateError(f"{label}: a key with more than {MAX_DEPTH} dotted parts")
