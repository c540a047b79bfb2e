"""The data contracts: load ``contracts/vN`` and run its checks on tensors in memory or files on disk.

``contracts/v1/capture.yaml`` lists every check a capture must pass; each entry names a ``kind``, an
implementation registered here, and carries its parameters. ``contracts/v1/manifest.yaml`` is a pandera
schema whose custom checks are registered here too, through ``pandera.extensions``. The capture gate and
``zkllm-hf validate`` run the same entries through the same functions, so a capture is valid by exactly one
definition: an entry removed from the contract is removed from both, a changed parameter changes both.

Scopes: ``layer`` checks see one layer's int32 codes (the identities); ``file`` checks see each file once
(integrity and range, from one read); ``capture`` checks see a manifest, its metadata and, when given, the
model; ``dataset`` checks see a dataset's index and its units.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm.auto import tqdm

from . import fixed_point as fp
from .manifest import FORMAT_VERSION, rows_digest
from .points import FILE_TEMPLATES, POINTS, alias_point_name
from .writer import MANIFEST_NAME, sha256_file

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


class ContractViolation(ValueError):
    """A capture broke its data contract. ``failures`` lists every failed check."""

    def __init__(self, failures: Sequence[CheckResult], *, context: str = "capture"):
        self.failures = list(failures)
        lines = "\n".join(f"  - {f.describe()}" for f in self.failures)
        super().__init__(f"{context} failed {len(self.failures)} contract check(s); nothing was emitted:\n{lines}")


# --------------------------------------------------------------------------------------------------
# The registry: each contract entry's ``kind`` names one of these.

SCOPES = ("capture", "file", "layer", "dataset")
_KINDS: dict[str, tuple[str, Callable[..., Any]]] = {}


def register_check(kind: str, scope: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the implementation behind contract entries of ``kind``."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}; one of {SCOPES}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _KINDS[kind] = (scope, fn)
        return fn

    return deco


@dataclass(frozen=True)
class CheckSpec:
    """One contract entry."""

    name: str
    kind: str
    scope: str
    params: Mapping[str, Any] = field(default_factory=dict)  # everything else in the entry
    needs_model: bool = False
    doc: str = ""

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

    def scope(self, scope: str) -> tuple[CheckSpec, ...]:
        return tuple(c for c in self.checks if c.scope == scope)

    def has(self, name: str) -> bool:
        return any(c.name == name for c in self.checks)

    @property
    def identities(self) -> tuple[CheckSpec, ...]:
        return self.scope("layer")

    @property
    def norm_modules(self) -> tuple[str, ...]:
        """The norm modules whose weights the model-dependent layer checks need."""
        return tuple(s.module for s in self.identities if s.module)

    @property
    def identity(self) -> dict[str, Any]:
        """How manifests name this contract."""
        return {"name": self.name, "version": self.version, "folder": self.folder}

    def validate_manifest(self, frame: pd.DataFrame, name: str = "manifest_schema") -> list[CheckResult]:
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
                        name,
                        False,
                        f"column {column!r} failed {case.get('check')!s} (value {case.get('failure_case')!r})",
                        file=file,
                    )
                )
            return results
        return [CheckResult(name, True)]


@functools.cache
def load_contract(folder: str = DEFAULT_CONTRACT) -> Contract:
    """Load and check a contract: a packaged one by name (``"v1"``), or a folder holding ``capture.yaml``.

    Every entry's kind must be registered, with the scope it declares, and the contract's format version
    must be the one this zkllm-hf writes.
    """
    import pandera.pandas as pa

    _register_manifest_checks()
    base = Path(folder) if ("/" in folder or os.sep in folder) else contracts_root() / folder
    if not (base / "capture.yaml").is_file():
        known = sorted(p.name for p in contracts_root().iterdir() if p.is_dir())
        raise ValueError(f"contract {folder!r} does not exist; known contracts: {known}, or a folder with capture.yaml")
    spec = yaml.safe_load((base / "capture.yaml").read_text())
    where = f"contract {folder}"
    if list(spec["points"]) != [p.name for p in POINTS]:
        raise ValueError(f"{where} names points {spec['points']}, the point table has {[p.name for p in POINTS]}")
    if int(spec["format_version"]) != FORMAT_VERSION:
        raise ValueError(
            f"{where} describes manifest format {spec['format_version']}; this zkllm-hf writes format "
            f"{FORMAT_VERSION}. Use a contract for format {FORMAT_VERSION}, or a zkllm-hf that matches"
        )
    checks = []
    for entry in spec["checks"]:
        entry = dict(entry)
        name, kind, scope = entry.pop("name"), entry.pop("kind", None), entry.pop("scope", None)
        if kind not in _KINDS:
            raise ValueError(f"{where} check {name!r} has kind {kind!r}, which no registered check implements")
        if scope != _KINDS[kind][0]:
            raise ValueError(f"{where} check {name!r}: kind {kind!r} runs at scope {_KINDS[kind][0]!r}, not {scope!r}")
        needs_model, doc = bool(entry.pop("needs_model", False)), str(entry.pop("doc", ""))
        checks.append(CheckSpec(name, kind, scope, entry, needs_model, doc))
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ValueError(f"{where} names a check twice: {names}")
    schema = pa.DataFrameSchema.from_yaml(base / spec["manifest_schema"])
    folder_id = folder if base.parent == contracts_root() and base.name == folder else str(base.resolve())
    return Contract(
        str(spec["contract"]), str(spec["version"]), folder_id, int(spec["format_version"]), tuple(checks), schema
    )


# --------------------------------------------------------------------------------------------------
# Layer checks: the identities on one layer's int32 codes.

Tensors = Mapping[str, torch.Tensor]


@register_check("sum", "layer")
def _sum(
    spec: CheckSpec,
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    *,
    lhs_dtype: torch.dtype,
    scale_log2: int,
    residuals: str = "model",
    **_: Any,
) -> torch.Tensor:
    if residuals == "exact-int":  # the sum was derived from its terms in the int domain: it must be exact
        return fp.equal_deviation_stats(lhs, terms[0].to(torch.int64) + terms[1].to(torch.int64))
    tolerance = {k: float(spec.params[k]) for k in ("quantisation_lsb", "rounding_ulps") if k in spec.params}
    return fp.sum_deviation_stats(terms[0], terms[1], lhs, lhs_dtype, scale_log2, **tolerance)


@register_check("exact", "layer")
def _exact(spec: CheckSpec, lhs: torch.Tensor, terms: Sequence[torch.Tensor], **_: Any) -> torch.Tensor:
    return fp.equal_deviation_stats(lhs, terms[0])


@register_check("rmsnorm", "layer")
def _rmsnorm(
    spec: CheckSpec,
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    *,
    lhs_dtype: torch.dtype,
    term_dtypes: Sequence[torch.dtype],
    scale_log2: int,
    norm: tuple[torch.Tensor, float],
    input_drift_lsb: float = 0.0,
    **_: Any,
) -> torch.Tensor:
    weight, eps = norm
    return fp.rmsnorm_deviation_stats(
        terms[0], lhs, weight, eps, term_dtypes[0], lhs_dtype, scale_log2, input_drift_lsb=input_drift_lsb
    )


@register_check("drift", "layer")
def _drift(
    spec: CheckSpec,
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    *,
    lhs_dtype: torch.dtype,
    scale_log2: int,
    **_: Any,
) -> torch.Tensor:
    """``lhs`` derived in the int domain against ``terms[0]``, the model's own codes of the same point."""
    return fp.drift_deviation_stats(
        lhs,
        terms[0],
        lhs_dtype,
        scale_log2,
        drift_lsb=float(spec.params["drift_lsb"]),
        drift_ulps=float(spec.params["drift_ulps"]),
    )


