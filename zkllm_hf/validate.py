"""Re-checking a finished capture from disk against its contract (reading one: :mod:`zkllm_hf.loading`)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import provenance
from .contracts import (
    INDEX_KINDS,
    RESIDUAL_MODES,
    CaptureSubject,
    CheckResult,
    Contract,
    inside,
    run_capture_checks,
    run_dataset_checks,
    run_file_checks,
    run_identities,
)
from .dtypes import SOURCE_DTYPES
from .errors import CaptureNotFinished, UnsafeManifestError
from .hooks import find_layout
from .loading import (  # noqa: F401 - the reading side, also importable from here as before
    UNIT_FOLDER,
    Capture,
    CaptureDataset,
    load_capture,
    load_folder,
    unit_entries,
)
from .manifest import REQUIRED_COLUMNS, read_manifest
from .metadata import MetadataError, check_columns, check_metadata
from .points import POINTS
from .trust import trusted_contract
from .writer import MANIFEST_NAME, clean_leftovers


@dataclass
class ValidationReport:
    """Every check ``validate`` ran on one capture folder, by contract name; ``ok`` iff none failed.

    A check that could not run (no model given, a weight that cannot be read) is listed as skipped, with
    the reason, and never counts as passed.
    """

    path: Path
    results: list[CheckResult]
    metadata: dict[str, Any] | None = None
    rows: list[dict[str, Any]] | None = field(default=None, repr=False)  # the manifest's rows, as read
    contract: Contract | None = field(default=None, repr=False)  # the contract the checks came from
    replay: dict[str, Any] | None = None  # validate --replay: the verdict, what differed, the localisation

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    @property
    def skipped(self) -> list[CheckResult]:
        return [r for r in self.results if r.skipped is not None]

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.results:
            entry = out.setdefault(r.check, {"passed": 0, "failed": 0, "skipped": 0})
            entry["skipped" if r.skipped is not None else "passed" if r.passed else "failed"] += 1
        return out

    def skip_reasons(self) -> dict[str, list[str]]:
        """Each skipped check's distinct reasons."""
        out: dict[str, list[str]] = {}
        for r in self.skipped:
            reasons = out.setdefault(r.check, [])
            if r.skipped not in reasons:
                reasons.append(str(r.skipped))
        return out

    def to_json(self) -> str:
        return json.dumps(
            {
                "path": str(self.path),
                "ok": self.ok,
                "summary": self.summary(),
                "failures": [f.to_dict() for f in self.failures],
                "skipped": self.skip_reasons(),
                **({"replay": self.replay} if self.replay is not None else {}),
            },
            indent=2,
            default=str,
        )

    def __str__(self) -> str:
        head = f"{self.path}: {'VALID' if self.ok else 'INVALID'}"
        lines = [head] + [
            f"  {name:<22} {c['passed']:>5} passed  {c['failed']:>5} failed"
            + (f"  {c['skipped']:>5} skipped" if c["skipped"] else "")
            for name, c in self.summary().items()
        ]
        if self.skipped:
            lines.append("skipped (not checked):")
            lines += [f"  - {name}: {reason}" for name, reasons in self.skip_reasons().items() for reason in reasons]
        if self.failures:
            lines.append("failures:")
            lines += [f"  - {f.describe()}" for f in self.failures]
        if self.replay is not None:
            lines.append(f"replay: {self.replay['verdict']} verdict" + "".join(
                f"\n  - differs: {d}" for d in self.replay["differences"]))  # fmt: skip
            if self.replay.get("localisation"):
                lines.append(f"  localised: {self.replay['localisation']['message']}")
        return "\n".join(lines)


def validate(
    path: str | os.PathLike[str],
    model: torch.nn.Module | None = None,
    *,
    progress: bool = False,
    contract: str | None = None,
    replay: bool = False,
) -> ValidationReport:
    """Re-check a capture (a unit or a dataset) from disk against every check of its contract.

    With ``model``, also recompute both RMSNorms with its weights and compare its config and weights
    fingerprint; without it those checks are reported as skipped. ``progress`` shows bars on a terminal.
    A manifest naming a contract outside the package is refused unless ``contract`` names that folder:
    a capture cannot choose a laxer contract for itself.

    ``replay`` (needs ``model``) re-runs every unit's recorded forwards through ``model`` and compares every
    captured point with its file, under the contract's ``replay`` entries (see :mod:`zkllm_hf.replay`).
    """
    if replay and model is None:
        raise ValueError("replay=True needs the model to replay through: pass model= (the CLI's --model)")
    path = Path(path)
    clean_leftovers(path)  # a dead capture's staging or half-deleted old folder, beside this one
    report = validate_folder(path, model, progress=progress, trusted=contract)
    if replay:
        _add_replay(report, model)
    return report


