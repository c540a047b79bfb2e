"""The manifest metadata every reader relies on, checked once, where a capture is read.

A manifest's digest detects edits but is no signature: anyone can rewrite the metadata and re-seal it. So the
readers (``validate``, ``inspect``, ``plan``, ``compare``, ``load_capture``) do not trust its shape. When a
manifest is read, :func:`decode_metadata` refuses metadata that is not a JSON object or nests deeper than any
capture does; when a capture is loaded, :func:`check_metadata` checks every field a reader uses: present if
zkllm-hf always writes it, of the type and in the range zkllm-hf writes (and :func:`check_columns` the
rows' columns). Anything else raises one
:class:`MetadataError` naming the field, the value and the fix, so no reader meets a KeyError or a TypeError.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from .digests import DIGESTS
from .errors import MetadataError

INT32_MAX = 2**31 - 1
MAX_DEPTH = 64  # zkllm-hf's own metadata nests 4 levels; extra_metadata gets room, not unbounded recursion
RESIDUAL_MODES = ("model", "exact-int")
UNIT_FOLDER = re.compile(r"^sample-\d+(/step-\d+)?$")
FIX = "the manifest was edited or damaged (a re-sealed digest does not make it valid): capture again"


def shown(value: Any) -> str:
    """A short one-line rendering of any JSON value, for an error message."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits"
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True, default=repr)
    except (ValueError, TypeError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 48 else text[:45] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def decode_metadata(raw: bytes, where: str) -> dict[str, Any]:
    """The ``zkllm_hf`` metadata of a manifest, decoded: a JSON object nested at most :data:`MAX_DEPTH` deep."""
    try:
        meta = json.loads(raw)
    except RecursionError:
        raise MetadataError(
            f"{where}: its metadata nests deeper than Python can read; zkllm-hf never writes that: {FIX}"
        ) from None
    except ValueError as exc:  # not UTF-8, not JSON, or an integer too long to convert
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MetadataError(f"{where}: its metadata is not readable JSON ({first[:120]}): {FIX}") from None
    if not isinstance(meta, dict):
        raise MetadataError(f"{where}: its metadata is {_kind(meta)}, not a JSON object: {FIX}")
    stack = [(meta, 1)]
    while stack:  # iteratively: a recursive walk is what must not happen on hostile input
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MetadataError(
                f"{where}: its metadata nests more than {MAX_DEPTH} levels deep; zkllm-hf never writes that: {FIX}"
            )
        children = node.values() if isinstance(node, dict) else node
        stack += [(c, depth + 1) for c in children if isinstance(c, (dict, list))]
    return meta


# --------------------------------------------------------------------------------------------------
# What a field may hold: a test and the words for it.

Rule = tuple[Callable[[Any], bool], str]


def _int(lo: int, hi: int = INT32_MAX) -> Rule:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi), f"an integer {lo} to {hi}"


def _number(lo: float) -> Rule:
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isnan(v) or v >= lo)

    return ok, f"a number >= {lo:g}"


def _str(nonempty: bool = False) -> Rule:
    words = "a non-empty string" if nonempty else "a string"
    return (lambda v: isinstance(v, str) and (bool(v) or not nonempty)), words


def _one_of(*choices: str) -> Rule:
    return (lambda v: isinstance(v, str) and v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _null_or(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v)), f"{rule[1]} or null"


OBJECT: Rule = (lambda v: isinstance(v, dict)), "an object"
ARRAY: Rule = (lambda v: isinstance(v, list)), "an array"
INT_ARRAY: Rule = (
    (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)),
    "an array of integers",
)
_EXPLAIN = {"format_version": "this zkllm-hf reads manifest format {want}: use the zkllm-hf that wrote it"}


def _contract_folder() -> Rule:
    from .contracts import contracts_root

    try:
        shipped = sorted(p.name for p in contracts_root().iterdir() if p.is_dir())
    except OSError:
        shipped = []
    return (
        lambda v: isinstance(v, str) and (v in shipped or (v.startswith("/") and len(v) > 1)),
        f"a contract zkllm-hf ships ({', '.join(shipped)}) or an absolute folder",
    )