RESIDUAL_MODES = ("model", "exact-int")


@dataclass
class PendingIdentities:
    """A layer's identity checks, computed on the codes' device but not yet read back (no device sync).

    ``stats`` holds ``fp.DEVIATION_STATS`` numbers per check that ran (None if none ran); :meth:`resolve`
    turns them, once they are on the host, into the :class:`CheckResult` list :func:`run_identities` returns.
    """

    slots: list[CheckResult | tuple[CheckSpec, dict[str, Any], tuple[int, ...]]]
    stats: torch.Tensor | None

    def resolve(self, host: Sequence[float] | None = None) -> list[CheckResult]:
        """The results; ``host`` is ``stats`` flattened on the host (read here, with one sync, if omitted)."""
        if host is None:
            host = [] if self.stats is None else self.stats.reshape(-1).tolist()
        out, k = [], 0
        for slot in self.slots:
            if isinstance(slot, CheckResult):
                out.append(slot)
                continue
            spec, where, shape = slot
            dev = fp.Deviation.from_stats(host[k : k + fp.DEVIATION_STATS], shape)
            k += fp.DEVIATION_STATS
            out.append(
                CheckResult(
                    spec.name,
                    dev.ok,
                    max_dev_lsb=dev.max_dev_lsb,
                    max_ratio=dev.max_ratio,
                    tolerance_lsb=dev.tolerance_lsb,
                    index=dev.index,
                    **where,
                )
            )
        return out


