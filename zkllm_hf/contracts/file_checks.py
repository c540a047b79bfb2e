"""The file checks: each file of a capture read once (on threads), for its size, digest and int range; and
:func:`inside`, the one test of whether a manifest's file name stays inside its capture folder.

The checks judge a :class:`~zkllm_hf.direct_io.ReadBack`: what a file holds, as read from it. ``validate``
reads every file here; the capture's gate passes in what its writer read back from each file as the bytes
landed (``known``), and only the files without one are read again."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..digests import row_digest
from ..direct_io import ReadBack, read_back_of
from .registry import entries_of, implementation, register_check
from .spec import CheckResult, CheckSpec, Contract, row_place


@register_check("integrity", "file")
def _integrity(spec: CheckSpec, row: Mapping[str, Any], data: ReadBack | None, problem: str | None) -> CheckResult:
    where = row_place(row)
    if data is None:
        return CheckResult(spec.name, False, problem or "file is unreadable", **where)
    if data.size != row["byte_size"]:
        return CheckResult(spec.name, False, f"{data.size} bytes, manifest says {row['byte_size']}", **where)
    algorithm, want = row_digest(row)
    digest = data.digest
    if data.algorithm != algorithm or digest != want:
        said = f"{algorithm} {digest[:12]}..., manifest says {str(want)[:12]}..."
        return CheckResult(spec.name, False, said, **where)
    return CheckResult(spec.name, True, **where)


@register_check("range", "file")
def _range(spec: CheckSpec, row: Mapping[str, Any], data: ReadBack | None, problem: str | None) -> CheckResult:
    where = row_place(row)
    if data is None or data.size % 4:
        return CheckResult(spec.name, False, skipped=f"no int32 data to read ({problem or 'truncated file'})", **where)
    if data.int_min is None or data.int_max is None:
        return CheckResult(spec.name, False, "file holds no values", **where)
    lo, hi = data.int_min, data.int_max
    ok = (lo, hi) == (row["int_min"], row["int_max"]) and lo > -(2**31)
    message = "" if ok else f"data spans [{lo}, {hi}], manifest says [{row['int_min']}, {row['int_max']}]"
    if lo == -(2**31):
        message += "; -2**31 is outside the symmetric int32 range zkLLM uses"
    return CheckResult(spec.name, ok, message, **where)


def inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` if ``name`` is a plain relative path that stays inside ``folder``, else None.

    No ``..``, no absolute path, and no symlink among its components that leads out of ``folder`` (only a
    component that is a symlink is resolved, so the common case costs one ``lstat`` per component).
    """
    parts = Path(name).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or Path(name).is_absolute():
        return None
    path = folder
    try:
        for part in parts:
            path = path / part
            if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
                return None
    except OSError:
        return None
    return path


def _read(path: Path, local: threading.local) -> memoryview:
    """The whole file, read into this thread's buffer (grown as needed); the view is valid until the next read."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < size + 1:
            buf = local.buf = bytearray(size + 1)
        view = memoryview(buf)
        n = 0
        while True:  # up to the end, even if the file grew since fstat (one spare byte tells)
            got = fh.readinto(view[n:])
            if not got:
                break
            n += got
            if n == len(buf):
                local.buf = bytearray(2 * len(buf))
                local.buf[:n] = buf
                buf, view = local.buf, memoryview(local.buf)
        return view[:n]


def run_file_checks(
    contract: Contract,
    folder: Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    progress: bool = False,
    known: Mapping[str, ReadBack] | None = None,
) -> list[CheckResult]:
    """The contract's file checks, each file read once (on threads), except those ``known`` gives (by the
    row's ``file``) as already read back. ``progress`` shows a bar on a terminal."""
    specs = entries_of(contract, "file")
    if not specs:
        return []

    local = threading.local()  # one read buffer per thread, reused: no fresh memory (and page faults) per file
    paths = [inside(folder, str(row["file"])) for row in rows]
    inodes = [_inode(p) for p in paths]
    first = {key: i for i, key in reversed(list(enumerate(inodes))) if key is not None}
    same = [first.get(key, i) for i, key in enumerate(inodes)]  # the first row naming the same file, or itself
    read: dict[int, ReadBack] = {}  # row index -> what its file held, for the rows that read it

    def check(i: int) -> list[CheckResult]:
        row, path = rows[i], paths[i]
        if path is None:  # never opened: the containment check names the row
            return []
        algorithm = row_digest(row)[0]
        data, problem = (known or {}).get(str(row["file"])), None
        if data is None and same[i] != i:  # a hard link of a file read before (an alias): its bytes, not again
            data = read.get(same[i])
        if data is not None and data.algorithm != algorithm:  # a read-back under another digest: read it
            data = None
        if data is None and not path.is_file():
            problem = "file is missing"
        elif data is None:
            data = read[i] = read_back_of(_read(path, local), algorithm)
        return [implementation(s)(s, row, data, problem) for s in specs]

    # the first row of each file in a first pass, its other names (hard links) in a second
    firsts = [i for i in range(len(rows)) if same[i] == i]
    others = [i for i in range(len(rows)) if same[i] != i]
    out: dict[int, list[CheckResult]] = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        bar = tqdm(total=len(rows), desc="files", unit="file", disable=None if progress else True)
        for batch in (firsts, others):
            for i, results in zip(batch, pool.map(check, batch)):
                out[i] = results
                bar.update(1)
        bar.close()
    return [r for i in range(len(rows)) for r in out[i]]


def _inode(path: Path | None) -> tuple[int, int] | None:
    """``(device, inode)`` of a regular file, or None (no path, missing, not a regular file)."""
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st is not None and stat.S_ISREG(st.st_mode) else None
