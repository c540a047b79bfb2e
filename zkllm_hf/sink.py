"""The engine's output stage: a :class:`Sink` takes each unit's int32 codes, a layer at a time, then its end.

Two sinks: :func:`staging_sink`, the atomic staging folder a capture writes today
(:class:`~zkllm_hf.writer.StagingDir`: ordered writer threads, a byte-bounded queue, PARTIAL marker,
flock, atomic rename at commit), and :class:`MemorySink`, which keeps the codes per (unit, layer, point) in
memory and writes nothing (to replay a capture and compare it with the files).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .points import POINTS
from .writer import StagingDir

__all__ = ["GPU_WRITERS", "MemorySink", "Sink", "point_of_file", "staging_sink", "writer_count"]


class Sink(Protocol):
    """What the recorder hands its codes to. Names are paths relative to the capture (``sample-1/layer-0-...``)."""

    max_in_flight_bytes: int  # how many bytes of host copies may wait in the sink (the engine bounds it)

    def append_many(
        self, items: list[tuple[str, np.ndarray]], *, ready: Any = None, done: Callable[[], Any] | None = None
    ) -> None:
        """One layer of one unit: append each ``(name, codes)``. ``ready.synchronize()`` (if given) must run
        before the arrays are read; ``done()`` must be called once they are no longer needed."""

    def seal_many(self, items: list[tuple[str, tuple[str, ...]]]) -> Any:
        """A unit's end: each ``(name, aliases)`` is complete."""

    def remove(self, folder: str) -> None:
        """Forget a unit's folder (a unit that will not be committed), after what was queued into it."""

    def abort(self) -> None:
        """Drop everything."""


def staging_sink(
    out_dir: str | os.PathLike[str], *, overwrite: bool = False, digest: str = "blake3", writers: int = 1
) -> StagingDir:
    """The sink of a capture written to disk: the staging folder beside ``out_dir``."""
    return StagingDir(out_dir, overwrite=overwrite, digest=digest, writers=writers)


GPU_WRITERS = 4  # writer threads on a GPU, where the host is otherwise idle (at most the CPU count)


def writer_count(model: Any, asked: int | None) -> int:
    """The writer threads of a capture: as asked, else 1 on the CPU (the forward needs its cores) and
    :data:`GPU_WRITERS` on a GPU, so hashing and writing are not bound by one core."""
    if asked is not None:
        return asked
    on_gpu = any(p.device.type == "cuda" for p in model.parameters())
    return min(GPU_WRITERS, os.cpu_count() or 1) if on_gpu else 1


_FILE_PATTERNS = [
    (re.compile("^" + re.escape(p.file).replace(re.escape("{L}"), r"(\d+)") + "$"), p.name) for p in POINTS
]


def point_of_file(name: str) -> tuple[str, int, str]:
    """``(unit folder, layer, point)`` of a file name as the recorder hands it (``sample-0/layer-3-...bin``)."""
    folder, _, base = name.rpartition("/")
    for pattern, point in _FILE_PATTERNS:
        if m := pattern.match(base):
            return folder, int(m[1]), point
    raise ValueError(f"{name!r} is not the file of a capture point")


class MemorySink:
    """Collects the quantised codes per (unit folder, layer, point), rows of every forward in order, as the
    files would hold them (int32, C order); writes nothing. ``codes[(folder, layer, point)]`` is an
    ``(rows, hidden)`` int32 array; ``sealed`` lists the folders whose units ended."""

    def __init__(self) -> None:
        self.max_in_flight_bytes = 64 << 20  # nothing waits here: each layer is copied as it arrives
        self._parts: dict[tuple[str, int, str], list[np.ndarray]] = {}
        self.sealed: list[str] = []

    def append_many(
        self, items: list[tuple[str, np.ndarray]], *, ready: Any = None, done: Callable[[], Any] | None = None
    ) -> None:
        try:
            if ready is not None:
                ready.synchronize()  # the copies into the host buffers have landed (one sync per layer)
            for name, codes in items:
                part = np.array(codes, dtype="<i4", order="C", copy=True)  # the buffer goes back to the pool
                self._parts.setdefault(point_of_file(name), []).append(part)
        finally:
            if done is not None:
                done()

    def seal_many(self, items: list[tuple[str, tuple[str, ...]]]) -> None:
        for name, _ in items:
            folder = point_of_file(name)[0]
            if folder not in self.sealed:
                self.sealed.append(folder)

    def remove(self, folder: str) -> None:
        for key in [k for k in self._parts if k[0] == folder]:
            del self._parts[key]
        self.sealed = [f for f in self.sealed if f != folder]

    def abort(self) -> None:
        self._parts.clear()
        self.sealed.clear()

    @property
    def codes(self) -> dict[tuple[str, int, str], np.ndarray]:
        """Every (unit folder, layer, point) and its codes, the forwards' rows concatenated."""
        return {k: parts[0] if len(parts) == 1 else np.concatenate(parts) for k, parts in self._parts.items()}

    def units(self) -> Sequence[str]:
        """The unit folders it holds codes of."""
        return sorted({k[0] for k in self._parts})
