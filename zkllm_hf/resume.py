"""The resume decision of ``capture_dataset``: whether a unit folder already on disk is kept or captured again.

A unit is kept only if it shares with this run everything its bytes depend on (:func:`run_settings` and
:func:`unit_settings` name the same fields: the prompt, the contract, the mode, layers, scale, residuals,
the intra-op thread count, the model) and it passes every check of its contract that runs without the
model, as ``validate`` runs them (capture, file and layer checks). Nothing is journalled: a unit folder
exists only once complete, so its manifests are the whole record.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .manifest import read_manifest
from .prompts import Prompt
from .validate import trusted_contract, validate_folder
from .writer import MANIFEST_NAME, STEP_DIR

MODEL_KEYS = ("config_sha256", "weights_fingerprint", "dtype", "quantization")  # what identifies the model


def unit_manifests(folder: Path) -> list[Path]:
    """The manifests of one prompt's units: ``sample-N/manifest.arrow`` or ``sample-N/step-K/manifest.arrow``."""
    if (folder / MANIFEST_NAME).is_file():
        return [folder / MANIFEST_NAME]
    steps = sorted((int(m[1]), p) for p in folder.glob("step-*") if (m := STEP_DIR.match(p.name)))
    return [p / MANIFEST_NAME for _, p in steps]


def run_settings(
    *,
    contract: Any,
    mode: str,
    layers: list[int],
    scale_log2: int,
    residuals: str,
    threads: int,
    model_info: Mapping[str, Any],
    digest: str = "blake3",
) -> dict[str, Any]:
    """What this run's units share whatever the prompt (the fields of :func:`unit_settings` but the prompt)."""
    return {
        "contract": contract,
        "mode": mode,
        "layers": layers,
        "scale_log2": scale_log2,
        "residuals": residuals,
        "threads": threads,
        "digest": digest,  # the files' digests and the weights fingerprint are made by it
        "model": {k: model_info.get(k) for k in MODEL_KEYS},
    }


def wanted(prompt: Prompt, asked: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
    """What this run asks of ``prompt``'s unit: the prompt as asked (``asked``: generate, mode, pad_to), and
    the run's fixed settings."""
    return {"prompt": {"prompt_id": prompt.id, "text_sha256": prompt.text_sha256, **asked}, **fixed}


def unit_settings(meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a unit must share with this run to be kept: the prompt, how it was captured, the model."""
    model, capture = meta.get("model") or {}, meta.get("capture") or {}
    asked = dict((meta.get("extra") or {}).get("dataset") or {})
    asked.pop("line", None)
    return {
        "prompt": asked,
        "contract": meta.get("contract"),
        "mode": capture.get("mode"),
        "layers": capture.get("layers"),
        "scale_log2": capture.get("scale_log2"),
        "residuals": capture.get("residuals", "model"),
        "threads": (meta.get("runtime") or {}).get("torch_threads"),  # float32 bytes depend on it
        "digest": meta.get("digest_algorithm", "sha256"),  # absent before BLAKE3
        "model": {k: model.get(k) for k in MODEL_KEYS},
    }


def difference(got: Mapping[str, Any], want: Mapping[str, Any]) -> str | None:
    """The first setting in which a unit (``got``) differs from this run (``want``), said as a phrase; or None."""
    for key in want:
        if got.get(key) != want[key]:
            if key == "prompt":
                for k in want[key]:
                    if got[key].get(k) != want[key][k]:
                        return f"with {k} {got[key].get(k)!r}, this run has {want[key][k]!r}"
            return f"with {key} {got.get(key)!r}, this run has {want[key]!r}"
    return None


def verify_unit(folder: Path, prompt: Prompt, want: Mapping[str, Any]) -> str | None:
    """None if ``folder`` holds this prompt's finished, intact units captured as this run asks; else why not."""
    manifests = unit_manifests(folder)
    if not manifests:
        return "no manifest.arrow"
    steps = None
    for i, path in enumerate(manifests):
        try:
            meta = read_manifest(path)[1]
            trusted_contract(meta, None)  # a contract outside the package is not this run's
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{path.relative_to(folder.parent)} cannot be read ({exc})"
        unit = meta.get("unit") or {}
        if meta.get("kind") != "unit" or unit.get("sample") != prompt.sample:
            return f"{path.relative_to(folder.parent)} is not the unit of sample {prompt.sample}"
        why = difference(unit_settings(meta), want)
        if why is not None:
            return f"captured {why}"
        if len(manifests) > 1 or path.parent != folder:  # steps: exactly step-0 .. step-(S-1)
            steps = (meta.get("generation") or {}).get("steps") if steps is None else steps
            if unit.get("step") != i or path.parent.name != f"step-{i}":
                return f"step {i} is missing"
        failed = validate_folder(path.parent, None, progress=False).failures  # every check that runs without the model
        if failed:
            return f"{path.parent.relative_to(folder.parent)} fails {failed[0].describe()}"
    if steps is not None and len(manifests) != steps:
        return f"{len(manifests)} step folders, the generation ran {steps} steps"
    return None


def mismatch(folder: Path, want: Mapping[str, Any]) -> str | None:
    """Why the units in ``folder`` were captured otherwise than this run asks (their manifests only)."""
    for path in unit_manifests(folder)[:1]:
        try:
            meta = read_manifest(path)[1]
        except (OSError, ValueError):
            return None  # unreadable: broken, captured again
        return difference(unit_settings(meta), want)
    return None


def asked_settings(
    generate: int | None, mode: str, pad_to: int | None, sampling: Mapping[str, Any] | None, seed: int | None
) -> dict[str, Any]:
    """What a run asks of each prompt's unit besides its text (a kept unit must have been captured so); the
    sampling settings only when given, so a greedy unit of an earlier run is still kept."""
    asked: dict[str, Any] = {"generate": generate, "mode": mode, "pad_to": pad_to}
    if sampling or seed is not None:
        asked.update(sampling=dict(sampling or {}), seed=seed)
    return asked


__all__ = [
    "MODEL_KEYS",
    "asked_settings",
    "difference",
    "mismatch",
    "run_settings",
    "unit_manifests",
    "unit_settings",
    "verify_unit",
    "wanted",
]
