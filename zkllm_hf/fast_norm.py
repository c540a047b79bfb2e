"""The RMSNorm check's fast path on the CPU: ``fixed_point.rmsnorm_deviation_stats``'s four numbers, bit for
bit, from a leaner float64 kernel (about 25 passes over each block instead of 38, in reused buffers, every
operation that feeds the deviation or the bound rounding exactly as the formula's own).

Why each rewrite gives the formula's floats (docs/architecture.md, section 2, "the norm's fast path"). Every
step below multiplies or divides by a power of two, which is exact and commutes with rounding as long as no
value is subnormal (overflow commutes too: the scaled threshold is itself a rounding boundary); the
preconditions in :func:`_applies` keep every value the kernel forms at or above 2**-900 or zero:

- ``mean((q/2**k)**2) == mean(q*q) / 2**2k``, and ``(q/2**k)/rms == q/(rms * 2**k)`` (one correctly rounded
  division of the same real number);
- ``(n*w)*2**k == n*(w*2**k)``, so the deviation ``|q_out - y*2**k|`` is formed from the same product;
- with ``h = (0.5 + drift)/2**k`` a power of two, ``((|n|+1)*h)/D == (|n|+1)/(D/h)``;
- the clamp of ``n_high`` to the input dtype's smallest normal is a no-op when that is below 2**-70:
  ``n_high >= h/rms >= 2**-63`` for ``k <= 30`` and ``eps <= 2**30``;
- ``ulp(v) * 0.5`` added to ``t`` is ``t + (eps/2) * 2**floor(log2 v)``: ``add(alpha=eps/2)``, whose product
  is exact, so a fused multiply-add rounds as the separate add does;
- the bound's final ``* 2**k`` moves into the weight's magnitude (``|w| * 2**k``) and the output's ulp term;
  that ulp, ``0.5 * ulp_out((|q_out| + 0.5)/2**k) * 2**k``, is ``(eps/2) * max(2**floor(log2 |q_out|), 0.5,
  smallest_normal * 2**k)`` (``q_out`` an integer), the exponent taken straight from its float64 bits.

The kernel's blocks of rows need not be the formula's: every step is elementwise or a per-row mean over the
last dimension, which torch reduces row by row, so a row's numbers are the same in any block and at any
thread count (the tests compare at several block sizes, on 1 and 2 threads). Where a precondition does not
hold (or on another device) the float64 formula itself runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import fixed_point as fp

EXPONENT_BITS = 0x7FF0000000000000
TINY = torch.finfo(torch.float64).tiny
# At most this far from 1 (in powers of two): the weights' non-zero magnitudes, so that nothing the kernel
# forms from them is subnormal or overflows differently from the formula.
WEIGHT_EXPONENT = 800
MAX_EPS = 2.0**30
UNCLAMPED_NORMAL = 2.0**-70  # an input dtype's smallest normal below this: n_high never needs the clamp


@dataclass(frozen=True)
class _Plan:
    """The per-call constants of one norm check."""

    scale: float
    h: float
    eps: float
    w_scaled: torch.Tensor  # w * 2**k
    w_abs_scaled: torch.Tensor  # |w| * 2**k
    reduction: float
    in_half_eps: float
    in_normal: float | None  # the clamp on n_high, None when it is a no-op
    out_half_eps: float
    out_floor: float  # max(0.5, smallest_normal_out * 2**k): the least code magnitude the ulp is taken at
    h_power_of_two: bool


def _applies(q_in, q_out, weight, eps, scale_log2, input_drift_lsb) -> bool:
    if q_in.device.type != "cpu" or q_in.numel() == 0 or q_in.dtype != torch.int32 or q_out.dtype != torch.int32:
        return False
    if q_in.shape != q_out.shape or q_in.dim() < 1 or tuple(weight.shape) != (q_in.shape[-1],):
        return False
    if not (isinstance(scale_log2, int) and 0 <= scale_log2 <= 30):
        return False
    if not (math.isfinite(eps) and 0.0 <= eps <= MAX_EPS and math.isfinite(input_drift_lsb) and input_drift_lsb >= 0):
        return False
    if weight.device.type != "cpu" or not weight.dtype.is_floating_point:
        return False
    mag = weight.detach().to(torch.float64).abs()
    if not bool(torch.isfinite(mag).all()):
        return False
    nonzero = mag[mag != 0]
    return nonzero.numel() == 0 or (
        float(nonzero.min()) >= 2.0**-WEIGHT_EXPONENT and float(nonzero.max()) <= 2.0**WEIGHT_EXPONENT
    )


def _plan(weight, eps, in_dtype, out_dtype, scale_log2, input_drift_lsb, hidden) -> _Plan:
    scale = float(2**scale_log2)
    h = (0.5 + input_drift_lsb) / scale
    w = weight.detach().to(torch.float64)
    fin, fout = torch.finfo(in_dtype), torch.finfo(out_dtype)
    return _Plan(
        scale=scale,
        h=h,
        eps=eps,
        w_scaled=w * scale,
        w_abs_scaled=w.abs().mul_(scale),
        reduction=(math.ceil(math.log2(max(hidden, 2))) + 4) * torch.finfo(torch.float32).eps,
        in_half_eps=fin.eps * 0.5,
        in_normal=None if fin.smallest_normal < UNCLAMPED_NORMAL else fin.smallest_normal,
        out_half_eps=fout.eps * 0.5,
        out_floor=max(0.5, fout.smallest_normal * scale),
        h_power_of_two=math.frexp(h)[0] == 0.5,
    )


def _row_rms(qi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: _Plan) -> torch.Tensor:
    """Each row's rms as the formula forms it; ``a`` holds the codes in float64 after, ``b`` is scratch."""
    a.copy_(qi)
    torch.mul(a, a, out=b)
    return b.mean(dim=-1, keepdim=True).div_(p.scale * p.scale).add_(p.eps).sqrt_()