def _add_replay(report: ValidationReport, model: torch.nn.Module) -> None:
    """Replay the capture through ``model`` and add the ``replay`` entries' results to ``report``."""
    from .replay import replay_capture

    if report.contract is None:
        report.results.append(CheckResult("replay", False, skipped="the capture's manifest cannot be read"))
        return
    try:
        outcome = replay_capture(report.path, model, report.contract)
    except (MetadataError, OSError, pa.ArrowInvalid, KeyError, TypeError, IndexError, AttributeError) as exc:
        report.results.append(CheckResult("replay", False, f"the replay could not run: {exc}"))
        return
    report.results += outcome.results
    report.replay = outcome.to_dict()


def validate_folder(
    path: Path,
    model: torch.nn.Module | None,
    *,
    progress: bool,
    fingerprint: Any = None,
    trusted: str | None = None,
) -> ValidationReport:
    """:func:`validate`'s checks on one folder as it is (a unit or a dataset), leaving whatever is beside it.

    ``fingerprint`` is a callable giving the model's weights fingerprint (shared by a dataset's units, so
    it is computed once); ``trusted`` is the contract folder the caller trusts besides the packaged ones.
    """
    try:
        index = _dataset_index(path)
        if index is not None:  # a dataset is checked unit by unit, even if some are unreadable
            return _validate_dataset(path, *index, model, progress=progress, trusted=trusted)
        cap = load_folder(path, check_paths=False)  # the contract's containment check names every unsafe row
        contract = trusted_contract(cap.metadata, trusted)
        scale = int(cap.metadata["capture"]["scale_log2"])
        layers = [int(x) for x in cap.metadata["capture"]["layers"]]
    except MetadataError as exc:  # metadata no reader can rely on: the capture is invalid, nothing else runs
        return ValidationReport(path, [CheckResult(exc.check, False, str(exc))])
    except (CaptureNotFinished, OSError, pa.ArrowInvalid, ValueError, KeyError, TypeError) as exc:
        return ValidationReport(path, [CheckResult("manifest", False, str(exc))])
    assert isinstance(cap, Capture)
    if model is not None and fingerprint is None:
        fingerprint = functools.cache(lambda digest: provenance.weights_fingerprint(model, digest=digest))
    return _validate_unit(cap, contract, scale, layers, model, progress=progress, fingerprint=fingerprint)


# Deprecated aliases, for one release.
_contract_of = trusted_contract
_validate = validate_folder


def _dataset_index(path: Path) -> tuple[pa.Table, dict[str, Any]] | None:
    """The folder's dataset index (its columns and metadata fields checked), or None if it is not a dataset's."""
    if not (path / MANIFEST_NAME).is_file():
        return None
    table, meta = read_manifest(path / MANIFEST_NAME)
    if meta.get("kind") != "dataset" or not all(c in table.column_names for c in REQUIRED_COLUMNS):
        return None
    check_columns(table, str(path / MANIFEST_NAME))  # the index's columns and fields, before any
    check_metadata(meta, str(path / MANIFEST_NAME))  # reader uses them
    return table, meta


def _validate_unit(
    cap: Capture,
    contract: Contract,
    scale: int,
    layers: list[int],
    model: torch.nn.Module | None,
    *,
    progress: bool,
    fingerprint: Any,
) -> ValidationReport:
    """One unit: the capture checks, then (if its format is this contract's) the file and layer checks."""
    path, meta, rows = cap.path, cap.metadata, cap.manifest.to_pylist()
    subject = CaptureSubject(rows, cap.manifest, meta, path, model, fingerprint)
    results = run_capture_checks(contract, subject)
    report = ValidationReport(path, results, meta, rows, contract)
    if any(r.check in contract.names_of("format_version") and r.failed for r in results):
        return report  # a format this contract does not describe: nothing else can be read reliably
    results += run_file_checks(contract, path, rows, progress=progress)
    layout = find_layout(model) if model is not None else None
    try:
        residuals, drift = _residuals_of(meta)
    except (KeyError, TypeError, ValueError) as exc:
        report.results.append(CheckResult("manifest", False, f"unreadable residuals metadata: {exc}"))
        return report
    layer_list = sorted(set(layers) | {r["layer"] for r in rows})
    results += _layer_checks(cap, contract, scale, layer_list, layout, progress, residuals, drift)
    return report


