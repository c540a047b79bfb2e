"""Streaming, atomic output: files go to a staging folder next to the target and move into place whole.

A staging folder carries a ``PARTIAL`` marker from creation until it is renamed into place, so a reader
can always tell a finished capture (it has ``manifest.arrow``, written last, and no marker) from a broken
one. Writes and SHA-256 run on a background thread, with a bounded number of files in flight, so the
model's forward overlaps the disk and memory held stays bounded whatever the layer count.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

PARTIAL_MARKER = "PARTIAL"
MANIFEST_NAME = "manifest.arrow"
_STAGING_TAG = ".zkllm-staging-"


@dataclass(frozen=True)
class WrittenFile:
    name: str
    sha256: str
    byte_size: int


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a target that exists and is not empty, unless ``overwrite`` and it is a capture itself."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"output path '{out_dir}' exists and is not a directory; choose another --out")
    entries = list(out_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"output directory '{out_dir}' exists and is not empty ({len(entries)} entries); pass "
            f"--overwrite (overwrite=True) to replace it, or choose another --out"
        )
    if not (out_dir / MANIFEST_NAME).is_file() and not (out_dir / PARTIAL_MARKER).exists():
        raise FileExistsError(
            f"output directory '{out_dir}' is not a zkllm-hf capture (no {MANIFEST_NAME}); refusing to "
            f"replace it even with --overwrite. Remove it yourself or choose another --out"
        )


class StagingDir:
    """A staging folder beside ``out_dir``; :meth:`commit` renames it into place, :meth:`abort` removes it."""

    def __init__(self, out_dir: str | os.PathLike[str], *, overwrite: bool = False, max_in_flight: int = 16):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        check_target(self.out_dir, overwrite)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir.parent / f".{self.out_dir.name}{_STAGING_TAG}{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        (self.path / PARTIAL_MARKER).write_text("zkllm-hf capture in progress; not a finished capture\n")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zkllm-writer")
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._futures: list[Future[WrittenFile]] = []
        self._closed = False

    def write(self, name: str, codes: np.ndarray, aliases: tuple[str, ...] = ()) -> Future[WrittenFile]:
        """Queue ``codes`` (int32) to be written as raw little-endian C-order bytes to ``name``.

        Each name in ``aliases`` then gets the same bytes, as a hard link where the filesystem allows.
        """
        data = np.ascontiguousarray(codes, dtype="<i4")
        self._slots.acquire()  # bounds the bytes held in flight
        try:
            fut = self._pool.submit(self._write, self.path / name, data, aliases)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _: self._slots.release())
        self._futures.append(fut)
        return fut

    @staticmethod
    def _write(path: Path, data: np.ndarray, aliases: tuple[str, ...]) -> WrittenFile:
        view = memoryview(data).cast("B")
        digest = hashlib.sha256(view).hexdigest()
        with open(path, "wb") as fh:
            fh.write(view)
            fh.flush()
            os.fsync(fh.fileno())
        for alias in aliases:
            try:
                os.link(path, path.with_name(alias))
            except OSError:
                shutil.copyfile(path, path.with_name(alias))
        return WrittenFile(path.name, digest, len(view))

    def wait(self) -> list[WrittenFile]:
        """Wait for every queued write; re-raise the first failure."""
        return [f.result() for f in self._futures]

    def commit(self, write_manifest: Callable[[Path], None]) -> Path:
        """Wait for the writes, let ``write_manifest(path)`` write the manifest last, then move into place."""
        self.wait()
        self._pool.shutdown(wait=True)
        write_manifest(self.path / MANIFEST_NAME)
        (self.path / PARTIAL_MARKER).unlink()
        _fsync_dir(self.path)
        check_target(self.out_dir, self.overwrite)  # the target may have changed during the forward
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.zkllm-old-{uuid.uuid4().hex[:12]}"
            os.rename(self.out_dir, old)
        try:
            os.rename(self.path, self.out_dir)
        except BaseException:
            if old is not None:  # put the previous capture back
                os.rename(old, self.out_dir)
            raise
        _fsync_dir(self.out_dir.parent)
        self._closed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything staged; the target is left exactly as it was."""
        if self._closed:
            return
        self._closed = True
        for fut in self._futures:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
