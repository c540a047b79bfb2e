"""What a capture's manifests say: each unit's rows (one per file and alias) and metadata, and the metadata
every unit of a capture shares. Stateless: built from what the recorder holds at commit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from . import fixed_point as fp
from . import provenance
from .hooks import DecoderLayout
from .options import CaptureOptions
from .points import POINTS, alias_point_name

if TYPE_CHECKING:
    from .unit import UnitRecorder

__all__ = ["common_metadata", "ran_with", "unit_metadata", "unit_rows", "unit_texts"]


def unit_rows(
    unit: UnitRecorder, written: Mapping[str, Any], options: CaptureOptions, layout: DecoderLayout
) -> list[dict[str, Any]]:
    """A unit's manifest rows, ``file`` relative to its folder; ``written`` maps each staged file to its
    size and digest."""
    drift = set(options.contract.names_of("drift"))
    by_lhs = {(c.layer, c.point): c for c in unit.checks.values() if c.point is not None and c.check not in drift}
    rows = []
    for (layer, _), rec in sorted(unit.records.items(), key=lambda kv: (kv[0][0], kv[1].point.file)):
        w = written[f"{unit.folder}/{rec.point.file_name(layer)}"]
        check = by_lhs.get((layer, rec.point.name))
        base = {
            "sample": unit.sample,
            "step": unit.step,
            "phase": unit.phase,
            "layer": layer,
            "point": rec.point.name,
            "file": rec.point.file_name(layer),
            "alias_of": None,
            "rows": rec.rows,
            "cols": rec.cols,
            "dtype": "int32",
            "scale_log2": options.scale_log2,
            "byte_size": w.byte_size,
            "sha256": w.sha256 if w.algorithm == "sha256" else None,  # the column named by the digest
            "blake3": w.sha256 if w.algorithm == "blake3" else None,
            "source_dtype": str(rec.dtype).removeprefix("torch."),
            "int_min": rec.int_min,
            "int_max": rec.int_max,
            "headroom": max(-rec.int_min, rec.int_max) / fp.INT32_MAX,
            "hf_module": layout.module_path(layer, rec.point),
            "hook": "forward_pre" if rec.point.hook == "pre" else "forward",
            "check": check.check if check else None,
            "max_dev_lsb": check.max_dev_lsb if check else None,
            "max_dev_ratio": check.max_ratio if check else None,
        }
        rows.append(base)
        for i, alias in enumerate(rec.point.alias_names(layer)):
            rows.append(dict(base, point=alias_point_name(rec.point.name, i), file=alias, alias_of=base["file"]))
    return rows


def unit_texts(unit: UnitRecorder, tokenizer: Any, store_text: bool) -> dict[str, Any]:
    """The unit's prompt and generated tokens as text, decoded by the capture's tokenizer; null without one or
    with ``store_text=False`` (the token ids are recorded either way: they are what a proof is about)."""
    ids = unit.token_ids
    if not store_text or tokenizer is None or ids is None:
        why = "store_text=False" if not store_text else "no tokenizer was given" if tokenizer is None else "no ids"
        return {"prompt_text": None, "generated_text": None, "text_from": None, "text_omitted": why}
    prompt = unit.seq_len if unit.prompt_token_count is None else unit.prompt_token_count
    generated = ids[prompt : prompt + unit.generated_token_count]
    return {
        "prompt_text": provenance.decode_text(tokenizer, ids[:prompt]) if prompt else None,  # none in a decode step
        "generated_text": provenance.decode_text(tokenizer, generated) if generated else None,
        "text_from": "input_ids decoded by the recorded tokenizer, special tokens kept",
        "text_omitted": None,
    }


def unit_metadata(
    unit: UnitRecorder, common: Mapping[str, Any], residuals: str, *, tokenizer: Any = None, store_text: bool = True
) -> dict[str, Any]:
    """A unit's manifest metadata: ``common`` and the unit's own tokens (and their text), autocast, gate maxima,
    drift, skips."""
    return {
        **common,
        "kind": "unit",
        "unit": {"sample": unit.sample, "step": unit.step, "phase": unit.phase, **unit.info},
        "tokens": {
            "input_ids": unit.token_ids,
            "position_ids": unit.position_ids,
            "prompt_token_count": unit.seq_len if unit.prompt_token_count is None else unit.prompt_token_count,
            "generated_token_count": unit.generated_token_count,
            "seq_len": unit.seq_len,
            "pad_token_id": unit.pad_token_id,
            **unit_texts(unit, tokenizer, store_text),
        },
        "runtime": {**common.get("runtime", {}), "autocast": unit.autocast},
        # zkLLM's SwiGLU lookup covers |gate| < 512: the largest |gate_proj output| per layer, over real tokens
        "ffn": {
            "gate_abs_max": [{"layer": layer, "value": float(v)} for layer, v in sorted(unit.gate_abs_max.items())]
        },
        "residuals": {
            "mode": residuals,
            "drift": [unit.drift[k] for k in sorted(unit.drift)],
        },
        "replay": unit.replay,  # the forwards its rows came from, to replay them (see replay_record)
        "checks": {
            "skipped": [
                {"check": c.check, "layer": c.layer, "point": c.point, "reason": c.skipped}
                for c in unit.checks.values()
                if c.skipped is not None
            ]
        },
    }


def ran_with(seen: Sequence[Mapping[str, Any]], model: nn.Module) -> dict[str, Any]:
    """The runtime the captured forwards ran with (``seen``: each distinct one); a setting that changed between
    them lists each value."""
    seen = list(seen) or [provenance.runtime(model)]
    merged: dict[str, Any] = {}
    for key in seen[0]:
        values = [r[key] for r in seen]
        distinct = [v for i, v in enumerate(values) if v not in values[:i]]
        merged[key] = distinct[0] if len(distinct) == 1 else distinct
    return merged


def common_metadata(
    model: nn.Module,
    options: CaptureOptions,
    ran: Mapping[str, Any],
    fingerprint: str,
    how: str = "full",
    *,
    hidden: int,
) -> dict[str, Any]:
    """The metadata every unit of a capture shares: contract, digest, versions, runtime, model, capture
    settings. ``how`` says whether the fingerprint was computed now ("full") or reused ("cached")."""
    return {
        "contract": options.contract.identity,
        "digest_algorithm": options.digest,  # the files' column, the manifest digest, the fingerprint
        "versions": provenance.versions(),
        "runtime": dict(ran),
        "model": {
            **provenance.model_info(model, fingerprint=False, digest=options.digest),
            "weights_fingerprint": fingerprint,
            "weights_fingerprint_mode": how,
            "attn_implementation": ran["attn_implementation"],  # the one that ran, not the one now
        },
        "tokenizer": provenance.tokenizer_info(options.tokenizer),
        "capture": {
            "mode": options.mode,
            "layers": list(options.layers),
            "scale_log2": options.scale_log2,
            "residuals": options.residuals,
            "hidden_size": hidden,
            "points": [p.name for p in POINTS],
            "device": str(next((p.device for p in model.parameters()), "cpu")),
            "created_utc": provenance.utc_now(),
        },
        "extra": dict(options.extra_metadata),
    }
