"""The data contracts: load ``contracts/vN`` and run its checks on tensors in memory or files on disk.

``contracts/v1/capture.yaml`` names the tensor checks; this module registers the functions behind them.
``contracts/v1/manifest.yaml`` is a pandera schema whose custom checks are registered here too, through
``pandera.extensions``. The capture gate and ``zkllm-hf validate`` both run what this module returns, so a
capture is valid by exactly one definition.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from . import fixed_point as fp
from .points import FILE_TEMPLATES, POINTS
from .writer import sha256_file

DEFAULT_CONTRACT = "v1"


# --------------------------------------------------------------------------------------------------
# Where the contracts live: inside the wheel (zkllm_hf/contracts_data, mapped at build time from the
# top-level contracts/ folder), or the source tree's contracts/ in a checkout or editable install.


def contracts_root() -> Path:
    """The folder holding ``v1/``, ``v2/``, ... ."""
    packaged = Path(str(resources.files("zkllm_hf"))) / "contracts_data"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parent.parent / "contracts"
    if source.is_dir():
        return source
    raise FileNotFoundError(f"zkllm_hf data contracts not found at {packaged} or {source}; reinstall zkllm-hf")


# --------------------------------------------------------------------------------------------------
# Results


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

    def describe(self) -> str:
        where = [self.unit] if self.unit else []
        if self.layer is not None:
            where.append(f"layer {self.layer}")
        if self.point:
            where.append(self.point)
        if self.file:
            where.append(f"({self.file})")
        text = f"{self.check}: {' '.join(where) or 'capture'}"
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


class ContractViolation(ValueError):
    """A capture broke its data contract. ``failures`` lists every failed check."""

    def __init__(self, failures: Sequence[CheckResult], *, context: str = "capture"):
        self.failures = list(failures)
        lines = "\n".join(f"  - {f.describe()}" for f in self.failures)
        super().__init__(f"{context} failed {len(self.failures)} contract check(s); nothing was emitted:\n{lines}")


# --------------------------------------------------------------------------------------------------
# Tensor checks: registered by tolerance kind, named and parameterised by the contract.

Tensors = Mapping[str, torch.Tensor]
IdentityFn = Callable[..., fp.Deviation]
_IDENTITIES: dict[str, IdentityFn] = {}


def register_identity(kind: str) -> Callable[[IdentityFn], IdentityFn]:
    """Register the function behind a contract's ``tolerance: <kind>``."""

    def deco(fn: IdentityFn) -> IdentityFn:
        _IDENTITIES[kind] = fn
        return fn

    return deco


@register_identity("sum")
def _sum(
    lhs: torch.Tensor, terms: Sequence[torch.Tensor], *, lhs_dtype: torch.dtype, scale_log2: int, **_: Any
) -> fp.Deviation:
    return fp.sum_deviation(terms[0], terms[1], lhs, lhs_dtype, scale_log2)


@register_identity("exact")
def _exact(lhs: torch.Tensor, terms: Sequence[torch.Tensor], **_: Any) -> fp.Deviation:
    return fp.equal_deviation(lhs, terms[0])


@register_identity("rmsnorm")
def _rmsnorm(
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    *,
    lhs_dtype: torch.dtype,
    term_dtypes: Sequence[torch.dtype],
    scale_log2: int,
    norm: tuple[torch.Tensor, float],
    **_: Any,
) -> fp.Deviation:
    weight, eps = norm
    return fp.rmsnorm_deviation(terms[0], lhs, weight, eps, term_dtypes[0], lhs_dtype, scale_log2)


@dataclass(frozen=True)
class IdentitySpec:
    name: str
    lhs: str
    terms: tuple[str, ...]
    tolerance: str
    module: str | None = None
    needs_model: bool = False
    previous_layer: bool = False  # the terms are the previous layer's points


