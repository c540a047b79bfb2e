"""The commit's gate: share the duplicated units, check every staged unit and the dataset index, write the
manifests, and summarise the capture as a :class:`CaptureResult`.

The gate runs the contract's capture and file checks on each staged unit, as ``validate`` runs them from
disk, plus the layer checks already run in memory as each layer completed. In a dataset the manifest schema
runs once, on the index, which holds every unit's rows. Nothing is emitted unless every check passes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any

from torch import nn

from . import fixed_point as fp
from .contracts import (
    INDEX_KINDS,
    CaptureSubject,
    CheckResult,
    ContractViolation,
    inside,
    run_capture_checks,
    run_dataset_checks,
    run_file_checks,
)
from .direct_io import stamp
from .manifest import build_table, table_metadata, write_manifest, write_sidecar
from .options import CaptureOptions
from .profile import zkllm_limit_warnings
from .unit import UnitRecorder
from .writer import MANIFEST_NAME, link_or_copy, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "CaptureResult",
    "Gated",
    "build_index",
    "gate_units",
    "index_rows",
    "share_units",
    "summarise",
    "write_manifests",
]


@dataclass
class CaptureResult:
    """What a finished capture holds, for the caller to report."""

    out_dir: Path
    seq_len: int  # the unit's seq_len; for a dataset, the longest unit's
    hidden_size: int
    layers: list[int]
    scale_log2: int
    max_abs_value: float  # largest |x| over every captured point
    worst: tuple[int, str]  # (layer, point) where it occurs
    checks: list[CheckResult] = field(default_factory=list)  # every check the gate ran, by contract name
    warnings: list[str] = field(default_factory=list)  # zkLLM limits the capture does not meet
    units: list[dict[str, Any]] = field(default_factory=list)  # folder, sample, step, phase, seq_len per unit
    mode: str = "forward"

    @property
    def headroom(self) -> float:
        """Fraction of the int32 range the largest value uses (0.69 means 69%)."""
        return fp.headroom(self.max_abs_value, self.scale_log2)

    @property
    def skipped(self) -> list[CheckResult]:
        """The checks that could not run, each with its reason (never counted as passed)."""
        return [c for c in self.checks if c.skipped is not None]

    @property
    def is_dataset(self) -> bool:
        return bool(self.units) and self.units[0]["folder"] != ""


def index_rows(rows: Sequence[Mapping[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """A unit's manifest rows as a dataset index lists them: ``file`` (and ``alias_of``) under ``prefix``."""
    return [
        dict(r, file=prefix + r["file"], alias_of=None if r["alias_of"] is None else prefix + r["alias_of"])
        for r in rows
    ]


def build_index(
    root: Path,
    contract: Any,
    rows: list[dict[str, Any]],
    metadata: Mapping[str, Any],
    units: Sequence[tuple[Mapping[str, Any], Any]],
    *,
    kinds: frozenset[str] = INDEX_KINDS - {"manifest_schema"},
) -> tuple[Any, list[CheckResult]]:
    """The dataset index over units whose manifests are already written under ``root``, and its checks.

    ``rows`` are every unit's rows as :func:`index_rows` lists them; ``units`` pairs each unit's entry
    (folder, sample, step, phase, seq_len, ...) with its manifest table. Returns the index table (the
    metadata's unit list gains each manifest's SHA-256) and the index's own checks as ``validate`` runs them.
    """
    meta = {
        **metadata,
        "kind": "dataset",
        "units": [dict(m, manifest_sha256=sha256_file(root / m["folder"] / MANIFEST_NAME)) for m, _ in units],
    }
    index = build_table(rows, meta)
    subject = CaptureSubject(index.to_pylist(), index, table_metadata(index))
    entries = [
        dict(m, rows=table.to_pylist(), metadata=table_metadata(table)) for m, (_, table) in zip(meta["units"], units)
    ]
    results = run_capture_checks(contract, subject, kinds=kinds)
    results += run_dataset_checks(contract, root, rows, meta, entries)
    return index, [_replace(r, unit=r.unit or ".") for r in results]


