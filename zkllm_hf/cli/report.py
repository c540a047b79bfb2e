"""``zkllm-hf report DIR [--out FILE]``: the capture's self-contained HTML page (:mod:`zkllm_hf.report`)."""

from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

from .common import open_capture
from .exits import EXIT_ENVIRONMENT, EXIT_INVALID, EXIT_OK, EXIT_USAGE, err


def out_problem(out: Path, capture: Path, overwrite: bool) -> str | None:
    """Why the page may not be written to ``out``, else None: never into the capture (whose manifest would not
    list it), never through a symlink, and over an existing file only with --overwrite and only if this command
    wrote it."""
    from ..report import is_report

    if out.is_symlink():
        return f"--out {out} is a symlink; the report is never written through one: choose another --out"
    folder = out.absolute().parent.resolve()
    if folder == capture.resolve() or capture.resolve() in folder.parents:
        return (
            f"--out {out} is inside the capture {capture}, where its manifest would not list it: write the report "
            f"outside the capture folder"
        )
    if not folder.is_dir():
        return f"--out {out}: the folder {folder} does not exist; create it or choose another --out"
    if out.exists():
        if not overwrite:
            return f"--out {out} exists; pass --overwrite to replace it, or choose another --out"
        if not is_report(out):
            return f"--out {out} exists and is not a page zkllm-hf report wrote; refusing to replace it"
    return None


def write_atomically(out: Path, text: str) -> None:
    """``text`` to ``out`` by a temporary file beside it and a rename."""
    tmp = out.with_name(f".{out.name}.zkllm-tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of ``args.dir`` to ``args.out``; 0 if the capture is valid, 1 if not (the page says
    why), 2 for an --out it may not write, 3 without matplotlib or when the page cannot be written."""
    from ..report import build_report
    from ..report_plots import MISSING, pyplot

    try:
        pyplot()
    except ImportError:
        err(MISSING)
        return EXIT_ENVIRONMENT
    cap = open_capture(args.dir)
    if isinstance(cap, int):
        return cap
    out = Path(args.out)
    problem = out_problem(out, Path(args.dir), args.overwrite)
    if problem is not None:
        err(problem)
        return EXIT_USAGE
    page = build_report(args.dir)
    try:
        write_atomically(out, page.html)
    except OSError as exc:
        err(f"--out {out}: cannot write the report ({exc.strerror or exc})")
        return EXIT_ENVIRONMENT
    verdict = "valid" if page.ok else f"INVALID, {len(page.validation.failures)} failed checks (listed on the page)"
    print(f"wrote {out} ({len(page.html) // 1024} KiB): {args.dir} is {verdict}")
    return EXIT_OK if page.ok else EXIT_INVALID