@dataclass(frozen=True)
class Contract:
    """A loaded, versioned contract."""

    version: str  # e.g. "1.0.0"
    folder: str  # e.g. "v1"
    format_version: int
    checks: tuple[str, ...]
    identities: tuple[IdentitySpec, ...]
    manifest_schema: Any = field(repr=False)

    @property
    def norm_modules(self) -> tuple[str, ...]:
        """The norm modules whose weights the model-dependent checks need."""
        return tuple(s.module for s in self.identities if s.module)

    def validate_manifest(self, frame: pd.DataFrame) -> list[CheckResult]:
        """Run the pandera manifest schema; every failure becomes a :class:`CheckResult`."""
        import pandera.errors

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
                        "manifest_schema",
                        False,
                        f"column {column!r} failed {case.get('check')!s} (value {case.get('failure_case')!r})",
                        file=file,
                    )
                )
            return results
        return [CheckResult("manifest_schema", True)]


@functools.cache
def load_contract(folder: str = DEFAULT_CONTRACT) -> Contract:
    """Load and check ``contracts/<folder>``: every check it names must be registered here."""
    import pandera.pandas as pa

    _register_manifest_checks()
    base = contracts_root() / folder
    if not base.is_dir():
        known = sorted(p.name for p in contracts_root().iterdir() if p.is_dir())
        raise ValueError(f"contract {folder!r} does not exist; known contracts: {known}")
    spec = yaml.safe_load((base / "capture.yaml").read_text())
    if list(spec["points"]) != [p.name for p in POINTS]:
        raise ValueError(
            f"contract {folder} names points {spec['points']}, the point table has {[p.name for p in POINTS]}"
        )
    identities = []
    for entry in spec["tensor_checks"]:
        if "tolerance" not in entry:
            continue
        if entry["tolerance"] not in _IDENTITIES:
            raise ValueError(
                f"contract {folder} check {entry['name']!r} uses tolerance "
                f"{entry['tolerance']!r}, which no registered check implements"
            )
        identities.append(
            IdentitySpec(
                entry["name"],
                entry["lhs"],
                tuple(entry["terms"]),
                entry["tolerance"],
                entry.get("module"),
                bool(entry.get("needs_model", False)),
                bool(entry.get("previous_layer", False)),
            )
        )
    schema = pa.DataFrameSchema.from_yaml(base / spec["manifest_schema"])
    return Contract(
        str(spec["version"]),
        folder,
        int(spec["format_version"]),
        tuple(e["name"] for e in spec["tensor_checks"]),
        tuple(identities),
        schema,
    )


def run_identities(
    contract: Contract,
    layer: int,
    tensors: Tensors,
    dtypes: Mapping[str, torch.dtype],
    scale_log2: int,
    *,
    previous: Tensors | None = None,
    norms: Mapping[str, tuple[torch.Tensor, float]] | None = None,
    files: Mapping[str, str] | None = None,
) -> list[CheckResult]:
    """Run every identity of the contract on one layer's int32 codes.

    ``tensors`` maps point names to (seq_len, hidden) int32 codes on any one device. Checks across layers
    (the chain) run when ``previous`` holds layer L-1's codes of their terms, the norms when ``norms`` maps
    each norm module to its ``(weight, eps)``.
    """
    results = []
    for spec in contract.identities:
        source = previous if spec.previous_layer else tensors
        if source is None:
            continue
        terms = [source[t] for t in spec.terms]
        extra: dict[str, Any] = {}
        if spec.needs_model:
            if norms is None:
                continue
            extra["norm"] = norms[spec.module]
        device = tensors[spec.lhs].device
        if device.type == "mps":  # no float64 there
            device = torch.device("cpu")
        dev = _IDENTITIES[spec.tolerance](
            tensors[spec.lhs].to(device),
            [t.to(device) for t in terms],
            lhs_dtype=dtypes[spec.lhs],
            term_dtypes=[dtypes.get(t, dtypes[spec.lhs]) for t in spec.terms],
            scale_log2=scale_log2,
            **extra,
        )
        results.append(
            CheckResult(
                spec.name,
                dev.ok,
                layer=layer,
                point=spec.lhs,
                file=(files or {}).get(spec.lhs),
                max_dev_lsb=dev.max_dev_lsb,
                max_ratio=dev.max_ratio,
                tolerance_lsb=dev.tolerance_lsb,
                index=dev.index,
            )
        )
    return results


