"""Float ↔ zkLLM fixed point, and the error bounds of the identities in the int domain. Pure functions.

zkLLM's ``fileio_utils.save_int`` stores ``round(x * 2**k)`` as int32. We do the same, round half to even
(as ``torch.round`` does), and refuse what would not survive the cast: NaN, Inf, and any value whose
rounded magnitude exceeds ``2**31 - 1``. Nothing is wrapped or clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import FixedPointError

INT32_MAX = 2**31 - 1
MIN_SCALE_LOG2 = 0
MAX_SCALE_LOG2 = 30


def check_scale(scale_log2: int) -> int:
    """Return ``scale_log2`` if it is an int in the supported range, else raise a clear error."""
    if isinstance(scale_log2, bool) or not isinstance(scale_log2, int):
        raise TypeError(f"scale_log2 must be an int, got {scale_log2!r} ({type(scale_log2).__name__})")
    if not MIN_SCALE_LOG2 <= scale_log2 <= MAX_SCALE_LOG2:
        raise ValueError(f"scale_log2={scale_log2} is outside [{MIN_SCALE_LOG2}, {MAX_SCALE_LOG2}]; zkLLM uses 16")
    return scale_log2


def max_abs(scale_log2: int) -> float:
    """The magnitude every value must stay below at scale ``2**scale_log2`` (32768 at 2**16)."""
    return float(2 ** (31 - scale_log2))


def largest_safe_scale(amax: float) -> int | None:
    """The largest scale_log2 at which a value of magnitude ``amax`` still fits int32, or None."""
    if not math.isfinite(amax) or amax >= 2**31:  # beyond int32 at every scale (and no float overflow below)
        return None
    for k in range(MAX_SCALE_LOG2, MIN_SCALE_LOG2 - 1, -1):
        if round(amax * 2**k) <= INT32_MAX:
            return k
    return None


def headroom(amax: float, scale_log2: int) -> float:
    """Fraction of the int32 range used by a value of magnitude ``amax`` (0.69 means 69%)."""
    return float(amax) * 2**scale_log2 / INT32_MAX


def _where(index: tuple[int, ...]) -> str:
    if len(index) == 2:
        return f"token {index[0]}, dim {index[1]}"
    return f"index {list(index)}"


# On the CPU, elementwise maths over a whole (seq_len, hidden) tensor streams every float64 temporary
# through memory (9 MB each at 2048 x 576) and page-faults it in fresh; blocks of whole rows this large stay
# in cache and reuse the allocator's memory. Rows are independent in every check, so the results are the
# same element for element. Elsewhere (CUDA) one block is the whole tensor.
CPU_BLOCK_ELEMENTS = 1 << 17


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(1, -1)


def row_blocks(t: torch.Tensor) -> list[slice]:
    """Slices of whole rows of the 2-D ``t`` that together cover it: cache-sized on the CPU, one elsewhere."""
    rows, cols = t.shape
    if t.device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, CPU_BLOCK_ELEMENTS // max(1, cols))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def map_blocks(fn: Callable[[slice], torch.Tensor], blocks: list[slice], device: torch.device) -> list[torch.Tensor]:
    """``fn`` on each block, in order, on the calling thread. Each block's ops use torch's own intra-op
    threads: a pool of Python threads here would start one OpenMP team per thread and oversubscribe the
    cores the model's forward is using (bench/RESULTS.md, 2026-12-01 "one team of threads")."""
    return [fn(b) for b in blocks]


def quantize(x: torch.Tensor, scale_log2: int, *, what: str = "tensor") -> torch.Tensor:
    """``round(x * 2**scale_log2)`` as int32, half to even, on ``x``'s own device.

    Raises :class:`FixedPointError` naming ``what``, the offending value, its position and the fix.
    """
    return quantize_with_range(x, scale_log2, what=what)[0]


def quantize_with_range(x: torch.Tensor, scale_log2: int, *, what: str = "tensor") -> tuple[torch.Tensor, int, int]:
    """:func:`quantize`, plus the smallest and largest code, from the one reduction the range check needs."""
    x = _float_input(x, scale_log2, what)
    out = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    lo, hi = quantize_into(x, out, scale_log2, what=what)
    return out, lo, hi


