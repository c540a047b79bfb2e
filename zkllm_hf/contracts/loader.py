"""Load a contract folder (``contracts/vN``, or a folder holding ``capture.yaml``) into a :class:`Contract`.

The packaged contracts live inside the wheel (``zkllm_hf/contracts_data``, mapped at build time from the
top-level ``contracts/`` folder), or in the source tree's ``contracts/`` in a checkout or editable install.
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..manifest import FORMAT_VERSION
from ..points import POINTS
from .manifest_schema import register_manifest_checks
from .registry import scope_of
from .spec import CheckSpec, Contract

DEFAULT_CONTRACT = "v1"


def contracts_root() -> Path:
    """The folder holding ``v1/``, ``v2/``, ... ."""
    packaged = Path(str(resources.files("zkllm_hf"))) / "contracts_data"
    if packaged.is_dir():
        return packaged
    source = Path(__file__).resolve().parents[2] / "contracts"
    if source.is_dir():
        return source
    raise FileNotFoundError(f"zkllm_hf data contracts not found at {packaged} or {source}; reinstall zkllm-hf")


@functools.cache
def load_contract(folder: str = DEFAULT_CONTRACT) -> Contract:
    """Load and check a contract: a packaged one by name (``"v1"``), or a folder holding ``capture.yaml``.

    Every entry's kind must be registered, with the scope it declares, and the contract's format version
    must be the one this zkllm-hf writes.
    """
    import pandera.pandas as pa

    register_manifest_checks()
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
    checks = [_entry(dict(entry), where) for entry in spec["checks"]]
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ValueError(f"{where} names a check twice: {names}")
    schema = pa.DataFrameSchema.from_yaml(base / spec["manifest_schema"])
    folder_id = folder if base.parent == contracts_root() and base.name == folder else str(base.resolve())
    return Contract(
        str(spec["contract"]), str(spec["version"]), folder_id, int(spec["format_version"]), tuple(checks), schema
    )


def _entry(entry: dict[str, Any], where: str) -> CheckSpec:
    """One ``checks:`` entry of ``capture.yaml``, its kind registered at the scope it declares."""
    name, kind, scope = entry.pop("name"), entry.pop("kind", None), entry.pop("scope", None)
    registered = scope_of(kind) if isinstance(kind, str) else None
    if registered is None:
        raise ValueError(f"{where} check {name!r} has kind {kind!r}, which no registered check implements")
    if scope != registered:
        raise ValueError(f"{where} check {name!r}: kind {kind!r} runs at scope {registered!r}, not {scope!r}")
    needs_model = bool(entry.pop("needs_model", False))
    entry.pop("doc", None)  # documentation for the reader of the yaml; no check reads it
    return CheckSpec(name, kind, scope, entry, needs_model)