# Each reader's fields: (path, required, rule). Required: zkllm-hf writes it in every capture and a reader
# indexes it. Optional: a reader uses it where present, so its type is checked when it is there.
_COMMON: tuple[tuple[str, bool, Rule], ...] = (
    ("contract", True, OBJECT),
    ("contract.version", True, _str()),
    ("capture", True, OBJECT),
    ("capture.scale_log2", True, _int(0, 30)),
    ("capture.hidden_size", True, _int(1)),
    ("capture.layers", True, ((lambda v: isinstance(v, list) and bool(v)), "a non-empty array of layer indices")),
    ("capture.mode", True, _str(nonempty=True)),
    ("capture.created_utc", True, _str()),
    ("capture.residuals", False, _one_of(*RESIDUAL_MODES)),
    ("digest_algorithm", False, _one_of(*DIGESTS)),  # absent before BLAKE3: sha256
    ("model.weights_fingerprint_mode", False, _one_of("cached", "full")),
    ("model", True, OBJECT),
    ("model.class", True, _str()),
    ("model.dtype", True, _str()),
    ("model.model_type", False, _null_or(_str())),
    ("model.name_or_path", False, _null_or(_str())),
    ("model.quantization", False, _null_or(OBJECT)),
    ("model.hidden_size", False, _null_or(_int(1))),
    ("model.intermediate_size", False, _null_or(_int(1))),
    ("model.num_attention_heads", False, _null_or(_int(1))),
    ("model.num_key_value_heads", False, _null_or(_int(1))),
    ("model.num_hidden_layers", False, _null_or(_int(1))),
    ("model.rms_norm_eps", False, _null_or(_number(0))),
    ("versions", True, OBJECT),
    ("versions.zkllm_hf", True, _str()),
    ("versions.transformers", True, _str()),
    ("versions.torch", True, _str()),
    ("generation", False, _null_or(OBJECT)),
    ("sidecar", False, _null_or(OBJECT)),
    ("sidecar.file", False, _str(nonempty=True)),
    ("sidecar.sha256", False, _str(nonempty=True)),
    ("tokenizer", False, _null_or(OBJECT)),
    ("tokenizer.class", False, _null_or(_str())),
    ("tokenizer.fingerprint", False, _null_or(_str())),
    ("trainer", False, _null_or(OBJECT)),
)
_UNIT = (
    ("tokens", True, OBJECT),
    ("tokens.seq_len", True, _int(1)),
    ("tokens.prompt_token_count", True, _int(0)),
    ("tokens.input_ids", False, _null_or(ARRAY)),
    ("tokens.pad_token_id", False, _null_or(_int(0, 2**63))),
    ("tokens.prompt_text", False, _null_or(_str())),
    ("tokens.generated_text", False, _null_or(_str())),
    ("unit", True, OBJECT),
    ("unit.phase", True, _str(nonempty=True)),
    ("unit.sample", True, _int(0)),
    ("unit.step", True, _int(0)),
    ("ffn", False, _null_or(OBJECT)),
    ("ffn.gate_abs_max", False, _null_or(ARRAY)),
    ("residuals", False, _null_or(OBJECT)),
    ("residuals.mode", False, _one_of(*RESIDUAL_MODES)),
    ("residuals.drift", False, _null_or(ARRAY)),
)
_ITEMS: dict[str, tuple[tuple[str, bool, Rule], ...]] = {  # the fields of each element of an array field
    "capture.layers": (("", True, _int(0)),),
    "tokens.input_ids": (("", True, _int(0, 2**63)),),
    "ffn.gate_abs_max": (("", True, OBJECT), ("layer", True, _int(0)), ("value", True, _number(0))),
    "residuals.drift": (
        ("", True, OBJECT),
        ("layer", True, _int(0)),
        ("point", True, _str()),
        ("max_dev_lsb", True, _number(0)),
        ("max_ratio", False, _null_or(_number(0))),
        ("tolerance_lsb", False, _null_or(_number(0))),
        ("index", False, _null_or(INT_ARRAY)),
    ),
    "units": (
        ("", True, OBJECT),
        ("folder", True, (lambda v: isinstance(v, str) and bool(UNIT_FOLDER.match(v)), "sample-B or sample-B/step-K")),
        ("sample", True, _int(0)),
        ("step", True, _int(0)),
        ("manifest_sha256", True, _str(nonempty=True)),
        ("phase", False, _str()),
        ("seq_len", False, _int(1)),
    ),
}
_MISSING = object()