def _float_input(x: torch.Tensor, scale_log2: int, what: str) -> torch.Tensor:
    check_scale(scale_log2)
    x = x.detach()
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    return x


def _widen(x: torch.Tensor) -> torch.Tensor:
    # Multiplying by a power of two is exact in float32 and float64; half types are widened first.
    return x if x.dtype in (torch.float64, torch.float32) else x.to(torch.float32)


def quantize_into(x: torch.Tensor, out: torch.Tensor, scale_log2: int, *, what: str = "tensor") -> tuple[int, int]:
    """Write ``round(x * 2**scale_log2)`` into the int32 tensor ``out`` (same shape); return the smallest and
    largest code. Raises :class:`FixedPointError` as :func:`quantize` does.

    On the CPU the rows go through in cache-sized blocks, so no full-size float temporary is made; on another
    device it is one pass with one device sync (use :func:`quantize_device` to avoid even that)."""
    x = _float_input(x, scale_log2, what)
    if out.dtype != torch.int32 or tuple(out.shape) != tuple(x.shape):
        raise ValueError(f"{what}: out must be int32 of shape {tuple(x.shape)}, got {out.dtype} {tuple(out.shape)}")
    if not x.numel():
        return 0, 0
    scale = float(2**scale_log2)
    # The codes' extremes from x's own: scaling by a power of two and rounding are monotone (and exact), so
    # min(round(x * s)) = round(min(x) * s). One reduction; aminmax propagates NaN, and NaN, Inf and overflow
    # all fail the test below, before any code is written.
    a, b = (round(w) if math.isfinite(w := v * scale) else w for v in torch.stack(torch.aminmax(x)).tolist())
    if not (-INT32_MAX <= a and b <= INT32_MAX):
        wide = _widen(x)
        _raise_unrepresentable(wide, torch.round(wide * scale), x.dtype, scale_log2, what)
    flat_x, flat_out = _as_rows(x), _as_rows(out)
    for rows in row_blocks(flat_x):
        flat_out[rows].copy_(torch.mul(_widen(flat_x[rows]), scale).round_())
    return int(a), int(b)


# stats of quantize_device, in this order
_Q_LO, _Q_HI, _Q_NONFINITE, _Q_NONFINITE_AT, _Q_NONFINITE_VALUE, _Q_ABSMAX_AT, _Q_ABSMAX_VALUE = range(7)
QUANT_STATS = 7