def check_integrity(folder: Path, rows: Sequence[Mapping[str, Any]], *, progress: bool = False) -> list[CheckResult]:
    """Every file of ``rows`` exists in ``folder`` with the recorded byte size and SHA-256 (one result each).

    ``progress`` shows a bar on a terminal.
    """

    def check(row: Mapping[str, Any]) -> CheckResult:
        where = {"layer": int(row["layer"]), "point": str(row["point"]), "file": str(row["file"])}
        path = folder / row["file"]
        if not path.is_file():
            return CheckResult("integrity", False, "file is missing", **where)
        size = path.stat().st_size
        if size != row["byte_size"]:
            return CheckResult("integrity", False, f"{size} bytes, manifest says {row['byte_size']}", **where)
        digest = sha256_file(path)
        if digest != row["sha256"]:
            return CheckResult(
                "integrity", False, f"sha256 {digest[:12]}..., manifest says {row['sha256'][:12]}...", **where
            )
        return CheckResult("integrity", True, **where)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        done = pool.map(check, rows)
        return list(tqdm(done, total=len(rows), desc="checksums", unit="file", disable=None if progress else True))


# --------------------------------------------------------------------------------------------------
# pandera checks named by contracts/v1/manifest.yaml


def expected_file(point: str, layer: int) -> str | None:
    """The file a manifest row of ``point`` (or its alias) at ``layer`` must name; None for unknown points."""
    template = FILE_TEMPLATES.get(point)
    return None if template is None else template.format(L=layer)


@functools.cache
def _register_manifest_checks() -> None:
    import pandera.extensions as extensions

    @extensions.register_check_method(statistics=[], check_type="element_wise")
    def zkllm_point_name(value: Any) -> bool:
        return value in FILE_TEMPLATES

    @extensions.register_check_method(statistics=[])
    def zkllm_unique_point_per_layer(df: pd.DataFrame) -> pd.Series:
        return ~df.duplicated(subset=["sample", "step", "layer", "point"], keep=False)

    @extensions.register_check_method(statistics=[])
    def zkllm_file_matches_point(df: pd.DataFrame) -> pd.Series:
        return pd.Series(
            [
                expected_file(p, int(lay)) == str(f).rsplit("/", 1)[-1]
                for p, lay, f in zip(df["point"], df["layer"], df["file"])
            ],
            index=df.index,
        )

    @extensions.register_check_method(statistics=[])
    def zkllm_file_in_unit_folder(df: pd.DataFrame) -> pd.Series:
        def ok(file: str, sample: int, step: int) -> bool:
            folder = str(file).rpartition("/")[0]
            return folder in ("", f"sample-{sample}", f"sample-{sample}/step-{step}")

        return pd.Series([ok(f, s, k) for f, s, k in zip(df["file"], df["sample"], df["step"])], index=df.index)

    @extensions.register_check_method(statistics=[])
    def zkllm_bytes_match_shape(df: pd.DataFrame) -> pd.Series:
        return df["byte_size"] == df["rows"] * df["cols"] * 4

    @extensions.register_check_method(statistics=[])
    def zkllm_min_le_max(df: pd.DataFrame) -> pd.Series:
        return df["int_min"] <= df["int_max"]

    @extensions.register_check_method(statistics=[])
    def zkllm_one_scale(df: pd.DataFrame) -> pd.Series:
        return df["scale_log2"] == (df["scale_log2"].mode().iloc[0] if len(df) else 0)

    @extensions.register_check_method(statistics=[])
    def zkllm_alias_matches_primary(df: pd.DataFrame) -> pd.Series:
        by_file = dict(zip(df["file"], df["sha256"]))
        ok = [pd.isna(a) or by_file.get(a) == s for a, s in zip(df["alias_of"], df["sha256"])]
        return pd.Series(ok, index=df.index)
