"""The Arrow manifest: one row per emitted file, provenance as JSON schema metadata and, beside it, as
capture.json (docs/architecture.md §3)."""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from .digests import digest_bytes, manifest_algorithm
from .metadata import decode_metadata

FORMAT_VERSION = 1
METADATA_KEY = b"zkllm_hf"

SCHEMA = pa.schema(
    [
        pa.field("sample", pa.int32(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("phase", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("point", pa.string(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("alias_of", pa.string()),  # the primary file this one duplicates, else null
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("cols", pa.int64(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("scale_log2", pa.int32(), nullable=False),
        pa.field("byte_size", pa.int64(), nullable=False),
        pa.field("sha256", pa.string()),  # the file's digest, under the manifest's digest_algorithm:
        pa.field("blake3", pa.string()),  # exactly one of the two is filled (captures before 1.5: sha256 only)
        pa.field("source_dtype", pa.string(), nullable=False),
        pa.field("int_min", pa.int32(), nullable=False),
        pa.field("int_max", pa.int32(), nullable=False),
        pa.field("headroom", pa.float64(), nullable=False),  # max |code| / (2**31 - 1)
        pa.field("hf_module", pa.string(), nullable=False),
        pa.field("hook", pa.string(), nullable=False),
        pa.field("check", pa.string()),  # identity whose left-hand side this file is
        pa.field("max_dev_lsb", pa.float64()),  # its largest deviation, in LSB
        pa.field("max_dev_ratio", pa.float64()),  # ... as a ratio to the per-element bound
    ]
)
COLUMNS = tuple(SCHEMA.names)
OPTIONAL_COLUMNS = ("blake3",)  # absent from manifests written before BLAKE3; read as null
REQUIRED_COLUMNS = tuple(c for c in COLUMNS if c not in OPTIONAL_COLUMNS)


def rows_digest(rows: Iterable[Mapping[str, Any]], metadata: Mapping[str, Any]) -> str:
    """The digest (the metadata's ``digest_algorithm``; SHA-256 without one) over the rows and the metadata
    (less this digest), in a canonical JSON form."""
    meta = {k: v for k, v in metadata.items() if k != "manifest_digest"}
    canon = json.dumps(
        {"rows": [dict(r) for r in rows], "metadata": meta},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
        allow_nan=True,
    )
    return digest_bytes(manifest_algorithm(metadata), canon.encode())


SIDECAR_NAME = "capture.json"  # the metadata as a plain JSON file, beside every manifest
_NOT_IN_SIDECAR = ("manifest_digest", "sidecar")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite number as null: the sidecar is strict JSON that every reader parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def sidecar_bytes(metadata: Mapping[str, Any]) -> bytes:
    """``capture.json``: the manifest's metadata less its digest and this file's own record, as strict JSON
    (sorted keys, UTF-8, NaN and infinities as null). A function of the metadata alone, so the file, its
    SHA-256 recorded in the manifest, and the metadata it repeats can each be checked against the others."""
    body = {k: v for k, v in metadata.items() if k not in _NOT_IN_SIDECAR}
    text = json.dumps(_finite(body), sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False, default=str)
    return (text + "\n").encode()


def build_table(rows: list[dict[str, Any]], metadata: dict[str, Any]) -> pa.Table:
    """The manifest table, rows sorted by (sample, step, layer, file), with its digest in the metadata. The
    metadata records the ``capture.json`` that :func:`write_manifest` writes beside it (name and SHA-256), so
    the manifest's digest covers that file too."""
    full = ({**dict.fromkeys(OPTIONAL_COLUMNS), **r} for r in rows)  # every column, as the table reads back
    rows = sorted(full, key=lambda r: (r["sample"], r["step"], r["layer"], r["file"]))
    meta = dict(metadata, format_version=FORMAT_VERSION)
    meta["sidecar"] = {"file": SIDECAR_NAME, "sha256": digest_bytes("sha256", sidecar_bytes(meta))}
    meta["manifest_digest"] = rows_digest(rows, meta)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.zkllm-tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")  # pid-named: ours
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_manifest(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write an Arrow IPC file atomically (temporary name, fsync, rename), then the ``capture.json`` its
    metadata records, beside it (a manifest without a sidecar record gets none).

    In that order because ownership is by manifest (:func:`zkllm_hf.writer.foreign_files`): a sidecar is ours
    only while its manifest lists it, so a run that dies between the two leaves a manifest whose sidecar is
    missing (``validate`` says so; ``capture-dataset`` rewrites such an index), never an orphan sidecar."""
    path = Path(path)

    def arrow(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    _atomic_write(path, arrow)
    write_sidecar(table, path.parent)


def write_sidecar(table: pa.Table, folder: str | os.PathLike[str]) -> None:
    """Write the ``capture.json`` a manifest table's metadata records into ``folder`` (atomically), if it
    records one. The gate writes it into the staged unit before checking it, as ``validate`` will. Metadata
    that is not a JSON object (a crafted manifest) records none."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    try:
        meta = decode_metadata(raw, "manifest") if raw is not None else {}
    except ValueError:
        return
    if sidecar_name(meta) is not None:
        target = Path(folder) / SIDECAR_NAME
        _atomic_write(target, lambda tmp: tmp.write_bytes(sidecar_bytes(meta)))


def sidecar_name(metadata: Mapping[str, Any]) -> str | None:
    """The sidecar a manifest's metadata records (``capture.json``), or None for one written without it."""
    sidecar = metadata.get("sidecar")
    return SIDECAR_NAME if isinstance(sidecar, dict) and sidecar.get("file") == SIDECAR_NAME else None


def remove_manifest(path: str | os.PathLike[str]) -> None:
    """Delete a manifest and its sidecar: the sidecar first, so no sidecar is ever left without its manifest."""
    path = Path(path)
    path.with_name(SIDECAR_NAME).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def sidecar_problem(folder: str | os.PathLike[str], metadata: Mapping[str, Any]) -> str | None:
    """What is wrong with the ``capture.json`` beside a manifest of ``metadata``, else None: it must be a plain
    file whose SHA-256 is the one the manifest records and whose content is the manifest's metadata."""
    record = metadata.get("sidecar")
    if not isinstance(record, dict) or record.get("file") != SIDECAR_NAME:
        return f"the manifest records no {SIDECAR_NAME} (sidecar {record!r})"
    path = Path(folder) / SIDECAR_NAME
    if path.is_symlink() or not path.is_file():
        return f"{SIDECAR_NAME} is missing (or not a regular file); the manifest records one"
    data = path.read_bytes()
    got = digest_bytes("sha256", data)
    if got != record.get("sha256"):
        return (
            f"{SIDECAR_NAME} was edited: sha256 {got[:12]}..., the manifest records "
            f"{str(record.get('sha256'))[:12]}..."
        )
    if data != sidecar_bytes(metadata):
        return f"{SIDECAR_NAME} does not hold the manifest's metadata (both were edited, the digest re-sealed)"
    return None


def table_metadata(table: pa.Table) -> dict[str, Any]:
    """The decoded ``zkllm_hf`` metadata of a manifest table."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw is not None else {}


def read_manifest(path: str | os.PathLike[str]) -> tuple[pa.Table, dict[str, Any]]:
    """Read ``manifest.arrow``; return the table and its decoded metadata, a JSON object of bounded depth.

    Raises :class:`~zkllm_hf.metadata.MetadataError` (a ValueError) if the metadata is not one; what its
    fields hold is checked where a capture is loaded (:func:`zkllm_hf.metadata.check_metadata`).
    """
    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path}: no '{METADATA_KEY.decode()}' metadata; not a zkllm-hf manifest")
    return table, decode_metadata(raw, str(path))