def run_identities(*args: Any, **kwargs: Any) -> list[CheckResult]:
    """:func:`start_identities` (same arguments), its results read back at once."""
    return start_identities(*args, **kwargs).resolve()


def start_identities(
    contract: Contract,
    layer: int,
    tensors: Tensors,
    dtypes: Mapping[str, torch.dtype],
    scale_log2: int,
    *,
    previous: Tensors | None = None,
    norms: Mapping[str, tuple[torch.Tensor, float] | str] | str | None = None,
    files: Mapping[str, str] | None = None,
    residuals: str = "model",
    model_codes: Tensors | None = None,
    drift_lsb: Mapping[str, float] | None = None,
    recorded_drift: Mapping[str, Mapping[str, Any]] | None = None,
) -> PendingIdentities:
    """Run the contract's layer checks on one layer's int32 codes, on the codes' device, without reading the
    results back: :meth:`PendingIdentities.resolve` reads them once they have reached the host (no device sync
    until then).

    ``tensors`` maps point names to (seq_len, hidden) int32 codes on any one device. Checks across layers
    (the chain) use ``previous``, layer L-1's codes; at layer 0 they do not apply, and when L-1 is absent
    they are reported as skipped. Model checks use ``norms``, mapping each norm module to its ``(weight,
    eps)`` or to the reason it could not be read; a string (or None) is the reason for all of them.

    With ``residuals="exact-int"`` the residual points were derived from the sublayer outputs in the int
    domain: the sums must hold exactly, the drift checks compare each derived point with the model's own
    codes (``model_codes``, in the gate) or read the drift the manifest recorded (``recorded_drift``, in
    validate), and the norm checks widen their input term by the largest drift of their input, in LSB
    (``drift_lsb`` in the gate; the recorded ``max_dev_lsb`` in validate).
    """
    if residuals not in RESIDUAL_MODES:
        raise ValueError(f"residuals {residuals!r}; one of {RESIDUAL_MODES}")
    if drift_lsb is None:
        drift_lsb = {k: float(v.get("max_dev_lsb") or 0.0) for k, v in (recorded_drift or {}).items()}
    slots: list[CheckResult | tuple[CheckSpec, dict[str, Any], tuple[int, ...]]] = []
    stats = []
    for spec in contract.identities:
        where = {"layer": layer, "point": spec.lhs, "file": (files or {}).get(spec.lhs)}
        if spec.kind == "drift":
            if residuals != "exact-int":
                continue  # the files hold the model's own values: nothing was derived
            if model_codes is not None:
                terms = [model_codes[spec.lhs]]
            else:
                record = (recorded_drift or {}).get(spec.lhs)
                slots.append(_recorded_drift(spec, record, where, tensors[spec.lhs], dtypes[spec.lhs], scale_log2))
                continue
        elif spec.previous_layer and previous is None:
            if layer > 0:
                slots.append(CheckResult(spec.name, False, skipped=f"layer {layer - 1} is not in the capture", **where))
            continue
        else:
            terms = [(previous if spec.previous_layer else tensors)[t] for t in spec.terms]  # type: ignore[index]
        extra: dict[str, Any] = {"residuals": residuals}
        if spec.needs_model:
            norm = norms.get(spec.module) if isinstance(norms, Mapping) else (norms or "no model was given")
            if not isinstance(norm, tuple):
                slots.append(CheckResult(spec.name, False, skipped=str(norm), **where))
                continue
            extra["norm"] = norm
            extra["input_drift_lsb"] = drift_lsb.get(spec.terms[0], 0.0)
        device = tensors[spec.lhs].device
        if device.type == "mps":  # no float64 there
            device = torch.device("cpu")
        stats.append(
            _KINDS[spec.kind][1](
                spec,
                tensors[spec.lhs].to(device),
                [t.to(device) for t in terms],
                lhs_dtype=dtypes[spec.lhs],
                term_dtypes=[dtypes.get(t, dtypes[spec.lhs]) for t in spec.terms],
                scale_log2=scale_log2,
                **extra,
            )
        )
        slots.append((spec, where, tuple(tensors[spec.lhs].shape)))
    return PendingIdentities(slots, torch.cat(stats) if stats else None)


