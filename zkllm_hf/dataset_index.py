"""The dataset index: built by rank 0 from the units' manifests on disk, once every rank has finished.

It is the engine's :func:`~zkllm_hf.engine.build_index` over every prompt's units, so a dataset reads as a
batch capture does; it runs the contract's index and dataset checks (the gate) before it is written, and is
written last, so a folder without it is not a finished dataset. A current index is left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import provenance
from .contracts import INDEX_KINDS, ContractViolation
from .engine import CaptureError, build_index, index_rows
from .manifest import read_manifest, sidecar_problem, table_metadata, write_manifest
from .prompts import Prompt, prompts_digest
from .resume import unit_manifests, unit_settings
from .validate import trusted_contract
from .writer import MANIFEST_NAME, fsync_dir, sha256_file

SHARDING = "rank r of K captures the prompts at positions r, r + K, ... (one prompt per forward)"


def write_index(
    out: Path, prompts: Sequence[Prompt], source: Mapping[str, Any], ranks: int, *, rebuild: bool
) -> tuple[list[dict[str, Any]], bool]:
    """Rank 0, once every rank has finished: the index over every prompt's units (the engine's builder).

    Returns the index's unit list and whether it was written; unless ``rebuild``, an index already listing
    these units and prompts is kept as it is.
    """
    entries, tables, rows, first = _read_units(out, prompts)
    dataset = {
        "prompts": {**source, "count": len(prompts), "digest": prompts_digest(prompts)},
        "ranks": ranks,
        "sharding": SHARDING,
    }
    existing = out / MANIFEST_NAME
    if not rebuild and existing.is_file():
        units = _current_units(out, existing, entries, dataset)
        if units is not None:
            return units, False  # a finished dataset of these prompts: nothing to do
    common = _common_metadata(first, dataset)
    contract = trusted_contract(first, None)
    index, results = build_index(out, contract, rows, common, list(zip(entries, tables)), kinds=INDEX_KINDS)
    failed = [r for r in results if r.failed]
    if failed:
        raise ContractViolation(failed, context=f"dataset index of '{out}'")
    write_manifest(index, existing)
    fsync_dir(out)
    return table_metadata(index)["units"], True


def _read_units(out: Path, prompts: Sequence[Prompt]) -> tuple[list[dict[str, Any]], list[Any], list[Any], dict]:
    """Every unit's index entry, manifest table and index rows, by sample, and the first unit's metadata;
    refuses units captured with other settings than the first."""
    entries, tables, rows = [], [], []
    first: dict[str, Any] | None = None
    for p in sorted(prompts, key=lambda p: p.sample):
        for path in unit_manifests(out / p.folder):
            table, meta = read_manifest(path)
            folder = path.parent.relative_to(out).as_posix()
            unit = meta["unit"]
            entry = {
                "folder": folder,
                "sample": unit["sample"],
                "step": unit["step"],
                "phase": unit["phase"],
                "seq_len": meta["tokens"]["seq_len"],
                "prompt_id": p.id,
            }
            if first is None:
                first = meta
            elif unit_settings(meta) | {"prompt": None} != unit_settings(first) | {"prompt": None}:
                raise CaptureError(f"{folder} was captured with other settings than {entries[0]['folder']}")
            entries.append(entry)
            tables.append(table)
            rows += index_rows(table.to_pylist(), folder + "/")
    assert first is not None
    return entries, tables, rows, first


def _current_units(
    out: Path, existing: Path, entries: list[dict[str, Any]], dataset: Mapping[str, Any]
) -> list[dict[str, Any]] | None:
    """The unit list of the index already there, if it lists exactly these units (by their manifests' digests)
    and these prompts; else None."""
    try:
        _, old = read_manifest(existing)
        same = [{k: u.get(k) for k in (*entries[0], "manifest_sha256")} for u in old.get("units", [])]
        now = [dict(e, manifest_sha256=sha256_file(out / e["folder"] / MANIFEST_NAME)) for e in entries]
        intact = sidecar_problem(out, old) is None  # an index with a missing or edited capture.json: rewrite
        if intact and same == now and (old.get("dataset") or {}).get("prompts") == dataset["prompts"]:
            return old["units"]
    except (OSError, ValueError, KeyError):
        pass
    return None


def _common_metadata(first: Mapping[str, Any], dataset: Mapping[str, Any]) -> dict[str, Any]:
    """The index's metadata: what every unit shares (from the first), and the dataset's own record."""
    extra = {k: v for k, v in (first.get("extra") or {}).items() if k != "dataset"}
    common = {k: first[k] for k in ("contract", "digest_algorithm", "versions", "model", "tokenizer") if k in first}
    common["capture"] = dict(first["capture"], created_utc=provenance.utc_now())
    common["extra"] = extra
    if "generation" in first:  # the generation config; prompt_length, steps and rows are each unit's own
        common["generation"] = {
            k: v for k, v in first["generation"].items() if k not in ("prompt_length", "steps", "rows")
        }
    common["dataset"] = dataset
    return common


__all__ = ["SHARDING", "write_index"]
