"""``zkllm-hf compare``: a prover's output against a captured file, within the tolerance of the contract check
whose result the captured file is (exactly, for every other point and for exact-int captures)."""

from __future__ import annotations

import math
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..contracts import inside
from ..digests import digest_bytes, row_digest
from ..dtypes import SOURCE_DTYPES
from ..fixed_point import sum_tolerance
from ..manifest import rows_digest
from ..trust import trusted_contract


@dataclass(frozen=True)
class Comparison:
    ok: bool
    message: str
    input_error: bool = False  # the files could not be compared at all (exit 2), rather than differ (exit 1)


def _input_error(message: str) -> Comparison:
    return Comparison(False, message, input_error=True)


def _read_int32(path: Path, size: int, what: str) -> np.ndarray | Comparison:
    """The bytes of a regular file of exactly ``size`` bytes as int32, or the input error saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO must not block
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return _input_error(f"{path} is not a file; give the {what}")
            if st.st_size != size:
                return _input_error(f"{path} holds {st.st_size} bytes; the {what} is {size} bytes")
            chunks, left = [], size + 1
            while left > 0 and (chunk := os.read(fd, min(left, 1 << 24))):
                chunks.append(chunk)
                left -= len(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return _input_error(f"{path} does not exist; give the {what}")
    except OSError as exc:
        return _input_error(f"cannot read {path}: {exc.strerror or exc}")
    if len(data) != size:
        return _input_error(f"{path} changed while it was read ({len(data)} bytes, not {size})")
    return np.frombuffer(data, dtype="<i4")


def compare_files(produced: Path, captured: Path, capture: Any, *, contract: str | None = None) -> Comparison:
    """Compare ``produced`` (a zkLLM skip output) with ``captured``, a file of ``capture`` (``validate.Capture``).

    A residual point (post_attn_residual, block_output) is compared within the tolerance of the contract's sum
    check whose result it is, as the model's float add allows; in a capture made with
    ``residuals="exact-int"``, and for every other point, the files must be equal. The contract is a packaged
    one, or the folder the manifest names only if ``contract`` names it too (as for ``validate``). The captured
    file must still be the one the manifest recorded (its size and SHA-256, under the manifest's digest).
    ``input_error`` is set when the files cannot be compared: a missing, unreadable or wrong-sized file, a
    file that is not the capture's, or a contract that is not trusted.
    """
    target = Path(captured).resolve()  # the capture and the file resolve alike: relative paths, symlinks
    row = _row_of(capture, captured, target)
    if isinstance(row, Comparison):
        return row
    rows, cols = int(row["rows"]), int(row["cols"])
    what = f"layer {row['layer']} {row['point']}"
    a = _read_int32(Path(produced), rows * cols * 4, f"{what} as {rows} x {cols} int32")
    if isinstance(a, Comparison):
        return a
    recorded = _recorded(capture, contract)
    if isinstance(recorded, Comparison):
        return recorded
    data = _captured_bytes(capture, captured, target, row)
    if isinstance(data, Comparison):
        return data
    a = torch.from_numpy(a.reshape(rows, cols).astype(np.int64))
    b = torch.from_numpy(np.frombuffer(data, dtype="<i4").reshape(rows, cols).astype(np.int64))
    tol = _tolerance(b, row, *recorded, what)
    if isinstance(tol, Comparison):
        return tol
    return _verdict(a, b, *tol, what=what, produced=produced, captured=captured)


def _row_of(capture: Any, captured: Path, target: Path) -> dict[str, Any] | Comparison:
    """The manifest row of the captured file (resolved as ``target``), or the input error saying why none is."""
    folder = Path(capture.path).resolve()
    named = ((r, inside(folder, str(r["file"]))) for r in capture.rows.values())
    row = next((r for r, p in named if p is not None and p.resolve() == target), None)
    if row is None:
        return _input_error(
            f"{captured} is not a file of the capture at {capture.path} (its manifest names no such file); give "
            f"one of its files, or the --tolerance-from folder that holds it"
        )
    if not target.exists():
        return _input_error(f"{captured} does not exist; the capture at {capture.path} lists it: validate the capture")
    if not target.is_file():
        return _input_error(f"{captured} is not a file; the capture at {capture.path} lists it: validate the capture")
    return row


def _recorded(capture: Any, contract: str | None) -> tuple[Any, str] | Comparison:
    """The capture's trusted contract and residual mode, once its manifest's digest is checked."""
    try:
        spec_contract = trusted_contract(capture.metadata, contract)
        residuals = capture.metadata.get("capture", {}).get("residuals", "model")
        recorded = capture.metadata.get("manifest_digest")
    except (KeyError, TypeError, AttributeError) as exc:
        return _input_error(f"{capture.path}: the manifest's metadata lacks {exc}; it is not a zkllm-hf capture")
    except ValueError as exc:
        return _input_error(f"{capture.path}: {exc}")
    if rows_digest(capture.manifest.to_pylist(), capture.metadata) != recorded:
        return Comparison(
            False,
            f"{capture.path}: the manifest was edited after capture (its digest does not match); run zkllm-hf "
            f"validate {shlex.quote(str(capture.path))}",
        )
    return spec_contract, residuals


def _captured_bytes(capture: Any, captured: Path, target: Path, row: dict[str, Any]) -> bytes | Comparison:
    """The captured file's bytes, if they are still those the manifest recorded (size and SHA-256)."""
    rows, cols = int(row["rows"]), int(row["cols"])
    try:
        data = target.read_bytes()
    except OSError as exc:
        return _input_error(f"cannot read {captured}: {exc.strerror or exc}")
    algorithm, want = row_digest(row)
    digest = digest_bytes(algorithm, data)
    if len(data) != int(row["byte_size"]) or digest != want:
        held = (
            f"holds {len(data)} bytes, the manifest says {row['byte_size']}"
            if len(data) != int(row["byte_size"])
            else f"has {algorithm} {digest[:16]}..., the manifest says {str(want)[:16]}..."
        )
        return Comparison(
            False,
            f"{captured} {held}: the captured file changed after capture; run zkllm-hf validate "
            f"{shlex.quote(str(capture.path))}",
        )
    if len(data) != rows * cols * 4:
        return _input_error(f"{captured}: the manifest says {rows} x {cols} int32 in {len(data)} bytes; capture again")
    return data


def _tolerance(
    b: torch.Tensor, row: dict[str, Any], spec_contract: Any, residuals: str, what: str
) -> tuple[torch.Tensor, str] | Comparison:
    """The allowed deviation per element and the rule's wording: the sum check's tolerance for a residual point
    of a ``model``-residuals capture, else zero."""
    spec = next((s for s in spec_contract.identities if s.kind == "sum" and s.lhs == row["point"]), None)
    if spec is None or residuals == "exact-int":
        return torch.zeros(b.shape, dtype=torch.float64), "equal (exact)"
    params = {k: float(spec.params[k]) for k in ("quantisation_lsb", "rounding_ulps") if k in spec.params}
    dtype = SOURCE_DTYPES.get(str(row["source_dtype"]))
    if dtype is None:
        return _input_error(f"{what}: the manifest's source_dtype {row['source_dtype']!r} is not a float type")
    tol = sum_tolerance(b, dtype, int(row["scale_log2"]), **params)
    return tol, f"within contract check {spec.name}'s tolerance"


def _verdict(
    a: torch.Tensor, b: torch.Tensor, tol: torch.Tensor, rule: str, *, what: str, produced: Path, captured: Path
) -> Comparison:
    """Whether every element is within ``tol``; else where the worst one (relative to its tolerance) is."""
    dev = (a - b).abs().to(torch.float64)
    bad = dev > tol
    if not bool(bad.any()):
        return Comparison(
            True, f"{what}: {produced} matches {captured}, {rule}; max deviation {float(dev.max()):g} LSB"
        )
    cols = int(b.shape[1])
    ratio = torch.where(tol > 0, dev / tol.clamp(min=1e-300), torch.where(dev > 0, math.inf, 0.0))
    pos = int(torch.argmax(ratio.reshape(-1)))
    t, c = divmod(pos, cols)
    return Comparison(
        False,
        f"{what}: {produced} differs from {captured} at {int(bad.sum())} element(s), the worst at token {t}, "
        f"dim {c}: {int(a[t, c])} vs {int(b[t, c])} ({float(dev[t, c]):g} LSB, allowed {float(tol[t, c]):g}; {rule})",
    )


__all__ = ["Comparison", "compare_files"]
