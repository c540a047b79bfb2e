"""Streaming, atomic output: files go to a staging folder next to the target and move into place whole.

A staging folder carries a ``PARTIAL`` marker from creation until it is renamed into place, so a reader
can always tell a finished capture (it has ``manifest.arrow``, written last, and no marker) from a broken
one. Writes, digests and read-backs run on background threads, with a bounded number of bytes in flight, so
the model's forward overlaps the disk and memory held stays bounded whatever the layer count; the writes go
around the page cache where the filesystem allows it (:mod:`zkllm_hf.direct_io`).

It also holds the ownership rule (:func:`foreign_files`): what zkllm-hf may replace or delete is what a
manifest it wrote lists, or its own pid-named staging, old, temp and lock entries; never a file by its name.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .digests import DEFAULT_DIGEST, check_digest, digest_file
from .direct_io import FileAppender, ReadBack, stamp
from .errors import TargetBusyError  # noqa: F401 - importable from here as before
from .ownership import (  # noqa: F401 - the ownership rule and the leftovers, also importable from here as before
    LEFTOVER,
    STEP_DIR,
    UNIT_DIR,
    WORK,
    TargetLock,
    clean_leftovers,
    delete_in_background,
    foreign_files,
    leftover_name,
    remove_leftovers,
    shown_paths,
    wait_for_deletions,
    zkllm_manifest,
)

PARTIAL_MARKER = "PARTIAL"
MANIFEST_NAME = "manifest.arrow"  # also ownership.MANIFEST_NAME


@dataclass(frozen=True)
class WrittenFile:
    name: str
    digest: str
    byte_size: int
    algorithm: str = DEFAULT_DIGEST
    read_back: ReadBack | None = None  # the file as read back after each write (None: the gate reads it)

    @property
    def sha256(self) -> str:
        """Deprecated (0.1.x): the digest, whatever its algorithm; read ``digest`` and ``algorithm``."""
        return self.digest


DURABILITY = ("append", "seal", "syncfs")  # when the staged bytes are made durable (docs in StagingDir)
SYNC_THREADS = 4  # fdatasyncs in flight at once (durability "append"); bench/RESULTS.md measures the choice


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a target that exists and is not empty, unless ``overwrite`` and it is a finished capture that
    holds nothing zkllm-hf does not own (:func:`foreign_files`), so replacing it deletes nothing of anyone's."""
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
    if zkllm_manifest(out_dir / MANIFEST_NAME) is None:
        why = (
            f"its {MANIFEST_NAME} does not read as one zkllm-hf wrote (format, metadata or digest)"
            if (out_dir / MANIFEST_NAME).exists()
            else f"no {MANIFEST_NAME}"
        )
        raise FileExistsError(
            f"output directory '{out_dir}' is not a finished zkllm-hf capture ({why}); refusing to replace it "
            f"even with --overwrite. Remove it yourself or choose another --out"
        )
    foreign = foreign_files(out_dir)
    if foreign:
        raise FileExistsError(
            f"output directory '{out_dir}' holds files its manifest does not list ({shown_paths(foreign)}); "
            f"--overwrite only replaces a capture holding nothing else. Move them away or choose another --out"
        )


