"""File appends that bypass the page cache, and the read-back that checks what reached the file.

A capture's files are written once and read much later (by the prover, by ``validate``). Writing them through
the page cache costs the forward its cores: the kernel copies every byte into the cache, and writes it back
later on its own threads, on the same two cores the model's matmuls need (bench/RESULTS.md measures it).
Where the filesystem allows it (Linux ``O_DIRECT``), :class:`FileAppender` hands the block-aligned part of each
append to the device straight from the capture's own page-aligned buffer, and writes the rest (under one block)
through the cache. Right after, it reads the appended bytes back from the file (the aligned part with
``O_DIRECT`` too, so from the device, not from a cached copy), compares them with what was written, byte
for byte, and keeps their int32 range: the gate's file checks judge those read-backs against the manifest,
so the commit does not read the capture again. Each
read-back carries the file's :func:`stamp` (inode, size, modification and change times) from then; the gate
uses a read-back only while the file's stamp is unchanged, and reads the file itself otherwise, so a write
to a staged file after its read-back is still caught before the commit (on Linux 6.13 and later a change
right after a ``stat`` always gets a new timestamp; on older kernels one within the same clock tick, a few
milliseconds, can keep it, and then only ``validate`` sees the change).

Where ``O_DIRECT`` is missing, refused by the filesystem (``EINVAL``), or the buffer or offset is not aligned,
the same appender writes and reads through the cache; the checks are the same either way.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .digests import digest_bytes, hasher

READ_CHUNK = 8 << 20  # read-backs go through one buffer this large per writer thread (a multiple of BLOCK)
BLOCK = 4096  # alignment of O_DIRECT offsets, lengths and buffers: a page, a multiple of every logical block size
O_DIRECT = getattr(os, "O_DIRECT", 0)
_REFUSED = (errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL), getattr(errno, "ENOTSUP", errno.EINVAL))


@dataclass(frozen=True)
class ReadBack:
    """What a file holds, as read from it: its size, its digest under ``algorithm``, and its smallest and
    largest int32 code (None when it holds no whole int32 values)."""

    size: int
    algorithm: str
    digest: str
    int_min: int | None = None
    int_max: int | None = None
    stamp: tuple[int, ...] | None = None  # the file's stamp() when it was read back (or last linked)


def stamp(path: Path) -> tuple[int, ...]:
    """``(inode, size, mtime_ns, ctime_ns)`` of ``path``: any write to the file, or a new link to it, changes it."""
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_back_of(data: bytes | memoryview, algorithm: str) -> ReadBack:
    """The :class:`ReadBack` of a whole file's bytes (as ``validate`` reads them)."""
    lo = hi = None
    if len(data) and not len(data) % 4:
        codes = np.frombuffer(data, dtype="<i4")
        lo, hi = int(codes.min()), int(codes.max())
    return ReadBack(len(data), algorithm, digest_bytes(algorithm, data), lo, hi)


_local = threading.local()  # each writer thread's page-aligned read-back buffer, reused


def _scratch(n: int) -> memoryview:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = mmap.mmap(-1, max(n, BLOCK))  # anonymous maps start on a page boundary
    return memoryview(buf)[:n]


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def _write_at(fh: Any, view: memoryview, offset: int) -> None:
    fh.seek(offset)
    done = 0
    while done < len(view):
        done += fh.write(view[done:])


def _read_at(fh: Any, out: memoryview, offset: int) -> int:
    """Read into ``out`` from ``offset`` of the open file ``fh`` until it is full or the file ends."""
    fh.seek(offset)
    got = 0
    while got < len(out):
        n = fh.readinto(out[got:])
        if not n:
            break
        got += n
    return got


def _same(a: memoryview, b: memoryview) -> bool:
    """Whether two byte views of one length hold the same bytes (compared eight at a time)."""
    whole = len(a) - len(a) % 8
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    return bool(np.array_equal(x[:whole].view(np.uint64), y[:whole].view(np.uint64))) and a[whole:] == b[whole:]


