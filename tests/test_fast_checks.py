"""The identity checks' fast path (zkllm_hf/fast_checks.py) against the float64 formulas it replaces.

The ``reference_*`` functions below are fixed_point.py's check formulas as they stood before the fast path
(issue 17), copied verbatim (block mapping made sequential, which does not change a number: rows are
independent). They are the oracle: for every input, the fast path must return the same four statistics (the
largest deviation, the largest ratio, the first index where it peaks, the tolerance there), and so the same
verdict and the same ``max_dev_lsb`` / ``max_dev_ratio`` in the manifest. Hypothesis drives them with
elements at the bound, one LSB either side, codes at binade edges and the int32 extremes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zkllm_hf import fast_checks as fast
from zkllm_hf import fixed_point as fp

# Reproducible in CI: a fixed sequence of examples, no example database (as tests/test_no_traceback.py).
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)

# ------------------------------------------------------------------------------------------------------------
# the oracle: fixed_point.py's formulas before the fast path, verbatim

# On the CPU, elementwise maths over a whole (seq_len, hidden) tensor streams every float64 temporary
# through memory (9 MB each at 2048 x 576) and page-faults it in fresh; blocks of whole rows this large stay
# in cache and reuse the allocator's memory. Rows are independent in every check, so the results are the
# same element for element. Elsewhere (CUDA) one block is the whole tensor.
CPU_BLOCK_ELEMENTS = 1 << 17


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(1, -1)


def reference_row_blocks(t: torch.Tensor) -> list[slice]:
    """Slices of whole rows of the 2-D ``t`` that together cover it: cache-sized on the CPU, one elsewhere."""
    rows, cols = t.shape
    if t.device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, CPU_BLOCK_ELEMENTS // max(1, cols))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]




_EXPONENT_BITS = 0x7FF0000000000000


def reference_ulp(values: torch.Tensor, dtype: torch.dtype, *, in_place: bool = False) -> torch.Tensor:
    """Unit in the last place of ``dtype`` at each magnitude in ``values`` (float64 out).

    With ``in_place`` the float64, non-negative ``values`` are overwritten with the result (no temporary)."""
    info = torch.finfo(dtype)
    mag = values if in_place else values.abs().to(torch.float64)
    mag.clamp_(min=info.smallest_normal)
    # Keeping only a float64's exponent bits gives 2**floor(log2 |v|), exactly: the binade's start.
    mag.view(torch.int64).bitwise_and_(_EXPONENT_BITS)
    return mag.mul_(info.eps)


def reference_ulp_bound(
    q: torch.Tensor, dtype: torch.dtype, scale_log2: int, *, lsb: float, ulps: float
) -> torch.Tensor:
    """Per element, in LSB: ``lsb + ulps * ulp_dtype(|v|)``, the magnitude ``|v|`` of each value taken from its
    code ``q``, widened by the half LSB its own rounding may have removed. The one home of the sum and drift
    tolerances (float64 out; ``q`` is never modified)."""
    scale = float(2**scale_log2)
    magnitude = q.to(torch.float64, copy=True).abs_().add_(0.5).div_(scale)
    return reference_ulp(magnitude, dtype, in_place=True).mul_(ulps).mul_(scale).add_(lsb)


def reference_sum_tolerance(
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
    return reference_ulp_bound(q_sum, dtype, scale_log2, lsb=quantisation_lsb, ulps=rounding_ulps)


def reference_drift_tolerance(
    q_model: torch.Tensor, dtype: torch.dtype, scale_log2: int, *, drift_lsb: float, drift_ulps: float
) -> torch.Tensor:
    """Per-element bound, in LSB, on how far codes derived in the int domain may drift from the model's own
    codes ``q_model``: ``drift_lsb + drift_ulps * reference_ulp(|model value|)`` in the model's ``dtype``."""
    return reference_ulp_bound(q_model, dtype, scale_log2, lsb=drift_lsb, ulps=drift_ulps)


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

    return _combine([one(b) for b in reference_row_blocks(rows[0])])


