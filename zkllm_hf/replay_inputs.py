"""What a replay runs: a capture's units read from disk, and each recorded forward's inputs rebuilt.

A unit's manifest says where its rows came from (``replay.routes``: forward, batch row, columns) and the first
unit of each capture (its ``group``) holds the forwards themselves (``replay.forwards``, see
:mod:`~zkllm_hf.replay_record`). The rebuilt inputs are those the forward received, with one change: each
unit's own columns take the token ids and position ids its ``tokens`` metadata records, because that record is
what the capture claims; a recorded token that is not the one the files were computed from makes the replay
diverge there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MetadataError
from .manifest import read_manifest
from .writer import MANIFEST_NAME

__all__ = ["ForwardPlan", "ReplayUnit", "UnitRoute", "plan_forwards", "read_units"]


@dataclass
class ReplayUnit:
    """One unit of the capture on disk, as replay needs it."""

    path: Path  # its folder
    label: str  # how reports name it ("" for a capture of one unit, else its folder in the dataset)
    meta: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # manifest rows by file name (aliases left out)
    skip: str | None = None  # why it cannot be replayed

    @property
    def replay(self) -> dict[str, Any]:
        return self.meta.get("replay") or {}

    @property
    def folder(self) -> str:
        """The folder the engine named it by when it captured (``sample-0`` even for a flat capture)."""
        return str(self.replay.get("folder"))


@dataclass(frozen=True)
class UnitRoute:
    unit: ReplayUnit
    row: int
    cols: slice | torch.Tensor
    offset: int  # the unit's rows before this forward


@dataclass
class ForwardPlan:
    """One forward to run: its keyword inputs (CPU tensors) and the units that take its rows."""

    group: str
    index: int
    record: dict[str, Any]
    input_ids: torch.Tensor
    mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    routes: list[UnitRoute] = field(default_factory=list)


def _bad(unit: ReplayUnit, what: str) -> MetadataError:
    return MetadataError(
        f"{unit.path / MANIFEST_NAME}: replay.{what}; the manifest was edited or damaged: capture again",
        check="replay",
    )


def read_units(path: Path) -> list[ReplayUnit]:
    """The capture's units (one, or each a dataset's index lists), their manifests read."""
    _, meta = read_manifest(path / MANIFEST_NAME)
    if meta.get("kind") == "dataset":
        places = [(path / str(e["folder"]), str(e["folder"])) for e in meta.get("units", [])]
    else:
        places = [(path, "")]
    units = []
    for where, label in places:
        table, m = read_manifest(where / MANIFEST_NAME)
        rows = {str(r["file"]): r for r in table.to_pylist() if r["alias_of"] is None}
        unit = ReplayUnit(where, label, m, rows)
        if not isinstance(m.get("replay"), Mapping):
            unit.skip = "its manifest records no replay inputs (captured before zkllm-hf recorded them); capture again"
        elif (m.get("tokens") or {}).get("input_ids") is None:
            unit.skip = "it was captured from inputs_embeds, and the embeddings are not recorded: no token to replay"
        units.append(unit)
    return units


def _cols(unit: ReplayUnit, raw: Any, q: int) -> slice | torch.Tensor:
    if not isinstance(raw, list) or not raw or not all(isinstance(c, int) and not isinstance(c, bool) for c in raw):
        raise _bad(unit, f"routes: columns {raw!r} are not [lo, hi] or [-1, i, ...]")
    if raw[0] == -1:
        idx = torch.tensor(raw[1:], dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= q):
            raise _bad(unit, f"routes: a column beyond the forward's {q}")
        return idx
    if len(raw) != 2 or not 0 <= raw[0] <= raw[1] <= q:
        raise _bad(unit, f"routes: columns {raw!r} beyond the forward's {q}")
    return slice(raw[0], raw[1])


def _tensor(unit: ReplayUnit, name: str, value: Any, shape: tuple[int, int]) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise _bad(unit, f"forwards: {name} is not a table of integers") from None
    if tuple(t.shape) != shape:
        raise _bad(unit, f"forwards: {name} has shape {tuple(t.shape)}, the forward {shape}")
    return t


def _mask(unit: ReplayUnit, rec: Mapping[str, Any], before: torch.Tensor | None) -> torch.Tensor | None:
    raw = rec.get("attention_mask")
    if raw is None:
        return None
    rows = raw.get("rows") if isinstance(raw, Mapping) else None
    if not isinstance(rows, list) or not all(isinstance(r, str) and set(r) <= {"0", "1"} for r in rows):
        raise _bad(unit, "forwards: attention_mask rows are not strings of 0 and 1")
    new = torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool).reshape(len(rows), -1)
    if raw.get("columns") == "new":
        if before is None:
            raise _bad(unit, "forwards: a mask extends a cache whose forward passed none")
        new = torch.cat([before, new], dim=1)
    return new


def _unit_route(unit: ReplayUnit, route: Mapping[str, Any], batch: int, q: int, offset: int) -> UnitRoute:
    row = route.get("row")
    if not isinstance(row, int) or isinstance(row, bool) or not 0 <= row < batch:
        raise _bad(unit, f"routes: row {row!r} of a forward of {batch} rows")
    return UnitRoute(unit, row, _cols(unit, route.get("columns"), q), offset)


def _width(cols: slice | torch.Tensor, q: int) -> int:
    return len(range(q)[cols]) if isinstance(cols, slice) else int(cols.numel())


def _claimed(plan: ForwardPlan, ids: torch.Tensor, pos: torch.Tensor | None, past: int) -> torch.Tensor | None:
    """Each unit's columns take its recorded token ids and position ids (see the module docstring)."""
    q = ids.shape[1]
    default = torch.arange(past, past + q).expand(ids.shape[0], q)
    explicit = pos is not None
    pos = (pos if pos is not None else default).clone()
    for r in plan.routes:
        tokens = r.unit.meta["tokens"]
        w = _width(r.cols, q)
        claim_ids = list(tokens.get("input_ids") or [])[r.offset : r.offset + w]
        claim_pos = list(tokens.get("position_ids") or [])[r.offset : r.offset + w]
        if len(claim_ids) != w or len(claim_pos) != w:
            raise _bad(r.unit, f"routes: the unit's tokens hold fewer than the {r.offset + w} rows its routes take")
        ids[r.row, r.cols] = torch.tensor(claim_ids, dtype=torch.long)
        pos[r.row, r.cols] = torch.tensor(claim_pos, dtype=torch.long)
    return pos if explicit or not torch.equal(pos, default) else None


