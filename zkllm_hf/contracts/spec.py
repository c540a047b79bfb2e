"""The contract's types: a loaded :class:`Contract`, its entries (:class:`CheckSpec`), and what a check
reports (:class:`CheckResult`, :class:`ContractViolation`).

A contract answers which entries it holds by kind and scope (:meth:`Contract.entries`,
:meth:`Contract.names_of`), so no code needs to spell an entry's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..errors import ContractViolation  # noqa: F401 - re-exported; it lives in errors.py


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check on one place (a layer's point, a file, or the whole manifest)."""

    check: str
    passed: bool
    message: str = ""
    layer: int | None = None
    point: str | None = None
    file: str | None = None
    max_dev_lsb: float | None = None
    max_ratio: float | None = None
    tolerance_lsb: float | None = None
    index: tuple[int, ...] | None = None
    unit: str | None = None  # the unit folder in a dataset (``sample-1/step-2``), "." for the index
    skipped: str | None = None  # why the check did not run; a skipped check is neither passed nor failed

    @property
    def failed(self) -> bool:
        return not self.passed and self.skipped is None

    def describe(self) -> str:
        where = [self.unit] if self.unit else []
        if self.layer is not None:
            where.append(f"layer {self.layer}")
        if self.point:
            where.append(self.point)
        if self.file:
            where.append(f"({self.file})")
        text = f"{self.check}: {' '.join(where) or 'capture'}"
        if self.skipped is not None:
            return f"{text}: skipped: {self.skipped}"
        if self.max_dev_lsb is not None:
            at = f" at token {self.index[0]}, dim {self.index[1]}" if self.index and len(self.index) == 2 else ""
            text += (
                f": deviation {self.max_dev_lsb:.6g} LSB{at}, allowed {self.tolerance_lsb:.6g} LSB "
                f"(ratio {self.max_ratio:.3g})"
            )
        if self.message:
            text += f": {self.message}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def row_place(row: Mapping[str, Any]) -> dict[str, Any]:
    """Where a manifest row's check result points: its layer, point and file (:class:`CheckResult` fields)."""
    return {"layer": int(row["layer"]), "point": str(row["point"]), "file": str(row["file"])}


@dataclass(frozen=True)
class CheckSpec:
    """One contract entry."""

    name: str
    kind: str
    scope: str
    params: Mapping[str, Any] = field(default_factory=dict)  # everything else in the entry
    needs_model: bool = False

    @property
    def lhs(self) -> str:
        return str(self.params["lhs"])

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self.params.get("terms", ()))

    @property
    def module(self) -> str | None:
        return self.params.get("module")

    @property
    def previous_layer(self) -> bool:
        return bool(self.params.get("previous_layer", False))


@dataclass(frozen=True)
class Contract:
    """A loaded, versioned contract."""

    name: str  # e.g. "zkllm-hf-capture"
    version: str  # e.g. "1.2.0"
    folder: str  # "v1" for a packaged contract, else the folder's absolute path
    format_version: int
    checks: tuple[CheckSpec, ...]
    manifest_schema: Any = field(repr=False)

    def entries(self, *, kind: str | None = None, scope: str | None = None) -> tuple[CheckSpec, ...]:
        """The contract's entries of ``kind`` and ``scope`` (either may be omitted), in contract order."""
        return tuple(c for c in self.checks if (kind is None or c.kind == kind) and (scope is None or c.scope == scope))

    def names_of(self, kind: str) -> frozenset[str]:
        """The names of the contract's entries of ``kind`` (what their :class:`CheckResult` s are called)."""
        return frozenset(c.name for c in self.entries(kind=kind))

    def name_of(self, kind: str) -> str:
        """The name of the contract's one entry of ``kind``; the kind itself if it has none.

        Raises ``ValueError`` if the contract has several entries of ``kind``."""
        names = [c.name for c in self.entries(kind=kind)]
        if len(names) > 1:
            raise ValueError(
                f"contract {self.folder} has {len(names)} entries of kind {kind!r} ({names}); expected one"
            )
        return names[0] if names else kind

    def scope(self, scope: str) -> tuple[CheckSpec, ...]:
        """The contract's entries of ``scope`` (``entries(scope=scope)``)."""
        return self.entries(scope=scope)

    @property
    def identities(self) -> tuple[CheckSpec, ...]:
        """The layer entries (the identities on one layer's codes)."""
        return self.entries(scope="layer")

    @property
    def norm_modules(self) -> tuple[str, ...]:
        """The norm modules whose weights the model-dependent layer checks need."""
        return tuple(s.module for s in self.identities if s.module)

    @property
    def identity(self) -> dict[str, Any]:
        """How manifests name this contract."""
        return {"name": self.name, "version": self.version, "folder": self.folder}

    def validate_manifest(self, frame: pd.DataFrame, name: str | None = None) -> list[CheckResult]:
        """Run the pandera manifest schema; every failure becomes a :class:`CheckResult` called ``name`` (by
        default the name of the contract's ``manifest_schema`` entry)."""
        import pandera.errors

        name = self.name_of("manifest_schema") if name is None else name
        try:
            self.manifest_schema.validate(frame, lazy=True)
        except pandera.errors.SchemaErrors as exc:
            results = []
            for _, case in exc.failure_cases.iterrows():
                idx = case.get("index")
                file = None
                if idx is not None and not pd.isna(idx) and "file" in frame and int(idx) in frame.index:
                    file = str(frame.loc[int(idx), "file"])
                column = case.get("column")
                results.append(
                    CheckResult(
                        name,
                        False,
                        f"column {column!r} failed {case.get('check')!s} (value {case.get('failure_case')!r})",
                        file=file,
                    )
                )
            return results
        return [CheckResult(name, True)]