def _sum_kernel(q_x, q_y, q_sum, *, dtype, scale_log2, quantisation_lsb=1.5, rounding_ulps=0.5):
    # |q_sum - q_x - q_y| in float64 is exact: every term is below 2**33.
    dev = q_sum.to(torch.float64)
    dev.sub_(q_x).sub_(q_y).abs_()
    return dev, reference_sum_tolerance(
        q_sum, dtype, scale_log2, quantisation_lsb=quantisation_lsb, rounding_ulps=rounding_ulps
    )


def reference_sum_deviation_stats(
    q_x: torch.Tensor, q_y: torch.Tensor, q_sum: torch.Tensor, dtype: torch.dtype, scale_log2: int, **tolerance: float
) -> torch.Tensor:
    """the sum check as ``DEVIATION_STATS`` statistics on the codes' device, without a device sync."""
    kernel = lambda x, y, s: _sum_kernel(x, y, s, dtype=dtype, scale_log2=scale_log2, **tolerance)  # noqa: E731
    return _rows_check(kernel, (q_x, q_y, q_sum), math.nan)


def reference_equal_deviation_stats(q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """the chain check as ``DEVIATION_STATS`` statistics, without a device sync."""
    if q_a.numel() == 0:
        return _empty_stats(q_a.device, 0.0)
    rows_a, rows_b = _as_rows(q_a), _as_rows(q_b)
    cols = rows_a.shape[1]

    def one(b: slice) -> torch.Tensor:
        dev = rows_a[b].to(torch.float64)
        dev = dev.sub_(rows_b[b]).abs_().reshape(-1)
        pos = torch.argmax(dev)  # the first largest difference
        return torch.stack([dev[pos], dev[pos], (pos + b.start * cols).double(), torch.zeros_like(dev[pos])])

    stats = _combine([one(b) for b in reference_row_blocks(rows_a)])
    # tolerance zero: any difference is a ratio of infinity
    return torch.where(torch.arange(4, device=stats.device) == 1, torch.where(stats[0] > 0, math.inf, 0.0), stats)


def _drift_kernel(q_derived, q_model, *, dtype, scale_log2, drift_lsb, drift_ulps):
    dev = q_derived.to(torch.float64).sub_(q_model).abs_()  # exact: both below 2**31
    return dev, reference_drift_tolerance(q_model, dtype, scale_log2, drift_lsb=drift_lsb, drift_ulps=drift_ulps)


def reference_drift_deviation_stats(
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
    drift_ulps * reference_ulp(|model value|)`` in the model's dtype: a fixed allowance on zkLLM's grid plus a few
    roundings of the model's own arithmetic."""
    kernel = lambda a, b: _drift_kernel(  # noqa: E731
        a, b, dtype=dtype, scale_log2=scale_log2, drift_lsb=drift_lsb, drift_ulps=drift_ulps
    )
    return _rows_check(kernel, (q_derived, q_model), float(drift_lsb))


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
    per_value = (
        from_input.add_(s.mul_(reduction)).add_(reference_ulp(n_high, in_dtype, in_place=True).mul_(0.5)).mul_(w_abs)
    )
    tol = per_value.add_(reference_ulp(y_high, out_dtype, in_place=True).mul_(0.5)).mul_(scale).add_(0.5)
    dev = q_out.to(torch.float64).sub_(y.mul_(scale)).abs_()
    return dev, tol


def reference_rmsnorm_deviation_stats(
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
    """the norm check as ``DEVIATION_STATS`` statistics, without a device sync."""
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




# ------------------------------------------------------------------------------------------------------------
# inputs: codes at binade edges and the int32 extremes, deviations at the bound and one LSB either side

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SCALES = [0, 4, 16, 24, 30]
# (lsb, ulps): the contract's sum and drift bounds, a bound without its ulp term, and odd ones
BOUNDS = [(1.5, 0.5), (256.0, 4.0), (1.5, 0.0), (0.25, 0.5), (3.0, 2.0), (0.5, 1.0)]
EDGES = sorted({0, 1, 2, 3, INT32_MAX - 1, INT32_MAX} | {2**j + o for j in range(2, 31) for o in (-1, 0, 1)})


def codes(draw, wide: bool = True) -> int:
    """One code: a binade edge (either sign, -2**31 included), anywhere in int32, or a small one; with
    ``wide=False``, codes below 2**29 in magnitude, so that int32 sums of three never overflow."""
    kind = draw(st.integers(0, 3))
    if not wide:
        if kind == 0:
            return draw(st.sampled_from([e for e in EDGES if e <= 2**29])) * draw(st.sampled_from([1, -1]))
        return draw(st.integers(-(2**29), 2**29)) if kind == 1 else draw(st.integers(-40, 40))
    if kind == 0:
        return draw(st.sampled_from(EDGES)) * draw(st.sampled_from([1, -1]))
    if kind == 1:
        return draw(st.sampled_from([INT32_MIN, INT32_MIN + 1, INT32_MAX, INT32_MAX - 1]))
    if kind == 2:
        return draw(st.integers(INT32_MIN, INT32_MAX))
    return draw(st.integers(-40, 40))


def near_bound(draw, tol: float, rare: bool = False, passing: bool = False) -> int:
    """A deviation at the bound, one LSB inside or outside it, or anywhere small; with ``rare``, mostly 0 or 1
    LSB (as in a real layer, where few elements are off by more); with ``passing``, never over the bound."""
    f = math.floor(tol)
    if rare and draw(st.integers(0, 9)):
        return draw(st.sampled_from([0, 1, -1]))
    if passing:
        return draw(st.sampled_from([f, f - 1, min(f, 2), min(f, 1)])) * draw(st.sampled_from([1, -1]))
    d = draw(st.sampled_from([0, 1, 2, f, f - 1, f + 1, f + 2, None]))
    if d is None:
        d = draw(st.integers(0, max(3, 3 * f)))
    return d * draw(st.sampled_from([1, -1]))


def clamp32(v: int) -> int:
    return max(INT32_MIN, min(INT32_MAX, v))


@st.composite
def sum_cases(draw, wide: bool = True):
    """(q_x, q_y, q_sum, dtype, scale_log2, lsb, ulps): sums whose deviations sit at and around the bound.
    ``wide``: codes anywhere in int32 (the fast path mostly declines); else codes and deviations that a real
    layer has (the fast path mostly runs)."""
    dtype, k = draw(st.sampled_from(DTYPES)), draw(st.sampled_from(SCALES))
    lsb, ulps = draw(st.sampled_from(BOUNDS))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 9) if wide else st.integers(8, 24))
    pool = [codes(draw, wide) for _ in range(draw(st.integers(1, 6)))]  # few values: ties between elements
    s = [draw(st.sampled_from(pool)) if draw(st.booleans()) else codes(draw, wide) for _ in range(rows * cols)]
    tol = reference_ulp_bound(torch.tensor(s, dtype=torch.int64), dtype, k, lsb=lsb, ulps=ulps).tolist()
    x, y = [], []
    passing = draw(st.booleans())
    for si, ti in zip(s, tol):
        d = near_bound(draw, ti, rare=not wide, passing=passing)
        xi = codes(draw, wide) if draw(st.booleans()) else draw(st.integers(-1000, 1000))
        yi = si - xi - d
        if clamp32(yi) != yi:  # keep the deviation: move it all into y
            xi, yi = 0, clamp32(si - d)
        x.append(xi)
        y.append(yi)
    t = [torch.tensor(v, dtype=torch.int32).reshape(rows, cols) for v in (x, y, s)]
    return (*t, dtype, k, lsb, ulps)


@pytest.fixture(params=[1 << 17, 8], ids=["one-block", "many-blocks"])
def blocks(request, monkeypatch):
    """Run with the CPU's block size, and with blocks of one or two rows (the fast path scans block by block)."""
    monkeypatch.setattr(fp, "CPU_BLOCK_ELEMENTS", request.param)
    return request.param


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same statistics, number for number (NaN only where both have it: an empty tensor's index)."""
    return a.dtype == b.dtype == torch.float64 and all(
        u == v or (math.isnan(u) and math.isnan(v)) for u, v in zip(a.tolist(), b.tolist(), strict=True)
    )


# ------------------------------------------------------------------------------------------------------------
# the properties

@FUZZ
@given(case=st.one_of(sum_cases(), sum_cases(wide=False)))
def test_the_sum_check_gives_the_reference_numbers(blocks, case):
    q_x, q_y, q_s, dtype, k, lsb, ulps = case
    tolerance = {"quantisation_lsb": lsb, "rounding_ulps": ulps}
    want = reference_sum_deviation_stats(q_x, q_y, q_s, dtype, k, **tolerance)
    got = fast.sum_stats(q_x, q_y, q_s, dtype, k, **tolerance)
    assert same(got, want), (got.tolist(), want.tolist())
    assert (got[1] <= 1.0) == (want[1] <= 1.0)  # the verdict


@FUZZ
@given(case=st.one_of(sum_cases(), sum_cases(wide=False)))
def test_the_drift_check_gives_the_reference_numbers(blocks, case):
    _, _, q_model, dtype, k, lsb, ulps = case
    q_derived = case[0] + case[1]  # int32 wraps here; whatever it holds is an input
    bound = {"drift_lsb": lsb, "drift_ulps": ulps}
    want = reference_drift_deviation_stats(q_derived, q_model, dtype, k, **bound)
    got = fast.drift_stats(q_derived, q_model, dtype, k, **bound)
    assert same(got, want), (got.tolist(), want.tolist())


@FUZZ
@given(case=st.one_of(sum_cases(), sum_cases(wide=False)))
def test_the_exact_checks_give_the_reference_numbers(blocks, case):
    q_x, q_y, q_s = case[:3]
    # the chain: block_input[L+1] against block_output[L] (here: equal where the deviation is 0)
    want = reference_equal_deviation_stats(q_s, q_x)
    assert same(fast.equal_stats(q_s, [q_x], dense=lambda: want), want)
    chain = q_s.clone()
    chain.view(-1)[:: max(1, chain.numel() // 2)] = q_x.view(-1)[0]
    want = reference_equal_deviation_stats(chain, q_s)
    assert same(fast.equal_stats(chain, [q_s], dense=lambda: reference_equal_deviation_stats(chain, q_s)), want)
    # residuals="exact-int": the sum must hold exactly, against the int64 sum of its terms
    want = reference_equal_deviation_stats(q_s, q_x.to(torch.int64) + q_y.to(torch.int64))
    got = fast.equal_stats(q_s, [q_x, q_y], dense=lambda: reference_equal_deviation_stats(
        q_s, q_x.to(torch.int64) + q_y.to(torch.int64)))
    assert same(got, want), (got.tolist(), want.tolist())


@FUZZ
@given(
    q=st.one_of(st.sampled_from(EDGES), st.integers(INT32_MIN, INT32_MAX)),
    sign=st.sampled_from([1, -1]),
    dtype=st.sampled_from(DTYPES),
    k=st.sampled_from(SCALES),
    bound=st.sampled_from(BOUNDS),
)
def test_the_tolerance_depends_on_the_bit_length_alone(q, sign, dtype, k, bound):
    """What the fast path rests on: the float64 bound of a code is its class's entry in the table."""
    q = clamp32(q * sign)
    table = fast.tolerance_table(dtype, k, *bound)
    assert table is not None  # positive, finite and non-decreasing for every bound the contract could hold
    want = reference_ulp_bound(torch.tensor([q], dtype=torch.int32), dtype, k, lsb=bound[0], ulps=bound[1])
    assert table[abs(q).bit_length()] == float(want[0])


# ------------------------------------------------------------------------------------------------------------
# the fast path is taken (these would pass vacuously if every input fell back to the float64 formula)

def _no_dense():
    pytest.fail("the float64 formula ran on the whole tensor")


@FUZZ
@given(case=sum_cases(wide=False))
def test_the_fast_path_runs_where_it_applies(blocks, case):
    """Real-layer-like inputs (codes below 2**29, few elements off by 2 LSB or more): the numbers come from the
    fast path, never from the float64 formula on the whole tensor, and are still the reference's."""
    q_x, q_y, q_s, dtype, k, lsb, ulps = case
    off = (q_s.long() - q_x - q_y).abs() >= 2  # over 1/8 of a block of rows so: the float64 formula may run
    crowded = any(int(off[b].sum()) * fast.DENSE_FRACTION > off[b].numel() for b in fp.row_blocks(off))
    dense = (lambda: want) if crowded else _no_dense
    flat = [t.reshape(-1) for t in (q_x, q_y, q_s)]
    tolerance = {"quantisation_lsb": lsb, "rounding_ulps": ulps}
    want = reference_sum_deviation_stats(q_x, q_y, q_s, dtype, k, **tolerance)
    got = fast.ulp_bound_stats(
        q_s, [q_x, q_y], q_s, dtype, k, lsb=lsb, ulps=ulps, dense=dense,
        exact=lambda i: reference_sum_deviation_stats(*(t[i] for t in flat), dtype, k, **tolerance),
    )
    assert same(got, want), (got.tolist(), want.tolist())


def test_a_typical_float32_layer_takes_the_fast_path(blocks):
    """(A half-precision layer has |d| >= 2 almost everywhere, an ulp there being many LSB: it runs the float64
    formula on everything, as before.)"""
    dtype = torch.float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 48, generator=g, dtype=torch.float64) * 3
    x[:, 5] = x[:, 5] * 300 + 20_000  # an outlier dimension: sums far above 2**16, where an ulp is many LSB
    y = torch.randn(64, 48, generator=g, dtype=torch.float64)
    s = (x.to(dtype) + y.to(dtype)).double()  # the add the model did, rounded in its dtype
    q_x, q_y, q_s = (fp.quantize(t, 16) for t in (x.to(dtype).double(), y.to(dtype).double(), s))
    want = reference_sum_deviation_stats(q_x, q_y, q_s, dtype, 16)
    flat = [t.reshape(-1) for t in (q_x, q_y, q_s)]
    got = fast.ulp_bound_stats(
        q_s, [q_x, q_y], q_s, dtype, 16, lsb=1.5, ulps=0.5,
        exact=lambda i: reference_sum_deviation_stats(*(t[i] for t in flat), dtype, 16), dense=_no_dense,
    )
    assert same(got, want), (got.tolist(), want.tolist())
    assert fast.equal_stats(q_s, [q_s], dense=_no_dense).tolist() == [0.0, 0.0, 0.0, 0.0]


def test_a_failing_element_is_found_where_the_reference_finds_it():
    q_x = torch.zeros(4, 5, dtype=torch.int32)
    q_s = torch.full((4, 5), 7, dtype=torch.int32)
    q_y = q_s.clone()
    q_y[2, 3] -= 2  # off by 2 LSB at a small sum: over 1.5 LSB, a failure
    q_y[1, 1] -= 1  # off by 1: within the bound
    want = reference_sum_deviation_stats(q_x, q_y, q_s, torch.float32, 16)
    got = fast.sum_stats(q_x, q_y, q_s, torch.float32, 16)
    assert same(got, want) and got[1] > 1.0 and int(got[2]) == 2 * 5 + 3


@pytest.mark.parametrize(
    "values",
    [[INT32_MAX, INT32_MIN, -1], [INT32_MIN, INT32_MIN, 0], [INT32_MAX, -1, INT32_MAX - 1], [INT32_MAX - 1, 0, 0]],
    ids=["wraps", "min-min", "max", "near-max"],
)
def test_int32_extremes_give_the_reference_numbers(values):
    """Where int32 arithmetic could overflow the fast path must not be fooled (2**31 - 1 + 2**31 + 1 is 0
    modulo 2**32): it falls back to the float64 formula, or stays exact."""
    s, x, y = (torch.tensor([[v, 0, 1]], dtype=torch.int32) for v in values)
    for a, b, c in ((x, y, s), (s, x, y), (y, s, x)):
        want = reference_sum_deviation_stats(a, b, c, torch.float32, 16)
        assert same(fast.sum_stats(a, b, c, torch.float32, 16), want)
        want = reference_equal_deviation_stats(c, a.to(torch.int64) + b.to(torch.int64))
        assert same(fast.equal_stats(c, [a, b], dense=lambda a=a, b=b, c=c: reference_equal_deviation_stats(
            c, a.to(torch.int64) + b.to(torch.int64))), want)


def test_an_empty_layer_gives_the_reference_numbers():
    e = torch.zeros(0, 8, dtype=torch.int32)
    assert same(fast.sum_stats(e, e, e, torch.float32, 16), reference_sum_deviation_stats(e, e, e, torch.float32, 16))
    want = reference_equal_deviation_stats(e, e)
    assert same(fast.equal_stats(e, [e], dense=lambda: fp.equal_deviation_stats(e, e)), want)


# ------------------------------------------------------------------------------------------------------------
# the RMSNorm check's lean float64 kernel (zkllm_hf/fast_norm.py) against the formula it replaces

NORM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 0.0: h = 2**-(k+1), a power of two; 0.5 and 1.5 keep one; the others do not (the kernel's other branch)
DRIFTS = [0.0, 0.0, 0.5, 1.5, 1.0, 255.5, 3.7]
EPSES = [1e-5, 1e-6, 0.0, 1.0, 2.0**-40]


def _row(draw, cols: int, k: int) -> list[int]:
    """One row of input codes: an ordinary activation row, a row of a few LSB (rms far below 1 LSB or near
    it), a zero row, a row at the int32 extremes, or one at binade edges."""
    kind = draw(st.sampled_from(["normal", "normal", "tiny", "zero", "extreme", "edges", "outlier"]))
    if kind == "zero":
        return [0] * cols
    if kind == "tiny":
        return [draw(st.integers(-2, 2)) for _ in range(cols)]
    if kind == "extreme":
        return [draw(st.sampled_from([INT32_MAX, INT32_MIN, INT32_MIN + 1, -INT32_MAX, 0, 1])) for _ in range(cols)]
    if kind == "edges":
        return [draw(st.sampled_from(EDGES)) * draw(st.sampled_from([1, -1])) for _ in range(cols)]
    seed = draw(st.integers(0, 2**16))
    size = 2.0 ** draw(st.integers(-4, min(14, 30 - k)))
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(cols, generator=g, dtype=torch.float64) * size
    if kind == "outlier":  # SmolLM2's residual stream has a dimension near 22,500
        row[draw(st.integers(0, cols - 1))] = draw(st.sampled_from([22_500.0, -9_000.0, 2.0**14]))
    limit = 2.0 ** (31 - k) - 1
    return fp.quantize(row.clamp(-limit, limit), k).tolist()


def _weight(draw, cols: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = (0.5 + 1.5 * torch.rand(cols, generator=g, dtype=torch.float64)) * torch.where(
        torch.rand(cols, generator=g) < 0.3, -1.0, 1.0
    ).double()
    for _ in range(draw(st.integers(0, 2))):  # zeros, tiny and large weights
        w[draw(st.integers(0, cols - 1))] = draw(st.sampled_from([0.0, 1e-30, -1e-20, 300.0, 2.0**-126]))
    return w.to(dtype)


@st.composite
def norm_cases(draw):
    """(q_in, q_out, weight, eps, in_dtype, out_dtype, k, drift): outputs whose deviations sit at the bound,
    just inside and outside it, at one LSB, or anywhere; a row's outputs at the int32 extremes, or zero."""
    k = draw(st.sampled_from(SCALES))
    in_dtype, out_dtype = draw(st.sampled_from(NORM_DTYPES)), draw(st.sampled_from(NORM_DTYPES))
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 24))
    eps, drift = draw(st.sampled_from(EPSES)), draw(st.sampled_from(DRIFTS))
    q_in = torch.tensor([_row(draw, cols, k) for _ in range(rows)], dtype=torch.int32)
    weight = _weight(draw, cols, draw(st.sampled_from([torch.float32, torch.bfloat16, in_dtype])))
    # the oracle's own output and bound for an output at the recomputed value (then moved)
    x = q_in.double() / 2**k
    y_scaled = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight.double() * 2**k
    centre = y_scaled.round().clamp(INT32_MIN, INT32_MAX).to(torch.int32)
    w = weight.detach().double()
    _, tol = _rmsnorm_kernel(q_in, centre, w=w, w_abs=w.abs(), eps=eps, in_dtype=in_dtype, out_dtype=out_dtype,
                             scale_log2=k, input_drift_lsb=drift)
    out = []
    # mostly inside the bound (so that the largest ratio sits near 1, below or just above), or anything
    kinds = draw(st.sampled_from([["at", "in", "one", "zero"], ["at", "in"], ["at", "out", "in", "one", "zero",
                                                                               "any", "extreme"]]))
    for c, t in zip(centre.reshape(-1).tolist(), tol.reshape(-1).tolist()):
        t = t if math.isfinite(t) else 3.0
        kind = draw(st.sampled_from(kinds))
        if kind == "extreme":
            out.append(draw(st.sampled_from([INT32_MAX, INT32_MIN, -INT32_MAX, 0])))
            continue
        offsets = {"at": math.floor(t), "in": max(0, math.floor(t) - 1), "out": math.ceil(t) + 1, "one": 1, "zero": 0}
        off = offsets.get(kind)
        if off is None:
            off = draw(st.integers(0, max(3, 3 * int(min(t, 2**20)))))
        out.append(clamp32(c + off * draw(st.sampled_from([1, -1]))))
    q_out = torch.tensor(out, dtype=torch.int32).reshape(rows, cols)
    return q_in, q_out, weight, eps, in_dtype, out_dtype, k, drift


@pytest.fixture(params=[(1 << 17, 1), (1 << 17, 2), (8, 1), (40, 2)],
                ids=["one-block", "one-block-2-threads", "row-blocks", "few-row-blocks-2-threads"])
def norm_blocks(request, monkeypatch):
    """The block size (fixed_point's blocks, which the kernel takes), and torch's threads (which split each
    operation when it is large enough)."""
    elements, threads = request.param
    monkeypatch.setattr(fp, "CPU_BLOCK_ELEMENTS", elements)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield elements
    torch.set_num_threads(before)


@FUZZ
@given(case=norm_cases())
def test_the_norm_check_gives_the_reference_numbers(norm_blocks, case, monkeypatch):
    """The four numbers are the reference's; and they come from the lean kernel, not the formula, unless the
    formula has NaNs (a zero row with eps 0: rms 0; an overflowed bound times a zero weight)."""
    from zkllm_hf import fast_norm

    q_in, q_out, weight, eps, in_dtype, out_dtype, k, drift = case
    want = reference_rmsnorm_deviation_stats(q_in, q_out, weight, eps, in_dtype, out_dtype, k, input_drift_lsb=drift)
    nan_rows = eps == 0 and bool((q_in == 0).all(dim=-1).any())
    dense = fp.rmsnorm_deviation_stats
    if not (nan_rows or math.isnan(float(want[1]))):
        dense = lambda *a, **kw: pytest.fail("the float64 formula ran")  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(fp, "rmsnorm_deviation_stats", dense)
        got = fast_norm.rmsnorm_stats(q_in, q_out, weight, eps, in_dtype, out_dtype, k, input_drift_lsb=drift)
    assert same(got, want), (got.tolist(), want.tolist())
    assert (got[1] <= 1.0) == (want[1] <= 1.0)  # the verdict


@st.composite
def float32_norm_layers(draw):
    """A float32 norm as a model's layer has it: the output within half an LSB of the recomputed value but for
    a few elements (one LSB, or the model's float32 error at a large |y|), some rows repeated (ties between
    rows: the first must be found), an outlier dimension."""
    rows, cols = draw(st.integers(8, 40)), draw(st.integers(32, 96))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 2.0 ** draw(st.integers(-2, 3))
    x[:, draw(st.integers(0, cols - 1))] *= draw(st.sampled_from([1.0, 300.0]))
    for _ in range(draw(st.integers(0, 3))):  # repeated rows
        x[draw(st.integers(1, rows - 1))] = x[draw(st.integers(0, rows - 1))]
    w = (0.5 + 1.5 * torch.rand(cols, generator=g)).to(torch.float32)
    q_in = fp.quantize(x.float().double(), 16)
    xf = q_in.double() / 2**16
    y = (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-5) * w.double()).float().double()
    q_out = fp.quantize(y, 16)
    flat = q_out.view(-1)
    for _ in range(draw(st.integers(0, 6))):
        flat[draw(st.integers(0, flat.numel() - 1))] += draw(st.sampled_from([1, -1, 2]))
    return q_in, q_out, w, 1e-5, torch.float32, torch.float32, 16, draw(st.sampled_from([0.0, 1.0]))


@FUZZ
@given(case=float32_norm_layers())
def test_a_float32_norm_gives_the_reference_numbers(norm_blocks, case):
    from zkllm_hf import fast_norm

    q_in, q_out, weight, eps, in_dtype, out_dtype, k, drift = case
    want = reference_rmsnorm_deviation_stats(q_in, q_out, weight, eps, in_dtype, out_dtype, k, input_drift_lsb=drift)
    got = fast_norm.rmsnorm_stats(q_in, q_out, weight, eps, in_dtype, out_dtype, k, input_drift_lsb=drift)
    assert same(got, want), (got.tolist(), want.tolist())


def _layer_norm(rows: int, cols: int, dtype: torch.dtype, seed: int = 0):
    """A layer's norm as LlamaRMSNorm computes it in ``dtype`` (float32 inside), quantised at 2**16."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 2
    x[:, 7] = 22_500 + x[:, 7] * 50  # SmolLM2's residual stream has a dimension this large
    x, w = x.to(dtype), (torch.rand(cols, generator=g) + 0.5).to(dtype)
    xf = x.float()
    y = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    return fp.quantize(x, 16), fp.quantize(y, 16), w, 1e-5, dtype, dtype, 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_norm_takes_the_lean_kernel(dtype, monkeypatch):
    """A layer-sized norm (SmolLM2's width, an outlier dimension) never falls back to the formula, in several
    blocks, and gives its numbers (these would pass vacuously if every input fell back)."""
    from zkllm_hf import fast_norm

    args = _layer_norm(512, 576, dtype)
    want = reference_rmsnorm_deviation_stats(*args)
    monkeypatch.setattr(fp, "rmsnorm_deviation_stats", lambda *a, **kw: pytest.fail("the formula ran"))
    assert len(fp.row_blocks(args[0])) > 1
    got = fast_norm.rmsnorm_stats(*args)
    assert same(got, want), (got.tolist(), want.tolist())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2s_norms_give_the_reference_numbers(model_cache, dtype):
    """The real default model's 60 norms on a short prompt, captured as the layer checks see them."""
    from zkllm_hf import fast_norm
    from zkllm_hf.models import load

    lm = load(None, dtype=dtype, tokenizer=False)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0][0], out[0])))
             for layer in lm.model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.arange(100, 164).reshape(1, -1))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 2 * len(lm.model.model.layers)
    for mod, x, y in seen:
        args = (fp.quantize(x, 16), fp.quantize(y, 16), mod.weight.detach(), mod.variance_epsilon,
                x.dtype, y.dtype, 16)
        assert same(fast_norm.rmsnorm_stats(*args), reference_rmsnorm_deviation_stats(*args))


