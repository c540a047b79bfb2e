"""The identity checks' fast path on the CPU: the same statistics as :mod:`fixed_point`'s float64 formulas,
number for number, from int32 arithmetic plus the exact formula on the few elements that need it.

Each function returns the ``fixed_point.DEVIATION_STATS`` numbers (largest deviation, largest ratio, the
first flat index where the ratio peaks, the tolerance there) that the float64 formula returns for the same
tensors, or calls that formula (``dense``) whenever a precondition below does not hold. Why the numbers are
the same (docs/architecture.md, section 2, "the fast path"):

- The deviation ``d = lhs - t1 - t2`` is exact in int32 when interval arithmetic on the tensors' extremes
  shows that no intermediate leaves (-2**31, 2**31); otherwise the float64 formula runs.
- The tolerance ``ulp_bound(q)`` depends on ``q`` only through ``j = bit_length(|q|)`` (``(|q| + 0.5) / 2**k``
  stays in one binade while ``j`` does), so it is one of 33 numbers, ``T[j]``, computed once by
  ``fixed_point.ulp_bound`` itself on one code per class. ``T`` must be positive, finite and non-decreasing
  in ``j`` (it is for ``ulps >= 0``), or the float64 formula runs.
- Elements with ``|d| >= 2`` go through the float64 formula itself, gathered. Elements with ``|d| == 0``
  have ratio 0. The ratio of an element with ``|d| == 1`` is ``1 / T[j]``, largest at the smallest ``|q|``
  among the elements with ``|d| >= 1``; every element of ratio exactly ``R`` is found by its ``|q|`` alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import fixed_point as fp

INT32_MAX = 2**31 - 1
# Codes whose magnitude leaves room for a marker above every valid one (the ratio search below).
LARGEST_KEY = INT32_MAX - 1
DENSE_FRACTION = 8  # more than 1/8 of the elements with |d| >= 2: the float64 formula on everything is cheaper

Stats = Callable[[], torch.Tensor]


def _extremes(t: torch.Tensor) -> tuple[int, int]:
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def fits_int32(lhs: torch.Tensor, terms: Sequence[torch.Tensor]) -> bool:
    """Whether ``|lhs - terms[0] - ...|`` is exact in int32: interval arithmetic on each tensor's smallest and
    largest code keeps every intermediate inside (-2**31, 2**31)."""
    lo, hi = _extremes(lhs)
    for t in terms:
        t_lo, t_hi = _extremes(t)
        lo, hi = lo - t_hi, hi - t_lo
        if lo <= -(2**31) or hi > INT32_MAX:
            return False
    return True


def _difference(lhs: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
    out = torch.sub(lhs, terms[0])
    for t in terms[1:]:
        out.sub_(t)
    return out


def abs_difference(lhs: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``|lhs - terms[0] - ...|`` in int32 (exact where :func:`fits_int32` holds)."""
    return _difference(lhs, terms).abs_()


