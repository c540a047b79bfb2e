"""The dataset's output folder: what a run may write, replace or delete there, decided by manifest.

Ownership is :func:`zkllm_hf.writer.foreign_files`, the rule ``capture`` applies too: a path no manifest of
ours lists makes the run refuse before any byte is changed. Entries of ours are deleted by first renaming
them to a pid-named leftover, and a unit is moved into place with one rename, so a unit folder exists only
once complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .prompts import Prompt
from .resume import mismatch
from .writer import (
    MANIFEST_NAME,
    UNIT_DIR,
    WORK,
    foreign_files,
    fsync_dir,
    leftover_name,
    remove_leftovers,
    shown_paths,
    zkllm_manifest,
)


def check_out_dir(out: str | os.PathLike[str], prompts: Sequence[Prompt], overwrite: bool) -> None:
    """Refuse an output folder that holds anything zkllm-hf does not own, by manifest (read-only).

    Without ``overwrite`` it may hold this set's units, its index and an interrupted run's leftovers; with
    it, any zkllm-hf capture or dataset holding nothing else, which is replaced. Ownership is
    :func:`~zkllm_hf.writer.foreign_files`, the rule ``capture`` applies too.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output path '{out}' exists and is not a directory; choose another --out")
    foreign = foreign_files(out)
    if foreign and overwrite:
        raise FileExistsError(
            f"output directory '{out}' holds files zkllm-hf did not write ({shown_paths(foreign)}); --overwrite "
            f"only replaces a capture or dataset holding nothing else. Move them away or choose another --out"
        )
    if foreign:
        raise FileExistsError(
            f"output directory '{out}' holds files capture-dataset did not write ({shown_paths(foreign)}); it "
            f"resumes only its own dataset. Move them away, pass --overwrite to replace a zkllm-hf capture, or "
            f"choose another --out"
        )
    if overwrite:
        return
    index = zkllm_manifest(out / MANIFEST_NAME)
    if index is not None and index[1].get("kind") != "dataset":
        raise FileExistsError(
            f"output directory '{out}' holds a zkllm-hf capture of one unit ({MANIFEST_NAME} is a unit's), not a "
            f"dataset; pass --overwrite to replace it, or choose another --out"
        )
    samples = {p.sample for p in prompts}
    stray = [e.name for e in sorted(out.iterdir()) if (m := UNIT_DIR.match(e.name)) and int(m[1]) not in samples]
    if stray:
        raise FileExistsError(
            f"output directory '{out}' holds {shown_paths(stray)}, which no prompt of this set names (another "
            f"prompt set was captured there); pass --overwrite to replace it, or choose another --out"
        )


def refuse_foreign(out: Path, name: str) -> None:
    """Before replacing ``out/name``: refuse if anything in it is not zkllm-hf's (it may have changed since
    the folder was checked)."""
    foreign = foreign_files(out, only=name)
    if foreign:
        raise FileExistsError(
            f"{out / name} holds files zkllm-hf did not write ({shown_paths(foreign)}); move them away"
        )


def discard(path: Path) -> None:
    """Delete an entry of ours: first renamed to a pid-named leftover, so a half-deleted one is never taken
    for a unit (or for anyone's), then removed."""
    if path.is_dir() and not path.is_symlink():
        old = leftover_name(path, "old")
        os.rename(path, old)
        shutil.rmtree(old, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clear_work(out: Path) -> None:
    """Remove the work folder's entries that are ours, then the folder if that empties it."""
    work = out / WORK
    if not work.is_dir() or work.is_symlink():
        return
    foreign = foreign_files(out, only=WORK)
    for entry in list(work.iterdir()):
        name = f"{WORK}/{entry.name}"
        if not any(f == name or f.startswith(name + "/") for f in foreign):
            discard(entry)
    try:
        work.rmdir()
    except OSError:  # something not ours is left there: it stays, and so does the folder
        pass


def prepare_out_dir(
    out: Path, prompts: Sequence[Prompt], overwrite: bool, want: Callable[[Prompt], Mapping[str, Any]]
) -> None:
    """Rank 0, before any capture: refuse a folder this run may not write into; clear it for overwrite."""
    check_out_dir(out, prompts, overwrite)
    if overwrite and out.exists() and any(out.iterdir()):
        old = leftover_name(out, "old")
        os.rename(out, old)
        if foreign := foreign_files(old):  # arrived since the check: put everything back as it was
            os.rename(old, out)
            raise FileExistsError(
                f"output directory '{out}' holds files zkllm-hf did not write ({shown_paths(foreign)}); --overwrite "
                f"only replaces a capture or dataset holding nothing else. Move them away or choose another --out"
            )
        shutil.rmtree(old, ignore_errors=True)
    elif out.exists():
        remove_leftovers(out / MANIFEST_NAME)  # a dead run's temporary index (we hold the folder's lock)
        for p in prompts:
            if (out / p.folder).is_dir() and (why := mismatch(out / p.folder, want(p))) is not None:
                raise FileExistsError(
                    f"{p.folder} in '{out}' was captured {why}; pass --overwrite (overwrite=True) to replace the "
                    f"dataset, or choose another --out"
                )
    out.mkdir(parents=True, exist_ok=True)


def place_unit(out: Path, folder: str, tree: Path, work: Path) -> None:
    """Move a prompt's finished capture ``tree`` (under its ``work`` folder) to ``out/folder`` with one rename,
    replacing a broken unit of ours there; then remove what is left of the work folder."""
    target = out / folder
    old = None
    if target.exists():  # a broken unit being replaced: ours by its manifest, holding nothing else
        refuse_foreign(out, folder)
        old = leftover_name(target, "old")
        os.rename(target, old)
    os.rename(tree, target)
    fsync_dir(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if work.exists():
        discard(work)


__all__ = ["check_out_dir", "clear_work", "discard", "place_unit", "prepare_out_dir", "refuse_foreign"]
