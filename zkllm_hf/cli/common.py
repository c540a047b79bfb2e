"""What several commands share: a capture opened for reading, text tables, and layer lists written as ranges."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .exits import READING_A_CAPTURE, fail


def open_capture(path: str):
    """The capture at ``path``, or the exit code (1) after printing why it cannot be read."""
    from ..validate import CaptureNotFinished, load_capture

    try:
        return load_capture(path)
    except (CaptureNotFinished, OSError, ValueError) as exc:
        return fail(exc, READING_A_CAPTURE)


NUMBER = re.compile(r"-?\d+(\.\d+)?")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """``rows`` under ``headers`` in aligned columns: a column of plain numbers right-aligned, any other
    column left-aligned (a value that merely starts with a digit stays in line with its neighbours)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(NUMBER.fullmatch(r[i]) for r in cells[1:]) for i in range(len(headers))]
    fmt = lambda r: "  ".join(  # noqa: E731
        c.rjust(w) if right else c.ljust(w) for c, w, right in zip(r, widths, numeric)
    ).rstrip()
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def ranges(xs: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5 (4)``."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out) + f" ({len(xs)})"