def share_units(root: Path, units: Sequence[UnitRecorder], written: dict[str, Any]) -> None:
    """Give each shared unit (rows duplicated before prefill) its source's bytes, hard-linked under its own
    folder in ``root``, and its source's digests in ``written``."""
    for u in units:
        source = u.source
        if source is None:
            continue
        (root / u.folder).mkdir(parents=True, exist_ok=True)
        for rec in u.records.values():
            names = (rec.point.file_name(rec.layer), *rec.point.alias_names(rec.layer))
            key = rec.point.file_name(rec.layer)
            w = written[f"{source.folder}/{key}"]
            src = root / source.folder / key
            fresh = w.read_back is not None and _stamp_or_none(src) == w.read_back.stamp
            linked = all([link_or_copy(root / source.folder / name, root / u.folder / name) for name in names])
            # a hard link is the bytes read back (the link changed the stamp: take it again); a copy is read
            w = _replace(w, read_back=_replace(w.read_back, stamp=stamp(src)) if fresh and linked else None)
            written[f"{source.folder}/{key}"] = written[f"{u.folder}/{key}"] = w


@dataclass
class Gated:
    """What the gate has checked and the manifests will say."""

    flat: bool  # one unit written at the top level, not a dataset
    unit_tables: list[tuple[UnitRecorder, Any]]
    dataset_rows: list[dict[str, Any]]
    index_results: list[CheckResult]
    failures: list[CheckResult]

    def tag(self, r: CheckResult, u: UnitRecorder) -> CheckResult:
        """A check as the result lists it: named by its unit's folder in a dataset."""
        return r if self.flat else _replace(r, unit=u.folder)

    def unit_meta(self) -> list[dict[str, Any]]:
        return [
            {
                "folder": "" if self.flat else u.folder,
                "sample": u.sample,
                "step": u.step,
                "phase": u.phase,
                "seq_len": u.seq_len,
            }
            for u, _ in self.unit_tables
        ]


def _gate_unit(
    contract: Any,
    u: UnitRecorder,
    table: Any,
    rows: list[dict[str, Any]],
    root: Path,
    model: nn.Module,
    fingerprint: str,
    flat: bool,
    written: Mapping[str, Any],
) -> list[CheckResult]:
    """Every check of one staged unit: its layer checks (run in memory), its capture checks on the manifest
    as validate reads it back (the rows in manifest order, the metadata through JSON), and its file checks."""
    skip = frozenset() if flat else frozenset({"manifest_schema"})
    subject = CaptureSubject(
        table.to_pylist(), table, table_metadata(table), root / u.folder, model, lambda _: fingerprint, u.failures
    )
    capture_checks = run_capture_checks(contract, subject, skip=skip)
    file_checks = run_file_checks(contract, root / u.folder, rows, known=read_backs(rows, written, root, u.folder))
    return list(u.checks.values()) + capture_checks + file_checks


def read_backs(
    rows: Sequence[Mapping[str, Any]], written: Mapping[str, Any], root: Path, folder: str
) -> dict[str, Any]:
    """``{row file: ReadBack}`` for the files of the unit ``folder`` (under ``root``) its writer read back as
    they landed, and unchanged since (an alias, a hard link, shares its primary's), so the file checks read
    only the others from disk."""
    out = {}
    for r in rows:
        w = written.get(f"{folder}/{r['alias_of'] or r['file']}")
        rb = getattr(w, "read_back", None)
        path = inside(root / folder, str(r["file"]))
        if rb is not None and path is not None and _stamp_or_none(path) == rb.stamp:
            out[str(r["file"])] = rb
    return out


def _stamp_or_none(path: Path) -> tuple[int, ...] | None:
    try:
        return stamp(path)
    except OSError:
        return None


def _gate_index(contract: Any, dataset_rows: list[dict[str, Any]]) -> list[CheckResult]:
    """The manifest schema on the dataset index, which holds every unit's rows."""
    index = build_table(dataset_rows, {})
    subject = CaptureSubject(index.to_pylist(), index, table_metadata(index))
    return [
        _replace(c, unit=(c.file.rpartition("/")[0] if c.file else "."))
        for c in run_capture_checks(contract, subject, kinds=frozenset({"manifest_schema"}))
    ]


