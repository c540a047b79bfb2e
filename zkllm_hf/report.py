"""``zkllm-hf report``: one self-contained HTML page of a capture, for an auditor.

The page needs no network: its CSS is inline and each figure is a PNG inside the page (a ``data:`` URI),
drawn by :mod:`zkllm_hf.report_plots` from the manifest's rows and metadata alone. It shows, per layer, the
largest |x| against int32's limit at the capture's scale, each identity's worst deviation as a ratio of its
bound, the exact-int drift, and |gate_proj output| against zkLLM's SwiGLU table; for a dataset, each unit's
seq_len and verdict; and the audit metadata as tables. The verdict is ``validate``'s, without the model.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import report_plots as plots
from .prove.limits import GATE_LIMIT
from .report_html import GENERATOR, page
from .validate import CaptureDataset, ValidationReport, load_capture, validate

FIGURES = ("headroom", "identities", "drift", "gate")  # every report's; a dataset's adds "units"


@dataclass
class UnitView:
    """One unit as the report shows it."""

    folder: str
    metadata: Mapping[str, Any]
    rows: list[dict[str, Any]]
    failures: list[str] = field(default_factory=list)
    prompt_id: Any = None

    @property
    def ok(self) -> bool:
        return not self.failures


def _max_into(series: dict[str, dict[int, float]], name: str, layer: int, value: float | None) -> None:
    if value is None or value != value:  # None or NaN: nothing recorded
        return
    points = series.setdefault(name, {})
    points[layer] = max(points.get(layer, value), value)


def headroom_series(units: Iterable[UnitView], scale_log2: int) -> dict[str, dict[int, float]]:
    """Per point, per layer: the largest |x| (float value) over every unit's files."""
    series: dict[str, dict[int, float]] = {}
    for u in units:
        for r in u.rows:
            if r["alias_of"] is None:
                _max_into(series, r["point"], r["layer"], max(-r["int_min"], r["int_max"]) / 2**scale_log2)
    return series


def identity_series(units: Iterable[UnitView]) -> dict[str, dict[int, float]]:
    """Per identity check, per layer: the worst deviation as a ratio of its bound, over every unit."""
    series: dict[str, dict[int, float]] = {}
    for u in units:
        for r in u.rows:
            if r["check"] is not None and r["alias_of"] is None:
                _max_into(series, r["check"], r["layer"], r["max_dev_ratio"])
    return series


def drift_series(units: Iterable[UnitView]) -> dict[str, dict[int, float]]:
    """Per derived point (exact-int captures), per layer: its worst drift from the model's own codes, as a ratio
    of the drift bound, over every unit (empty for a capture of the model's own residuals)."""
    series: dict[str, dict[int, float]] = {}
    for u in units:
        for d in (u.metadata.get("residuals") or {}).get("drift") or []:
            ratio = d.get("max_ratio")
            if ratio is None and d.get("tolerance_lsb"):
                ratio = float(d["max_dev_lsb"]) / float(d["tolerance_lsb"])
            _max_into(series, f"drift {d['point']}", int(d["layer"]), ratio)
    return series


def gate_series(units: Iterable[UnitView]) -> dict[int, float]:
    """Per layer: the largest |gate_proj output| any unit recorded."""
    series: dict[str, dict[int, float]] = {}
    for u in units:
        for g in (u.metadata.get("ffn") or {}).get("gate_abs_max") or []:
            _max_into(series, "gate", int(g["layer"]), float(g["value"]))
    return series.get("gate", {})


def _unit_views(path: Path, report: ValidationReport) -> tuple[list[UnitView], Mapping[str, Any]]:
    """Each unit of the capture at ``path`` with its rows, metadata and failures; and the top metadata."""
    cap = load_capture(path)
    failing: dict[str, list[str]] = {}
    for r in report.failures:
        failing.setdefault(r.unit or "", []).append(r.describe())
    if not isinstance(cap, CaptureDataset):
        return [UnitView("", cap.metadata, cap.manifest.to_pylist(), failing.get("", []))], cap.metadata
    ids = {u["folder"]: u.get("prompt_id") for u in cap.metadata.get("units") or []}
    views = []
    for unit in cap:
        folder = unit.path.relative_to(cap.path).as_posix()
        rows = unit.manifest.to_pylist()
        views.append(UnitView(folder, unit.metadata, rows, failing.get(folder, []), ids.get(folder)))
    return views, cap.metadata  # the index's own failures belong to no unit: the page lists every failure


def _img(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img id="fig-{name}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def figures(units: list[UnitView], meta: Mapping[str, Any], dataset: bool) -> dict[str, tuple[str, str]]:
    """Each figure's (alt text, <img> element), by name: :data:`FIGURES`, and ``units`` for a dataset."""
    scale = int(meta["capture"]["scale_log2"])
    limit = (2**31 - 1) / 2**scale
    drift_note = (
        "not an exact-int capture: the residual files are the model's own values, so there is no drift"
        if meta["capture"].get("residuals", "model") == "model"
        else "no drift recorded"
    )
    alts = {
        "headroom": f"largest |x| per layer and point against the int32 limit {limit:g} at scale 2**{scale}",
        "identities": "each identity check's worst deviation per layer as a ratio of its bound",
        "drift": "exact-int drift per layer and derived point as a ratio of the drift bound",
        "gate": f"largest |gate_proj output| per layer against zkLLM's SwiGLU table range {GATE_LIMIT:g}",
    }
    pngs = {
        "headroom": plots.headroom(headroom_series(units, scale), limit, scale),
        "identities": plots.ratios(
            identity_series(units), "identities: worst deviation / bound, per layer", "no identity check recorded"
        ),
        "drift": plots.ratios(drift_series(units), "exact-int drift / bound, per layer", drift_note),
        "gate": plots.gate(gate_series(units), GATE_LIMIT),
    }
    if dataset:
        alts["units"] = "seq_len per unit, coloured by its validation verdict"
        pngs["units"] = plots.units([u.folder for u in units], [_seq_len(u) for u in units], [u.ok for u in units])
    return {name: (alts[name], _img(name, pngs[name], alts[name])) for name in pngs}


def _seq_len(u: UnitView) -> int:
    return int((u.metadata.get("tokens") or {}).get("seq_len") or 0)


@dataclass(frozen=True)
class Report:
    """A capture's report: the page, and the verdict it shows (``validate`` without the model)."""

    html: str
    validation: ValidationReport

    @property
    def ok(self) -> bool:
        return self.validation.ok


def build_report(path: str | os.PathLike[str]) -> Report:
    """The report page of the capture (unit or dataset) at ``path``; raises as ``load_capture`` does for a
    folder that is not a readable capture, and ImportError (naming what to install) without matplotlib."""
    plots.pyplot()  # before any work: matplotlib missing is one line
    path = Path(path)
    report = validate(path)
    units, meta = _unit_views(path, report)
    dataset = meta.get("kind") == "dataset"
    return Report(page(path, meta, units, report, figures(units, meta, dataset), dataset), report)


def is_report(path: Path) -> bool:
    """Whether ``path`` is a page this command wrote (its generator tag in the first 4 KiB)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}">'.encode() in head


__all__ = [
    "FIGURES",
    "GENERATOR",
    "Report",
    "UnitView",
    "build_report",
    "drift_series",
    "figures",
    "gate_series",
    "headroom_series",
    "identity_series",
    "is_report",
]