def _block(qi, qo, bufs, p: _Plan) -> tuple[float, float, int, float] | None:
    """(largest |dev|, largest ratio, its index in the block, the bound there) of one block, or None when a
    row's rms is not a positive finite number (the formula's NaNs: the caller runs the formula itself). The
    ratio is NaN only if the block has one (``np.argmax`` returns the first NaN, as ``torch.argmax`` does)."""
    a, b, c, d, e = bufs
    rms = _row_rms(qi, a, b, p)
    if not bool(((rms > 0) & (rms < math.inf)).all()):
        return None
    a.div_(rms * p.scale)  # n
    torch.mul(a, p.w_scaled, out=b)  # y * 2**k
    e.copy_(qo)
    torch.sub(e, b, out=b).abs_()  # dev
    a.abs_()  # |n|
    floor = (rms - p.h).clamp_(min=TINY)
    torch.add(a, 1, out=c)
    if p.h_power_of_two:
        c.div_(floor.div_(p.h))
    else:
        c.mul_(p.h).div_(floor)  # from_input
    a.add_(c)  # s = |n| + from_input
    torch.mul(a, 1 + p.reduction, out=d)  # n_high
    c.add_(a.mul_(p.reduction))
    if p.in_normal is not None:
        d.clamp_(min=p.in_normal)
    d.view(torch.int64).bitwise_and_(EXPONENT_BITS)
    c.add_(d, alpha=p.in_half_eps).mul_(p.w_abs_scaled)  # per_value * 2**k
    e.view(torch.int64).bitwise_and_(EXPONENT_BITS)
    c.add_(e.clamp_(min=p.out_floor), alpha=p.out_half_eps).add_(0.5)  # tol
    dev = b.numpy().reshape(-1)
    max_dev = float(dev.max())
    ratio = np.divide(dev, c.numpy().reshape(-1), out=dev)
    pos = int(np.argmax(ratio))  # the first largest
    return max_dev, float(ratio[pos]), pos, float(c.numpy().reshape(-1)[pos])


def rmsnorm_stats(
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
    """``fixed_point.rmsnorm_deviation_stats``, the same four numbers, by the lean kernel where it applies."""
    args = (q_in, q_out, weight, eps, in_dtype, out_dtype, scale_log2)

    def dense() -> torch.Tensor:
        return fp.rmsnorm_deviation_stats(*args, input_drift_lsb=input_drift_lsb)

    if not _applies(q_in, q_out, weight, float(eps), scale_log2, float(input_drift_lsb)):
        return dense()
    qi, qo = (t.reshape(-1, t.shape[-1]) for t in (q_in, q_out))
    rows, cols = qi.shape
    p = _plan(weight, float(eps), in_dtype, out_dtype, scale_log2, float(input_drift_lsb), cols)
    blocks = fp.row_blocks(qi)  # cache-sized; each operation split over torch's own intra-op threads
    step = max(b.stop - b.start for b in blocks)
    bufs = [torch.empty(step, cols, dtype=torch.float64) for _ in range(5)]
    best: tuple[float, float, int, float] | None = None
    max_dev = -math.inf
    for blk in blocks:
        n = blk.stop - blk.start
        got = _block(qi[blk], qo[blk], [t[:n] for t in bufs], p)
        if got is None or math.isnan(got[1]):  # (an overflowed bound times a zero weight): the formula decides
            return dense()
        max_dev = max(max_dev, got[0])
        if best is None or got[1] > best[1]:  # blocks in row order: the first largest ratio overall
            best = (got[0], got[1], got[2] + blk.start * cols, got[3])
    assert best is not None
    return torch.tensor([max_dev, best[1], float(best[2]), best[3]], dtype=torch.float64)
