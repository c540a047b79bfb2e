"""Property tests of the pure functions in ``zkllm_hf.fixed_point``.

Every expected value is recomputed independently of the code under test: exact rational arithmetic
(``fractions.Fraction``, whose ``round`` is half to even), ``torch.nextafter`` / ``numpy.spacing`` for
float gaps, or reasoning from the definitions (e.g. ulp(m) <= eps * m for a normal m).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from zkllm_hf.fixed_point import (
    FixedPointError,
    check_scale,
    dequantize,
    equal_deviation,
    largest_safe_scale,
    quantize,
    quantize_with_range,
    rmsnorm_deviation,
    sum_deviation,
    ulp,
)

I32 = 2**31 - 1
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scales = st.integers(min_value=0, max_value=30)


# ----------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------


def ref_code(v: float, k: int) -> int:
    """round(v * 2**k), half to even, in exact rational arithmetic."""
    return round(Fraction(v) * 2**k)


def ref_safe_scale(a: float) -> int | None:
    """Largest k in [0, 30] at which ``a`` rounds (half to even) to a code of magnitude <= 2**31 - 1."""
    for k in range(30, -1, -1):
        if abs(ref_code(a, k)) <= I32:
            return k
    return None


def f32_at_most(b: float) -> float:
    """The largest float32 that is <= b (b > 0)."""
    v = np.float32(b)
    if float(v) > b:
        v = np.nextafter(v, np.float32(0))
    return float(v)


def numbers_in(msg: str) -> list[float]:
    out = []
    for tok in re.findall(r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)", msg):
        try:
            out.append(float(tok))
        except ValueError:
            pass
    return out


def mentions_value(msg: str, value: float) -> bool:
    return any(math.isclose(n, value, rel_tol=1e-5) for n in numbers_in(msg))


@st.composite
def shaped(draw, elements, max_side=6):
    """A 1-D or 2-D list of values with its shape."""
    if draw(st.booleans()):
        shape = (draw(st.integers(1, max_side * 2)),)
    else:
        shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    n = math.prod(shape)
    vals = draw(st.lists(elements, min_size=n, max_size=n))
    return shape, vals


def fit_width(b: float, width: int) -> float:
    return f32_at_most(b) if width == 32 else b


def spread(bound: float, width: int):
    """Floats in [-bound, bound], mixing uniform-ish draws with small magnitudes."""
    parts = [bound, min(bound, 1.0), min(bound, 2.0**-10)]
    return st.one_of(
        *[
            st.floats(-fit_width(b, width), fit_width(b, width), width=width, allow_nan=False)
            for b in parts
        ]
    )


@st.composite
def fitting_tensor(draw, dtype):
    """(k, x): a float32/float64 tensor of values whose codes fit int32 at scale k."""
    k = draw(scales)
    bound = I32 / 2**k
    if dtype == torch.float32:
        bound = f32_at_most(bound)
        shape, vals = draw(shaped(spread(bound, 32)))
    else:
        shape, vals = draw(shaped(spread(bound, 64)))
    return k, torch.tensor(vals, dtype=dtype).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# 1. quantize: exactness, round trip, dtype, shapes, half types
# ----------------------------------------------------------------------------------------------------


@FAST
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_quantize_matches_exact_rounding_and_round_trips(data, dtype):
    k, x = data.draw(fitting_tensor(dtype))
    q = quantize(x, k)
    assert q.dtype == torch.int32
    assert q.shape == x.shape
    xs = [float(v) for v in x.reshape(-1).tolist()]
    codes = q.reshape(-1).tolist()
    back = dequantize(q, k)
    assert back.dtype == torch.float64
    half_lsb = Fraction(1, 2 ** (k + 1))
    for v, c, b in zip(xs, codes, back.reshape(-1).tolist()):
        assert c == ref_code(v, k)
        assert Fraction(b) == Fraction(c, 2**k)  # dequantize is exact
        assert abs(Fraction(b) - Fraction(v)) <= half_lsb


@FAST
@given(
    k=st.integers(0, 30),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    shape_vals=shaped(st.floats(-60000.0, 60000.0, width=32)),
)
def test_half_types_quantise_as_their_float32_widening(k, dtype, shape_vals):
    shape, vals = shape_vals
    x = torch.tensor(vals, dtype=torch.float32).to(dtype).reshape(shape)
    wide = x.to(torch.float32)
    assume(bool(torch.isfinite(wide).all()))
    assume(float(wide.abs().max()) * 2**k < 2**31 - 1)
    q = quantize(x, k)
    assert q.dtype == torch.int32
    assert torch.equal(q, quantize(wide, k))
    assert q.reshape(-1).tolist() == [ref_code(float(v), k) for v in wide.reshape(-1).tolist()]


def test_quantize_rejects_integer_tensors_and_keeps_shape_of_empty():
    with pytest.raises(TypeError):
        quantize(torch.tensor([1, 2, 3]), 16)
    e = quantize(torch.zeros((0, 4)), 16)
    assert e.dtype == torch.int32 and e.shape == (0, 4)


def test_quantize_detaches_grad_tensors():
    x = torch.tensor([0.25, -1.5], requires_grad=True)
    q = quantize(x, 4)
    assert q.tolist() == [4, -24] and not q.requires_grad


# ----------------------------------------------------------------------------------------------------
# 2. monotone
# ----------------------------------------------------------------------------------------------------


@FAST
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_quantize_is_monotone(data, dtype):
    k, x = data.draw(fitting_tensor(dtype))
    bound = I32 / 2**k
    width = 32 if dtype == torch.float32 else 64
    if dtype == torch.float32:
        bound = f32_at_most(bound)
    z = torch.tensor(
        data.draw(st.lists(spread(bound, width), min_size=x.numel(), max_size=x.numel())), dtype=dtype
    ).reshape(x.shape)
    y = torch.maximum(x, z)
    assert bool((x <= y).all())
    assert bool((quantize(x, k) <= quantize(y, k)).all())


# ----------------------------------------------------------------------------------------------------
# 3. round half to even
# ----------------------------------------------------------------------------------------------------


@FAST
@given(n=st.integers(-(2**31 - 1), 2**31 - 2), k=scales)
def test_exact_halves_round_to_even_float64(n, k):
    v = (n + 0.5) / 2**k  # exact in float64
    assert Fraction(v) == (Fraction(n) + Fraction(1, 2)) / 2**k
    expected = n if n % 2 == 0 else n + 1
    assert expected == round(Fraction(2 * n + 1, 2))  # independent check of the even rule
    q = quantize(torch.tensor([v], dtype=torch.float64), k)
    assert q.item() == expected
    assert q.item() % 2 == 0


@FAST
@given(n=st.integers(-(2**23) + 1, 2**23 - 2), k=st.integers(0, 30))
def test_exact_halves_round_to_even_float32(n, k):
    v = np.float32((n + 0.5) / 2**k)
    assert Fraction(float(v)) == (Fraction(n) + Fraction(1, 2)) / 2**k  # representable
    q = quantize(torch.tensor([float(v)], dtype=torch.float32), k)
    assert q.item() == (n if n % 2 == 0 else n + 1)


def test_round_half_even_small_examples():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 0.50000006], dtype=torch.float32)
    assert quantize(x, 0).tolist() == [0, 2, 2, 0, -2, -2, 0, 1]
    # at scale 2: 0.125 = 0.5 LSB -> 0, 0.375 = 1.5 LSB -> 2
    assert quantize(torch.tensor([0.125, 0.375, -0.625]), 2).tolist() == [0, 2, -2]


# ----------------------------------------------------------------------------------------------------
# 4. exact overflow boundaries, error message, largest_safe_scale
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 7, 16, 23, 30])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_float64_int32_boundary(k, sign):
    ok = sign * (2**31 - 1) / 2**k
    assert quantize(torch.tensor([ok], dtype=torch.float64), k).item() == sign * (2**31 - 1)
    # the largest float64 below (2**31 - 0.5) / 2**k still rounds to 2**31 - 1
    below = sign * float(np.nextafter((2**31 - 0.5), 0.0)) / 2**k
    assert quantize(torch.tensor([below], dtype=torch.float64), k).item() == sign * (2**31 - 1)
    bad = sign * (2**31 - 0.5) / 2**k  # a tie: rounds half to even up to 2**31
    assert ref_code(bad, k) == sign * 2**31
    with pytest.raises(FixedPointError):
        quantize(torch.tensor([bad], dtype=torch.float64), k)


def test_float32_boundary_at_scale_16():
    x_bad = torch.tensor([1.0, 32768.0], dtype=torch.float32)
    with pytest.raises(FixedPointError) as exc:
        quantize(x_bad, 16, what="layer 3 attn input")
    msg = str(exc.value)
    assert "layer 3 attn input" in msg
    assert mentions_value(msg, 32768.0)
    assert "16" in msg
    assert "lower --scale-log2" in msg
    assert "to 15" in msg  # 32768 = 2**15 fits at 2**15 (2**30) and not at 2**16 (2**31)
    assert "index [1]" in msg

    top = np.nextafter(np.float32(32768.0), np.float32(0.0))
    assert float(top) == 32768.0 - 2**-9  # float32 spacing in [2**14, 2**15) is 2**-9
    q = quantize(torch.tensor([float(top), -float(top)], dtype=torch.float32), 16)
    assert q.tolist() == [2**31 - 2**7, -(2**31 - 2**7)]
    with pytest.raises(FixedPointError):
        quantize(torch.tensor([-32768.0]), 16)


def test_overflow_message_names_2d_position():
    x = torch.zeros(3, 5)
    x[2, 4] = -40000.0
    with pytest.raises(FixedPointError) as exc:
        quantize(x, 16, what="mlp out")
    msg = str(exc.value)
    assert "mlp out" in msg and "token 2, dim 4" in msg
    assert mentions_value(msg, -40000.0)
    assert "lower --scale-log2 to 15" in msg


@FAST
@given(
    k=st.integers(1, 30),
    mult=st.floats(1.0, 1e6, allow_nan=False),
    sign=st.sampled_from([1.0, -1.0]),
    shape=st.sampled_from([(1,), (4,), (2, 3)]),
)
def test_overflow_message_suggests_a_scale_that_works(k, mult, sign, shape):
    v = sign * (2**31 - 0.5) * mult / 2**k
    assume(abs(ref_code(v, k)) > I32)
    x = torch.zeros(shape, dtype=torch.float64)
    x.view(-1)[-1] = v
    with pytest.raises(FixedPointError) as exc:
        quantize(x, k, what="probe")
    msg = str(exc.value)
    assert "probe" in msg and str(k) in msg
    assert mentions_value(msg, v)
    m = re.search(r"lower --scale-log2 to (\d+)", msg)
    expected = ref_safe_scale(abs(v))
    if expected is None:
        assert m is None
    else:
        assert m is not None
        suggested = int(m.group(1))
        assert suggested < k
        quantize(x, suggested)  # the advice works
        assert suggested == expected  # and is the largest scale that does


def test_overflow_message_suggests_the_largest_scale():
    # (2**32 - 1.25) / 2**16 rounds to 2**32 - 1 at scale 16 (overflow) but to 2**31 - 1 at scale 15.
    v = (2**32 - 1.25) / 2**16
    assert ref_safe_scale(v) == 15
    x = torch.tensor([v], dtype=torch.float64)
    assert quantize(x, 15).item() == 2**31 - 1
    with pytest.raises(FixedPointError) as exc:
        quantize(x, 16)
    assert "lower --scale-log2 to 15" in str(exc.value)


def _boundary_amax():
    j = st.integers(0, 30)
    off = st.integers(-3, 3)

    def near(center_num, jj, steps):
        v = center_num / 2**jj
        for _ in range(abs(steps)):
            v = float(np.nextafter(v, np.inf if steps > 0 else 0.0))
        return v

    return st.one_of(
        st.floats(0.0, 2.0**32, allow_nan=False),
        st.floats(0.0, 4.0, allow_nan=False),
        st.builds(lambda jj, s: near(2**31 - 0.5, jj, s), j, off),
        st.builds(lambda jj, s: near(2**31 - 1, jj, s), j, off),
    )


@settings(max_examples=150, deadline=None)
@given(amax=_boundary_amax())
@example(amax=0.0)
@example(amax=2**31 - 1.0)
@example(amax=2**31 - 0.5)
@example(amax=(2**31 - 0.5) / 2**30)
def test_largest_safe_scale_consistent_with_quantize(amax):
    s = largest_safe_scale(amax)
    assert s == ref_safe_scale(amax)
    x64 = torch.tensor([amax, -amax], dtype=torch.float64)
    if s is None:
        with pytest.raises(FixedPointError):
            quantize(x64, 0)
        return
    quantize(x64, s)
    if s < 30:
        with pytest.raises(FixedPointError):
            quantize(x64, s + 1)
    # also for float32 values (exact widening)
    a32 = np.float32(amax)
    s32 = largest_safe_scale(float(a32))
    if s32 is not None:
        quantize(torch.tensor([float(a32)]), s32)
        if s32 < 30:
            with pytest.raises(FixedPointError):
                quantize(torch.tensor([float(a32)]), s32 + 1)


def test_largest_safe_scale_of_non_finite_or_large_value_is_none():
    assert largest_safe_scale(math.inf) is None
    assert largest_safe_scale(2.0**31) is None
    assert largest_safe_scale(1e30) is None


def test_largest_safe_scale_of_huge_value_is_none():
    assert largest_safe_scale(1e300) is None


@pytest.mark.parametrize(
    "value,dtype,k",
    [
        (1e34, torch.float32, 16),  # x * 2**16 overflows float32 to inf
        (3e38, torch.float32, 1),
        (-3e38, torch.float32, 30),
        (1e38, torch.bfloat16, 16),
        (6e4, torch.float16, 30),
        (1e30, torch.float64, 0),
        (1e300, torch.float64, 0),
        (-1.7e308, torch.float64, 30),
    ],
)
def test_huge_finite_values_raise_fixed_point_error(value, dtype, k):
    x = torch.tensor([0.0, value], dtype=dtype)
    assert bool(torch.isfinite(x).all())
    with pytest.raises(FixedPointError) as exc:
        quantize(x, k, what="huge")
    msg = str(exc.value)
    assert "huge" in msg and "index [1]" in msg
    safe = ref_safe_scale(abs(float(x[1])))
    if safe is None:
        assert "lower --scale-log2" not in msg  # no scale can hold it
    else:
        assert f"lower --scale-log2 to {safe} " in msg


@FAST
@given(
    v=st.floats(2.0**31, f32_at_most(3.4e38), width=32),
    sign=st.sampled_from([1.0, -1.0]),
    k=scales,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_any_finite_float32_too_large_for_every_scale_raises_fixed_point_error(v, sign, k, dtype):
    x = torch.tensor([sign * v], dtype=torch.float32).to(dtype)
    assume(bool(torch.isfinite(x).all()))
    with pytest.raises(FixedPointError):
        quantize(x, k)


# ----------------------------------------------------------------------------------------------------
# 5. NaN / Inf
# ----------------------------------------------------------------------------------------------------


@FAST
@given(
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    two_d=st.booleans(),
    rows=st.integers(1, 5),
    cols=st.integers(1, 7),
    data=st.data(),
    k=scales,
)
def test_non_finite_values_raise_with_position(bad, dtype, two_d, rows, cols, data, k):
    shape = (rows, cols) if two_d else (rows * cols,)
    x = torch.zeros(shape, dtype=dtype)
    if two_d:
        i, j = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
        x[i, j] = bad
        where = f"token {i}, dim {j}"
    else:
        i = data.draw(st.integers(0, rows * cols - 1))
        x[i] = bad
        where = f"index [{i}]"
    with pytest.raises(FixedPointError) as exc:
        quantize(x, k, what="hidden states")
    msg = str(exc.value)
    assert "hidden states" in msg
    assert where in msg
    assert repr(float(bad)) in msg  # 'nan', 'inf' or '-inf'


# ----------------------------------------------------------------------------------------------------
# 6. check_scale
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [True, False, 16.0, "16", None, np.int64(16), 1.5])
def test_check_scale_rejects_non_ints(bad):
    with pytest.raises(TypeError):
        check_scale(bad)
    with pytest.raises(TypeError):
        quantize(torch.ones(2), bad)


@pytest.mark.parametrize("bad", [-1, 31, -100, 64])
def test_check_scale_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        check_scale(bad)
    with pytest.raises(ValueError):
        quantize(torch.ones(2), bad)


@given(k=scales)
@settings(max_examples=31, deadline=None)
def test_check_scale_accepts_0_to_30(k):
    assert check_scale(k) == k


# ----------------------------------------------------------------------------------------------------
# 7. ulp
# ----------------------------------------------------------------------------------------------------

FLOAT_TYPES = [torch.float32, torch.float16, torch.bfloat16]


def gap_up(t: torch.Tensor) -> torch.Tensor:
    """Distance from each value of t to the next representable value above, in float64."""
    nxt = torch.nextafter(t, torch.full_like(t, math.inf))
    return nxt.to(torch.float64) - t.to(torch.float64)


@FAST
@given(
    dtype=st.sampled_from(FLOAT_TYPES),
    vals=st.lists(st.floats(0.0, f32_at_most(3e38), width=32, allow_nan=False), min_size=1, max_size=20),
)
def test_ulp_is_gap_to_next_value(dtype, vals):
    t = torch.tensor(vals, dtype=torch.float32).to(dtype)
    info = torch.finfo(dtype)
    t = t[torch.isfinite(t) & (t.to(torch.float64) >= info.smallest_normal) & (t < info.max)]
    assume(t.numel() > 0)
    expected = gap_up(t)
    got = ulp(t.to(torch.float64), dtype)
    assert got.dtype == torch.float64
    assert torch.equal(got, expected)
    assert torch.equal(ulp(-t.to(torch.float64), dtype), expected)  # sign does not matter
    assert torch.equal(ulp(t, dtype), expected)  # input in the dtype itself
    if dtype in (torch.float32, torch.float16):
        np_dtype = np.float32 if dtype == torch.float32 else np.float16
        sp = np.spacing(t.to(torch.float32).numpy().astype(np_dtype)).astype(np.float64)
        assert np.array_equal(got.numpy(), sp)


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_ulp_known_values_and_subnormals(dtype):
    info = torch.finfo(dtype)
    one = ulp(torch.tensor([1.0, 1.5, 2.0, 0.75], dtype=torch.float64), dtype)
    e = info.eps
    assert one.tolist() == [e, e, 2 * e, e / 2]
    # below the normal range the gap is the smallest subnormal, the same everywhere (zero included)
    tiny = torch.tensor([0.0, info.smallest_normal / 4], dtype=dtype)
    assert torch.equal(ulp(tiny.to(torch.float64), dtype), gap_up(tiny))


# ----------------------------------------------------------------------------------------------------
# 8. sum_deviation
# ----------------------------------------------------------------------------------------------------


def _operand(bound, width):
    return st.one_of(
        st.floats(-fit_width(bound, width), fit_width(bound, width), width=width),
        st.floats(-1.0, 1.0, width=width),
        st.builds(lambda m, e: m * 2.0**e, st.floats(-2.0, 2.0, width=width), st.integers(-20, 14)),
    )


@st.composite
def sum_case(draw, dtype):
    k = draw(st.integers(0, 30))
    lim = 2.0 ** (31 - k)
    rows, cols = draw(st.sampled_from([(1, 1), (1, 7), (3, 5), (16, 1), (4, 4)]))
    n = rows * cols
    xs = draw(st.lists(_operand(0.74 * lim, 32), min_size=n, max_size=n))
    ys = draw(st.lists(_operand(0.24 * lim, 32), min_size=n, max_size=n))
    x = torch.tensor(xs, dtype=torch.float32).to(dtype).reshape(rows, cols)
    y = torch.tensor(ys, dtype=torch.float32).to(dtype).reshape(rows, cols)
    x = torch.clamp(x, -0.74 * lim, 0.74 * lim)
    y = torch.clamp(y, -0.24 * lim, 0.24 * lim)
    if draw(st.booleans()):
        x, y = x.reshape(-1), y.reshape(-1)
    return k, x, y


def _check_sum(k, x, y, dtype, data):
    s = x + y  # the model's add, in dtype
    assert s.dtype == dtype
    qx, qy, qs = quantize(x, k), quantize(y, k), quantize(s, k)
    d = sum_deviation(qx, qy, qs, dtype, k)
    assert d.ok, d
    assert d.max_ratio <= 1.0

    # the deviation it reports is the real worst one
    real = (qs.to(torch.int64) - qx.to(torch.int64) - qy.to(torch.int64)).abs()
    assert d.max_dev_lsb == float(real.max())

    # corrupt one element by clearly more than any valid tolerance: the worst valid tolerance is
    # 1.5 + 0.5 ulp(s) in LSB <= 1.5 + eps/2 * (|code| + 0.5) (+ a subnormal floor far below 1 LSB)
    flat_pos = data.draw(st.integers(0, qs.numel() - 1))
    idx = tuple(int(i) for i in np.unravel_index(flat_pos, tuple(qs.shape)))
    c = int(qs[idx])
    eps = torch.finfo(dtype).eps
    delta = math.ceil((4 + eps * (abs(c) + 1)) / (1 - eps / 2)) + data.draw(st.integers(1, 3))
    c_bad = c + delta if c >= 0 else c - delta
    assume(abs(c_bad) <= I32)
    bad = qs.clone()
    bad[idx] = c_bad
    d_bad = sum_deviation(qx, qy, bad, dtype, k)
    assert not d_bad.ok
    assert d_bad.max_ratio > 1.0
    assert d_bad.index == idx
    assert d_bad.tolerance_lsb <= 1.5 + eps / 2 * (abs(c_bad) + 0.5) + 1e-3


@FAST
@given(case=sum_case(torch.float32), data=st.data())
@example(
    case=(16, torch.tensor([2e4, -2e4, 12345.678, 0.1]), torch.tensor([7000.3, 1e-4, -3.3e3, 0.2])),
    data=None,
).via("large float32 operands at 2**16")
def test_sum_deviation_float32(case, data):
    k, x, y = case
    if data is None:
        _check_sum_no_data(k, x, y, torch.float32)
    else:
        _check_sum(k, x, y, torch.float32, data)


def _check_sum_no_data(k, x, y, dtype):
    s = x + y
    d = sum_deviation(quantize(x, k), quantize(y, k), quantize(s, k), dtype, k)
    assert d.ok, d


@FAST
@given(case=sum_case(torch.bfloat16), data=st.data())
def test_sum_deviation_bfloat16(case, data):
    k, x, y = case
    _check_sum(k, x, y, torch.bfloat16, data)


def test_sum_deviation_large_float32_needs_ulp_tolerance():
    # 20000.x in float32 has an ulp of 2**-9, i.e. 128 LSB at 2**16: the sum may be off by 64 LSB
    k = 16
    x = torch.tensor([20000.0 + 2**-9], dtype=torch.float32)
    y = torch.tensor([2**-10 + 2**-16], dtype=torch.float32)
    s = x + y
    qx, qy, qs = quantize(x, k), quantize(y, k), quantize(s, k)
    dev = abs(int(qs) - int(qx) - int(qy))
    assert dev > 3  # far beyond three half-LSB quantisation errors
    assert sum_deviation(qx, qy, qs, torch.float32, k).ok


# ----------------------------------------------------------------------------------------------------
# 9. rmsnorm_deviation
# ----------------------------------------------------------------------------------------------------


def hf_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' own LlamaRMSNorm, with weight ``w``, on ``x``."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(w.shape[-1], eps=eps).to(w.dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        return norm(x)


# Row magnitudes, in LSB of the chosen scale: from rows of a few dozen LSB up to millions of LSB. Below
# a few LSB of rms the bound still holds (rows near zero are included).
ROW_RMS_LSB = [0.0, 1.0, 4.0, 32.0, 2.0**8, 2.0**10, 2.0**12, 2.0**14, 2.0**16, 2.0**18, 2.0**20]


@st.composite
def rms_case(draw, dtype, on_grid):
    """(k, eps, x, w): x of shape (T, H) in dtype, rows of very different magnitudes.

    ``on_grid`` rounds x to a multiple of 2**-k before the cast, so that its quantisation is exact.
    """
    T = draw(st.integers(1, 5))
    H = draw(st.sampled_from([16, 64, 128]))
    seed = draw(st.integers(0, 2**31 - 1))
    eps = draw(st.sampled_from([1e-5, 1e-6]))
    k = draw(st.sampled_from([12, 16, 18]))
    lsb = 2.0**-k
    row_scales = [draw(st.sampled_from([1.0, 3.0, 10.0]))]  # one ordinary row (wrong norms show there)
    row_scales += [draw(st.sampled_from(ROW_RMS_LSB)) * lsb for _ in range(T - 1)]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, dtype=torch.float64) * torch.tensor(
        row_scales, dtype=torch.float64
    ).unsqueeze(1)
    if draw(st.booleans()):  # an outlier dimension, as Llama has
        x[:, draw(st.integers(0, H - 1))] *= 20
    w = 0.5 + 1.5 * torch.rand(H, generator=g)
    if draw(st.booleans()):
        w = w * torch.where(torch.rand(H, generator=g) < 0.5, -1.0, 1.0)
    lim = 2.0 ** (31 - k) * 0.5
    x = x.clamp(-lim, lim)
    if on_grid:
        x = torch.round(x * 2**k) / 2**k  # bf16 keeps a multiple of 2**-k a multiple of 2**-k
    x = x.to(dtype)
    if on_grid:
        assert torch.equal(x.to(torch.float64) * 2**k, torch.round(x.to(torch.float64) * 2**k))
    return k, eps, x, w.to(dtype)


def _check_rms(k, eps, x, w, dtype):
    y = hf_rmsnorm(x, w, eps)
    assert y.dtype == dtype
    assume(float(y.abs().max()) < 2.0 ** (31 - k) * 0.99)
    qx, qy = quantize(x, k), quantize(y, k)
    d = rmsnorm_deviation(qx, qy, w, eps, dtype, dtype, k)
    assert d.ok, d

    # a norm that is 1% off is caught: for an element of the ordinary row 0 with |n| >= 0.5 the
    # deviation is 1% of |y| while a valid tolerance is below half an ulp of n plus half an ulp of y
    # (<= 2 * 2**-8 relative in bfloat16) plus terms far below 1% (input quantisation / rms, reduction)
    for factor in (1.01, 0.99):
        wrong = quantize(y.to(torch.float64) * factor, k)
        d_wrong = rmsnorm_deviation(qx, wrong, w, eps, dtype, dtype, k)
        assert not d_wrong.ok, (factor, d_wrong)
        assert d_wrong.max_ratio > 1.0


@pytest.mark.parametrize("on_grid", [False, True], ids=["any-input", "exact-input"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@FEW
@given(data=st.data())
def test_rmsnorm_deviation_accepts_hf_and_rejects_wrong_norms(dtype, on_grid, data):
    k, eps, x, w = data.draw(rms_case(dtype, on_grid=on_grid))
    _check_rms(k, eps, x, w, dtype)


def test_rmsnorm_deviation_bfloat16_binade_straddle():
    # the model's n lies just above 2**-3 while ours lies just below: the cast's ulp must be taken at the
    # larger magnitude. An ordinary bfloat16 row (rms ~ 0.008, i.e. ~530 LSB at 2**16), found by random search
    x = [0.01300048828125, -0.00104522705078125, -0.0086669921875, 0.001495361328125,
         -0.00225830078125, 0.00970458984375, 0.01019287109375, 0.0030975341796875,
         0.00090789794921875, -0.004913330078125, 0.00384521484375, -0.0079345703125,
         -0.00848388671875, -0.00970458984375, -0.0078125, 0.01263427734375]  # fmt: skip
    w = [0.9453125, 1.5546875, 1.6796875, 1.78125, 1.328125, 1.3828125, 1.9765625, 0.65625,
         0.93359375, 0.578125, 1.75, 1.375, 1.703125, 1.671875, 1.0234375, 1.7578125]  # fmt: skip
    xb = torch.tensor([x], dtype=torch.float64).to(torch.bfloat16)
    wb = torch.tensor(w, dtype=torch.float64).to(torch.bfloat16)
    assert xb.to(torch.float64).tolist() == [x] and wb.to(torch.float64).tolist() == w
    y = hf_rmsnorm(xb, wb, 1e-5)
    d = rmsnorm_deviation(quantize(xb, 16), quantize(y, 16), wb, 1e-5, torch.bfloat16, torch.bfloat16, 16)
    assert d.ok, d


def test_rmsnorm_deviation_float32_tiny_row():
    # a row whose rms is ~4 LSB: the input quantisation moves the rms itself, beyond a first-order bound
    x = [-0.0001500055950600654, 0.00042952739750035107, 0.0009355830261483788,
         0.0011062026023864746, 0.0011305040679872036, 0.0001447312388336286, 0.0009513035183772445,
         -0.0014012046158313751, -0.0004882558132521808, 0.0011343943187966943,
         -0.00012194804730825126, 0.001371762715280056, -0.0003594055597204715,
         -0.0004057894984725863, -0.00088095897808671, 0.00152697809971869]  # fmt: skip
    w = [1.2863260507583618, 0.7593545913696289, 1.7489320039749146, 0.6683441996574402,
         1.097184181213379, 1.1921998262405396, 1.8113032579421997, 1.2070786952972412,
         1.5069223642349243, 1.642777442932129, 1.65338134765625, 1.7092788219451904,
         0.89686518907547, 1.3626229763031006, 1.9311846494674683, 0.6220322847366333]  # fmt: skip
    xf = torch.tensor([x], dtype=torch.float32)
    wf = torch.tensor(w, dtype=torch.float32)
    y = hf_rmsnorm(xf, wf, 1e-6)
    d = rmsnorm_deviation(quantize(xf, 12), quantize(y, 12), wf, 1e-6, torch.float32, torch.float32, 12)
    assert d.ok, d


def test_rmsnorm_deviation_reports_the_corrupted_element():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    w = torch.ones(64)
    y = hf_rmsnorm(x, w, 1e-5)
    qx, qy = quantize(x, 16), quantize(y, 16)
    bad = qy.clone()
    bad[1, 17] += 5000
    d = rmsnorm_deviation(qx, bad, w, 1e-5, torch.float32, torch.float32, 16)
    assert not d.ok and d.index == (1, 17)


# ----------------------------------------------------------------------------------------------------
# 10. equal_deviation
# ----------------------------------------------------------------------------------------------------


@FAST
@given(
    shape=st.sampled_from([(1,), (7,), (2, 3), (4, 5)]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_equal_deviation(shape, seed, data):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    d = equal_deviation(q, q.clone())
    assert d.ok and d.max_ratio == 0.0 and d.max_dev_lsb == 0.0

    flat_pos = data.draw(st.integers(0, q.numel() - 1))
    idx = tuple(int(i) for i in np.unravel_index(flat_pos, shape))
    delta = data.draw(st.integers(-5, 5).filter(bool))
    other = q.clone()
    new = int(q[idx]) + delta
    assume(-(2**31) <= new <= I32)
    other[idx] = new
    d = equal_deviation(q, other)
    assert not d.ok
    assert d.max_ratio == math.inf
    assert d.index == idx
    assert d.max_dev_lsb == abs(delta)


def test_equal_deviation_empty():
    e = torch.zeros((0,), dtype=torch.int32)
    d = equal_deviation(e, e)
    assert d.ok and d.max_ratio == 0.0


@FAST
@given(
    values=st.lists(st.floats(-3e4, 3e4, allow_nan=False, width=32), min_size=1, max_size=40),
    k=st.integers(0, 16),
)
def test_quantize_with_range_reports_the_codes_extremes(values, k):
    x = torch.tensor(values, dtype=torch.float32)
    codes, lo, hi = quantize_with_range(x, k)
    assert torch.equal(codes, quantize(x, k))
    assert (lo, hi) == (int(codes.min()), int(codes.max()))


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    st.integers(1, 6),
    st.integers(1, 6),
    st.data(),
)
def test_quantize_device_and_check_quantized_agree_with_quantize(dtype, rows, cols, data):
    """The sync-free path (codes and stats on the device, checked later) gives the same codes, range and
    error message as quantize, for values that fit and values that do not."""
    from zkllm_hf.fixed_point import check_quantized, quantize_device

    k = data.draw(st.integers(8, 24))
    pool = [0.0, 1.5, -2.25, 3e4, -7.0, float("nan"), float("inf"), -float("inf"), 1e9, -1e9]
    values = data.draw(st.lists(st.sampled_from(pool), min_size=rows * cols, max_size=rows * cols))
    x = torch.tensor(values, dtype=torch.float64).reshape(rows, cols).to(dtype)
    codes, stats = quantize_device(x, k, what="t")
    try:
        expected = quantize_with_range(x, k, what="t")
    except FixedPointError as exc:
        with pytest.raises(FixedPointError) as got:
            check_quantized(stats.tolist(), x.shape, x.dtype, k, what="t")
        assert str(got.value) == str(exc)
        return
    assert check_quantized(stats.tolist(), x.shape, x.dtype, k, what="t") == expected[1:]
    assert torch.equal(codes, expected[0])
