"""Reading a finished capture back, and re-checking it from disk against its contract."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import provenance
from .contracts import (
    CheckResult,
    check_integrity,
    expected_file,
    load_contract,
    run_identities,
)
from .hooks import find_layout
from .manifest import FORMAT_VERSION, read_manifest, rows_digest
from .points import POINTS, alias_point_name
from .writer import MANIFEST_NAME, PARTIAL_MARKER, sha256_file

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class CaptureNotFinished(FileNotFoundError):
    """The folder is not a finished capture."""


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
        return np.memmap(self.path / row["file"], dtype="<i4", mode="r", shape=(row["rows"], row["cols"]))

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


def _unit_entries(path: Path, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
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
    """Open a finished capture folder (one with ``manifest.arrow``) for reading: a unit, or a dataset of units."""
    path = Path(path)
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
    if meta.get("kind") == "dataset":
        units = {}
        for e in _unit_entries(path, meta):
            unit = load_capture(path / e["folder"])
            if not isinstance(unit, Capture):
                raise ValueError(f"{path / e['folder']}: a dataset's unit cannot itself be a dataset")
            units[(int(e["sample"]), int(e["step"]))] = unit
        return CaptureDataset(path, table, meta, units)
    rows = {(int(r["layer"]), str(r["point"])): r for r in table.to_pylist()}
    return Capture(path, table, meta, rows)


@dataclass
class ValidationReport:
    """Every check ``validate`` ran on one capture folder; ``ok`` iff none failed."""

    path: Path
    results: list[CheckResult]
    metadata: dict[str, Any] | None = None

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.results:
            entry = out.setdefault(r.check, {"passed": 0, "failed": 0})
            entry["passed" if r.passed else "failed"] += 1
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "path": str(self.path),
                "ok": self.ok,
                "summary": self.summary(),
                "failures": [f.to_dict() for f in self.failures],
            },
            indent=2,
            default=str,
        )

    def __str__(self) -> str:
        head = f"{self.path}: {'VALID' if self.ok else 'INVALID'}"
        lines = [head] + [
            f"  {name:<22} {c['passed']:>5} passed  {c['failed']:>5} failed" for name, c in self.summary().items()
        ]
        if self.failures:
            lines.append("failures:")
            lines += [f"  - {f.describe()}" for f in self.failures]
        return "\n".join(lines)


def validate(
    path: str | os.PathLike[str], model: torch.nn.Module | None = None, *, progress: bool = False
) -> ValidationReport:
    """Re-check a capture from disk: manifest contract, sizes, checksums, range, completeness, identities.

    With ``model``, also recompute both RMSNorms with its weights and compare its weights fingerprint.
    ``progress`` shows bars over files and layers on a terminal.
    """
    return _validate(Path(path), model, progress=progress)


def _validate(
    path: Path, model: torch.nn.Module | None, *, progress: bool, fingerprint: str | None = None
) -> ValidationReport:
    try:
        if (path / MANIFEST_NAME).is_file():  # a dataset is checked unit by unit, even if some are unreadable
            table, meta = read_manifest(path / MANIFEST_NAME)
            if meta.get("kind") == "dataset":
                return _validate_dataset(path, table, meta, model, progress=progress)
        cap = load_capture(path)
    except (CaptureNotFinished, OSError, pa.ArrowInvalid, ValueError, KeyError) as exc:
        return ValidationReport(path, [CheckResult("manifest", False, str(exc))])
    assert isinstance(cap, Capture)
    results: list[CheckResult] = []
    meta = cap.metadata
    report = ValidationReport(path, results, meta)
    rows = cap.manifest.to_pylist()

    # The manifest itself: format, digest, pandera contract, agreement with its own metadata.
    if meta.get("format_version") != FORMAT_VERSION:
        results.append(
            CheckResult(
                "manifest",
                False,
                f"format_version {meta.get('format_version')!r}, this "
                f"zkllm-hf reads {FORMAT_VERSION}; upgrade zkllm-hf",
            )
        )
        return report
    try:
        contract = load_contract(meta["contract"]["folder"])
        capture_meta, tokens = meta["capture"], meta["tokens"]
        scale, seq_len, hidden = (
            int(capture_meta["scale_log2"]),
            int(tokens["seq_len"]),
            int(capture_meta["hidden_size"]),
        )
        layers = [int(x) for x in capture_meta["layers"]]
    except (KeyError, TypeError, ValueError) as exc:
        results.append(CheckResult("manifest", False, f"metadata is incomplete or unreadable: {exc!r}"))
        return report
    digest = rows_digest(rows, meta)
    results.append(
        CheckResult(
            "manifest_digest",
            digest == meta.get("manifest_digest"),
            ""
            if digest == meta.get("manifest_digest")
            else "rows or metadata were edited after the capture wrote them",
        )
    )
    results += contract.validate_manifest(cap.manifest.to_pandas())
    for row in rows:
        where = {"layer": row["layer"], "point": row["point"], "file": row["file"]}
        problems = []
        if row["scale_log2"] != scale:
            problems.append(f"scale_log2 {row['scale_log2']}, metadata says {scale}")
        if (row["rows"], row["cols"]) != (seq_len, hidden):
            problems.append(f"shape ({row['rows']}, {row['cols']}), metadata says ({seq_len}, {hidden})")
        results.append(CheckResult("shape", not problems, "; ".join(problems), **where))

    # Completeness: every point (and alias) of every requested layer, and no stray .bin files.
    listed = {(r["layer"], r["point"]) for r in rows}
    for layer in layers:
        for p in POINTS:
            names = [p.name] + [alias_point_name(p.name, i) for i in range(len(p.aliases))]
            for name in names:
                if (layer, name) not in listed:
                    results.append(
                        CheckResult(
                            "completeness",
                            False,
                            "missing from the manifest",
                            layer=layer,
                            point=name,
                            file=expected_file(name, layer),
                        )
                    )
    extra = sorted({f.name for f in path.glob("*.bin")} - {r["file"] for r in rows})
    for name in extra:
        results.append(CheckResult("completeness", False, "file is not in the manifest", file=name))
    if not any(r.check == "completeness" for r in results):
        results.append(CheckResult("completeness", True))

    # Integrity, then range and identities on the files that are whole.
    results += check_integrity(path, rows, progress=progress)
    readable = {
        (row["layer"], row["point"])
        for row in rows
        if (path / row["file"]).is_file() and (path / row["file"]).stat().st_size == row["byte_size"]
    }
    layout = find_layout(model) if model is not None else None
    if model is not None:
        results += _model_checks(model, meta, fingerprint)
    # One read per file: its range, then the layer's identities once all of its points are whole.
    previous: tuple[int, dict[str, torch.Tensor]] | None = None
    all_layers = sorted(set(layers) | {r["layer"] for r in rows})
    for layer in tqdm(all_layers, desc="identities", unit="layer", disable=None if progress else True):
        tensors = {}
        for p in POINTS:
            if (layer, p.name) in readable:
                tensors[p.name] = torch.from_numpy(np.array(cap.codes(layer, p.name)))
                results.append(_range_check(cap.rows[(layer, p.name)], tensors[p.name]))
        dtypes = {n: _DTYPES.get(cap.rows[(layer, n)]["source_dtype"]) for n in tensors}
        if len(tensors) < len(POINTS) or None in dtypes.values():  # the schema check reports a bad dtype
            previous = None
            continue
        norms = layout.norms(layer, contract.norm_modules) if layout is not None else None
        prev = previous[1] if previous and previous[0] == layer - 1 else None
        results += run_identities(
            contract,
            layer,
            tensors,
            dtypes,
            scale,
            previous=prev,
            norms=norms,
            files={n: cap.rows[(layer, n)]["file"] for n in tensors},
        )
        previous = (layer, tensors)
    return report


def _range_check(row: Mapping[str, Any], codes: torch.Tensor) -> CheckResult:
    lo, hi = (int(v) for v in torch.aminmax(codes))
    ok = (lo, hi) == (row["int_min"], row["int_max"]) and lo > -(2**31)
    return CheckResult(
        "range",
        ok,
        "" if ok else f"data spans [{lo}, {hi}], manifest says [{row['int_min']}, {row['int_max']}]",
        layer=row["layer"],
        point=row["point"],
        file=row["file"],
    )


def _model_checks(model: torch.nn.Module, meta: Mapping[str, Any], fingerprint: str | None = None) -> list[CheckResult]:
    recorded = meta.get("model", {})
    out = []
    fp_now = fingerprint or provenance.weights_fingerprint(model)
    ok = fp_now == recorded.get("weights_fingerprint")
    out.append(
        CheckResult(
            "weights_fingerprint",
            ok,
            ""
            if ok
            else f"model weights {fp_now[:12]}..., capture recorded "
            f"{str(recorded.get('weights_fingerprint'))[:12]}...; pass the model that was captured",
        )
    )
    cfg = provenance.config_sha256(getattr(model, "config", None))
    ok = cfg == recorded.get("config_sha256")
    out.append(CheckResult("config", ok, "" if ok else "model config differs from the captured model's"))
    return out


def _validate_dataset(
    path: Path, table: pa.Table, meta: dict[str, Any], model: torch.nn.Module | None, *, progress: bool
) -> ValidationReport:
    """The index (format, digest, schema), each unit on its own, and the index's agreement with every unit."""
    results: list[CheckResult] = []
    report = ValidationReport(path, results, meta)
    index = lambda check, ok, msg="", **kw: CheckResult(check, ok, "" if ok else msg, unit=".", **kw)  # noqa: E731
    if meta.get("format_version") != FORMAT_VERSION:
        results.append(
            index(
                "manifest",
                False,
                f"format_version {meta.get('format_version')!r}, this zkllm-hf "
                f"reads {FORMAT_VERSION}; upgrade zkllm-hf",
            )
        )
        return report
    rows = table.to_pylist()
    results.append(
        index(
            "manifest_digest",
            rows_digest(rows, meta) == meta.get("manifest_digest"),
            "rows or metadata were edited after the capture wrote them",
        )
    )
    contract = load_contract(meta["contract"]["folder"])
    results += [replace(c, unit=".") for c in contract.validate_manifest(table.to_pandas())]
    fingerprint = provenance.weights_fingerprint(model) if model is not None else None
    entries = _unit_entries(path, meta)
    listed = {e["folder"] for e in entries}
    by_unit: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_unit.setdefault(str(r["file"]).rpartition("/")[0], []).append(r)
    units = tqdm(entries, desc="units", unit="unit", disable=None if progress else True)
    for e in units:
        folder = e["folder"]
        unit_path = path / folder
        digest = sha256_file(unit_path / MANIFEST_NAME) if (unit_path / MANIFEST_NAME).is_file() else None
        results.append(
            index(
                "dataset_index",
                digest == e.get("manifest_sha256"),
                "the unit's manifest differs from the one the index recorded",
                file=f"{folder}/{MANIFEST_NAME}",
            )
        )
        sub = _validate(unit_path, model, progress=False, fingerprint=fingerprint)
        results += [replace(r, unit=folder) for r in sub.results]
        if sub.metadata is None:
            continue
        unit_meta = sub.metadata.get("unit", {})
        if (unit_meta.get("sample"), unit_meta.get("step")) != (e["sample"], e["step"]):
            results.append(
                index(
                    "dataset_index",
                    False,
                    f"{folder} says it is sample {unit_meta.get('sample')}, "
                    f"step {unit_meta.get('step')}; the index says {e['sample']}, {e['step']}",
                )
            )
        keys = ("layer", "point", "rows", "cols", "byte_size", "sha256", "source_dtype", "int_min", "int_max")
        mine = {(r["file"].rpartition("/")[2], *(r[k] for k in keys)) for r in by_unit.pop(folder, [])}
        theirs = {(r["file"], *(r[k] for k in keys)) for r in read_manifest(unit_path / MANIFEST_NAME)[0].to_pylist()}
        results.append(
            index(
                "dataset_index",
                mine == theirs,
                f"{len(mine ^ theirs)} file row(s) of {folder} differ between the index and the unit",
            )
        )
    for folder, stray in sorted(by_unit.items()):
        results.append(
            index(
                "dataset_index",
                False,
                f"{len(stray)} row(s) name files in {folder or 'the top folder'}, which is not a listed unit",
            )
        )
    on_disk = {p.relative_to(path).as_posix() for p in path.glob("sample-*") if p.is_dir()}
    on_disk |= {p.relative_to(path).as_posix() for p in path.glob("sample-*/step-*") if p.is_dir()}
    parents = {f.split("/")[0] for f in listed}
    for folder in sorted(on_disk - listed - parents):
        results.append(index("completeness", False, f"folder {folder} is not a unit the index lists"))
    for name in sorted(p.name for p in path.glob("*.bin")):
        results.append(index("completeness", False, "file is not in any unit", file=name))
    return report


__all__ = ["Capture", "CaptureDataset", "CaptureNotFinished", "ValidationReport", "load_capture", "validate"]
