"""Reading a finished capture: :func:`load_capture` opens a unit or a dataset folder, its manifest and
metadata checked once, and gives its int32 codes (memory-mapped) and float values per (layer, point)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .contracts import inside
from .errors import CaptureNotFinished, UnsafeManifestError
from .manifest import REQUIRED_COLUMNS, read_manifest
from .metadata import check_columns, check_metadata
from .writer import MANIFEST_NAME, PARTIAL_MARKER


def _unsafe(folder: Path, row: Mapping[str, Any]) -> str:
    return (
        f"{folder}: manifest row layer {row.get('layer')} {row.get('point')} names file {row.get('file')!r}, which is "
        f"not a file inside the capture folder; refusing to open it (the manifest was crafted or damaged)"
    )


class _LazyArrays(Mapping[tuple[int, str], np.ndarray]):
    def __init__(self, capture: Capture, make):
        self._capture, self._make = capture, make

    def __getitem__(self, key: tuple[int, str]) -> np.ndarray:
        return self._make(*key)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        return iter(self._capture.rows)

    def __len__(self) -> int:
        return len(self._capture.rows)


@dataclass
class Capture:
    """A finished capture on disk: its manifest, metadata, and arrays per (layer, point)."""

    path: Path
    manifest: pa.Table
    metadata: dict[str, Any]
    rows: dict[tuple[int, str], dict[str, Any]] = field(repr=False)

    @property
    def scale_log2(self) -> int:
        return int(self.metadata["capture"]["scale_log2"])

    @property
    def layers(self) -> list[int]:
        return list(self.metadata["capture"]["layers"])

    @property
    def seq_len(self) -> int:
        return int(self.metadata["tokens"]["seq_len"])

    @property
    def hidden_size(self) -> int:
        return int(self.metadata["capture"]["hidden_size"])

    def codes(self, layer: int, point: str) -> np.memmap:
        """The int32 codes of one point, memory-mapped read-only, shape (rows, cols) as the manifest says."""
        row = self.rows[(layer, point)]
        path = inside(self.path, str(row["file"]))
        if path is None:
            raise UnsafeManifestError(_unsafe(self.path, row))
        return np.memmap(path, dtype="<i4", mode="r", shape=(row["rows"], row["cols"]))

    def values(self, layer: int, point: str) -> np.ndarray:
        """The float64 values the codes stand for (``codes / 2**scale_log2``), computed on access."""
        row = self.rows[(layer, point)]
        return np.asarray(self.codes(layer, point), dtype=np.float64) / float(2 ** row["scale_log2"])

    @property
    def ints(self) -> Mapping[tuple[int, str], np.ndarray]:
        """``capture.ints[layer, point]``: memory-mapped int32 codes."""
        return _LazyArrays(self, self.codes)

    @property
    def floats(self) -> Mapping[tuple[int, str], np.ndarray]:
        """``capture.floats[layer, point]``: float64 values, dequantised on access."""
        return _LazyArrays(self, self.values)


UNIT_FOLDER = re.compile(r"^sample-\d+(/step-\d+)?$")


@dataclass
class CaptureDataset:
    """A finished capture of several units: ``sample-{b}/`` (and ``step-{k}/``) folders under one index."""

    path: Path
    manifest: pa.Table  # one row per file of every unit, ``file`` relative to ``path``
    metadata: dict[str, Any]
    units: dict[tuple[int, int], Capture] = field(repr=False)  # (sample, step) -> the unit

    @property
    def mode(self) -> str:
        return str(self.metadata["capture"]["mode"])

    def unit(self, sample: int, step: int = 0) -> Capture:
        """One unit, a complete capture of its own."""
        try:
            return self.units[(sample, step)]
        except KeyError:
            raise KeyError(
                f"{self.path}: no unit for sample {sample}, step {step}; it has {sorted(self.units)}"
            ) from None

    def __iter__(self) -> Iterator[Capture]:
        return iter(self.units.values())

    def __len__(self) -> int:
        return len(self.units)


def unit_entries(path: Path, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The units a dataset's index lists, each folder checked to be a plain ``sample-{b}[/step-{k}]`` name."""
    entries = meta.get("units")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: the dataset index lists no units")
    for e in entries:
        folder = str(e.get("folder"))
        if not UNIT_FOLDER.match(folder):
            raise ValueError(f"{path}: unit folder {folder!r} is not of the form sample-B or sample-B/step-K")
    return entries


def load_capture(path: str | os.PathLike[str]) -> Capture | CaptureDataset:
    """Open a finished capture folder (one with ``manifest.arrow``) for reading: a unit, or a dataset of units.

    Raises :class:`UnsafeManifestError` if a manifest row names a file outside its folder, and
    :class:`~zkllm_hf.metadata.MetadataError` (naming the field) if its metadata lacks a field readers rely
    on or holds a value zkllm-hf never writes.
    """
    return load_folder(Path(path), check_paths=True)


def load_folder(path: Path, *, check_paths: bool) -> Capture | CaptureDataset:
    """:func:`load_capture`; with ``check_paths`` False, rows naming a file outside the folder are left for the
    contract's containment check to name (``validate``)."""
    if not path.is_dir():
        raise CaptureNotFinished(f"'{path}' is not a directory; pass a capture folder written by zkllm-hf capture")
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        why = (
            f"it holds a {PARTIAL_MARKER} marker, so the capture was interrupted"
            if (path / PARTIAL_MARKER).exists()
            else "a finished capture always has one"
        )
        raise CaptureNotFinished(f"'{path}' has no {MANIFEST_NAME}: not a finished capture ({why}); capture again")
    table, meta = read_manifest(manifest)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{manifest}: the manifest lacks column(s) {missing}; it was not written by this zkllm-hf, or it "
            f"was damaged: capture again"
        )
    check_columns(table, str(manifest))  # column types, nulls and shapes, and every metadata field a reader
    check_metadata(meta, str(manifest))  # relies on, once: a MetadataError names the field
    if meta.get("kind") == "dataset":
        units = {}
        for e in unit_entries(path, meta):
            unit = load_folder(path / e["folder"], check_paths=check_paths)
            if not isinstance(unit, Capture):
                raise ValueError(f"{path / e['folder']}: a dataset's unit cannot itself be a dataset")
            units[(int(e["sample"]), int(e["step"]))] = unit
        return CaptureDataset(path, table, meta, units)
    listed = table.to_pylist()
    for row in listed if check_paths else ():
        if inside(path, str(row["file"])) is None:
            raise UnsafeManifestError(_unsafe(path, row))
    rows = {(int(r["layer"]), str(r["point"])): r for r in listed}
    return Capture(path, table, meta, rows)