@pytest.mark.parametrize(
    "change",
    ["nan-weight", "inf-weight", "subnormal-weight", "negative-eps", "huge-eps", "int64-codes", "zero-row",
     "negative-drift"],
)
def test_where_the_lean_kernel_does_not_apply_the_formula_gives_the_numbers(change):
    """Outside the kernel's preconditions (or where the formula has NaNs) the formula itself runs: the same
    numbers, NaNs included."""
    from zkllm_hf import fast_norm

    q_in, q_out, w, eps, in_dtype, out_dtype, k = _layer_norm(6, 16, torch.float32)
    drift = 0.0
    w = w.clone()
    if change == "nan-weight":
        w[3] = math.nan
    elif change == "inf-weight":
        w[3] = math.inf
    elif change == "subnormal-weight":
        w = w.double()
        w[3] = 1e-310
    elif change == "negative-eps":
        eps = -1.0
    elif change == "huge-eps":
        eps = 2.0**40
    elif change == "int64-codes":
        q_in, q_out = q_in.long(), q_out.long()
    elif change == "zero-row":
        q_in[2] = 0
        eps = 0.0
    else:
        drift = -0.25
    want = reference_rmsnorm_deviation_stats(q_in, q_out, w, eps, in_dtype, out_dtype, k, input_drift_lsb=drift)
    got = fast_norm.rmsnorm_stats(q_in, q_out, w, eps, in_dtype, out_dtype, k, input_drift_lsb=drift)
    assert same(got, want), (got.tolist(), want.tolist())


def test_an_empty_norm_gives_the_reference_numbers():
    from zkllm_hf import fast_norm

    e = torch.zeros(0, 8, dtype=torch.int32)
    w = torch.ones(8)
    want = reference_rmsnorm_deviation_stats(e, e, w, 1e-5, torch.float32, torch.float32, 16)
    assert same(fast_norm.rmsnorm_stats(e, e, w, 1e-5, torch.float32, torch.float32, 16), want)