def _routes_by_forward(units: Sequence[ReplayUnit]) -> dict[tuple[str, int], list[tuple[ReplayUnit, dict]]]:
    by_folder = {u.folder: u for u in units}
    out: dict[tuple[str, int], list[tuple[ReplayUnit, dict]]] = {}
    for u in units:
        if u.skip:
            continue
        source = by_folder.get(u.replay.get("copy_of")) if u.replay.get("copy_of") else u
        if source is None:
            u.skip = f"it is a copy of {u.replay.get('copy_of')}, which this replay does not hold"
            continue
        for route in source.replay.get("routes") or []:
            if not isinstance(route, Mapping) or not isinstance(route.get("forward"), int):
                raise _bad(u, "routes: an entry without its forward")
            out.setdefault((str(source.replay.get("group")), route["forward"]), []).append((u, dict(route)))
    return out


def plan_forwards(units: Sequence[ReplayUnit]) -> list[ForwardPlan]:
    """Every forward the units' routes need, in capture order, inputs rebuilt; marks units that cannot run."""
    groups = {u.folder: u for u in units if isinstance(u.replay.get("forwards"), list)}
    routes = _routes_by_forward(units)
    for (group, _), taken in routes.items():
        if group not in groups:
            for u, _ in taken:
                held = f"its forwards are recorded in {group}, which this replay does not hold"
                u.skip = u.skip or f"{held}: replay the whole capture"
    plans: list[ForwardPlan] = []
    for group, owner in groups.items():
        masks: dict[int, torch.Tensor | None] = {}
        offsets: dict[int, int] = {}
        for rec in owner.replay["forwards"]:
            plans.append(_plan_one(owner, group, rec, routes, masks, offsets))
    return plans


def _plan_one(owner, group, rec, routes, masks, offsets) -> ForwardPlan:
    if not isinstance(rec, Mapping) or not isinstance(rec.get("forward"), int):
        raise _bad(owner, "forwards: an entry without its number")
    batch, q, past = rec.get("batch"), rec.get("q"), rec.get("past_length")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (batch, q, past)):
        raise _bad(owner, f"forwards: forward {rec['forward']} has no batch, q or past_length")
    index = int(rec["forward"])
    taken = routes.get((group, index), [])
    unsupported = (
        isinstance(rec.get("attention_mask"), Mapping) and rec["attention_mask"].get("columns") == "unsupported"
    )
    unchained = past > 0 and not isinstance(rec.get("continues"), int)
    if rec.get("input_ids") is None or unsupported or unchained:
        why = (
            "it was called with inputs_embeds"
            if rec.get("input_ids") is None
            else "its attention mask was not 2-D"
            if unsupported
            else f"it continued a cache of {past} positions that no captured forward built"
        )
        for u, _ in taken:
            u.skip = u.skip or f"forward {index} cannot be replayed: {why}"
        ids = torch.zeros((batch, q), dtype=torch.long)
        mask = None
    else:
        ids = _tensor(owner, "input_ids", rec["input_ids"], (batch, q))
        cont = rec.get("continues")
        mask = _mask(owner, rec, masks.get(cont) if isinstance(cont, int) else None)
    masks[index] = mask
    pos = None if rec.get("position_ids") is None else _tensor(owner, "position_ids", rec["position_ids"], (batch, q))
    plan = ForwardPlan(group, index, dict(rec), ids, mask, pos)
    for u, route in taken:
        if u.skip:
            continue
        off = offsets.get(id(u), 0)
        r = _unit_route(u, route, batch, q, off)
        offsets[id(u)] = off + _width(r.cols, q)
        plan.routes.append(r)
    if plan.routes:
        plan.position_ids = _claimed(plan, plan.input_ids, pos, past)
    return plan
