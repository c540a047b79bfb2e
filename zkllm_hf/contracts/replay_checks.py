"""The ``replay`` kind: a capture point's files against the same point replayed through the model.

A replay (``validate --replay``) re-runs each unit's recorded forwards through the capture engine and hands the
comparison of every point, element by element, to the contract as :class:`ReplayStats`: the element count,
how many are equal, how many lie within 1, 2, 4 and 8 ulps of the file's source dtype at the element's
magnitude, and the worst. Each ``replay`` entry judges them under its ``verdict``:

- ``exact``: every code equal (the replay ran as the capture did: device type, dtype, quantization, thread
  count, attention implementation and library versions);
- ``tolerant``: at least ``fractions[D][k]`` of the elements within ``k`` ulps, none beyond ``max_ulps[D]``, and no
  biased token row (``row_bias_alpha[D]``, ``row_bias_lsb[D]``: :func:`row_statistics`, :func:`bias_limit`), for
  ``D`` the point's source dtype (float32's thresholds for a dtype the entry does not name). The whole-point
  fractions see noise spread over a point; the row rule sees a forgery concentrated on one token's row, which
  in half precision can stay within a few ulps of large elements yet shifts the row's mean far beyond its
  standard error.

An element's ulp, in LSB, is ``max(1, ulp_D(m) * 2**k)`` for ``m`` the larger magnitude of the two values: a
difference below one LSB cannot be seen in the codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from .registry import register_check
from .spec import CheckResult, CheckSpec

ULP_STEPS = (1, 2, 4, 8)
ROW_FIELDS = ("n", *(f"beyond_{k}" for k in ULP_STEPS), "sum", "sq")

__all__ = ["ROW_FIELDS", "ULP_STEPS", "ReplayStats", "bias_limit", "judge_replay", "row_statistics"]


@dataclass
class ReplayStats:
    """One point of one unit: the files against the replay, accumulated over the forwards that fed it."""

    unit: str
    layer: int
    point: str
    file: str
    dtype: str  # the source dtype the ulps are taken in
    rows_expected: int
    rows: int = 0
    elements: int = 0
    equal: int = 0
    within: dict[int, int] = field(default_factory=lambda: dict.fromkeys(ULP_STEPS, 0))
    max_ulps: float = 0.0
    max_lsb: int = 0
    ulp_lsb: float = 1.0  # one ulp at the worst element, in LSB
    index: tuple[int, int] | None = None  # (token within the unit, dim) of the worst element
    expected: int | None = None  # the file's code there
    replayed: int | None = None  # the replay's
    note: str = ""  # why the comparison is incomplete (rows missing, a file unreadable)
    scale_log2: int = 16
    # Per token row (rows of the file), columns ROW_FIELDS: elements compared, how many lie beyond k ulps for
    # each k of ULP_STEPS, sum d and sum d**2 (d the replay's code minus the file's, in LSB). Only rows compared
    # unequal are folded; the others stay zero (every element within every k).
    by_row: np.ndarray | None = None

    def row_table(self) -> np.ndarray:
        """The per-row accumulator, made on first use (one row per row of the file)."""
        if self.by_row is None:
            self.by_row = np.zeros((max(self.rows_expected, 0), len(ROW_FIELDS)), dtype=np.float64)
        return self.by_row

    def fraction(self, k: int) -> float:
        return 1.0 if not self.elements else self.within[k] / self.elements

    def to_dict(self) -> dict[str, Any]:
        return {
            "elements": self.elements,
            "equal": self.equal,
            "fraction_within_ulps": {str(k): self.fraction(k) for k in ULP_STEPS},
            "max_ulps": self.max_ulps,
            "max_dev_lsb": self.max_lsb,
            "index": list(self.index) if self.index else None,
            "expected_code": self.expected,
            "replayed_code": self.replayed,
        }


def row_statistics(s: ReplayStats) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """Per row of the point: the fraction of its elements within ``k`` ulps for each ``k`` of ULP_STEPS, and the
    signed-bias statistic ``|sum d| / sqrt(sum d**2)``, and the mean signed deviation in LSB; a row that never
    differed has fractions 1, bias 0 and mean 0."""
    table = s.row_table()
    n = table[:, 0]
    seen = n > 0
    within = {k: 1.0 - np.divide(table[:, i], n, out=np.zeros_like(n), where=seen) for i, k in enumerate(ULP_STEPS, 1)}
    dev_sum, dev_sq = table[:, len(ULP_STEPS) + 1], table[:, len(ULP_STEPS) + 2]
    bias = np.divide(np.abs(dev_sum), np.sqrt(dev_sq), out=np.zeros_like(n), where=dev_sq > 0)
    mean = np.divide(dev_sum, n, out=np.zeros_like(n), where=seen)
    return within, bias, mean


def _place(s: ReplayStats) -> dict[str, Any]:
    return {"layer": s.layer, "point": s.point, "file": s.file, "unit": s.unit or None, "index": s.index}


def _by_dtype(spec: CheckSpec, name: str, dtype: str) -> Any:
    """A tolerant parameter for ``dtype`` (float32's for a dtype the entry does not name, e.g. float64)."""
    table = dict(spec.params[name])
    return table.get(dtype, table["float32"])


def _fractions(spec: CheckSpec, dtype: str) -> Mapping[int, float]:
    return {int(k): float(v) for k, v in dict(_by_dtype(spec, "fractions", dtype)).items()}


def bias_limit(alpha: float, rows: int) -> float:
    """The row rule's limit in standard errors: the |N(0, 1)| quantile that ``rows`` rows of zero-mean noise all
    stay within but with probability ``alpha`` (Bonferroni over the point's rows)."""
    return NormalDist().inv_cdf(1.0 - alpha / (2.0 * max(rows, 1)))


def _biased_row(spec: CheckSpec, s: ReplayStats) -> tuple[float, list[str]]:
    """The row rule: a token row fails when its mean signed deviation is both beyond :func:`bias_limit`
    standard errors (``|sum d| / sqrt(sum d**2)``, for ``row_bias_alpha``) and beyond ``row_bias_lsb`` LSB.
    Kernel noise is near zero-mean and spread over every row; a forgery of one row is one-signed, and
    concentrated there. Returns the worst row's ratio to the rule (``min(t / T, |mean| / F)``; above 1 when it
    fails) and the failure's wording."""
    if "row_bias_alpha" not in spec.params or s.by_row is None:
        return 0.0, []
    _, bias, mean = row_statistics(s)
    limit_t = bias_limit(float(_by_dtype(spec, "row_bias_alpha", s.dtype)), bias.size)
    limit_lsb = float(_by_dtype(spec, "row_bias_lsb", s.dtype))
    ratio = np.minimum(bias / limit_t, np.abs(mean) / limit_lsb)
    row = int(np.argmax(ratio)) if ratio.size else 0
    worst = float(ratio[row]) if ratio.size else 0.0
    if worst <= 1.0:
        return worst, []
    flagged = int((ratio > 1.0).sum())
    return worst, [
        f"token row {row}{f' (and {flagged - 1} more)' if flagged > 1 else ''} is biased: mean deviation "
        f"{mean[row]:+.4g} LSB, {bias[row]:.3g} standard errors from zero (a row fails beyond {limit_t:.3g} "
        f"and {limit_lsb:g} LSB)"
    ]


@register_check("replay", "replay")
def judge_replay(spec: CheckSpec, s: ReplayStats) -> CheckResult:
    """One point's verdict under ``spec`` (its ``verdict``: exact or tolerant)."""
    if s.note:
        return CheckResult(spec.name, False, s.note, **_place(s))
    worst = f"file code {s.expected}, replay {s.replayed}" if s.index is not None else ""
    seen = ", ".join(f"{s.fraction(k):.6f} within {k}" for k in ULP_STEPS)
    if spec.params.get("verdict") == "exact":
        ok = s.equal == s.elements
        message = "" if ok else f"{s.elements - s.equal} of {s.elements} codes differ ({worst}; ulps: {seen})"
        return CheckResult(
            spec.name, ok, message, max_dev_lsb=float(s.max_lsb), max_ratio=float(s.max_lsb),
            tolerance_lsb=0.0, **_place(s),
        )  # fmt: skip
    allowed = float(_by_dtype(spec, "max_ulps", s.dtype))
    row_ratio, row_why = _biased_row(spec, s)
    short = [
        f"{s.fraction(k):.6f} within {k} ulps, needs {f}"
        for k, f in _fractions(spec, s.dtype).items()
        if s.fraction(k) < f
    ]
    over = s.max_ulps > allowed
    ok = not short and not over and not row_why
    why = ([f"worst {s.max_ulps:.4g} ulps, allowed {allowed:g}"] if over else []) + row_why + short
    return CheckResult(
        spec.name,
        ok,
        "" if ok else f"{'; '.join(why)} ({worst})",
        max_dev_lsb=float(s.max_lsb),
        max_ratio=max(s.max_ulps / allowed if allowed else float("inf"), row_ratio),
        tolerance_lsb=allowed * s.ulp_lsb,
        **_place(s),
    )
