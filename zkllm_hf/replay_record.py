"""What a replay needs of the forwards a capture ran: each forward's inputs, kept by the engine as it runs.

Every captured forward is logged with the inputs of all its rows (padding included): the token ids, the
attention mask as passed, the position ids if given, how many positions its cache already held, and which
earlier forward's cache it continued (``generate()`` passes one cache object from the prefill to the last
step). At commit, each unit records where its rows came from (forward, batch row, columns), and the first unit
of the capture also records the forwards every unit needs, a cache's earlier forwards included. So
``validate --replay`` rebuilds each forward as it ran: the same batch, padding, positions and cache.

A mask is stored as a string of ``0``/``1`` per row; a forward continuing a cache stores only its new columns
when the mask's earlier columns are those its cache's forwards passed (as ``generate()`` extends it), else the
whole mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .forward import ForwardInputs, Route
    from .unit import UnitRecorder

__all__ = ["ForwardLog", "columns_of", "mask_rows"]

REPLAY_FORMAT = 1


def columns_of(cols: slice | torch.Tensor, q: int) -> list[int]:
    """A route's columns as ``[lo, hi]`` (contiguous) or every index, as the metadata stores them."""
    if isinstance(cols, slice):
        lo, hi, _ = cols.indices(q)
        return [lo, hi]
    return [-1, *[int(i) for i in cols.tolist()]]  # -1 marks an explicit index list


def mask_rows(mask: torch.Tensor) -> list[str]:
    """A 2-D bool mask as one ``0``/``1`` string per row."""
    return ["".join("1" if v else "0" for v in row) for row in mask.tolist()]


@dataclass
class _Logged:
    inputs: ForwardInputs
    continues: int | None  # the forward whose cache this one extended
    mask: torch.Tensor | None  # the mask columns to store (all of them, or the new ones), or None
    full_mask: bool  # ``mask`` holds every column
    units: list[tuple[UnitRecorder, int, list[int]]] = field(default_factory=list)


class ForwardLog:
    """The captured forwards of one capture, in order, and the units that took rows from each."""

    def __init__(self) -> None:
        self._forwards: list[_Logged] = []
        self._last_of_cache: dict[int, tuple[int, torch.Tensor | None]] = {}  # cache id -> last forward, its mask

    def clear(self) -> None:
        self._forwards.clear()
        self._last_of_cache.clear()

    def observe(self, inputs: ForwardInputs, routes: Sequence[Route]) -> None:
        """Log one forward (call before its routes begin); numbers it in ``inputs.index``. A forward that no unit
        takes rows from and that uses no cache can never be needed: it is not kept."""
        if not routes and inputs.cache_id is None:
            return
        inputs.index = len(self._forwards)
        continues, before = None, None
        if inputs.cache_id is not None:
            if inputs.past_length > 0 and inputs.cache_id in self._last_of_cache:
                continues, before = self._last_of_cache[inputs.cache_id]
            self._last_of_cache[inputs.cache_id] = (inputs.index, inputs.full_mask)
        full = inputs.full_mask
        store_all = True
        if continues is not None and full is not None and before is not None:
            past = full[:, : full.shape[1] - inputs.q]
            store_all = tuple(before.shape) != tuple(past.shape) or not torch.equal(before, past)
        stored = full if full is None or store_all else full[:, full.shape[1] - inputs.q :].clone()
        inputs.full_mask = None  # the cache's latest mask is kept above; older ones are not needed
        logged = _Logged(inputs, continues, stored, store_all)
        for r in routes:
            logged.units.append((r.unit, r.row, columns_of(r.cols, inputs.q)))
        self._forwards.append(logged)

    def _needed(self, alive: set[int]) -> list[int]:
        """The forwards a surviving unit took rows from, and every earlier forward of their caches."""
        need: set[int] = set()
        for i, f in enumerate(self._forwards):
            if any(id(u) in alive for u, _, _ in f.units):
                j: int | None = i
                while j is not None and j not in need:
                    need.add(j)
                    j = self._forwards[j].continues
        return sorted(need)

    def _record(self, i: int) -> dict[str, Any]:
        f = self._forwards[i]
        x = f.inputs
        if x.mask_given and f.mask is None:
            mask: dict[str, Any] | None = {"columns": "unsupported"}  # a 4-D mask: not replayable
        elif f.mask is None:
            mask = None
        else:
            mask = {"columns": "all" if f.full_mask else "new", "rows": mask_rows(f.mask)}
        return {
            "forward": i,
            "batch": x.batch,
            "q": x.q,
            "past_length": x.past_length,
            "cache": x.cache_id is not None,
            "continues": f.continues,
            "input_ids": None if x.input_ids is None else x.input_ids.tolist(),
            "attention_mask": mask,
            "position_ids": None if x.position_ids is None else x.position_ids.tolist(),
            "training": x.training,
        }

    def assign(self, units: Sequence[UnitRecorder]) -> None:
        """Give each unit its ``replay`` metadata: its routes, and (the first unit) the forwards they need."""
        if not units:
            return
        alive = {id(u) for u in units}
        group = units[0].folder
        by_unit: dict[int, list[dict[str, Any]]] = {id(u): [] for u in units}
        for i, f in enumerate(self._forwards):
            for u, row, cols in f.units:
                if id(u) in by_unit:
                    by_unit[id(u)].append({"forward": i, "row": row, "columns": cols})
        for u in units:
            u.replay = {
                "format": REPLAY_FORMAT,
                "folder": u.folder,
                "group": group,
                "routes": by_unit[id(u)],
                "copy_of": u.source.folder if u.source is not None else None,
            }
        units[0].replay["forwards"] = [self._record(i) for i in self._needed(alive)]