def quantize_device(x: torch.Tensor, scale_log2: int, *, what: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` without any device sync: the int32 codes on ``x``'s device, and a float64 tensor of
    ``QUANT_STATS`` statistics on the same device (the smallest and largest code, and where a value that does
    not fit is) for :func:`check_quantized` to read once it has reached the host.

    The codes are meaningless until :func:`check_quantized` has passed on the stats."""
    x = _float_input(x, scale_log2, what)
    wide = _widen(x)
    scaled = torch.round(wide * float(2**scale_log2))
    if not scaled.numel():
        return scaled.to(torch.int32), torch.zeros(QUANT_STATS, dtype=torch.float64, device=x.device)
    flat, values = scaled.reshape(-1), wide.reshape(-1)
    lo, hi = torch.aminmax(scaled)
    nonfinite = ~torch.isfinite(flat)
    nf_at = torch.argmax(nonfinite.to(torch.uint8))  # the first non-finite value, if any
    am_at = torch.argmax(flat.abs())
    stats = torch.stack(
        [
            lo.double(),
            hi.double(),
            nonfinite.any().double(),
            nf_at.double(),
            values[nf_at].double(),
            am_at.double(),
            values[am_at].double(),
        ]
    )
    # Codes of out-of-range values are garbage until the stats are checked; clamp keeps the cast defined.
    return scaled.clamp_(-INT32_MAX, INT32_MAX).nan_to_num_(0.0).to(torch.int32), stats


def check_quantized(
    stats: Sequence[float], shape: Sequence[int], dtype: torch.dtype, scale_log2: int, *, what: str = "tensor"
) -> tuple[int, int]:
    """The smallest and largest code from :func:`quantize_device`'s ``stats`` (on the host), or the
    :class:`FixedPointError` :func:`quantize` would have raised for the same tensor."""
    lo, hi = float(stats[_Q_LO]), float(stats[_Q_HI])
    if -INT32_MAX <= lo and hi <= INT32_MAX:
        return int(lo), int(hi)
    if stats[_Q_NONFINITE]:
        pos, value = int(stats[_Q_NONFINITE_AT]), float(stats[_Q_NONFINITE_VALUE])
        _raise_not_finite(_unravel(pos, shape), value, dtype, what)
    pos, value = int(stats[_Q_ABSMAX_AT]), float(stats[_Q_ABSMAX_VALUE])
    _raise_overflow(_unravel(pos, shape), value, scale_log2, what)
    raise AssertionError("unreachable")  # pragma: no cover


def _unravel(pos: int, shape: Sequence[int]) -> tuple[int, ...]:
    idx = []
    for n in reversed(list(shape)):
        pos, r = divmod(pos, max(1, int(n)))
        idx.append(r)
    return tuple(reversed(idx))


def _raise_unrepresentable(
    wide: torch.Tensor, scaled: torch.Tensor, dtype: torch.dtype, scale_log2: int, what: str
) -> None:
    finite = torch.isfinite(wide)
    if not bool(finite.all()):
        idx = tuple(int(i) for i in torch.nonzero(~finite)[0])
        _raise_not_finite(idx, float(wide[idx]), dtype, what)
    pos = int(torch.argmax(scaled.abs().reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), scaled.shape))
    _raise_overflow(idx, float(wide[idx]), scale_log2, what)


def _raise_not_finite(idx: tuple[int, ...], value: float, dtype: torch.dtype, what: str) -> None:
    raise FixedPointError(
        f"{what}: value {value} at {_where(idx)} is not finite; zkLLM files hold finite fixed-point "
        f"numbers only. The model produced {value} in {dtype}: try --dtype float32, or check the "
        f"model and its inputs"
    )


def _raise_overflow(idx: tuple[int, ...], value: float, scale_log2: int, what: str) -> None:
    safe = largest_safe_scale(abs(value))  # from x itself: x * 2**k may have overflowed to inf
    fix = f"lower --scale-log2 to {safe} or below" if safe is not None else "the value is too large for any scale"
    raise FixedPointError(
        f"{what}: value {value:.6g} at {_where(idx)} exceeds int32 at scale 2**{scale_log2} "
        f"(max |x| < {max_abs(scale_log2):g}); {fix}, or inspect the model"
    )


def dequantize(q: torch.Tensor, scale_log2: int) -> torch.Tensor:
    """The float64 values that int32 codes ``q`` stand for."""
    return q.to(torch.float64) / float(2**scale_log2)


_EXPONENT_BITS = 0x7FF0000000000000


def ulp(values: torch.Tensor, dtype: torch.dtype, *, in_place: bool = False) -> torch.Tensor:
    """Unit in the last place of ``dtype`` at each magnitude in ``values`` (float64 out).

    With ``in_place`` the float64, non-negative ``values`` are overwritten with the result (no temporary)."""
    info = torch.finfo(dtype)
    mag = values if in_place else values.abs().to(torch.float64)
    mag.clamp_(min=info.smallest_normal)
    # Keeping only a float64's exponent bits gives 2**floor(log2 |v|), exactly: the binade's start.
    mag.view(torch.int64).bitwise_and_(_EXPONENT_BITS)
    return mag.mul_(info.eps)


def ulp_bound(q: torch.Tensor, dtype: torch.dtype, scale_log2: int, *, lsb: float, ulps: float) -> torch.Tensor:
    """Per element, in LSB: ``lsb + ulps * ulp_dtype(|v|)``, the magnitude ``|v|`` of each value taken from its
    code ``q``, widened by the half LSB its own rounding may have removed. The one home of the sum and drift
    tolerances (float64 out; ``q`` is never modified)."""
    scale = float(2**scale_log2)
    magnitude = q.to(torch.float64, copy=True).abs_().add_(0.5).div_(scale)
    return ulp(magnitude, dtype, in_place=True).mul_(ulps).mul_(scale).add_(lsb)


def sum_tolerance(
    q_sum: torch.Tensor,
    dtype: torch.dtype,
    scale_log2: int,
    *,
    quantisation_lsb: float = 1.5,
    rounding_ulps: float = 0.5,
) -> torch.Tensor:
    """Per-element bound, in LSB, on ``|q(x + y) - (q(x) + q(y))|`` when the model added in ``dtype``.

    The model's add rounds to half an ulp of the sum (``rounding_ulps``); quantising three values adds
    1.5 LSB (``quantisation_lsb``). The sum's magnitude is taken from its code, widened by the half LSB its
    own rounding may have removed.
    """
    return ulp_bound(q_sum, dtype, scale_log2, lsb=quantisation_lsb, ulps=rounding_ulps)


def drift_tolerance(
    q_model: torch.Tensor, dtype: torch.dtype, scale_log2: int, *, drift_lsb: float, drift_ulps: float
) -> torch.Tensor:
    """Per-element bound, in LSB, on how far codes derived in the int domain may drift from the model's own
    codes ``q_model``: ``drift_lsb + drift_ulps * ulp(|model value|)`` in the model's ``dtype``."""
    return ulp_bound(q_model, dtype, scale_log2, lsb=drift_lsb, ulps=drift_ulps)


@dataclass(frozen=True)
class Deviation:
    """The worst element of one identity check."""

    max_dev_lsb: float  # largest |lhs - rhs| in LSB
    max_ratio: float  # largest |lhs - rhs| / tolerance, per element; the check passes iff <= 1
    index: tuple[int, ...]  # where the ratio peaks
    tolerance_lsb: float  # the tolerance at that element

    @property
    def ok(self) -> bool:
        return self.max_ratio <= 1.0

    @classmethod
    def from_stats(cls, stats: Sequence[float], shape: Sequence[int]) -> Deviation:
        """From a check's ``DEVIATION_STATS`` statistics (as the ``*_stats`` functions return them), on the host."""
        max_dev, ratio, pos, tol = (float(v) for v in stats)
        if math.isnan(pos):  # no elements
            return cls(0.0, 0.0, (), tol)
        return cls(max_dev, ratio, _unravel(int(pos), shape), tol)


DEVIATION_STATS = 4  # max |lhs - rhs|, the largest ratio, its flat index, the tolerance there


def _empty_stats(device: torch.device, tol: float) -> torch.Tensor:
    return torch.tensor([0.0, 0.0, math.nan, tol], dtype=torch.float64, device=device)


def _block_stats(dev: torch.Tensor, tol: torch.Tensor, offset: int) -> torch.Tensor:
    """One block's worst element: ``dev`` is overwritten with the ratio. No device sync."""
    max_dev = dev.max()
    ratio = dev.div_(tol).reshape(-1)
    pos = torch.argmax(ratio)  # the first largest ratio (NaN counts as largest, and fails)
    return torch.stack([max_dev, ratio[pos], (pos + offset).double(), tol.reshape(-1)[pos]])


def _combine(blocks: list[torch.Tensor]) -> torch.Tensor:
    if len(blocks) == 1:
        return blocks[0]
    table = torch.stack(blocks)
    best = torch.argmax(table[:, 1])  # blocks are in row order: the first largest ratio overall
    return torch.stack([table[:, 0].max(), table[best, 1], table[best, 2], table[best, 3]])


def _rows_check(
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]], tensors: Sequence[torch.Tensor], empty_tol: float
) -> torch.Tensor:
    """Run ``kernel(*row blocks of tensors) -> (dev, tol)`` block by block; return the combined stats."""
    first = tensors[0]
    if first.numel() == 0:
        return _empty_stats(first.device, empty_tol)
    rows = [_as_rows(t) for t in tensors]
    cols = rows[0].shape[1]

    def one(b: slice) -> torch.Tensor:
        dev, tol = kernel(*(r[b] for r in rows))
        return _block_stats(dev, tol, b.start * cols)

    return _combine(map_blocks(one, row_blocks(rows[0]), first.device))


def _sum_kernel(q_x, q_y, q_sum, *, dtype, scale_log2, quantisation_lsb=1.5, rounding_ulps=0.5):
    # |q_sum - q_x - q_y| in float64 is exact: every term is below 2**33.
    dev = q_sum.to(torch.float64)
    dev.sub_(q_x).sub_(q_y).abs_()
    return dev, sum_tolerance(q_sum, dtype, scale_log2, quantisation_lsb=quantisation_lsb, rounding_ulps=rounding_ulps)


def sum_deviation_stats(
    q_x: torch.Tensor, q_y: torch.Tensor, q_sum: torch.Tensor, dtype: torch.dtype, scale_log2: int, **tolerance: float
) -> torch.Tensor:
    """:func:`sum_deviation` as ``DEVIATION_STATS`` statistics on the codes' device, without a device sync."""
    kernel = lambda x, y, s: _sum_kernel(x, y, s, dtype=dtype, scale_log2=scale_log2, **tolerance)  # noqa: E731
    return _rows_check(kernel, (q_x, q_y, q_sum), math.nan)


def sum_deviation(
    q_x: torch.Tensor, q_y: torch.Tensor, q_sum: torch.Tensor, dtype: torch.dtype, scale_log2: int, **tolerance: float
) -> Deviation:
    """How far ``q_sum`` is from ``q_x + q_y``, against :func:`sum_tolerance` (``tolerance``: its parameters)."""
    stats = sum_deviation_stats(q_x, q_y, q_sum, dtype, scale_log2, **tolerance)
    return Deviation.from_stats(stats.tolist(), q_sum.shape)


def equal_deviation_stats(q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """:func:`equal_deviation` as ``DEVIATION_STATS`` statistics, without a device sync."""
    if q_a.numel() == 0:
        return _empty_stats(q_a.device, 0.0)
    rows_a, rows_b = _as_rows(q_a), _as_rows(q_b)
    cols = rows_a.shape[1]

    def one(b: slice) -> torch.Tensor:
        dev = rows_a[b].to(torch.float64)
        dev = dev.sub_(rows_b[b]).abs_().reshape(-1)
        pos = torch.argmax(dev)  # the first largest difference
        return torch.stack([dev[pos], dev[pos], (pos + b.start * cols).double(), torch.zeros_like(dev[pos])])

    stats = _combine(map_blocks(one, row_blocks(rows_a), q_a.device))
    # tolerance zero: any difference is a ratio of infinity
    return torch.where(torch.arange(4, device=stats.device) == 1, torch.where(stats[0] > 0, math.inf, 0.0), stats)


def _drift_kernel(q_derived, q_model, *, dtype, scale_log2, drift_lsb, drift_ulps):
    dev = q_derived.to(torch.float64).sub_(q_model).abs_()  # exact: both below 2**31
    return dev, drift_tolerance(q_model, dtype, scale_log2, drift_lsb=drift_lsb, drift_ulps=drift_ulps)


def drift_deviation_stats(
    q_derived: torch.Tensor,
    q_model: torch.Tensor,
    dtype: torch.dtype,
    scale_log2: int,
    *,
    drift_lsb: float,
    drift_ulps: float,
) -> torch.Tensor:
    """How far codes derived in the int domain (``residuals="exact-int"``) drifted from the model's own, as
    ``DEVIATION_STATS`` statistics without a device sync. The per-element bound, in LSB, is ``drift_lsb +
    drift_ulps * ulp(|model value|)`` in the model's dtype: a fixed allowance on zkLLM's grid plus a few
    roundings of the model's own arithmetic."""
    kernel = lambda a, b: _drift_kernel(  # noqa: E731
        a, b, dtype=dtype, scale_log2=scale_log2, drift_lsb=drift_lsb, drift_ulps=drift_ulps
    )
    return _rows_check(kernel, (q_derived, q_model), float(drift_lsb))


def equal_deviation(q_a: torch.Tensor, q_b: torch.Tensor) -> Deviation:
    """Exact equality (the layer chain): tolerance zero, so any difference is a ratio of infinity."""
    return Deviation.from_stats(equal_deviation_stats(q_a, q_b).tolist(), q_a.shape)


def _rmsnorm_kernel(q_in, q_out, *, w, w_abs, eps, in_dtype, out_dtype, scale_log2, input_drift_lsb=0.0):
    # rmsnorm_deviation's formulas, in place, in the same order of operations (each row on its own)
    scale = float(2**scale_log2)
    h = (0.5 + input_drift_lsb) / scale
    x = q_in.to(torch.float64).div_(scale)
    hidden = x.shape[-1]
    rms = torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    n = x.div_(rms)
    y = n * w
    reduction = (math.ceil(math.log2(max(hidden, 2))) + 4) * torch.finfo(torch.float32).eps
    n_abs = n.abs_()
    from_input = n_abs.add(1).mul_(h).div_((rms - h).clamp(min=torch.finfo(torch.float64).tiny))
    s = n_abs.add_(from_input)  # n_abs + from_input; n_abs is not needed on its own below
    n_high = s.mul(1 + reduction)  # the largest |n| the model can have computed
    y_high = q_out.to(torch.float64).abs_().add_(0.5).div_(scale)  # the model's |y|, from its own code
    per_value = from_input.add_(s.mul_(reduction)).add_(ulp(n_high, in_dtype, in_place=True).mul_(0.5)).mul_(w_abs)
    tol = per_value.add_(ulp(y_high, out_dtype, in_place=True).mul_(0.5)).mul_(scale).add_(0.5)
    dev = q_out.to(torch.float64).sub_(y.mul_(scale)).abs_()
    return dev, tol


def rmsnorm_deviation_stats(
    q_in: torch.Tensor,
    q_out: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    in_dtype: torch.dtype,
    out_dtype: torch.dtype,
    scale_log2: int,
    *,
    input_drift_lsb: float = 0.0,
) -> torch.Tensor:
    """:func:`rmsnorm_deviation` as ``DEVIATION_STATS`` statistics, without a device sync."""
    w = weight.detach().to(device=q_in.device, dtype=torch.float64)
    kernel = lambda a, b: _rmsnorm_kernel(  # noqa: E731
        a,
        b,
        w=w,
        w_abs=w.abs(),
        eps=eps,
        in_dtype=in_dtype,
        out_dtype=out_dtype,
        scale_log2=scale_log2,
        input_drift_lsb=input_drift_lsb,
    )
    return _rows_check(kernel, (q_in, q_out), math.nan)


def rmsnorm_deviation(
    q_in: torch.Tensor,
    q_out: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    in_dtype: torch.dtype,
    out_dtype: torch.dtype,
    scale_log2: int,
    *,
    input_drift_lsb: float = 0.0,
) -> Deviation:
    """How far ``q_out`` is from ``RMSNorm(q_in / 2**k) * 2**k`` recomputed in float64.

    The per-element bound, in LSB, adds up what separates the model's output ``y = w * n`` from the
    recomputation, with ``h`` half an LSB and ``r`` the row's recomputed rms:

    - the input's quantisation: the model's ``n`` differs from ours by at most ``h (1 + |n|) / (r - h)``
      (each element moved by at most ``h``, and the rms, 1-Lipschitz, by at most ``h``);
    - the model's float32 reduction, rsqrt and multiply: ``(ceil(log2 H) + 4)`` float32 epsilons, relative
      (a pairwise-summation bound plus the elementwise steps);
    - the cast back to the input dtype (half an ulp of ``n``) and the multiply by the weight in the output
      dtype (half an ulp of ``y``), each ulp taken at the largest magnitude the model's value can have;
    - the output's own quantisation (half an LSB).

    ``input_drift_lsb`` widens ``h`` when ``q_in`` is not the model's own input but was derived from it in the
    int domain and may differ from it by up to that many LSB per element (``--residuals exact-int``).
    """
    stats = rmsnorm_deviation_stats(
        q_in, q_out, weight, eps, in_dtype, out_dtype, scale_log2, input_drift_lsb=input_drift_lsb
    )
    return Deviation.from_stats(stats.tolist(), q_out.shape)
