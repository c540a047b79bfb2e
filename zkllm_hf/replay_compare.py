"""The replay's sink: each layer's codes, as the engine hands them over, compared with the capture's files.

:class:`ComparatorSink` is a :class:`~zkllm_hf.sink.Sink` that writes nothing and keeps nothing but counts:
for each (unit, layer, point) it reads the rows the replay just produced from the file (at the offset the
unit's earlier forwards reached), compares them element by element and folds the result into a
:class:`~zkllm_hf.contracts.ReplayStats`. Memory stays one layer of one forward, whatever the capture's size.
Equal codes are the fast path (one comparison); only differing elements get their ulps computed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import fixed_point as fp
from .contracts import ULP_STEPS, ReplayStats
from .dtypes import SOURCE_DTYPES
from .sink import point_of_file

__all__ = ["ComparatorSink", "ExpectedFile", "compare_codes"]


@dataclass(frozen=True)
class ExpectedFile:
    """Where a replayed point's codes are on disk, and what the manifest says of them."""

    path: Path
    file: str  # as the manifest names it
    rows: int
    cols: int
    dtype: str  # source dtype


def compare_codes(stats: ReplayStats, got: np.ndarray, want: np.ndarray, row0: int, scale_log2: int) -> None:
    """Fold ``got`` (replayed) against ``want`` (the file's rows ``row0 ..``) into ``stats``."""
    stats.scale_log2 = scale_log2
    stats.rows += int(got.shape[0])
    stats.elements += int(got.size)
    if np.array_equal(got, want):
        stats.equal += int(got.size)
        for k in ULP_STEPS:
            stats.within[k] += int(got.size)
        return
    g = torch.from_numpy(np.ascontiguousarray(got, dtype=np.int64))
    w = torch.from_numpy(np.ascontiguousarray(want, dtype=np.int64))
    signed = g - w
    diff = signed.abs()
    where = torch.nonzero(diff.reshape(-1)).flatten()
    stats.equal += int(got.size - where.numel())
    dev = diff.reshape(-1)[where].to(torch.float64)
    scale = float(2**scale_log2)
    mag = torch.maximum(g.reshape(-1)[where].abs(), w.reshape(-1)[where].abs()).to(torch.float64).div_(scale)
    dtype = SOURCE_DTYPES.get(stats.dtype, torch.float32)
    unit = fp.ulp(mag, dtype, in_place=True).mul_(scale).clamp_(min=1.0)
    ulps = dev / unit
    fold_rows(stats, signed, where, ulps, row0, int(got.shape[1]))
    for k in ULP_STEPS:
        stats.within[k] += int(got.size - where.numel()) + int((ulps <= k).sum())
    i = int(torch.argmax(ulps))
    if float(ulps[i]) > stats.max_ulps:
        flat = int(where[i])
        row, col = divmod(flat, got.shape[1])
        stats.max_ulps, stats.max_lsb, stats.ulp_lsb = float(ulps[i]), int(dev[i]), float(unit[i])
        stats.index = (row0 + row, col)
        stats.expected, stats.replayed = int(want[row, col]), int(got[row, col])


def fold_rows(
    stats: ReplayStats, d: torch.Tensor, where: torch.Tensor, ulps: torch.Tensor, row0: int, cols: int
) -> None:
    """Fold each row's counts (see :data:`~zkllm_hf.contracts.ROW_FIELDS`) into ``stats.by_row``: ``d`` the
    signed deviations (rows, cols), ``where`` the flat indices of the differing elements, ``ulps`` theirs."""
    table = stats.row_table()
    rows = torch.div(where, cols, rounding_mode="floor")
    n = int(d.shape[0])
    if row0 + n > table.shape[0]:
        return
    block = table[row0 : row0 + n]
    block[:, 0] += cols
    for i, k in enumerate(ULP_STEPS, start=1):
        block[:, i] += torch.bincount(rows[ulps > k], minlength=n).numpy()
    dd = d.to(torch.float64)
    block[:, len(ULP_STEPS) + 1] += dd.sum(dim=1).numpy()
    block[:, len(ULP_STEPS) + 2] += dd.square().sum(dim=1).numpy()


class ComparatorSink:
    """Compares the replay's codes with the files as they arrive; ``stats`` holds the result per point.

    ``expected(name)`` gives the :class:`ExpectedFile` of a replayed name (``sample-0/layer-3-...bin``) or
    None when the capture has no such file; ``only`` limits the comparison to those (unit folder, layer).
    """

    def __init__(
        self,
        expected: Callable[[str], ExpectedFile | None],
        scale_log2: int,
        *,
        only: Collection[tuple[str, int]] | None = None,
        points: Collection[str] | None = None,
    ):
        self.max_in_flight_bytes = 64 << 20  # nothing waits here: each layer is compared as it arrives
        self._expected = expected
        self._scale = scale_log2
        self._only = None if only is None else set(only)
        self._points = None if points is None else set(points)
        self.stats: dict[tuple[str, int, str], ReplayStats] = {}

    def _stats(self, name: str) -> tuple[ReplayStats, ExpectedFile | None] | None:
        folder, layer, point = point_of_file(name)
        if (self._only is not None and (folder, layer) not in self._only) or (
            self._points is not None and point not in self._points
        ):
            return None
        key = (folder, layer, point)
        exp = self._expected(name)
        if key not in self.stats:
            self.stats[key] = ReplayStats(
                folder,
                layer,
                point,
                exp.file if exp else name.rpartition("/")[2],
                exp.dtype if exp else "float32",
                exp.rows if exp else 0,
            )
        return self.stats[key], exp

    def append_many(
        self, items: list[tuple[str, np.ndarray]], *, ready: Any = None, done: Callable[[], Any] | None = None
    ) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            for name, codes in items:
                found = self._stats(name)
                if found is None:
                    continue
                stats, exp = found
                self._compare(stats, exp, np.asarray(codes))
        finally:
            if done is not None:
                done()

    def _compare(self, stats: ReplayStats, exp: ExpectedFile | None, codes: np.ndarray) -> None:
        row0, n = stats.rows, int(codes.shape[0])
        if exp is None:
            stats.note = stats.note or "the replay computed this point, the capture has no file for it"
            return
        if codes.shape[1] != exp.cols or row0 + n > exp.rows:
            stats.note = stats.note or (
                f"the replay produced {row0 + n} rows of {codes.shape[1]}, the file holds {exp.rows} of {exp.cols}"
            )
            stats.rows += n
            return
        try:
            want = np.fromfile(exp.path, dtype="<i4", count=n * exp.cols, offset=row0 * exp.cols * 4)
        except OSError as exc:
            stats.note = stats.note or f"cannot read {exp.file}: {exc.strerror or exc}"
            return
        if want.size != n * exp.cols:
            stats.note = stats.note or f"{exp.file} is shorter than its manifest says"
            return
        compare_codes(stats, codes, want.reshape(n, exp.cols), row0, self._scale)

    def finish(self) -> list[ReplayStats]:
        """Every point compared, each marked when the replay did not produce all of its file's rows."""
        for s in self.stats.values():
            if not s.note and s.rows != s.rows_expected:
                s.note = f"the replay produced {s.rows} rows, the file holds {s.rows_expected}"
        return list(self.stats.values())

    def seal_many(self, items: list[tuple[str, tuple[str, ...]]]) -> None:
        return None

    def remove(self, folder: str) -> None:
        for key in [k for k in self.stats if k[0] == folder]:
            del self.stats[key]

    def abort(self) -> None:
        self.stats.clear()