class StagingDir:
    """A staging folder beside ``out_dir``; :meth:`commit` renames it into place, :meth:`abort` removes it.

    Files are named by their path relative to the staging folder (``layer-0-...bin`` for a flat capture,
    ``sample-1/step-2/layer-0-...bin`` in a dataset). ``writers`` background threads run the writes; each file
    belongs to one of them (given in turn as files first appear), which runs its writes in the order they were
    queued, so a file may be built by several :meth:`append_many` calls (a prompt prefilled in chunks) and
    :meth:`remove` drops a folder only after the writes queued into it, on every thread. At most
    ``max_in_flight_bytes`` of host copies wait for the disk (more only when one array alone is larger), which
    bounds memory. Each file is hashed (``digest``) as it is written, and each append read back as it lands
    and compared with what was written (:class:`~zkllm_hf.direct_io.FileAppender`; with ``direct``, around the
    page cache where the filesystem allows it).

    Every file is durable before the commit's rename. ``durability`` says when: ``"append"`` (the default)
    hands each file to a pool of sync threads as each write to it closes, which ``fdatasync`` it while the
    forward and the writers go on (concurrent syncs share the filesystem's journal commits), so the commit
    waits only for the syncs still running; ``"seal"`` fsyncs each file when its unit ends (one fsync per
    file at commit, as before 1.5); ``"syncfs"`` makes one ``syncfs`` of the staging folder's filesystem at
    commit (Linux; elsewhere it falls back to ``"seal"``). bench/RESULTS.md measures the three.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        max_in_flight_bytes: int = 64 << 20,
        digest: str = DEFAULT_DIGEST,
        writers: int = 1,
        durability: str = "append",
        direct: bool = True,
    ):
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.max_in_flight_bytes = max_in_flight_bytes
        self.digest = check_digest(digest)
        self.direct = direct  # O_DIRECT appends; turned off for the files after one the filesystem refused
        if durability not in DURABILITY:
            raise ValueError(f"durability={durability!r}; one of {', '.join(DURABILITY)}")
        self.durability = "seal" if durability == "syncfs" and _syncfs() is None else durability
        check_target(self.out_dir, overwrite)
        self._lock = TargetLock(self.out_dir)  # fails fast if another capture writes there; cleans up dead ones
        try:
            self.path = leftover_name(self.out_dir, "staging")
            self.path.mkdir()
            (self.path / PARTIAL_MARKER).write_text("zkllm-hf capture in progress; not a finished capture\n")
        except BaseException:
            self._lock.release()
            raise
        self._pools = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"zkllm-writer-{i}") for i in range(max(1, writers))
        ]
        self._shard: dict[str, int] = {}  # file -> its writer thread; set by the capture's thread only
        self._budget = threading.Condition()
        self._in_flight = 0
        self._futures: list[Future[Any]] = []
        self._files: dict[str, FileAppender] = {}  # name -> its appender; each used by its file's writer thread only
        self._barriers: list[threading.Barrier] = []  # removals waiting for every writer thread
        self._syncer = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="zkllm-sync")
        self._syncs: list[Future[Any]] = []  # each closed write's fdatasync (durability "append")
        self._closed = False

    @property
    def writers(self) -> int:
        return len(self._pools)

    def _shard_of(self, name: str) -> int:
        shard = self._shard.get(name)
        if shard is None:
            shard = self._shard[name] = len(self._shard) % len(self._pools)
        return shard

    def _reserve(self, nbytes: int) -> None:
        with self._budget:
            while self._in_flight and self._in_flight + nbytes > self.max_in_flight_bytes:
                self._budget.wait()
            self._in_flight += nbytes

    def _submit(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0, shard: int = 0) -> Future[Any]:
        """Queue ``fn(*args)`` on writer ``shard``; ``nbytes`` were reserved for it and are freed when it ends."""
        try:
            fut = self._pools[shard].submit(fn, *args)
        except BaseException:
            self._release(nbytes)
            raise
        fut.add_done_callback(lambda _: self._release(nbytes))
        self._futures.append(fut)
        return fut

    def _release(self, nbytes: int) -> None:
        with self._budget:
            self._in_flight -= nbytes
            self._budget.notify_all()

    def _groups(self, names: list[str]) -> dict[int, list[int]]:
        """The positions of ``names`` by writer thread, in order."""
        groups: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(self._shard_of(name), []).append(i)
        return groups

    def append_many(
        self,
        items: list[tuple[str, np.ndarray]],
        *,
        ready: Any = None,
        done: Callable[[], Any] | None = None,
    ) -> None:
        """Queue each ``(name, codes)``: int32 codes appended to the file ``name`` as raw little-endian C-order
        bytes. One task per writer thread for all of them (a layer's files).

        ``ready``, if given, has a ``synchronize()`` each writer thread calls before it reads the arrays (a CUDA
        event after asynchronous copies into them); ``done()`` is called once all are written, or failed to be."""
        data = [(name, np.ascontiguousarray(codes, dtype="<i4")) for name, codes in items]
        groups = self._groups([name for name, _ in data])
        self._reserve(sum(d.nbytes for _, d in data))
        left = [len(groups)]
        counted = threading.Lock()

        def finished() -> None:
            with counted:
                left[0] -= 1
                last = left[0] == 0
            if last and done is not None:
                done()

        for k, (shard, idx) in enumerate(groups.items()):
            part = [data[i] for i in idx]
            nbytes = sum(d.nbytes for _, d in part)
            try:
                self._submit(self._write_task, part, ready, finished, nbytes=nbytes, shard=shard)
            except BaseException:  # the groups not queued give their bytes back and count as finished
                for _, rest in list(groups.items())[k + 1 :]:
                    self._release(sum(data[i][1].nbytes for i in rest))
                    finished()
                raise
        data.clear()

    def _write_task(self, items: list[tuple[str, np.ndarray]], ready: Any, done: Callable[[], Any] | None) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            self._append_many(items)
        finally:
            items.clear()
            if done is not None:
                done()

    def _append_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        for name, data in items:
            self._append(name, data)
        items.clear()  # drop the arrays before the task's end frees room for more: memory stays within the bound

    def _append(self, name: str, data: np.ndarray) -> None:
        file = self._files.get(name)
        if file is None:
            path = self.path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            file = self._files[name] = FileAppender(path, self.digest, direct=self.direct)
        file.append(memoryview(data.reshape(-1)).cast("B"))
        self.direct = self.direct and file.direct
        if self.durability == "append":
            self._syncs.append(self._syncer.submit(_datasync_path, file.path))

    def seal_many(self, items: list[tuple[str, tuple[str, ...]]]) -> list[Future[list[WrittenFile]]]:
        """Queue the end of each ``(name, aliases)`` (a unit's files), one task per writer thread, each after
        the writes of its files: make the file durable (unless already), link each alias (same folder) to it,
        and report its digest."""
        groups = self._groups([name for name, _ in items])
        return [self._submit(self._seal_many, [items[i] for i in idx], shard=shard) for shard, idx in groups.items()]

    def _seal_many(self, items: list[tuple[str, tuple[str, ...]]]) -> list[WrittenFile]:
        return [self._seal(name, aliases) for name, aliases in items]

    def _seal(self, name: str, aliases: tuple[str, ...]) -> WrittenFile:
        path = self.path / name
        with open(path, "rb+") as fh:
            if self.durability == "seal":
                os.fsync(fh.fileno())
            size = fh.seek(0, os.SEEK_END)
        file = self._files.pop(name)
        read_back = file.read_back(size)  # None if the file changed since it was read back
        linked = all([link_or_copy(path, path.with_name(alias)) for alias in aliases])
        # the links change the file's stamp; a copied alias is read by the gate (and so is its file)
        read_back = replace(read_back, stamp=stamp(path)) if read_back is not None and linked else None
        return WrittenFile(name, file.sent.hexdigest(), size, self.digest, read_back)

    def remove(self, folder: str) -> None:
        """Queue the removal of a sub-folder, after every write already queued into it: a barrier on every
        writer thread, so no thread writes past it before the folder is gone."""
        barrier = threading.Barrier(len(self._pools), action=lambda: self._remove(folder))
        self._barriers.append(barrier)
        for shard in range(len(self._pools)):
            self._submit(barrier.wait, shard=shard)

    def _remove(self, folder: str) -> None:
        prefix = folder.rstrip("/") + "/"
        for name in [n for n in self._files if n.startswith(prefix)]:
            del self._files[name]
        shutil.rmtree(self.path / folder, ignore_errors=True)

    def wait(self) -> list[WrittenFile]:
        """Wait for every queued task and every sync; re-raise the first failure. Returns the sealed files, in
        order."""
        written = [w for f in self._futures if isinstance(r := f.result(), list) for w in r]
        for f in self._syncs:
            f.result()
        return written

    def _shutdown(self, *, cancel: bool = False) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=cancel)
        self._syncer.shutdown(wait=True, cancel_futures=cancel)

    def _make_durable(self) -> None:
        """What the staging folder needs before the rename: the syncfs pass, if that is the mode, and every
        folder's entries (the files', the aliases', the sub-folders')."""
        if self.durability == "syncfs":
            _syncfs()(self.path)
        for folder, _, _ in os.walk(self.path):
            fsync_dir(Path(folder))

    def commit(self, write_manifests: Callable[[Path], None]) -> Path:
        """Wait for the writes, let ``write_manifests(staging_path)`` write the manifests last, then move
        the folder into place. A capture it replaces is renamed aside and deleted in the background."""
        self.wait()
        self._shutdown()
        write_manifests(self.path)
        (self.path / PARTIAL_MARKER).unlink()
        self._make_durable()
        check_target(self.out_dir, self.overwrite)  # the target may have changed during the forward
        old = None
        if self.out_dir.exists():
            old = leftover_name(self.out_dir, "old")
            os.rename(self.out_dir, old)
        try:
            os.rename(self.path, self.out_dir)
        except BaseException:
            if old is not None:  # put the previous capture back
                os.rename(old, self.out_dir)
            raise
        fsync_dir(self.out_dir.parent)
        self._closed = True
        if old is not None:  # unmark it first: a half-deleted old capture must never look finished
            (old / PARTIAL_MARKER).write_text("a replaced zkllm-hf capture being deleted\n")
            (old / MANIFEST_NAME).unlink(missing_ok=True)
            delete_in_background(old)
        self._lock.release()
        return self.out_dir

    def abort(self) -> None:
        """Drop everything staged; the target is left exactly as it was."""
        if self._closed:
            return
        self._closed = True
        for fut in self._futures:
            fut.cancel()
        for barrier in self._barriers:  # a removal some threads reached, and cancelled tasks never will
            barrier.abort()
        self._shutdown(cancel=True)
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.release()


def _datasync_path(path: Path) -> None:
    """The file's data (and the size that reaches it) on disk: fdatasync, or fsync where there is none. A file
    gone by then was removed with its unit (:meth:`StagingDir.remove`); one missing at commit fails the gate."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        (getattr(os, "fdatasync", None) or os.fsync)(fd)
    finally:
        os.close(fd)


def _syncfs() -> Callable[[Path], None] | None:
    """``syncfs`` of a path's filesystem (Linux, through libc), or None where there is none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (OSError, AttributeError):
        return None

    def sync(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if call(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(path))
        finally:
            os.close(fd)

    return sync


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable (best effort: a folder that cannot be opened or
    synced, as on some filesystems, is left as it is)."""
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


_fsync_dir = fsync_dir  # deprecated alias, for one release


def link_or_copy(src: Path, dst: Path) -> bool:
    """``dst`` as a hard link to ``src`` (True), or a copy of it where the filesystem cannot link (False)."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copyfile(src, dst)
        return False


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in chunks."""
    return digest_file("sha256", path, chunk)
