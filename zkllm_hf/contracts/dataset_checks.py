"""The dataset checks: a dataset's index and the units it lists (each unit's manifest is the one recorded,
every unit entry matches its unit, and no unit is missing)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..writer import MANIFEST_NAME, sha256_file
from .registry import register_check, run_entries
from .spec import CheckResult, CheckSpec, Contract


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
        a = {(str(r["file"]).rpartition("/")[2], *(r[k] for k in keys), r.get("blake3")) for r in mine}
        b = {(str(r["file"]), *(r[k] for k in keys), r.get("blake3")) for r in unit_rows}
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
        results.append(CheckResult(spec.name, not wrong, "; ".join(f"entry {folder}: {w}" for w in wrong), unit="."))
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
    return [r for results in run_entries(contract, "dataset", path, rows, meta, units) for r in results]
