"""``residuals="exact-int"``: the residual stream derived in int32 from the sublayer outputs (pure functions).

zkLLM's skip steps compute ``z = x + y`` in int32; deriving ``post_attn_residual`` and ``block_output`` that
way (and taking ``block_input`` from the previous layer's derived ``block_output``) makes them reproduce the
files bit for bit. The model's own codes are kept for the drift check, and the largest drift per point is
recorded for the unit's metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import fixed_point as fp
from .contracts import CheckResult
from .errors import CaptureError

__all__ = ["RESIDUAL_POINTS", "derive_exact_int", "merge_drift_check", "note_drift"]

# the points exact-int replaces, whose model values the drift check compares with
RESIDUAL_POINTS = ("block_input", "post_attn_residual", "block_output")


def _range(codes: torch.Tensor) -> tuple[int, int]:
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(codes)).tolist())
    return lo, hi


def derive_exact_int(
    codes: Mapping[str, torch.Tensor], previous: torch.Tensor | None, *, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]], dict[str, torch.Tensor], dict[str, float]]:
    """Derive one layer's residual points from its int32 ``codes`` (every point, by name) and the previous
    layer's derived ``block_output`` (None for the first captured layer). ``what`` names the layer in errors.

    Returns the derived codes and their (lo, hi) ranges, the model's own codes they replace, and the largest
    drift from them per point, in LSB. Raises :class:`CaptureError` if a sum leaves int32."""
    block_input = previous if previous is not None else codes["block_input"]
    post_attn = block_input.to(torch.int64) + codes["attn_output"].to(torch.int64)
    block_output = post_attn + codes["mlp_output"].to(torch.int64)
    derived: dict[str, torch.Tensor] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for name, wide in (("post_attn_residual", post_attn), ("block_output", block_output)):
        lo, hi = _range(wide)
        if lo < -fp.INT32_MAX or hi > fp.INT32_MAX:
            raise CaptureError(
                f"{what} {name}: the int32 sum derived for residuals='exact-int' reaches "
                f"{max(-lo, hi)}, beyond int32; lower --scale-log2, or capture with residuals='model'"
            )
        derived[name] = wide.to(torch.int32)
        ranges[name] = (lo, hi)
    if previous is not None:
        derived["block_input"] = previous
        ranges["block_input"] = _range(previous)
    model = {name: codes[name] for name in RESIDUAL_POINTS}
    now = {**codes, **derived}
    devs = torch.stack([(now[k].to(torch.int64) - v.to(torch.int64)).abs().max() for k, v in model.items()])
    drift = dict(zip(model, (float(d) for d in devs.tolist())))
    return derived, ranges, model, drift


def note_drift(records: dict[tuple[int, str], dict[str, Any]], layer: int, drift: Mapping[str, float]) -> None:
    """Keep the largest drift per (layer, point) over the forwards that fed a unit."""
    for name, lsb in drift.items():
        rec = records.setdefault(
            (layer, name),
            {
                "layer": layer,
                "point": name,
                "max_dev_lsb": 0.0,
                "max_ratio": None,
                "tolerance_lsb": None,
                "index": [],
            },
        )
        rec["max_dev_lsb"] = max(rec["max_dev_lsb"], lsb)


def merge_drift_check(rec: dict[str, Any], r: CheckResult, row_offset: int) -> None:
    """Keep the drift check's worst ratio to its bound over the forwards that fed a unit (the largest
    deviation, which the norm checks widen by, is kept as each forward derives its points); token indices
    count from the unit's start (``row_offset`` rows came before this forward)."""
    if rec["max_ratio"] is None or (r.max_ratio or 0.0) > rec["max_ratio"]:
        index = list(r.index or ())
        if index and row_offset:
            index[0] += row_offset
        rec.update(max_ratio=float(r.max_ratio or 0.0), tolerance_lsb=r.tolerance_lsb, index=index)