def off_by_one_key(ad: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``|ref|`` where ``ad >= 1``, and ``INT32_MAX`` (above every ``|ref|`` the fast path admits) where
    ``ad == 0``, in int32 arithmetic (``ad`` is not modified)."""
    return ad.clamp(max=1).sub_(1).bitwise_and_(INT32_MAX).bitwise_or_(torch.abs(ref))


@functools.lru_cache(maxsize=256)
def tolerance_table(dtype: torch.dtype, scale_log2: int, lsb: float, ulps: float) -> tuple[float, ...] | None:
    """``T[j] = fixed_point.ulp_bound(q)`` for every code of bit length ``j`` (0 .. 32), or None when ``T`` is
    not positive, finite and non-decreasing (then the fast path does not apply)."""
    codes = torch.tensor([0] + [2 ** (j - 1) for j in range(1, 33)], dtype=torch.int64)
    table = fp.ulp_bound(codes, dtype, scale_log2, lsb=lsb, ulps=ulps)
    values = tuple(table.tolist())
    ok = all(math.isfinite(v) and v > 0 for v in values) and all(a <= b for a, b in zip(values, values[1:]))
    return values if ok else None


@functools.lru_cache(maxsize=256)
def unit_ratios(table: tuple[float, ...]) -> tuple[float, ...]:
    """``1 / T[j]`` as the float64 formula divides (the ratio of an element that is off by one LSB)."""
    return tuple((torch.ones(len(table), dtype=torch.float64) / torch.tensor(table, dtype=torch.float64)).tolist())


def _stats(max_dev: float, ratio: float, pos: int, tol: float) -> torch.Tensor:
    return torch.tensor([max_dev, ratio, float(pos), tol], dtype=torch.float64)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return (t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(1, -1)).contiguous()


def ulp_bound_stats(
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    ref: torch.Tensor,
    dtype: torch.dtype,
    scale_log2: int,
    *,
    lsb: float,
    ulps: float,
    exact: Callable[[torch.Tensor], torch.Tensor],
    dense: Stats,
) -> torch.Tensor:
    """The statistics of ``|lhs - sum(terms)|`` against ``ulp_bound(ref, dtype, scale_log2, lsb, ulps)`` per
    element (the sum check: ``ref`` is the sum; the drift check: the model's codes).

    ``exact(flat_indices)`` is the float64 formula's statistics on those elements alone (gathered, in the
    order given); ``dense()`` is the float64 formula on everything."""
    if lhs.device.type != "cpu" or lhs.numel() == 0 or not (math.isfinite(lsb) and math.isfinite(ulps)):
        return dense()
    table = tolerance_table(dtype, scale_log2, float(lsb), float(ulps))
    ref_lo, ref_hi = _extremes(ref)
    if table is None or ref_lo < -LARGEST_KEY or ref_hi > LARGEST_KEY or not fits_int32(lhs, terms):
        return dense()
    rows = [_rows(t) for t in (lhs, *terms, ref)]
    blocks = fp.row_blocks(rows[0])
    ratios = unit_ratios(table)
    scan = _BlockScan(rows, exact, ratios[0])
    scanned = fp.map_blocks(scan, blocks, lhs.device)
    if scan.too_many:
        return dense()
    max_dev = max(s[0] for s in scanned)
    flat_ref = rows[-1].reshape(-1)
    if max_dev == 0:  # every ratio is 0: the first element, its tolerance
        return _stats(0.0, 0.0, 0, table[abs(int(flat_ref[0])).bit_length()])
    # (ratio, flat index, tolerance) of each group's best: per block, then the blocks gathered once decided
    candidates = [s[2] for s in scanned if isinstance(s[2], tuple)]
    rest = [s[2] for s in scanned if isinstance(s[2], np.ndarray)]
    if rest:
        candidates.append(scan.gathered_best(np.concatenate(rest)))
    best = max((c[0] for c in candidates), default=-math.inf)
    if not scan.ones_lose:  # then every block has its smallest key: j, the smallest |ref| where |d| >= 1
        j = min(s[1] for s in scanned if s[1] is not None).bit_length()
        best = max(best, ratios[j])
        if ratios[j] == best:  # elements off by one LSB reach it: the first of them, found by |ref| alone
            j_hi = j
            while j_hi + 1 < len(ratios) and ratios[j_hi + 1] == best:
                j_hi += 1
            first = _first_key_at_most(rows, blocks, min(2**j_hi - 1, LARGEST_KEY))
            candidates.append((best, first, table[abs(int(flat_ref[first])).bit_length()]))
    pos, tol = min((i, t) for r, i, t in candidates if r == best)
    return _stats(float(max_dev), best, pos, tol)


class _BlockScan:
    """One block of rows: its largest ``|d|``, its smallest :func:`off_by_one_key` (None when no longer needed)
    and the float64 formula's best among its elements with ``|d| >= 2`` (None if there are none; once
    ``ones_lose`` holds, their flat indices instead, for one gathered run of the formula at the end).

    The smallest key is not needed once a block has seen ``|ref| == 0`` where ``|d| >= 1`` (no key is smaller),
    nor once a gathered element's ratio exceeds ``1 / T[0]``, the largest an element off by one LSB can have
    (then ``ones_lose``). ``too_many``: over 1/DENSE_FRACTION of a block has ``|d| >= 2``; the caller runs the
    float64 formula on everything instead."""

    def __init__(self, rows: list[torch.Tensor], exact: Callable[[torch.Tensor], torch.Tensor], top_unit: float):
        self.rows, self.exact, self.top_unit = rows, exact, top_unit
        self.cols = rows[0].shape[1]
        self.zero_seen = self.ones_lose = self.too_many = False

    def gathered_best(self, flagged: np.ndarray) -> tuple[float, int, float]:
        """(ratio, flat index, tolerance) of the first largest ratio among ``flagged``, by the float64 formula."""
        _, ratio, pos, tol = self.exact(torch.from_numpy(flagged)).tolist()
        return ratio, int(flagged[int(pos)]), tol

    def __call__(self, b: slice) -> tuple[int, int | None, tuple[float, int, float] | np.ndarray | None]:
        if self.too_many:
            return 0, None, None
        ad = abs_difference(self.rows[0][b], [t[b] for t in self.rows[1:-1]])
        top = int(ad.max())
        best = None
        if top >= 2:
            flagged = np.flatnonzero(ad.numpy() >= 2)
            if len(flagged) * DENSE_FRACTION > ad.numel():
                self.too_many = True
                return 0, None, None
            flagged += b.start * self.cols
            if self.ones_lose:  # decided: the float64 formula runs on these once, with the other blocks' rest
                return top, None, flagged
            best = self.gathered_best(flagged)
            self.ones_lose = self.ones_lose or best[0] > self.top_unit
        if top == 0 or self.zero_seen or self.ones_lose:
            return top, None, best
        least = int(off_by_one_key(ad, self.rows[-1][b]).min())
        self.zero_seen = self.zero_seen or least == 0
        return top, least, best


def _first_key_at_most(rows: list[torch.Tensor], blocks: list[slice], limit: int) -> int:
    """The first flat index whose :func:`off_by_one_key` is at most ``limit`` (one exists)."""
    cols = rows[0].shape[1]
    for b in blocks:
        ad = abs_difference(rows[0][b], [t[b] for t in rows[1:-1]])
        hits = off_by_one_key(ad, rows[-1][b]).numpy().reshape(-1) <= limit
        if hits.any():
            return b.start * cols + int(np.argmax(hits))
    raise AssertionError("unreachable: the smallest key is at most the limit")  # pragma: no cover


def equal_stats(lhs: torch.Tensor, terms: Sequence[torch.Tensor], *, dense: Stats) -> torch.Tensor:
    """The statistics of ``lhs == sum(terms)`` exactly (the chain; the sums of ``residuals="exact-int"``), as
    ``fixed_point.equal_deviation_stats`` gives them: the largest difference, a ratio of infinity if it is not
    zero, and the first element where it is largest."""
    if lhs.device.type != "cpu" or lhs.numel() == 0 or not fits_int32(lhs, terms):
        return dense()
    ad = abs_difference(_rows(lhs), [_rows(t) for t in terms])
    max_dev = int(ad.max())
    if max_dev == 0:
        return _stats(0.0, 0.0, 0, 0.0)
    return _stats(float(max_dev), math.inf, int(np.argmax(ad.numpy().reshape(-1) == max_dev)), 0.0)


def sum_stats(
    q_x: torch.Tensor, q_y: torch.Tensor, q_sum: torch.Tensor, dtype: torch.dtype, scale_log2: int, **tolerance: float
) -> torch.Tensor:
    """``fixed_point.sum_deviation_stats``, the same numbers, by the fast path where it applies."""
    flat = [_rows(t).reshape(-1) for t in (q_x, q_y, q_sum)]

    def exact(idx: torch.Tensor) -> torch.Tensor:
        return fp.sum_deviation_stats(*(t.index_select(0, idx) for t in flat), dtype, scale_log2, **tolerance)

    return ulp_bound_stats(
        q_sum,
        [q_x, q_y],
        q_sum,
        dtype,
        scale_log2,
        lsb=tolerance.get("quantisation_lsb", 1.5),
        ulps=tolerance.get("rounding_ulps", 0.5),
        exact=exact,
        dense=lambda: fp.sum_deviation_stats(q_x, q_y, q_sum, dtype, scale_log2, **tolerance),
    )


def drift_stats(
    q_derived: torch.Tensor,
    q_model: torch.Tensor,
    dtype: torch.dtype,
    scale_log2: int,
    *,
    drift_lsb: float,
    drift_ulps: float,
) -> torch.Tensor:
    """``fixed_point.drift_deviation_stats``, the same numbers, by the fast path where it applies."""
    bound = {"drift_lsb": drift_lsb, "drift_ulps": drift_ulps}
    flat = [_rows(t).reshape(-1) for t in (q_derived, q_model)]

    def exact(idx: torch.Tensor) -> torch.Tensor:
        return fp.drift_deviation_stats(*(t.index_select(0, idx) for t in flat), dtype, scale_log2, **bound)

    return ulp_bound_stats(
        q_derived,
        [q_model],
        q_model,
        dtype,
        scale_log2,
        lsb=drift_lsb,
        ulps=drift_ulps,
        exact=exact,
        dense=lambda: fp.drift_deviation_stats(q_derived, q_model, dtype, scale_log2, **bound),
    )
