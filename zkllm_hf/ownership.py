"""What zkllm-hf may replace or delete: by manifest, never by name (:func:`foreign_files`), and the names of
its own pid-named staging, old and temp entries and lock files (docs/architecture.md §4); the lock on a target
(:class:`TargetLock`), which removes dead processes' leftovers, and the background deletion of a replaced
capture."""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from .errors import TargetBusyError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.arrow"
LEFTOVER = re.compile(r"\.zkllm-(staging|old|tmp)-(\d+)-[0-9a-f]+$")  # .NAME.zkllm-KIND-PID-RANDOM

# --------------------------------------------------------------------------------------------------
# Ownership: what zkllm-hf may replace or delete. By manifest, never by name.

WORK = ".zkllm-work"  # capture_dataset's per-prompt engine targets, inside a dataset folder
UNIT_DIR = re.compile(r"^sample-(\d+)$")
STEP_DIR = re.compile(r"^step-(\d+)$")
LOCK_NAME = re.compile(r"^\..+\.zkllm-lock$")


def shown_paths(names: list[str]) -> str:
    """A few paths, then how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def zkllm_manifest(path: Path) -> tuple[Any, dict[str, Any]] | None:
    """The table and metadata of ``path`` if it reads as a manifest zkllm-hf wrote, else None: a regular file,
    an Arrow IPC file with every column of the schema, ``zkllm_hf`` metadata of this format version, and a
    digest over rows and metadata that matches (edits are detected; it is not a signature)."""
    from .manifest import FORMAT_VERSION, REQUIRED_COLUMNS, read_manifest, rows_digest

    try:
        if path.is_symlink() or not path.is_file():
            return None
        table, meta = read_manifest(path)
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            return None
        if any(c not in table.column_names for c in REQUIRED_COLUMNS):
            return None
        if rows_digest(table.to_pylist(), meta) != meta.get("manifest_digest"):
            return None
    except Exception:  # noqa: BLE001 - whatever fails to read as our manifest is simply not one
        return None
    return table, meta


def _plain(name: Any) -> str | None:
    """``name`` as a plain relative posix path inside its folder (no ``..``, not absolute), else None."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return "/".join(parts) if parts and ".." not in parts else None


def _is_leftover(entry: os.DirEntry) -> bool:
    """A pid-named staging, old or temp entry, or a target's lock file (each is zkllm-hf's by its name)."""
    if entry.is_symlink() or not entry.name.startswith("."):
        return False
    if LOCK_NAME.match(entry.name):
        return entry.is_file()
    return bool(LEFTOVER.search(entry.name))


def _claim(folder: Path, rel: str, files: set[str]) -> bool:
    """Add to ``files`` what the zkllm-hf manifest in ``folder`` lists (a dataset index: its units, each by
    its own manifest); False if ``folder`` holds no such manifest."""
    found = zkllm_manifest(folder / MANIFEST_NAME)
    if found is None:
        return False
    table, meta = found
    files.add(rel + MANIFEST_NAME)
    from .manifest import sidecar_name

    if (name := sidecar_name(meta)) is not None:
        files.add(rel + name)  # the capture.json the manifest records (and its digest covers)
    if meta.get("kind") == "dataset":
        for unit in meta.get("units") or []:
            name = _plain(unit.get("folder")) if isinstance(unit, dict) else None
            if name is not None:
                _claim(folder / name, f"{rel}{name}/", files)
        return True
    for column in ("file", "alias_of"):
        for name in table.column(column).to_pylist():
            if (name := _plain(name)) is not None:
                files.add(rel + name)
    return True


def _claim_unit(folder: Path, rel: str, files: set[str]) -> None:
    """A unit folder ``sample-N``: its own manifest's, or (units of generation steps) its ``step-K`` folders'."""
    if _claim(folder, rel, files):
        return
    for entry in os.scandir(folder):
        if STEP_DIR.match(entry.name) and entry.is_dir(follow_symlinks=False):
            _claim(Path(entry.path), f"{rel}{entry.name}/", files)