def _readable(cap: Capture) -> set[tuple[int, str]]:
    """The (layer, point) files of the right size (else the schema check says so; a changed file also shows in
    what it breaks)."""
    return {
        key
        for key, row in cap.rows.items()
        if (p := inside(cap.path, row["file"])) is not None
        and p.is_file()
        and p.stat().st_size == row["byte_size"] == row["rows"] * row["cols"] * 4
    }


def _layer_checks(
    cap: Capture,
    contract: Contract,
    scale: int,
    layers: list[int],
    layout: Any,
    progress: bool,
    residuals: str,
    drift: Mapping[int, dict[str, dict[str, Any]]],
) -> list[CheckResult]:
    """The contract's layer checks (identities, norms, the chain) on every layer whose files are all readable."""
    readable, results = _readable(cap), []
    previous: tuple[int, dict[str, torch.Tensor]] | None = None
    for layer in tqdm(layers, desc="identities", unit="layer", disable=None if progress else True):
        tensors = {
            p.name: torch.from_numpy(np.array(cap.codes(layer, p.name))) for p in POINTS if (layer, p.name) in readable
        }
        dtypes = {n: SOURCE_DTYPES.get(cap.rows[(layer, n)]["source_dtype"]) for n in tensors}
        if len(tensors) < len(POINTS) or None in dtypes.values():  # reported by integrity or the schema
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
            norms=norms if norms is not None else "no model was given (pass model=, or --model)",
            files={n: cap.rows[(layer, n)]["file"] for n in tensors},
            residuals=residuals,
            recorded_drift=drift.get(layer, {}),
        )
        previous = (layer, tensors)
    return results


def _residuals_of(meta: Mapping[str, Any]) -> tuple[str, dict[int, dict[str, dict[str, Any]]]]:
    """How the capture wrote its residual stream, and the drift it recorded per layer and point (exact-int)."""
    mode = str(meta.get("capture", {}).get("residuals", "model"))
    if mode not in RESIDUAL_MODES:
        raise ValueError(f"residuals mode {mode!r} is not one of {RESIDUAL_MODES}")
    drift: dict[int, dict[str, dict[str, Any]]] = {}
    for entry in (meta.get("residuals") or {}).get("drift") or []:
        record = {
            "max_dev_lsb": float(entry["max_dev_lsb"]),
            "max_ratio": None if entry.get("max_ratio") is None else float(entry["max_ratio"]),
            "tolerance_lsb": None if entry.get("tolerance_lsb") is None else float(entry["tolerance_lsb"]),
            "index": [int(i) for i in entry.get("index") or ()],
        }
        drift.setdefault(int(entry["layer"]), {})[str(entry["point"])] = record
    return mode, drift


def _validate_dataset(
    path: Path,
    table: pa.Table,
    meta: dict[str, Any],
    model: torch.nn.Module | None,
    *,
    progress: bool,
    trusted: str | None,
) -> ValidationReport:
    """The index (its capture checks), each unit on its own, and the contract's dataset checks."""
    contract = trusted_contract(meta, trusted)
    rows = table.to_pylist()
    subject = CaptureSubject(rows, table, meta, path)
    results = [replace(r, unit=".") for r in run_capture_checks(contract, subject, kinds=INDEX_KINDS)]
    report = ValidationReport(path, results, meta, contract=contract)
    if any(r.check in contract.names_of("format_version") and r.failed for r in results):
        return report
    fingerprint = None
    if model is not None:
        fingerprint = functools.cache(lambda digest: provenance.weights_fingerprint(model, digest=digest))
    entries = []
    for e in tqdm(unit_entries(path, meta), desc="units", unit="unit", disable=None if progress else True):
        folder = e["folder"]
        sub = validate_folder(path / folder, model, progress=False, fingerprint=fingerprint, trusted=trusted)
        results += [replace(r, unit=folder) for r in sub.results]
        entries.append(dict(e, rows=sub.rows, metadata=sub.metadata))
    results += run_dataset_checks(contract, path, rows, meta, entries)
    return report


__all__ = [
    "Capture",
    "CaptureDataset",
    "CaptureNotFinished",
    "UnsafeManifestError",
    "ValidationReport",
    "load_capture",
    "trusted_contract",
    "validate",
    "validate_folder",
]