class FileAppender:
    """One staged file, written by appends in order (by one writer thread), each read back as it lands.

    ``sent`` hashes the bytes handed to the file; each append's bytes read back are compared with them, byte
    for byte. :meth:`read_back` says what was read (its digest is then ``sent``'s), or None if anything read
    back differs from what was written, in length or in content (then the gate reads the file itself).
    ``direct``: whether to try ``O_DIRECT`` (it turns itself off, for this file, where the filesystem refuses it)."""

    def __init__(self, path: Path, algorithm: str, *, direct: bool = True):
        self.path, self.algorithm = path, algorithm
        self.direct = bool(direct and O_DIRECT)
        self.size = 0  # bytes appended so far
        self.direct_bytes = 0  # of which written with O_DIRECT
        self.sent = hasher(algorithm)
        self._lo: int | None = None
        self._hi: int | None = None
        self._differs = False  # a read-back came up short or different: the file is not what was written
        self._stamp: tuple[int, ...] | None = None  # the file's stamp after the last read-back

    def append(self, view: memoryview) -> None:
        """Append ``view`` (bytes) to the file, then read the appended range back."""
        self.sent.update(view)
        start, n = self.size, len(view)
        aligned = 0
        if self.direct and not start % BLOCK and n >= BLOCK and not _address(view) % BLOCK:
            aligned = self._write_direct(view[: n - n % BLOCK], start)
        if aligned < n or not (start or aligned):  # the tail, or an empty first append (the file exists)
            with open(self.path, "r+b" if self.size or aligned else "wb", buffering=0) as fh:
                _write_at(fh, view[aligned:], start + aligned)
        self.size += n
        self.direct_bytes += aligned
        self._read_back(view, start, aligned)

    def _write_direct(self, view: memoryview, offset: int) -> int:
        """Write ``view`` at ``offset`` with O_DIRECT; the bytes written (0 where the filesystem refuses)."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | O_DIRECT, 0o644)
        except OSError as e:
            if e.errno not in _REFUSED:
                raise
            self.direct = False
            return 0
        try:
            done = 0
            while done < len(view):
                n = os.pwrite(fd, view[done:], offset + done)
                if not n or n % BLOCK:  # a short, unaligned write: the rest (rewritten the same) through the cache
                    return done + n - n % BLOCK
                done += n
            return done
        except OSError as e:
            if e.errno not in _REFUSED or done:
                raise
            self.direct = False
            return 0
        finally:
            os.close(fd)

    def _read_back(self, view: memoryview, start: int, aligned: int) -> None:
        """Read the append of ``view`` at ``start`` back in chunks (the first ``aligned`` bytes with O_DIRECT, as
        written), compare each with what was written and take its range; a short or different read marks the
        file."""
        n = len(view)
        end, direct_end = start + n, start + aligned
        with contextlib.ExitStack() as stack:
            # O_DIRECT exists here whenever aligned > 0: the write used it
            direct = stack.enter_context(open(os.open(self.path, os.O_RDONLY | O_DIRECT), "rb", 0)) if aligned else None
            cached = stack.enter_context(open(self.path, "rb", buffering=0)) if aligned < n else None
            pos = start
            while pos < end:
                fh, limit = (direct, direct_end) if pos < direct_end else (cached, end)
                out = _scratch(READ_CHUNK)[: min(READ_CHUNK, limit - pos)]
                if _read_at(fh, out, pos) != len(out) or not _same(out, view[pos - start : pos - start + len(out)]):
                    self._differs = True
                    return
                self._range(out)
                pos += len(out)
        self._stamp = stamp(self.path)

    def _range(self, data: memoryview) -> None:
        if len(data) % 4:
            self._differs = True  # appends not of whole int32 values: let the gate read the file
            return
        if not len(data):
            return
        codes = np.frombuffer(data, dtype="<i4")
        lo, hi = int(codes.min()), int(codes.max())
        self._lo = lo if self._lo is None else min(self._lo, lo)
        self._hi = hi if self._hi is None else max(self._hi, hi)

    def read_back(self, size: int) -> ReadBack | None:
        """What was read back, if it covers the file's ``size`` bytes exactly and the file is unchanged since
        (else None)."""
        if self._differs or size != self.size or self._stamp is None or stamp(self.path) != self._stamp:
            return None
        return ReadBack(size, self.algorithm, self.sent.hexdigest(), self._lo, self._hi, self._stamp)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"FileAppender({str(self.path)!r}, size={self.size}, direct_bytes={self.direct_bytes})"