def _lookup(meta: Mapping[str, Any], path: str) -> Any:
    node: Any = meta
    for key in path.split("."):
        if not isinstance(node, Mapping):  # under an optional parent that is null
            return _MISSING
        node = node.get(key, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _fail(where: str, field: str, value: Any, expected: str, check: str = "manifest") -> MetadataError:
    if value is _MISSING:
        said = f"metadata field '{field}' is missing"
    else:
        said = f"metadata field '{field}' is {shown(value)} ({_kind(value)})"
    return MetadataError(f"{where}: {said}; zkllm-hf writes {expected}: {FIX}", field=field, check=check)


def _check_fields(meta: Mapping[str, Any], fields, where: str, prefix: str = "") -> None:
    for path, required, (ok, expected) in fields:
        value = _lookup(meta, path)
        name = f"{prefix}.{path}" if prefix else path
        if value is _MISSING:
            if required:
                raise _fail(where, name, value, expected)
            continue
        if not ok(value):
            raise _fail(where, name, value, expected)
        items = _ITEMS.get(path)
        if items is not None and value is not None:
            for i, item in enumerate(value):
                _check_item(item, items, where, f"{name}[{i}]")


def _check_item(item: Any, fields, where: str, name: str) -> None:
    (_, _, (ok, expected)), rest = fields[0], fields[1:]
    if not ok(item):
        raise _fail(where, name, item, expected)
    if rest:
        _check_fields(item, rest, where, prefix=name)


def check_metadata(meta: Mapping[str, Any], where: str) -> None:
    """Check a unit's or a dataset index's metadata (by its ``kind``); raise :class:`MetadataError` if a field
    a reader relies on is missing, of another type, or out of the range zkllm-hf writes."""
    from .manifest import FORMAT_VERSION

    found = meta.get("format_version", _MISSING)
    if isinstance(found, bool) or not isinstance(found, int) or found != FORMAT_VERSION:
        expected = _EXPLAIN["format_version"].format(want=FORMAT_VERSION)
        from .contracts import load_contract  # lazily: the contracts read manifests, which read this module

        raise _fail(where, "format_version", found, expected, check=load_contract().name_of("format_version"))
    kind = meta.get("kind", _MISSING)
    if kind not in ("unit", "dataset"):
        raise _fail(where, "kind", kind, "'unit' or 'dataset'")
    _check_fields(meta, _COMMON, where)
    _check_fields(meta, (("contract.folder", True, _contract_folder()),), where)
    if kind == "unit":
        _check_fields(meta, _UNIT, where)
    else:
        units = meta.get("units", _MISSING)
        if not isinstance(units, list) or not units:
            raise _fail(where, "units", units, "a non-empty array of the dataset's units")
        _check_fields(meta, (("units", True, ARRAY),), where)


def _digest_column(table: Any) -> str:
    """The column that holds a manifest's file digests: blake3 where any row has one, else sha256."""
    names = table.column_names
    if "blake3" in names and table.column("blake3").null_count < len(table):
        return "blake3"
    return "sha256"


_POSITIVE_COLUMNS = ("rows", "cols")  # a file of zero rows or columns is never written
_NON_NEGATIVE_COLUMNS = ("sample", "step", "layer", "byte_size")


def check_columns(table: Any, where: str) -> None:
    """Check a manifest table's columns: each of the type zkllm-hf writes, no null where it writes none, and
    shapes, sizes and indices not negative; raise :class:`MetadataError` naming the column and the row."""
    import pyarrow.compute as pc

    from .manifest import SCHEMA

    for spec in SCHEMA:
        if spec.name not in table.column_names:
            continue  # the loader names every missing column at once
        column = table.column(spec.name)
        if column.type != spec.type:
            raise MetadataError(
                f"{where}: manifest column '{spec.name}' holds {column.type}; zkllm-hf writes {spec.type}: {FIX}",
                field=spec.name,
            )
        if not spec.nullable and column.null_count:
            row = column.to_pylist().index(None)
            raise MetadataError(
                f"{where}: manifest column '{spec.name}' is null in row {row}; zkllm-hf always writes it: {FIX}",
                field=spec.name,
            )
        if spec.name == _digest_column(table) and column.null_count:  # every file has its digest
            row = column.to_pylist().index(None)
            raise MetadataError(
                f"{where}: manifest column '{spec.name}' is null in row {row}; zkllm-hf writes every file's digest: "
                f"{FIX}",
                field=spec.name,
            )
        low = 1 if spec.name in _POSITIVE_COLUMNS else 0 if spec.name in _NON_NEGATIVE_COLUMNS else None
        if low is not None and len(column) and pc.min(column).as_py() < low:
            row = next(i for i, v in enumerate(column.to_pylist()) if v < low)
            raise MetadataError(
                f"{where}: manifest column '{spec.name}' is {column[row].as_py()} in row {row}; zkllm-hf writes "
                f"{'a positive' if low else 'a non-negative'} number: {FIX}",
                field=spec.name,
            )


__all__ = ["MAX_DEPTH", "MetadataError", "check_columns", "check_metadata", "decode_metadata", "shown"]
