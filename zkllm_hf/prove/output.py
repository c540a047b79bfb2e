"""Where plan writes: its script only as a new file or in place of a script plan wrote (known by the digest on
its second line, :data:`PLAN_MARK`), never through a symlink, atomically; and the scratch folder it may use."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path

from ..errors import OutputRefused

PLAN_MARK = "# zkllm-hf plan sha256:"  # line 2 of every script plan writes; the digest of the other bytes
SCRATCH_MARK = ".zkllm-plan-scratch"  # the file a plan script leaves in the scratch folder it made
_MAX_SCRIPT = 64 << 20  # a file larger than this is not a plan script (one layer takes about 3 KB)


def sign(script: str) -> str:
    """``script`` with :data:`PLAN_MARK` and the SHA-256 of its bytes inserted as the second line."""
    first, _, rest = script.partition("\n")
    digest = hashlib.sha256(f"{first}\n{rest}".encode()).hexdigest()
    return f"{first}\n{PLAN_MARK}{digest}\n{rest}"


def is_plan_script(data: bytes) -> bool:
    """Whether ``data`` is a script plan wrote, unedited: line 2 is :data:`PLAN_MARK` and the SHA-256 of the
    script's bytes without that line."""
    parts = data.split(b"\n", 2)
    if len(parts) < 3 or not parts[1].startswith(PLAN_MARK.encode()):
        return False
    digest = parts[1][len(PLAN_MARK) :]
    return (
        re.fullmatch(rb"[0-9a-f]{64}", digest) is not None
        and hashlib.sha256(parts[0] + b"\n" + parts[2]).hexdigest() == digest.decode()
    )


def _is_ours(path: Path) -> bool:
    """Whether the regular file at ``path`` (opened without following a link) is a plan script."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_SCRIPT:
            return False
        chunks, left = [], st.st_size + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return left > 0 and is_plan_script(b"".join(chunks))
    finally:
        os.close(fd)


def check_out(path: Path, *, overwrite: bool) -> bool:
    """Whether ``path`` holds a script plan wrote (which ``overwrite`` lets plan replace); False if nothing is
    there. Raises :class:`OutputRefused` for a link, a folder, anything else, or without ``overwrite``."""
    what = f"--out {path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise OutputRefused(f"{what}: the folder {path.parent} does not exist; create it first") from None
        return False
    if stat.S_ISLNK(st.st_mode):
        raise OutputRefused(
            f"{what} is a symbolic link; plan never writes through one: give the path of a new file (the link "
            f"and what it points to are left as they are)"
        )
    if stat.S_ISDIR(st.st_mode):
        raise OutputRefused(f"{what} is a folder; give the script's file name, e.g. {path / 'prove.sh'}")
    try:
        mine = stat.S_ISREG(st.st_mode) and _is_ours(path)
    except OSError as exc:
        raise OutputRefused(
            f"{what} exists and cannot be read ({exc.strerror or exc}), so it cannot be recognised as a script "
            f"plan wrote; plan will not replace it: give another --out"
        ) from None
    if not mine:
        raise OutputRefused(
            f"{what} exists and is not a script zkllm-hf plan wrote (or it was edited since); plan will not replace "
            f"it: give another --out, or move the file away yourself"
        )
    if not overwrite:
        raise OutputRefused(f"{what} is a script zkllm-hf plan wrote: pass --overwrite to replace it, or another --out")
    return True


def check_scratch(path: Path) -> None:
    """Raise :class:`OutputRefused` unless ``path`` is absent, an empty folder, or a scratch folder a plan
    script marked (:data:`SCRATCH_MARK`): the script writes and deletes files there."""
    what = f"--scratch {path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise OutputRefused(f"{what} is a symbolic link; the script never writes through one: give a new folder")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputRefused(f"{what} is not a folder; give a new folder for zkLLM's outputs and logs")
    try:
        marked = stat.S_ISREG(os.lstat(path / SCRATCH_MARK).st_mode)
    except FileNotFoundError:
        marked = False
    if not marked and any(os.scandir(path)):
        raise OutputRefused(
            f"{what} is not a folder plan made for its script (it holds files and no {SCRATCH_MARK}); the script "
            f"writes and deletes files there: give a new or empty folder, e.g. {path.with_name(path.name + '-zkllm')}"
        )


def write_plan_file(path: Path, script: str, *, overwrite: bool = False) -> None:
    """Write ``script`` to ``path`` atomically: a new file, or in place of a script plan wrote (``overwrite``).

    The bytes go to a fresh temporary file beside ``path`` (created exclusively, mode 0o755 less the umask,
    fsynced), which is then hard-linked into place when ``path`` does not exist (so nothing that appeared
    there meanwhile is replaced) or renamed over plan's own script. Raises :class:`OutputRefused` (see
    :func:`check_out`) and OSError; on any failure the temporary file is removed and ``path`` is as it was.
    """
    replace = check_out(path, overwrite=overwrite)
    data = script.encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.zkllm-plan-tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o755)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        if replace:
            check_out(path, overwrite=True)  # still plan's own script, not a link put there since
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputRefused(f"--out {path} appeared while plan was writing; it was left as it is") from None
            except OSError as exc:  # a file system without hard links: create the file exclusively instead
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                _create_exclusively(path, data)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_folder(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _create_exclusively(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o755)
    except FileExistsError:
        raise OutputRefused(f"--out {path} appeared while plan was writing; it was left as it is") from None
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
    except BaseException:
        os.unlink(path)  # the file plan just created, half-written
        raise


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is done either way
    finally:
        os.close(fd)
