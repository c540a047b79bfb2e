"""The layer checks: the contract's identities on one layer's int32 codes (sums, the chain, the norms, the
drift of derived residuals), started on the codes' device and read back without a device sync.

The gate runs them in memory as each layer completes; ``validate`` runs them on the files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import fast_checks as fast
from .. import fast_norm
from .. import fixed_point as fp
from .registry import implementation, register_check
from .spec import CheckResult, CheckSpec, Contract

Tensors = Mapping[str, torch.Tensor]


@register_check("sum", "layer")
def _sum(
    spec: CheckSpec,
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    *,
    lhs_dtype: torch.dtype,
    scale_log2: int,
    residuals: str = "model",
    **_: Any,
) -> torch.Tensor:
    if residuals == "exact-int":  # the sum was derived from its terms in the int domain: it must be exact
        return fast.equal_stats(
            lhs, terms, dense=lambda: fp.equal_deviation_stats(lhs, terms[0].to(torch.int64) + terms[1].to(torch.int64))
        )
    tolerance = {k: float(spec.params[k]) for k in ("quantisation_lsb", "rounding_ulps") if k in spec.params}
    return fast.sum_stats(terms[0], terms[1], lhs, lhs_dtype, scale_log2, **tolerance)


@register_check("exact", "layer")
def _exact(spec: CheckSpec, lhs: torch.Tensor, terms: Sequence[torch.Tensor], **_: Any) -> torch.Tensor:
    return fast.equal_stats(lhs, terms[:1], dense=lambda: fp.equal_deviation_stats(lhs, terms[0]))


@register_check("rmsnorm", "layer")
def _rmsnorm(
    spec: CheckSpec,
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    *,
    lhs_dtype: torch.dtype,
    term_dtypes: Sequence[torch.dtype],
    scale_log2: int,
    norm: tuple[torch.Tensor, float],
    input_drift_lsb: float = 0.0,
    **_: Any,
) -> torch.Tensor:
    weight, eps = norm
    return fast_norm.rmsnorm_stats(
        terms[0], lhs, weight, eps, term_dtypes[0], lhs_dtype, scale_log2, input_drift_lsb=input_drift_lsb
    )


@register_check("drift", "layer")
def _drift(
    spec: CheckSpec,
    lhs: torch.Tensor,
    terms: Sequence[torch.Tensor],
    *,
    lhs_dtype: torch.dtype,
    scale_log2: int,
    **_: Any,
) -> torch.Tensor:
    """``lhs`` derived in the int domain against ``terms[0]``, the model's own codes of the same point."""
    return fast.drift_stats(
        lhs,
        terms[0],
        lhs_dtype,
        scale_log2,
        **_drift_params(spec),
    )


def _drift_params(spec: CheckSpec) -> dict[str, float]:
    """A drift entry's bound parameters, as :func:`fixed_point.drift_tolerance` takes them."""
    return {"drift_lsb": float(spec.params["drift_lsb"]), "drift_ulps": float(spec.params["drift_ulps"])}


RESIDUAL_MODES = ("model", "exact-int")


@dataclass
class PendingIdentities:
    """A layer's identity checks, computed on the codes' device but not yet read back (no device sync).

    ``stats`` holds ``fp.DEVIATION_STATS`` numbers per check that ran (None if none ran); :meth:`resolve`
    turns them, once they are on the host, into the :class:`CheckResult` list :func:`run_identities` returns.
    """

    slots: list[CheckResult | tuple[CheckSpec, dict[str, Any], tuple[int, ...]]]
    stats: torch.Tensor | None

    def resolve(self, host: Sequence[float] | None = None) -> list[CheckResult]:
        """The results; ``host`` is ``stats`` flattened on the host (read here, with one sync, if omitted)."""
        if host is None:
            host = [] if self.stats is None else self.stats.reshape(-1).tolist()
        out, k = [], 0
        for slot in self.slots:
            if isinstance(slot, CheckResult):
                out.append(slot)
                continue
            spec, where, shape = slot
            dev = fp.Deviation.from_stats(host[k : k + fp.DEVIATION_STATS], shape)
            k += fp.DEVIATION_STATS
            out.append(
                CheckResult(
                    spec.name,
                    dev.ok,
                    max_dev_lsb=dev.max_dev_lsb,
                    max_ratio=dev.max_ratio,
                    tolerance_lsb=dev.tolerance_lsb,
                    index=dev.index,
                    **where,
                )
            )
        return out


def run_identities(*args: Any, **kwargs: Any) -> list[CheckResult]:
    """:func:`start_identities` (same arguments), its results read back at once."""
    return start_identities(*args, **kwargs).resolve()