def _recorded_drift(
    spec: CheckSpec,
    record: Mapping[str, Any] | None,
    where: Mapping[str, Any],
    codes: torch.Tensor,
    dtype: torch.dtype,
    scale_log2: int,
) -> CheckResult:
    """A drift check from what the manifest recorded (the model's own codes are not on disk).

    The recorded deviation also widens the norm checks, so it is held to the largest bound the contract
    could have allowed any element of this file: ``drift_lsb + drift_ulps * ulp`` at the largest magnitude
    the model's value can have had (the file's largest code plus the recorded deviation)."""
    if not record or record.get("max_ratio") is None:
        return CheckResult(
            spec.name, False, "the capture derived its residuals in the int domain but recorded no drift here", **where
        )
    ratio, lsb = float(record["max_ratio"]), float(record["max_dev_lsb"])
    scale = float(2**scale_log2)
    largest = float(codes.abs().max()) if codes.numel() else 0.0
    magnitude = torch.tensor([(largest + lsb + 0.5) / scale], dtype=torch.float64)
    cap = (
        float(spec.params["drift_lsb"]) + float(spec.params["drift_ulps"]) * float(fp.ulp(magnitude, dtype)[0]) * scale
    )
    problems = []
    if not (0.0 <= ratio <= 1.0 and lsb >= 0.0):
        problems.append(f"recorded drift {lsb:g} LSB is {ratio:.3g}x the contract's bound")
    if not lsb <= cap:
        problems.append(f"recorded drift {lsb:g} LSB exceeds the largest bound the contract allows here ({cap:g} LSB)")
    return CheckResult(
        spec.name,
        not problems,
        "; ".join(problems),
        max_dev_lsb=lsb,
        max_ratio=ratio,
        tolerance_lsb=record.get("tolerance_lsb"),
        index=tuple(record.get("index") or ()),
        **where,
    )


# --------------------------------------------------------------------------------------------------
# File checks: each file read once, for its size, digest and int range.


@register_check("integrity", "file")
def _integrity(
    spec: CheckSpec, row: Mapping[str, Any], data: bytes | memoryview | None, problem: str | None
) -> CheckResult:
    where = _where(row)
    if data is None:
        return CheckResult(spec.name, False, problem or "file is unreadable", **where)
    if len(data) != row["byte_size"]:
        return CheckResult(spec.name, False, f"{len(data)} bytes, manifest says {row['byte_size']}", **where)
    digest = hashlib.sha256(data).hexdigest()
    if digest != row["sha256"]:
        return CheckResult(spec.name, False, f"sha256 {digest[:12]}..., manifest says {row['sha256'][:12]}...", **where)
    return CheckResult(spec.name, True, **where)


@register_check("range", "file")
def _range(
    spec: CheckSpec, row: Mapping[str, Any], data: bytes | memoryview | None, problem: str | None
) -> CheckResult:
    where = _where(row)
    if data is None or len(data) % 4:
        return CheckResult(spec.name, False, skipped=f"no int32 data to read ({problem or 'truncated file'})", **where)
    codes = np.frombuffer(data, dtype="<i4")
    if not codes.size:
        return CheckResult(spec.name, False, "file holds no values", **where)
    lo, hi = int(codes.min()), int(codes.max())
    ok = (lo, hi) == (row["int_min"], row["int_max"]) and lo > -(2**31)
    message = "" if ok else f"data spans [{lo}, {hi}], manifest says [{row['int_min']}, {row['int_max']}]"
    if lo == -(2**31):
        message += "; -2**31 is outside the symmetric int32 range zkLLM uses"
    return CheckResult(spec.name, ok, message, **where)


def _where(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"layer": int(row["layer"]), "point": str(row["point"]), "file": str(row["file"])}


def inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` if ``name`` is a plain relative path that stays inside ``folder``, else None.

    No ``..``, no absolute path, and no symlink among its components that leads out of ``folder`` (only a
    component that is a symlink is resolved, so the common case costs one ``lstat`` per component).
    """
    parts = Path(name).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or Path(name).is_absolute():
        return None
    path = folder
    try:
        for part in parts:
            path = path / part
            if path.is_symlink() and not path.resolve().is_relative_to(folder.resolve()):
                return None
    except OSError:
        return None
    return path


def _read(path: Path, local: threading.local) -> memoryview:
    """The whole file, read into this thread's buffer (grown as needed); the view is valid until the next read."""
    with open(path, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < size + 1:
            buf = local.buf = bytearray(size + 1)
        view = memoryview(buf)
        n = 0
        while True:  # up to the end, even if the file grew since fstat (one spare byte tells)
            got = fh.readinto(view[n:])
            if not got:
                break
            n += got
            if n == len(buf):
                local.buf = bytearray(2 * len(buf))
                local.buf[:n] = buf
                buf, view = local.buf, memoryview(local.buf)
        return view[:n]


def run_file_checks(
    contract: Contract, folder: Path, rows: Sequence[Mapping[str, Any]], *, progress: bool = False
) -> list[CheckResult]:
    """The contract's file checks, each file read once (on threads). ``progress`` shows a bar on a terminal."""
    specs = contract.scope("file")
    if not specs:
        return []

    local = threading.local()  # one read buffer per thread, reused: no fresh memory (and page faults) per file

    def check(row: Mapping[str, Any]) -> list[CheckResult]:
        path = inside(folder, str(row["file"]))
        if path is None:  # never opened: the containment check names the row
            return []
        data, problem = None, None
        if not path.is_file():
            problem = "file is missing"
        else:
            data = _read(path, local)
        return [_KINDS[s.kind][1](s, row, data, problem) for s in specs]

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        done = tqdm(
            pool.map(check, rows), total=len(rows), desc="files", unit="file", disable=None if progress else True
        )
        return [r for results in done for r in results]


# --------------------------------------------------------------------------------------------------
# Capture checks: a manifest, its metadata, and the model when one is given.


@dataclass
class CaptureSubject:
    """What the capture-scope checks look at: a unit's manifest (in memory or read back) and its folder."""

    rows: list[dict[str, Any]]
    table: Any  # pyarrow.Table
    metadata: Mapping[str, Any]
    folder: Path | None = None  # where the files lie, to find files the manifest does not list
    model: Any = None
    fingerprint: Callable[[], str] | None = None  # the model's weights fingerprint, computed at most once
    fired: Sequence[CheckResult] = ()  # completeness failures the gate's hooks saw (points firing twice)


def run_capture_checks(
    contract: Contract,
    subject: CaptureSubject,
    *,
    kinds: frozenset[str] | None = None,
    skip: frozenset[str] = frozenset(),
) -> list[CheckResult]:
    """The contract's capture checks on one manifest (only ``kinds`` if given, never ``skip``)."""
    results: list[CheckResult] = []
    for spec in contract.scope("capture"):
        if (kinds is not None and spec.kind not in kinds) or spec.kind in skip:
            continue
        if spec.needs_model and subject.model is None:
            results.append(CheckResult(spec.name, False, skipped="no model was given (pass model=, or --model)"))
            continue
        results += _KINDS[spec.kind][1](spec, subject, contract)
    return results


@register_check("containment", "capture")
def _containment(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    if s.folder is None:  # an index in memory: its unit folders are checked by the dataset checks
        return []
    bad = [
        CheckResult(
            spec.name,
            False,
            "names a file outside the capture folder (.., an absolute path or a symlink leaving it); it was not opened",
            **_where(row),
        )
        for row in s.rows
        if inside(s.folder, str(row["file"])) is None
    ]
    return bad or [CheckResult(spec.name, True)]


@register_check("format_version", "capture")
def _format_version(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    found = s.metadata.get("format_version")
    ok = found == contract.format_version
    return [
        CheckResult(
            spec.name,
            ok,
            ""
            if ok
            else f"format_version {found!r}; contract {contract.version} reads "
            f"{contract.format_version}: use a zkllm-hf that matches",
        )
    ]


@register_check("manifest_schema", "capture")
def _manifest_schema(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    return contract.validate_manifest(s.table.to_pandas(), spec.name)


@register_check("manifest_digest", "capture")
def _manifest_digest(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    ok = rows_digest(s.rows, s.metadata) == s.metadata.get("manifest_digest")
    return [CheckResult(spec.name, ok, "" if ok else "rows or metadata were edited after the capture wrote them")]


def _capture_dims(meta: Mapping[str, Any]) -> tuple[int, int, int, list[int]]:
    capture, tokens = meta["capture"], meta["tokens"]
    return (
        int(capture["scale_log2"]),
        int(tokens["seq_len"]),
        int(capture["hidden_size"]),
        [int(x) for x in capture["layers"]],
    )


@register_check("shape", "capture")
def _shape(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    scale, seq_len, hidden, _ = _capture_dims(s.metadata)
    results = []
    config_hidden = getattr(getattr(s.model, "config", None), "hidden_size", None)
    if config_hidden is not None and config_hidden != hidden:
        results.append(CheckResult(spec.name, False, f"hidden size {hidden}, the model's config says {config_hidden}"))
    for row in s.rows:
        problems = []
        if row["scale_log2"] != scale:
            problems.append(f"scale_log2 {row['scale_log2']}, metadata says {scale}")
        if (row["rows"], row["cols"]) != (seq_len, hidden):
            problems.append(f"shape ({row['rows']}, {row['cols']}), metadata says ({seq_len}, {hidden})")
        results.append(CheckResult(spec.name, not problems, "; ".join(problems), **_where(row)))
    return results


@register_check("completeness", "capture")
def _completeness(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    _, _, _, layers = _capture_dims(s.metadata)
    results = [replace(f, check=spec.name) for f in s.fired]
    listed = {(r["layer"], r["point"]) for r in s.rows}
    for layer in layers:
        for p in POINTS:
            for name in [p.name] + [alias_point_name(p.name, i) for i in range(len(p.aliases))]:
                if (layer, name) not in listed:
                    results.append(
                        CheckResult(
                            spec.name,
                            False,
                            "missing from the manifest",
                            layer=layer,
                            point=name,
                            file=expected_file(name, layer),
                        )
                    )
    if s.folder is not None:
        for name in sorted({f.name for f in s.folder.glob("*.bin")} - {r["file"] for r in s.rows}):
            results.append(CheckResult(spec.name, False, "file is not in the manifest", file=name))
    if not results:
        results.append(CheckResult(spec.name, True))
    return results


@register_check("config", "capture")
def _config(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    from .provenance import config_sha256

    ok = config_sha256(getattr(s.model, "config", None)) == s.metadata.get("model", {}).get("config_sha256")
    return [CheckResult(spec.name, ok, "" if ok else "model config differs from the captured model's")]


@register_check("weights_fingerprint", "capture")
def _weights_fingerprint(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    from .provenance import FINGERPRINT_ALGORITHM, weights_fingerprint

    now = s.fingerprint() if s.fingerprint is not None else weights_fingerprint(s.model)
    recorded = s.metadata.get("model", {}).get("weights_fingerprint")
    algorithm = s.metadata.get("model", {}).get("weights_fingerprint_algorithm")
    ok = now == recorded
    if ok:
        message = ""
    elif algorithm != FINGERPRINT_ALGORITHM:  # an unquantized model's fingerprint is the same in both: it matched
        message = (
            f"the capture's weights fingerprint was made by algorithm {algorithm!r}, this zkllm-hf computes "
            f"{FINGERPRINT_ALGORITHM!r}; validate with the zkllm-hf that made the capture, or capture again"
        )
    else:
        message = (
            f"model weights {now[:12]}..., capture recorded {str(recorded)[:12]}...; pass the model that was captured"
        )
    return [CheckResult(spec.name, ok, message)]


# --------------------------------------------------------------------------------------------------
# Dataset checks: an index and the units it lists.

INDEX_KINDS = frozenset({"format_version", "manifest_schema", "manifest_digest"})  # capture checks on an index


@register_check("dataset_index", "dataset")
def _dataset_index(
    spec: CheckSpec,
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    units: Sequence[Mapping[str, Any]],
) -> list[CheckResult]:
    """Each unit's manifest is the one the index recorded, and the index's rows for it are its rows.

    ``units`` are the index's unit entries, each with ``rows`` (the unit manifest's rows, or None if it
    could not be read) and ``metadata``.
    """
    results = []
    index = lambda ok, msg="", **kw: CheckResult(spec.name, ok, "" if ok else msg, unit=".", **kw)  # noqa: E731
    by_unit: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_unit.setdefault(str(r["file"]).rpartition("/")[0], []).append(r)
    keys = ("layer", "point", "rows", "cols", "byte_size", "sha256", "source_dtype", "int_min", "int_max")
    for e in units:
        folder = e["folder"]
        manifest = path / folder / MANIFEST_NAME
        digest = sha256_file(manifest) if manifest.is_file() else None
        results.append(
            index(
                digest == e.get("manifest_sha256"),
                "the unit's manifest is missing or differs from the one the index recorded",
                file=f"{folder}/{MANIFEST_NAME}",
            )
        )
        unit_rows, unit_meta = e.get("rows"), e.get("metadata") or {}
        mine = by_unit.pop(folder, [])
        if unit_rows is None:
            continue
        said = unit_meta.get("unit", {})
        if (said.get("sample"), said.get("step")) != (e["sample"], e["step"]):
            results.append(
                index(
                    False,
                    f"{folder} says it is sample {said.get('sample')}, step {said.get('step')}; "
                    f"the index says {e['sample']}, {e['step']}",
                )
            )
        a = {(str(r["file"]).rpartition("/")[2], *(r[k] for k in keys)) for r in mine}
        b = {(str(r["file"]), *(r[k] for k in keys)) for r in unit_rows}
        results.append(index(a == b, f"{len(a ^ b)} file row(s) of {folder} differ between the index and the unit"))
    for folder, stray in sorted(by_unit.items()):
        results.append(
            index(False, f"{len(stray)} row(s) name files in {folder or 'the top folder'}, which is not a listed unit")
        )
    listed = {e["folder"] for e in units}
    on_disk = {p.relative_to(path).as_posix() for p in path.glob("sample-*") if p.is_dir()}
    on_disk |= {p.relative_to(path).as_posix() for p in path.glob("sample-*/step-*") if p.is_dir()}
    for folder in sorted(on_disk - listed - {f.split("/")[0] for f in listed}):
        results.append(index(False, f"folder {folder} is not a unit the index lists"))
    for name in sorted(p.name for p in path.glob("*.bin")):
        results.append(index(False, "file is not in any unit", file=name))
    return results


_ENTRY_FIELDS = ("folder", "sample", "step", "phase", "seq_len", "prompt_id", "manifest_sha256")


def _prompt_set(meta: Mapping[str, Any], units: Sequence[Mapping[str, Any]]) -> bool:
    """Is this a prompt set's index (capture_dataset's)? It records its prompts, or its entries name prompts.
    (The per-prompt captures capture_dataset runs are datasets of their own, over one prompt: not these.)"""
    said = isinstance(meta.get("dataset"), Mapping) and "prompts" in meta["dataset"]
    return said or any("prompt_id" in e for e in units)


def _prompt_id(unit_meta: Mapping[str, Any]) -> Any:
    dataset = (unit_meta.get("extra") or {}).get("dataset")
    return dataset.get("prompt_id") if isinstance(dataset, Mapping) else None


@register_check("unit_entries", "dataset")
def _unit_entries(
    spec: CheckSpec,
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    units: Sequence[Mapping[str, Any]],
) -> list[CheckResult]:
    """Every field of each unit entry equals what the unit's own manifest says: its folder (``sample-N``, or
    ``sample-N/step-K`` for generation steps), sample, step, phase, seq_len, prompt id (a prompt set's) and
    the manifest's SHA-256; an entry holds no other field. A unit that could not be read is skipped here (its
    own checks fail it)."""
    results = []
    prompts = _prompt_set(meta, units)
    for e in units:
        folder, unit_meta = str(e.get("folder")), e.get("metadata")
        if e.get("rows") is None or not isinstance(unit_meta, Mapping):
            continue
        try:
            said = unit_meta.get("unit") or {}
            sample, step = said.get("sample"), said.get("step")
            stepped = (unit_meta.get("capture") or {}).get("mode") == "steps"
            manifest = path / folder / MANIFEST_NAME
            truth = {
                "folder": f"sample-{sample}/step-{step}" if stepped else f"sample-{sample}",
                "sample": sample,
                "step": step,
                "phase": said.get("phase"),
                "seq_len": (unit_meta.get("tokens") or {}).get("seq_len"),
                "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None,
            }
            if prompts or "prompt_id" in e:
                truth["prompt_id"] = _prompt_id(unit_meta)
            stated = {k: v for k, v in e.items() if k not in ("rows", "metadata")}
            wrong = [
                f"{k} {stated.get(k)!r}, the unit's manifest says {truth[k]!r}"
                for k in truth
                if stated.get(k) != truth[k] or type(stated.get(k)) is not type(truth[k])
            ]
            wrong += [f"{k} {stated[k]!r}, which no unit manifest records" for k in stated if k not in truth]
        except (TypeError, AttributeError, OSError) as exc:
            wrong = [f"cannot be compared with its unit ({exc})"]
        results.append(
            CheckResult(spec.name, not wrong, "; ".join(f"entry {folder}: {w}" for w in wrong), unit=".")
        )
    return results


@register_check("prompt_units", "dataset")
def _prompt_units(
    spec: CheckSpec,
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    units: Sequence[Mapping[str, Any]],
) -> list[CheckResult]:
    """No unit is missing. Each sample's units are one capture (step 0), or generation steps ``0 .. S-1``
    without a gap. A prompt set's dataset (capture_dataset's) holds the units of as many distinct prompts as
    its index records (its count), each with every step its manifests record (``generation.steps``)."""
    fail = lambda msg: CheckResult(spec.name, False, msg, unit=".")  # noqa: E731
    prompts = _prompt_set(meta, units)
    results = []
    by_sample: dict[Any, list[Mapping[str, Any]]] = {}
    for e in units:
        by_sample.setdefault(e.get("sample"), []).append(e)
    if prompts:
        count = ((meta.get("dataset") or {}).get("prompts") or {}).get("count")
        ids = {repr(_prompt_id(e["metadata"])) for e in units if isinstance(e.get("metadata"), Mapping)}
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            results.append(fail(f"the index records prompt count {count!r}, not a number of prompts"))
        elif len(by_sample) != count or len(ids) != count:
            results.append(
                fail(
                    f"the index records {count} prompt(s); its units hold {len(by_sample)} sample(s) with "
                    f"{len(ids)} distinct prompt id(s): a prompt's units are missing, or the count is wrong"
                )
            )
    for sample, entries in sorted(by_sample.items(), key=lambda kv: str(kv[0])):
        metas = [e["metadata"] for e in entries if isinstance(e.get("metadata"), Mapping)]
        steps = sorted(e.get("step") for e in entries if isinstance(e.get("step"), int))
        stepped = any((m.get("capture") or {}).get("mode") == "steps" for m in metas)
        recorded = {(m.get("generation") or {}).get("steps") for m in metas} - {None}
        if not stepped:
            want: int | None = 1
        elif prompts:  # one prompt per generate(): its units are every step the generation ran
            want = next(iter(recorded)) if len(recorded) == 1 else None
        else:  # a batch's samples end at their own EOS: their steps run from 0 without a gap
            want = steps[-1] + 1 if steps else None
        if want is None or steps != list(range(want)) or len(steps) != len(entries):
            results.append(
                fail(
                    f"sample {sample} has unit step(s) {steps}; "
                    + (f"it should have 0 to {want - 1}" if want else f"its units record {sorted(recorded)} steps")
                    + ": a unit is missing or repeated"
                )
            )
        if prompts and len({repr(_prompt_id(m)) for m in metas}) > 1:
            results.append(fail(f"sample {sample}'s units name different prompts"))
    return results or [CheckResult(spec.name, True, unit=".")]


def run_dataset_checks(
    contract: Contract,
    path: Path,
    rows: Sequence[Mapping[str, Any]],
    meta: Mapping[str, Any],
    units: Sequence[Mapping[str, Any]],
) -> list[CheckResult]:
    """The contract's dataset checks on an index (``rows``, ``meta``) and its ``units``."""
    return [r for spec in contract.scope("dataset") for r in _KINDS[spec.kind][1](spec, path, rows, meta, units)]


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
