"""CaptureSession: one capture of one forward, from hooks to an emitted, validated directory."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import fixed_point as fp
from . import provenance
from .contracts import (
    CheckResult,
    ContractViolation,
    check_integrity,
    load_contract,
    run_identities,
)
from .hooks import HookSet, attach, find_layout
from .manifest import build_table, write_manifest
from .points import POINTS, CapturePoint, alias_point_name, parse_layers
from .profile import zkllm_limit_warnings
from .writer import StagingDir

logger = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The capture could not be completed as asked; nothing was emitted."""


@dataclass
class CaptureResult:
    """What a finished capture holds, for the caller to report."""

    out_dir: Path
    seq_len: int
    hidden_size: int
    layers: list[int]
    scale_log2: int
    max_abs_value: float  # largest |x| over every captured point
    worst: tuple[int, str]  # (layer, point) where it occurs
    checks: list[CheckResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # zkLLM limits the capture does not meet

    @property
    def headroom(self) -> float:
        """Fraction of the int32 range the largest value uses (0.69 means 69%)."""
        return fp.headroom(self.max_abs_value, self.scale_log2)


@dataclass
class _PointRecord:
    layer: int
    point: CapturePoint
    dtype: torch.dtype
    int_min: int
    int_max: int
    rows: int
    cols: int


class CaptureSession:
    """Context manager behind :func:`zkllm_hf.capture`. Hooks live exactly as long as the ``with`` block."""

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | os.PathLike[str],
        *,
        layers: Sequence[int] | str | None = None,
        scale_log2: int = 16,
        overwrite: bool = False,
        progress: bool = False,
        prompt_length: int | None = None,
        pad_token_id: int | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
        contract: str = "v1",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture() needs a torch.nn.Module (a HF model), got {type(model).__name__}")
        self.model = model
        self.out_dir = Path(out_dir)
        self.scale_log2 = fp.check_scale(scale_log2)
        self.overwrite = overwrite
        self.progress = progress
        self.prompt_length = prompt_length
        self.pad_token_id = pad_token_id
        self.extra_metadata = dict(extra_metadata or {})
        self.contract = load_contract(contract)
        self.layout = find_layout(model)
        n = len(self.layout.layers)
        if layers is None or isinstance(layers, str):
            self.layers = parse_layers(layers, n)
        else:
            self.layers = parse_layers(",".join(str(int(i)) for i in layers), n) if layers else []
        if not self.layers:
            raise ValueError("layers is empty; pass None for every layer, or a spec such as '0-3,7'")
        self.result: CaptureResult | None = None
        self._hooks: HookSet | None = None
        self._staging: StagingDir | None = None

    # -- lifetime -----------------------------------------------------------------------------------

    def __enter__(self) -> CaptureSession:
        self._reset()
        # Host copies queued for the disk: two layers' worth. With the current layer's codes and the previous
        # block_output, a capture holds at most about three layers of activations, whatever the depth.
        self._staging = StagingDir(self.out_dir, overwrite=self.overwrite, max_in_flight=2 * len(POINTS))
        try:
            self._hooks = attach(self.model, self.layout, self.layers, self._on_capture, self._on_model_input)
        except BaseException:
            self._staging.abort()
            raise
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self.layers), desc="capturing layers", unit="layer")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._hooks is not None and self._staging is not None
        self._hooks.remove()
        if self._bar is not None:
            self._bar.close()
        try:
            if exc_type is None:
                self.result = self._finish()
        finally:
            self._staging.abort()  # drops the staging folder unless the capture was committed
            self._pending, self._previous = {}, None

    def _reset(self) -> None:
        self._fired: Counter[tuple[int, str]] = Counter()
        self._forwards = 0
        self._input_ids: list[int] | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_dtypes: dict[str, torch.dtype] = {}
        self._pending_range: dict[str, tuple[int, int]] = {}
        self._previous: tuple[int, dict[str, torch.Tensor]] | None = None  # (layer, its block_output codes)
        self._records: list[_PointRecord] = []
        self._checks: list[CheckResult] = []
        self._shape: tuple[int, int] | None = None
        self._bar = None

    # -- hooks --------------------------------------------------------------------------------------

    def _on_model_input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._forwards += 1
        if self._forwards > 1:
            raise CaptureError(
                "capture() records exactly one forward, and a second one started inside the block "
                "(generate() runs one per token); run a single model(...) call inside capture()"
            )
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] != 1:
                raise CaptureError(
                    f"batch size {ids.shape[0]}: zkLLM proves one sequence at a time; run one row per "
                    f"capture, e.g. model(input_ids[i:i+1])"
                )
            self._input_ids = [int(i) for i in ids.reshape(-1).tolist()]

    def _on_capture(self, layer: int, point: CapturePoint, tensor: torch.Tensor) -> None:
        key = (layer, point.name)
        self._fired[key] += 1
        if self._fired[key] > 1:
            raise CaptureError(
                f"layer {layer} {point.name} fired twice: capture() records exactly one forward; run a "
                f"single model(...) call inside capture()"
            )
        if tensor.dim() == 3:
            if tensor.shape[0] != 1:
                raise CaptureError(
                    f"layer {layer} {point.name}: batch size {tensor.shape[0]}; zkLLM proves one sequence "
                    f"at a time, so capture one row per forward"
                )
            tensor = tensor[0]
        if tensor.dim() != 2:
            raise CaptureError(f"layer {layer} {point.name}: expected (seq_len, hidden), got {tuple(tensor.shape)}")
        if self._shape is None:
            self._shape = (int(tensor.shape[0]), int(tensor.shape[1]))
        elif tuple(tensor.shape) != self._shape:
            raise CaptureError(
                f"layer {layer} {point.name}: shape {tuple(tensor.shape)} differs from {self._shape} seen "
                f"earlier; every point must be (seq_len, hidden_size)"
            )
        codes, lo, hi = fp.quantize_with_range(tensor, self.scale_log2, what=f"layer {layer} {point.name}")
        self._pending[point.name] = codes
        self._pending_dtypes[point.name] = tensor.dtype
        self._pending_range[point.name] = (lo, hi)
        if point.name == POINTS[-1].name:  # block_output closes the layer
            self._finish_layer(layer)

    def _finish_layer(self, layer: int) -> None:
        missing = [p.name for p in POINTS if p.name not in self._pending]
        if missing:
            self._checks.append(CheckResult("completeness", False, f"points {missing} did not fire", layer=layer))
        else:
            previous = self._previous[1] if self._previous and self._previous[0] == layer - 1 else None
            norms = self.layout.norms(layer, self.contract.norm_modules)
            self._checks.extend(
                run_identities(
                    self.contract,
                    layer,
                    self._pending,
                    self._pending_dtypes,
                    self.scale_log2,
                    previous=previous,
                    norms=norms,
                    files={p.name: p.file_name(layer) for p in POINTS},
                )
            )
        assert self._staging is not None
        for point in POINTS:
            codes = self._pending.get(point.name)
            if codes is None:
                continue
            host = codes.to("cpu").numpy()
            self._staging.write(point.file_name(layer), host, point.alias_names(layer))
            lo, hi = self._pending_range[point.name]
            self._records.append(_PointRecord(layer, point, self._pending_dtypes[point.name], lo, hi, *host.shape))
        if "block_output" in self._pending:
            self._previous = (layer, {"block_output": self._pending["block_output"]})
        self._pending, self._pending_dtypes, self._pending_range = {}, {}, {}
        if self._bar is not None:
            self._bar.update(1)

    # -- emit ---------------------------------------------------------------------------------------

    def _finish(self) -> CaptureResult:
        assert self._staging is not None
        if not self._fired:
            raise CaptureError("no forward ran inside capture(); call the model once inside the with block")
        failures = [c for c in self._checks if not c.passed]
        for layer in self.layers:
            for point in POINTS:
                count = self._fired[(layer, point.name)]
                if count != 1:
                    failures.append(
                        CheckResult(
                            "completeness",
                            False,
                            f"fired {count} times, expected once",
                            layer=layer,
                            point=point.name,
                            file=point.file_name(layer),
                        )
                    )
        seq_len, hidden = self._shape or (0, 0)
        config = getattr(self.model, "config", None)
        expected_hidden = getattr(config, "hidden_size", hidden)
        if hidden != expected_hidden:
            failures.append(CheckResult("shape", False, f"hidden size {hidden}, config says {expected_hidden}"))
        written = {w.name: w for w in self._staging.wait()}
        rows = self._rows(written)
        meta = self._metadata(seq_len, hidden)
        table = build_table(rows, meta)
        failures += [c for c in self.contract.validate_manifest(table.to_pandas()) if not c.passed]
        failures += [c for c in check_integrity(self._staging.path, rows) if not c.passed]
        if failures:
            raise ContractViolation(failures, context=f"capture into '{self.out_dir}'")
        self._staging.commit(lambda path: write_manifest(table, path))
        worst = max(self._records, key=lambda r: max(-r.int_min, r.int_max))
        max_abs = max(-worst.int_min, worst.int_max) / 2**self.scale_log2
        result = CaptureResult(
            out_dir=self._staging.out_dir,
            seq_len=seq_len,
            hidden_size=hidden,
            layers=list(self.layers),
            scale_log2=self.scale_log2,
            max_abs_value=max_abs,
            worst=(worst.layer, worst.point.name),
            checks=list(self._checks),
            warnings=zkllm_limit_warnings(seq_len, hidden, getattr(config, "intermediate_size", None)),
        )
        logger.info(
            "captured %d layers into %s; largest |x| %.6g at layer %d %s uses %.1f%% of int32",
            len(self.layers),
            result.out_dir,
            max_abs,
            *result.worst,
            100 * result.headroom,
        )
        return result

    def _rows(self, written: Mapping[str, Any]) -> list[dict[str, Any]]:
        by_lhs = {(c.layer, c.point): c for c in self._checks if c.point is not None}
        rows = []
        for rec in self._records:
            w = written[rec.point.file_name(rec.layer)]
            check = by_lhs.get((rec.layer, rec.point.name))
            base = {
                "sample": 0,
                "step": 0,
                "phase": "forward",
                "layer": rec.layer,
                "point": rec.point.name,
                "file": w.name,
                "alias_of": None,
                "rows": rec.rows,
                "cols": rec.cols,
                "dtype": "int32",
                "scale_log2": self.scale_log2,
                "byte_size": w.byte_size,
                "sha256": w.sha256,
                "source_dtype": str(rec.dtype).removeprefix("torch."),
                "int_min": rec.int_min,
                "int_max": rec.int_max,
                "headroom": max(-rec.int_min, rec.int_max) / fp.INT32_MAX,
                "hf_module": self.layout.module_path(rec.layer, rec.point),
                "hook": "forward_pre" if rec.point.hook == "pre" else "forward",
                "check": check.check if check else None,
                "max_dev_lsb": check.max_dev_lsb if check else None,
                "max_dev_ratio": check.max_ratio if check else None,
            }
            rows.append(base)
            for i, alias in enumerate(rec.point.alias_names(rec.layer)):
                rows.append(dict(base, point=alias_point_name(rec.point.name, i), file=alias, alias_of=w.name))
        return rows

    def _metadata(self, seq_len: int, hidden: int) -> dict[str, Any]:
        ids = self._input_ids
        return {
            "contract": {"name": "zkllm-hf-capture", "version": self.contract.version, "folder": self.contract.folder},
            "versions": provenance.versions(),
            "model": provenance.model_info(self.model),
            "tokens": {
                "input_ids": ids,
                "prompt_token_count": self.prompt_length
                if self.prompt_length is not None
                else (len(ids) if ids is not None else seq_len),
                "seq_len": seq_len,
                "pad_token_id": self.pad_token_id,
            },
            "capture": {
                "mode": "forward",
                "layers": list(self.layers),
                "scale_log2": self.scale_log2,
                "hidden_size": hidden,
                "points": [p.name for p in POINTS],
                "device": str(next((p.device for p in self.model.parameters()), "cpu")),
                "created_utc": provenance.utc_now(),
            },
            "extra": self.extra_metadata,
        }
