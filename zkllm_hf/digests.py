"""The digests a capture records: BLAKE3 by default (one fast pass, several threads on large inputs), SHA-256
for tools that need it. A manifest names its algorithm (``digest_algorithm`` in its metadata; a file's
digest is in the column named by it); one without the field was written before BLAKE3 and is SHA-256."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import blake3

DIGESTS = ("blake3", "sha256")
DEFAULT_DIGEST = "blake3"
LEGACY_DIGEST = "sha256"  # what a manifest without ``digest_algorithm`` used
_THREADED = 8 << 20  # from this size on, BLAKE3 hashes on several threads


def check_digest(name: Any, *, flag: bool = False) -> str:
    """``name`` if it is a digest zkllm-hf records, else a ValueError naming the choices."""
    if name not in DIGESTS:
        said = f"--digest {name}" if flag else f"digest={name!r}"
        raise ValueError(
            f"{said}: one of {', '.join(DIGESTS)} ('blake3' is the fast default; 'sha256' for tools that need it)"
        )
    return name


def hasher(name: str, *, threads: int = 1) -> Any:
    """A running hash (``update(bytes)``, ``hexdigest()``) of algorithm ``name``."""
    if name == "blake3":
        return blake3.blake3(max_threads=max(1, threads))
    if name == "sha256":
        return hashlib.sha256()
    raise ValueError(check_digest(name))


def digest_bytes(name: str, data: Any) -> str:
    """The hex digest of ``data`` (bytes or a buffer) under ``name``; BLAKE3 on several threads when large."""
    view = memoryview(data)
    view = view if view.format == "B" else view.cast("B")  # blake3 takes bytes, not int32 items
    if name == "blake3":
        big = view.nbytes >= _THREADED
        return blake3.blake3(view, max_threads=blake3.blake3.AUTO if big else 1).hexdigest()
    h = hasher(name)
    h.update(view)
    return h.hexdigest()


def digest_file(name: str, path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """The hex digest of a file under ``name``, read in chunks."""
    h = hasher(name)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def manifest_algorithm(metadata: Mapping[str, Any]) -> str:
    """The algorithm a manifest's digests use: its ``digest_algorithm``, else SHA-256 (captures before it)."""
    return metadata.get("digest_algorithm", LEGACY_DIGEST) if isinstance(metadata, Mapping) else LEGACY_DIGEST


def row_digest(row: Mapping[str, Any]) -> tuple[str, Any]:
    """``(algorithm, hex digest)`` of a manifest row: the BLAKE3 column when it is filled, else SHA-256."""
    value = row.get("blake3")
    if value is not None:
        return "blake3", value
    return "sha256", row.get("sha256")
