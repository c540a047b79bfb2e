"""The Arrow manifest: one row per emitted file, provenance as JSON schema metadata (docs/architecture.md §3)."""

from __future__ import annotations

import json
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


def build_table(rows: list[dict[str, Any]], metadata: dict[str, Any]) -> pa.Table:
    """The manifest table, rows sorted by (sample, step, layer, file), with its digest in the metadata."""
    full = ({**dict.fromkeys(OPTIONAL_COLUMNS), **r} for r in rows)  # every column, as the table reads back
    rows = sorted(full, key=lambda r: (r["sample"], r["step"], r["layer"], r["file"]))
    meta = dict(metadata, format_version=FORMAT_VERSION)
    meta["manifest_digest"] = rows_digest(rows, meta)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})


def write_manifest(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Write an Arrow IPC file atomically (temporary name, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.zkllm-tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")  # pid-named: ours
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