def start_identities(
    contract: Contract,
    layer: int,
    tensors: Tensors,
    dtypes: Mapping[str, torch.dtype],
    scale_log2: int,
    *,
    previous: Tensors | None = None,
    norms: Mapping[str, tuple[torch.Tensor, float] | str] | str | None = None,
    files: Mapping[str, str] | None = None,
    residuals: str = "model",
    model_codes: Tensors | None = None,
    drift_lsb: Mapping[str, float] | None = None,
    recorded_drift: Mapping[str, Mapping[str, Any]] | None = None,
) -> PendingIdentities:
    """Run the contract's layer checks on one layer's int32 codes, on the codes' device, without reading the
    results back: :meth:`PendingIdentities.resolve` reads them once they have reached the host (no device sync
    until then).

    ``tensors`` maps point names to (seq_len, hidden) int32 codes on any one device. Checks across layers
    (the chain) use ``previous``, layer L-1's codes; at layer 0 they do not apply, and when L-1 is absent
    they are reported as skipped. Model checks use ``norms``, mapping each norm module to its ``(weight,
    eps)`` or to the reason it could not be read; a string (or None) is the reason for all of them.

    With ``residuals="exact-int"`` the residual points were derived from the sublayer outputs in the int
    domain: the sums must hold exactly, the drift checks compare each derived point with the model's own
    codes (``model_codes``, in the gate) or read the drift the manifest recorded (``recorded_drift``, in
    validate), and the norm checks widen their input term by the largest drift of their input, in LSB
    (``drift_lsb`` in the gate; the recorded ``max_dev_lsb`` in validate).
    """
    if residuals not in RESIDUAL_MODES:
        raise ValueError(f"residuals {residuals!r}; one of {RESIDUAL_MODES}")
    if drift_lsb is None:
        drift_lsb = {k: float(v.get("max_dev_lsb") or 0.0) for k, v in (recorded_drift or {}).items()}
    slots: list[CheckResult | tuple[CheckSpec, dict[str, Any], tuple[int, ...]]] = []
    stats = []
    for spec in contract.identities:
        where = {"layer": layer, "point": spec.lhs, "file": (files or {}).get(spec.lhs)}
        if spec.kind == "drift":
            if residuals != "exact-int":
                continue  # the files hold the model's own values: nothing was derived
            if model_codes is not None:
                terms = [model_codes[spec.lhs]]
            else:
                record = (recorded_drift or {}).get(spec.lhs)
                slots.append(_recorded_drift(spec, record, where, tensors[spec.lhs], dtypes[spec.lhs], scale_log2))
                continue
        elif spec.previous_layer and previous is None:
            if layer > 0:
                slots.append(CheckResult(spec.name, False, skipped=f"layer {layer - 1} is not in the capture", **where))
            continue
        else:
            terms = [(previous if spec.previous_layer else tensors)[t] for t in spec.terms]  # type: ignore[index]
        extra: dict[str, Any] = {"residuals": residuals}
        if spec.needs_model:
            norm = norms.get(spec.module) if isinstance(norms, Mapping) else (norms or "no model was given")
            if not isinstance(norm, tuple):
                slots.append(CheckResult(spec.name, False, skipped=str(norm), **where))
                continue
            extra["norm"] = norm
            extra["input_drift_lsb"] = drift_lsb.get(spec.terms[0], 0.0)
        stats.append(_launch(spec, tensors, terms, dtypes, scale_log2, extra))
        slots.append((spec, where, tuple(tensors[spec.lhs].shape)))
    return PendingIdentities(slots, torch.cat(stats) if stats else None)


def _launch(
    spec: CheckSpec,
    tensors: Tensors,
    terms: Sequence[torch.Tensor],
    dtypes: Mapping[str, torch.dtype],
    scale_log2: int,
    extra: Mapping[str, Any],
) -> torch.Tensor:
    """Start one layer entry's check on the codes' device (the CPU for MPS, which has no float64)."""
    device = tensors[spec.lhs].device
    if device.type == "mps":  # no float64 there
        device = torch.device("cpu")
    return implementation(spec)(
        spec,
        tensors[spec.lhs].to(device),
        [t.to(device) for t in terms],
        lhs_dtype=dtypes[spec.lhs],
        term_dtypes=[dtypes.get(t, dtypes[spec.lhs]) for t in spec.terms],
        scale_log2=scale_log2,
        **extra,
    )


def _recorded_drift(
    spec: CheckSpec,
    record: Mapping[str, Any] | None,
    where: Mapping[str, Any],
    codes: torch.Tensor,
    dtype: torch.dtype,
    scale_log2: int,
) -> CheckResult:
    """A drift check from what the manifest recorded (the model's own codes are not on disk).

    The recorded deviation also widens the norm checks, so it is held to the largest bound the contract
    could have allowed any element of this file: ``drift_lsb + drift_ulps * ulp`` at the largest magnitude
    the model's value can have had (the file's largest code plus the recorded deviation)."""
    if not record or record.get("max_ratio") is None:
        return CheckResult(
            spec.name, False, "the capture derived its residuals in the int domain but recorded no drift here", **where
        )
    ratio, lsb = float(record["max_ratio"]), float(record["max_dev_lsb"])
    largest = float(codes.abs().max()) if codes.numel() else 0.0
    # the bound at the largest code the model's value can have had: the file's largest plus the drift
    widest = torch.tensor([largest + lsb], dtype=torch.float64)
    cap = float(fp.drift_tolerance(widest, dtype, scale_log2, **_drift_params(spec))[0])
    problems = []
    if not (0.0 <= ratio <= 1.0 and lsb >= 0.0):
        problems.append(f"recorded drift {lsb:g} LSB is {ratio:.3g}x the contract's bound")
    if not lsb <= cap:
        problems.append(f"recorded drift {lsb:g} LSB exceeds the largest bound the contract allows here ({cap:g} LSB)")
    return CheckResult(
        spec.name,
        not problems,
        "; ".join(problems),
        max_dev_lsb=lsb,
        max_ratio=ratio,
        tolerance_lsb=record.get("tolerance_lsb"),
        index=tuple(record.get("index") or ()),
        **where,
    )
