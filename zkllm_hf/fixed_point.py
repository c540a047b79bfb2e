"""Float ↔ zkLLM fixed point, and the error bounds of the identities in the int domain. Pure functions.

zkLLM's ``fileio_utils.save_int`` stores ``round(x * 2**k)`` as int32. We do the same, round half to even
(as ``torch.round`` does), and refuse what would not survive the cast: NaN, Inf, and any value whose
rounded magnitude exceeds ``2**31 - 1``. Nothing is wrapped or clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INT32_MAX = 2**31 - 1
MIN_SCALE_LOG2 = 0
MAX_SCALE_LOG2 = 30


class FixedPointError(ValueError):
    """A value cannot be stored as int32 at the requested scale (overflow, NaN or Inf)."""


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


def quantize(x: torch.Tensor, scale_log2: int, *, what: str = "tensor") -> torch.Tensor:
    """``round(x * 2**scale_log2)`` as int32, half to even, on ``x``'s own device.

    Raises :class:`FixedPointError` naming ``what``, the offending value, its position and the fix.
    """
    return quantize_with_range(x, scale_log2, what=what)[0]


def quantize_with_range(x: torch.Tensor, scale_log2: int, *, what: str = "tensor") -> tuple[torch.Tensor, int, int]:
    """:func:`quantize`, plus the smallest and largest code, from the one reduction the range check needs."""
    check_scale(scale_log2)
    x = x.detach()
    if not x.is_floating_point():
        raise TypeError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    # Multiplying by a power of two is exact in float32 and float64; half types are widened first.
    wide = x if x.dtype == torch.float64 else x.to(torch.float32)
    scaled = torch.round(wide * float(2**scale_log2))
    if not scaled.numel():
        return scaled.to(torch.int32), 0, 0
    # One reduction, one device sync: aminmax propagates NaN, and NaN, Inf and overflow all fail the test.
    lo, hi = (float(v) for v in torch.stack(torch.aminmax(scaled)).tolist())
    if not (-INT32_MAX <= lo and hi <= INT32_MAX):
        _raise_unrepresentable(wide, scaled, x.dtype, scale_log2, what)
    return scaled.to(torch.int32), int(lo), int(hi)


def _raise_unrepresentable(
    wide: torch.Tensor, scaled: torch.Tensor, dtype: torch.dtype, scale_log2: int, what: str
) -> None:
    finite = torch.isfinite(wide)
    if not bool(finite.all()):
        idx = tuple(int(i) for i in torch.nonzero(~finite)[0])
        value = float(wide[idx])
        raise FixedPointError(
            f"{what}: value {value} at {_where(idx)} is not finite; zkLLM files hold finite fixed-point "
            f"numbers only. The model produced {value} in {dtype}: try --dtype float32, or check the "
            f"model and its inputs"
        )
    pos = int(torch.argmax(scaled.abs().reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), scaled.shape))
    value = float(wide[idx])
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


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of ``dtype`` at each magnitude in ``values`` (float64 in, float64 out)."""
    info = torch.finfo(dtype)
    mag = values.abs().to(torch.float64).clamp(min=info.smallest_normal)
    # Keeping only a float64's exponent bits gives 2**floor(log2 |v|), exactly: the binade's start.
    binade = (mag.view(torch.int64) & _EXPONENT_BITS).view(torch.float64)
    return binade * info.eps


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
    scale = float(2**scale_log2)
    magnitude = (q_sum.to(torch.float64).abs() + 0.5) / scale
    return quantisation_lsb + rounding_ulps * ulp(magnitude, dtype) * scale


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


def _worst(dev: torch.Tensor, tol: torch.Tensor) -> Deviation:
    if dev.numel() == 0:
        return Deviation(0.0, 0.0, (), float("nan"))
    ratio = dev / tol
    pos = int(torch.argmax(ratio.reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), ratio.shape))
    return Deviation(float(dev.max()), float(ratio[idx]), idx, float(tol[idx]))


def sum_deviation(
    q_x: torch.Tensor, q_y: torch.Tensor, q_sum: torch.Tensor, dtype: torch.dtype, scale_log2: int, **tolerance: float
) -> Deviation:
    """How far ``q_sum`` is from ``q_x + q_y``, against :func:`sum_tolerance` (``tolerance``: its parameters)."""
    dev = (q_sum.to(torch.int64) - q_x.to(torch.int64) - q_y.to(torch.int64)).abs().to(torch.float64)
    return _worst(dev, sum_tolerance(q_sum, dtype, scale_log2, **tolerance))


def drift_deviation(
    q_derived: torch.Tensor,
    q_model: torch.Tensor,
    dtype: torch.dtype,
    scale_log2: int,
    *,
    drift_lsb: float,
    drift_ulps: float,
) -> Deviation:
    """How far codes derived in the int domain (``--residuals exact-int``) drifted from the model's own.

    The per-element bound, in LSB, is ``drift_lsb + drift_ulps * ulp(|model value|)`` in the model's dtype:
    a fixed allowance on zkLLM's grid plus a few roundings of the model's own arithmetic.
    """
    dev = (q_derived.to(torch.int64) - q_model.to(torch.int64)).abs().to(torch.float64)
    scale = float(2**scale_log2)
    magnitude = (q_model.to(torch.float64).abs() + 0.5) / scale
    return _worst(dev, drift_lsb + drift_ulps * ulp(magnitude, dtype) * scale)


def equal_deviation(q_a: torch.Tensor, q_b: torch.Tensor) -> Deviation:
    """Exact equality (the layer chain): tolerance zero, so any difference is a ratio of infinity."""
    dev = (q_a.to(torch.int64) - q_b.to(torch.int64)).abs().to(torch.float64)
    if dev.numel() == 0:
        return Deviation(0.0, 0.0, (), 0.0)
    pos = int(torch.argmax(dev.reshape(-1)))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(pos), dev.shape))
    worst = float(dev[idx])
    return Deviation(worst, math.inf if worst else 0.0, idx, 0.0)


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
    scale = float(2**scale_log2)
    h = (0.5 + input_drift_lsb) / scale
    x = q_in.to(torch.float64) / scale
    hidden = x.shape[-1]
    rms = torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps)
    n = x / rms
    w = weight.detach().to(device=x.device, dtype=torch.float64)
    y = w * n
    reduction = (math.ceil(math.log2(max(hidden, 2))) + 4) * torch.finfo(torch.float32).eps
    n_abs = n.abs()
    from_input = h * (1 + n_abs) / (rms - h).clamp(min=torch.finfo(torch.float64).tiny)
    n_high = (n_abs + from_input) * (1 + reduction)  # the largest |n| the model can have computed
    y_high = (q_out.to(torch.float64).abs() + 0.5) / scale  # the model's |y|, from its own code
    per_value = w.abs() * (from_input + reduction * (n_abs + from_input) + 0.5 * ulp(n_high, in_dtype))
    tol = 0.5 + (per_value + 0.5 * ulp(y_high, out_dtype)) * scale
    dev = (q_out.to(torch.float64) - y * scale).abs()
    return _worst(dev, tol)
