"""The capture checks: a unit's manifest, its metadata and, when one is given, the model (containment,
format, schema, digest, shape, completeness, config, weights fingerprint)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..manifest import SIDECAR_NAME, rows_digest, sidecar_problem
from ..points import POINTS, alias_point_name
from .file_checks import inside
from .manifest_schema import expected_file
from .registry import entries_of, implementation, register_check
from .spec import CheckResult, CheckSpec, Contract, row_place

INDEX_KINDS = frozenset({"format_version", "manifest_schema", "manifest_digest", "sidecar"})  # on an index


@dataclass
class CaptureSubject:
    """What the capture-scope checks look at: a unit's manifest (in memory or read back) and its folder."""

    rows: list[dict[str, Any]]
    table: Any  # pyarrow.Table
    metadata: Mapping[str, Any]
    folder: Path | None = None  # where the files lie, to find files the manifest does not list
    model: Any = None
    fingerprint: Callable[[str], str] | None = None  # the model's weights fingerprint under a digest, once each
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
    for spec in entries_of(contract, "capture"):
        if (kinds is not None and spec.kind not in kinds) or spec.kind in skip:
            continue
        if spec.needs_model and subject.model is None:
            results.append(CheckResult(spec.name, False, skipped="no model was given (pass model=, or --model)"))
            continue
        results += implementation(spec)(spec, subject, contract)
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
            **row_place(row),
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


@register_check("sidecar", "capture")
def _sidecar(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    if s.folder is None:  # an index in memory (the gate's): its sidecar is written with it, validate checks it
        return []
    recorded = s.metadata.get("sidecar")
    if recorded is None and not _at_least(s.metadata, spec.params.get("since", "1.5.0")):
        version = (s.metadata.get("contract") or {}).get("version")
        return [CheckResult(spec.name, False, skipped=f"captured under contract {version}, before {SIDECAR_NAME}")]
    problem = sidecar_problem(s.folder, s.metadata)
    return [CheckResult(spec.name, problem is None, problem or "", file=SIDECAR_NAME if problem else None)]


def _at_least(meta: Mapping[str, Any], version: str) -> bool:
    """Whether the contract a manifest names is ``version`` or later (an unreadable version counts as later)."""
    found = str((meta.get("contract") or {}).get("version", ""))
    try:
        return tuple(int(x) for x in found.split(".")) >= tuple(int(x) for x in version.split("."))
    except ValueError:
        return True


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
        results.append(CheckResult(spec.name, not problems, "; ".join(problems), **row_place(row)))
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
    from ..provenance import config_sha256

    ok = config_sha256(getattr(s.model, "config", None)) == s.metadata.get("model", {}).get("config_sha256")
    return [CheckResult(spec.name, ok, "" if ok else "model config differs from the captured model's")]


@register_check("weights_fingerprint", "capture")
def _weights_fingerprint(spec: CheckSpec, s: CaptureSubject, contract: Contract) -> list[CheckResult]:
    from ..provenance import FINGERPRINT_ALGORITHM, fingerprint_digest, weights_fingerprint

    recorded = s.metadata.get("model", {}).get("weights_fingerprint")
    algorithm = s.metadata.get("model", {}).get("weights_fingerprint_algorithm")
    digest = fingerprint_digest(algorithm) or "blake3"  # computed as the capture did (v2 sha256, v3 blake3)
    now = s.fingerprint(digest) if s.fingerprint is not None else weights_fingerprint(s.model, digest=digest)
    ok = now == recorded
    if ok:
        message = ""
    elif fingerprint_digest(algorithm) is None:  # an unquantized model's fingerprint is the same in both: it matched
        message = (
            f"the capture's weights fingerprint was made by algorithm {algorithm!r}, this zkllm-hf computes "
            f"{FINGERPRINT_ALGORITHM!r}; validate with the zkllm-hf that made the capture, or capture again"
        )
    else:
        message = _loaded_otherwise(s) or (
            f"model weights {now[:12]}..., capture recorded {str(recorded)[:12]}...; pass the model that was captured"
        )
    return [CheckResult(spec.name, ok, message)]


def _loaded_otherwise(s: CaptureSubject) -> str | None:
    """The recorded model field the given model differs in (dtype, quantization), and the flag that fixes it."""
    from ..provenance import quantization_info

    recorded = s.metadata.get("model", {})
    quant, now_quant = recorded.get("quantization") or {}, quantization_info(s.model) or {}
    for key, flag in (("load_in_4bit", "--load-in-4bit"), ("load_in_8bit", "--load-in-8bit")):
        if bool(quant.get(key)) != bool(now_quant.get(key)):
            fix = f"load it with {flag}" if quant.get(key) else f"load it without {flag}"
            return f"model.quantization: the capture recorded {key}={bool(quant.get(key))}, this model differs; {fix}"
    dtype, now_dtype = recorded.get("dtype"), str(getattr(s.model, "dtype", None)).removeprefix("torch.")
    if dtype is not None and dtype != now_dtype:
        return f"model.dtype: the capture recorded {dtype}, this model is {now_dtype}; load it with --dtype {dtype}"
    return None