def foreign_files(folder: Path, *, only: str | None = None) -> list[str]:
    """Every path under ``folder`` that zkllm-hf does not own, relative to it (folders with a trailing ``/``,
    named once as a whole when nothing in them is ours), sorted.

    zkllm-hf owns a file only if a manifest it wrote lists it (:func:`zkllm_manifest`: right format,
    metadata and digest): ``folder``'s own manifest, a dataset index's units by their own manifests, a unit
    folder ``sample-N`` (or its ``step-K`` folders) by its manifest, and under the work folder ``.zkllm-work``
    each capture by its manifest. Besides, a pid-named staging, old or temp entry and a lock file
    (:func:`leftover_name`, :class:`TargetLock`) are its own. A unit folder without a manifest is foreign as
    a whole (units are renamed into place complete), and so is any symlink. ``only`` limits the answer to one
    entry of ``folder`` (and reads only that entry's manifests).
    """
    files: set[str] = set()
    whole: set[str] = set()  # entries that are ours with all they hold
    containers: set[str] = set()  # folders that are ours to look into, whatever they hold
    if only is None:
        _claim(folder, "", files)
    for entry in os.scandir(folder):
        if only is not None and entry.name != only:
            continue
        if _is_leftover(entry):
            whole.add(entry.name)
        elif entry.is_symlink() or not entry.is_dir():
            continue
        elif UNIT_DIR.match(entry.name):
            _claim_unit(Path(entry.path), f"{entry.name}/", files)
        elif entry.name == WORK:
            containers.add(f"{WORK}/")
            for sub in os.scandir(entry.path):
                if _is_leftover(sub):
                    whole.add(f"{WORK}/{sub.name}")
                elif sub.is_dir(follow_symlinks=False):
                    _claim(Path(sub.path), f"{WORK}/{sub.name}/", files)
    dirs = set(containers)
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) + "/" for i in range(len(parts)))
    foreign: list[str] = []

    def walk(path: Path, rel: str) -> None:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            name = rel + entry.name
            if (rel == "" and only is not None and entry.name != only) or name in whole:
                continue
            if entry.is_symlink():
                foreign.append(name)
            elif entry.is_dir():
                if name + "/" in dirs:
                    walk(Path(entry.path), name + "/")
                else:
                    foreign.append(name + "/")
            elif name not in files:
                foreign.append(name)

    walk(folder, "")
    return foreign


# --------------------------------------------------------------------------------------------------
# The lock on a target, and the leftovers of dead processes.


class TargetLock:
    """An exclusive lock on one output folder, held while a capture (or a cache conversion) writes it.

    The lock is ``flock`` on a hidden file beside the target (``.NAME.zkllm-lock``, removed on release), so
    the kernel releases it when its process dies, however it dies. Whoever takes the lock therefore knows
    that hidden leftovers of that target (staging, old-capture and temp folders) belong to a dead process,
    and removes them, saying so. Where ``fcntl`` is missing (Windows) the lock is a no-op.
    """

    def __init__(self, target: Path, *, wait: bool = False):
        self.target = Path(target).absolute()
        self.path = self.target.parent / f".{self.target.name}.zkllm-lock"
        self.removed: list[Path] = []
        self._fd: int | None = None
        self.target.parent.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on this platform
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise TargetBusyError(
                    f"another capture is writing to '{self.target}' (process {holder}); wait for it to finish "
                    f"or choose another --out"
                ) from None
            try:  # the holder we waited for may have removed the file: lock the one that is there now
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self.removed = remove_leftovers(self.target)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def leftover_name(target: Path, kind: str) -> Path:
    """A hidden sibling of ``target`` owned by this process: ``.NAME.zkllm-KIND-PID-RANDOM``."""
    return target.parent / f".{target.name}.zkllm-{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


_DELETING: dict[Path, threading.Thread] = {}  # replaced captures this process is deleting in the background
_DELETING_LOCK = threading.Lock()


def delete_in_background(old: Path) -> threading.Thread:
    """Delete ``old`` (a pid-named ``.zkllm-old-`` entry, already marked unfinished) on a thread, off the
    commit's critical path. Not a daemon: the interpreter waits for it at exit. If the process dies first,
    the entry is a leftover by its name, which the next lock holder of the target removes."""

    def run() -> None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        finally:
            with _DELETING_LOCK:
                _DELETING.pop(Path(os.path.realpath(old)), None)

    thread = threading.Thread(target=run, name="zkllm-delete-old", daemon=False)
    with _DELETING_LOCK:
        _DELETING[Path(os.path.realpath(old))] = thread
    thread.start()
    return thread


def wait_for_deletions(timeout: float | None = None) -> None:
    """Wait for this process's background deletions of replaced captures to finish."""
    with _DELETING_LOCK:
        threads = list(_DELETING.values())
    for t in threads:
        t.join(timeout)


def remove_leftovers(target: Path) -> list[Path]:
    """Remove hidden leftovers of ``target`` whose process is gone (call it holding the target's lock). A
    replaced capture this process is deleting in the background is waited for, and removed only if that
    thread left something."""
    target = Path(target).absolute()
    removed = []
    prefix = f".{target.name}.zkllm-"
    for entry in target.parent.glob(f"{glob.escape(prefix)}*"):
        m = LEFTOVER.search(entry.name)
        if not m:
            continue
        with _DELETING_LOCK:
            ours = _DELETING.get(Path(os.path.realpath(entry)))
        if ours is not None:
            ours.join()
            if not entry.exists():
                continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        logger.warning("removed %s, left by an interrupted zkllm-hf process (pid %s)", entry, m[2])
    return removed


def clean_leftovers(target: Path) -> list[Path]:
    """Remove dead processes' leftovers of ``target`` if no capture is writing to it now (validate uses it)."""
    try:
        lock = TargetLock(target)
    except OSError:  # busy (a capture is writing: nothing there is a leftover), or a read-only folder
        return []
    lock.release()
    return lock.removed