def gate_units(
    units: Sequence[UnitRecorder],
    written: Mapping[str, Any],
    root: Path,
    *,
    options: CaptureOptions,
    model: nn.Module,
    common: Mapping[str, Any],
    extra: Mapping[str, Any],
    out_dir: Path,
) -> Gated:
    """Check every staged unit under ``root`` (and, for a dataset, the index's rows); raise
    :class:`ContractViolation` naming every failure. ``extra`` is the adapter's metadata for each unit."""
    flat = len(units) == 1 and not options.stepped
    gated = Gated(flat, [], [], [], [])
    fingerprint = common["model"]["weights_fingerprint"]  # computed once, for the metadata and the check
    for u in units:
        rows = u.rows(written)
        # each unit carries how it was made (the generation config, the Trainer's settings) too
        table = build_table(rows, {**u.metadata(common), **dict(extra)})
        write_sidecar(table, root / u.folder)  # checked below from disk, as validate reads it
        gated.unit_tables.append((u, table))
        u.results = _gate_unit(options.contract, u, table, rows, root, model, fingerprint, flat, written)
        gated.failures += [gated.tag(r, u) for r in u.results if r.failed]
        gated.dataset_rows += index_rows(rows, "" if flat else f"{u.folder}/")
    if not flat:
        gated.index_results += _gate_index(options.contract, gated.dataset_rows)
        gated.failures += [c for c in gated.index_results if c.failed]
    if gated.failures:
        raise ContractViolation(gated.failures, context=f"capture into '{out_dir}'")
    return gated


def write_manifests(root: Path, gated: Gated, contract: Any, metadata: Mapping[str, Any], out_dir: Path) -> None:
    """Write the manifests last, in the staging folder ``root``: a single unit's files moved to the top
    level with its manifest, or each unit's manifest and then the checked dataset index."""
    if gated.flat:
        u, table = gated.unit_tables[0]
        for entry in list((root / u.folder).iterdir()):
            os.rename(entry, root / entry.name)
        (root / u.folder).rmdir()
        if u.folder.count("/"):
            (root / u.folder.split("/")[0]).rmdir()
        write_manifest(table, root / MANIFEST_NAME)
        return
    for u, table in gated.unit_tables:
        write_manifest(table, root / u.folder / MANIFEST_NAME)
    index, results = build_index(
        root,
        contract,
        gated.dataset_rows,
        metadata,
        [(m, table) for m, (_, table) in zip(gated.unit_meta(), gated.unit_tables)],
    )
    gated.index_results.extend(results)
    bad = [r for r in gated.index_results if r.failed]
    if bad:
        raise ContractViolation(bad, context=f"capture into '{out_dir}'")
    write_manifest(index, root / MANIFEST_NAME)


def summarise(out: Path, gated: Gated, options: CaptureOptions, model: nn.Module, hidden: int) -> CaptureResult:
    """The committed capture's result: its largest value, every check, the zkLLM limits it does not meet."""
    units = [u for u, _ in gated.unit_tables]
    records = [rec for u in units for rec in u.records.values()]
    worst = max(records, key=lambda r: max(-r.int_min, r.int_max))
    max_abs = max(-worst.int_min, worst.int_max) / 2**options.scale_log2
    seq_len = max(u.seq_len for u in units)
    config = getattr(model, "config", None)
    result = CaptureResult(
        out_dir=out,
        seq_len=seq_len,
        hidden_size=hidden,
        layers=list(options.layers),
        scale_log2=options.scale_log2,
        max_abs_value=max_abs,
        worst=(worst.layer, worst.point.name),
        checks=[gated.tag(c, u) for u in units for c in u.results] + gated.index_results,
        warnings=zkllm_limit_warnings(
            seq_len,
            hidden,
            getattr(config, "intermediate_size", None),
            paddable=options.paddable,
            num_attention_heads=getattr(config, "num_attention_heads", None),
            num_key_value_heads=getattr(config, "num_key_value_heads", None),
        ),
        units=gated.unit_meta(),
        mode=options.mode,
    )
    logger.info(
        "captured %d unit(s) of %d layers into %s; largest |x| %.6g at layer %d %s uses %.1f%% of int32",
        len(units),
        len(options.layers),
        out,
        max_abs,
        *result.worst,
        100 * result.headroom,
    )
    return result
