"""The capture engine: one set of hooks per model, switched on per forward, routing batch rows to units.

A *unit* is one sample's share of one or more forwards (a prompt, a decode step, a padded batch row): the
files of its layers in one folder and its own manifest. The engine installs the hooks once, and for each
forward asks its adapter (``capture()``, :class:`~zkllm_hf.CaptureLogitsProcessor`,
:class:`~zkllm_hf.CaptureCallback`) which rows and columns go to which unit. Everything after the routing
is shared: quantisation, the contract's identity checks as each layer completes, the streaming writer, the
manifests and the atomic commit. The adapters only decide which forwards make which units.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from dataclasses import replace as _replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import fixed_point as fp
from . import provenance
from .buffers import HostBufferPool
from .contracts import (
    INDEX_KINDS,
    RESIDUAL_MODES,
    CaptureSubject,
    CheckResult,
    ContractViolation,
    load_contract,
    run_capture_checks,
    run_dataset_checks,
    run_file_checks,
    start_identities,
)
from .hooks import HookSet, attach, find_layout
from .manifest import build_table, table_metadata, write_manifest
from .points import POINTS, CapturePoint, alias_point_name, parse_layers
from .profile import zkllm_limit_warnings
from .writer import MANIFEST_NAME, StagingDir, check_target, sha256_file

logger = logging.getLogger(__name__)

PHASES = ("forward", "prefill", "decode", "full")


class CaptureError(RuntimeError):
    """The capture could not be completed as asked; nothing was emitted."""


# --------------------------------------------------------------------------------------------------
# What one forward received


@dataclass
class ForwardInputs:
    """The top-level model inputs of one forward, as the adapters need them to route rows to units."""

    batch: int
    q: int  # new positions this forward computes
    past_length: int  # positions already in the cache
    input_ids: torch.Tensor | None  # (batch, q) on the CPU, or None (inputs_embeds)
    mask: torch.Tensor | None  # (batch, q) bool on the CPU: which of this forward's columns are real; None: all
    position_ids: torch.Tensor | None  # (batch, q) on the CPU, or None when the model derives them
    training: bool

    def real_columns(self, row: int) -> slice | torch.Tensor:
        """This forward's columns that hold real tokens of ``row``: a slice when contiguous (left or right
        padding), else an index tensor."""
        if self.mask is None:
            return slice(0, self.q)
        idx = torch.nonzero(self.mask[row]).flatten()
        if idx.numel() == 0:
            return slice(0, 0)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        return slice(lo, hi) if hi - lo == idx.numel() else idx

    def width(self, cols: slice | torch.Tensor) -> int:
        """How many of this forward's columns ``cols`` selects."""
        return len(range(self.q)[cols]) if isinstance(cols, slice) else int(cols.numel())

    def tokens(self, row: int, cols: slice | torch.Tensor) -> list[int] | None:
        return None if self.input_ids is None else [int(t) for t in self.input_ids[row, cols].tolist()]

    def positions(self, row: int, cols: slice | torch.Tensor) -> list[int]:
        if self.position_ids is not None:
            pos = self.position_ids[0 if self.position_ids.shape[0] == 1 else row]
            return [int(p) for p in pos[cols].tolist()]
        return [self.past_length + int(i) for i in torch.arange(self.q)[cols].tolist()]


_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "cache", "inputs_embeds")


def _forward_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ForwardInputs:
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = list(_INPUT_NAMES)
    bound = dict(zip(params, args))
    bound.update(kwargs)
    ids, embeds = bound.get("input_ids"), bound.get("inputs_embeds")
    ref = ids if isinstance(ids, torch.Tensor) else embeds
    if not isinstance(ref, torch.Tensor):
        raise CaptureError("the model was called without input_ids or inputs_embeds; zkllm_hf cannot route its rows")
    if ref.dim() == (1 if ref is ids else 2):  # unbatched call
        ref = ref.unsqueeze(0)
        ids = ids.unsqueeze(0) if isinstance(ids, torch.Tensor) else None
    batch, q = int(ref.shape[0]), int(ref.shape[1])
    cache = bound.get("cache", bound.get("past_key_values"))
    past = 0
    if cache is not None and hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    mask = bound.get("attention_mask")
    tail = None
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2:
            if batch > 1:
                raise CaptureError(
                    f"attention_mask has shape {tuple(mask.shape)}; zkllm_hf de-pads a batch with the 2-D padding "
                    f"mask (batch, seq_len). Pass that mask, or one row per forward (generate() builds a 4-D mask "
                    f"itself for cache_implementation='static': use the default dynamic cache to capture a batch)"
                )
        else:
            tail = mask[:, -q:].to("cpu") != 0
            if bool(tail.all()):
                tail = None
    pos = bound.get("position_ids")
    pos = pos[..., -q:].to("cpu") if isinstance(pos, torch.Tensor) and pos.dim() == 2 else None
    return ForwardInputs(
        batch,
        q,
        past,
        ids.to("cpu") if isinstance(ids, torch.Tensor) else None,
        tail,
        pos,
        bool(getattr(model, "training", False)),
    )


def _autocast_state(device: str) -> dict[str, Any]:
    return {
        "enabled": torch.is_autocast_enabled(device),
        "dtype": str(torch.get_autocast_dtype(device)).removeprefix("torch."),
        "grad_enabled": torch.is_grad_enabled(),
    }


# --------------------------------------------------------------------------------------------------
# One unit


@dataclass
class _PointRecord:
    layer: int
    point: CapturePoint
    dtype: torch.dtype
    int_min: int
    int_max: int
    rows: int
    cols: int


@dataclass
class Route:
    """Row ``row`` of the current forward, columns ``cols``, go to ``unit``."""

    row: int
    cols: slice | torch.Tensor
    unit: UnitRecorder


class _Done:
    """The event of work that is already done (the asynchronous path run on the CPU, as tests do)."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _record_event(device: torch.device) -> Any:
    if device.type != "cuda":
        return _Done()
    event = torch.cuda.Event()
    event.record()
    return event


def _pooled(buffers: HostBufferPool, t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and buffers.owns(t)


@dataclass
class _LayerInFlight:
    """One layer of one unit between its checks being started and their results being read back."""

    layer: int
    pending: Any  # contracts.PendingIdentities, or None when the layer is incomplete (completeness reports it)
    dtypes: dict[str, torch.dtype]
    scale_log2: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ranges: dict[str, Any] = field(default_factory=dict)  # (lo, hi) per point, or quantize_device's stats
    stats: torch.Tensor | None = None  # CUDA: every point's range stats, then the checks', page-locked
    event: Any = None  # CUDA: recorded after the copies; done once the layer's numbers are on the host
    _results: list[CheckResult] | None = None

    def resolve_now(self) -> None:
        self._results = [] if self.pending is None else self.pending.resolve()

    def done(self, wait: bool) -> bool:
        if self.event is None:
            return True
        if wait:
            self.event.synchronize()
            return True
        return bool(self.event.query())

    def point_ranges(self, where: str) -> dict[str, tuple[int, int]]:
        if self.stats is None:
            return dict(self.ranges)
        host = self.stats.tolist()
        out, k = {}, 0
        for name, shape in self.shapes.items():
            what = f"{where}layer {self.layer} {name}"
            out[name] = fp.check_quantized(
                host[k : k + fp.QUANT_STATS], shape, self.dtypes[name], self.scale_log2, what=what
            )
            k += fp.QUANT_STATS
        self._results = [] if self.pending is None else self.pending.resolve(host[k:])
        return out

    def results(self) -> list[CheckResult]:
        assert self._results is not None
        return self._results


class UnitRecorder:
    """One unit: quantises what is routed to it, checks each layer as it completes, streams the files."""

    def __init__(self, engine: CaptureEngine, sample: int, step: int, phase: str, folder: str):
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}; one of {PHASES}")
        self.engine, self.sample, self.step, self.phase, self.folder = engine, sample, step, phase, folder
        self.token_ids: list[int] | None = []
        self.position_ids: list[int] = []
        self.prompt_token_count: int | None = None  # default: seq_len
        self.generated_token_count = 0  # tokens generate() chose that this unit holds
        self.pad_token_id: int | None = None
        self.info: dict[str, Any] = {}  # adapter-specific facts for the unit's metadata
        self.autocast: dict[str, Any] | None = None
        self.seq_len = 0  # rows written so far
        self.hidden: int | None = None
        self.records: dict[tuple[int, str], _PointRecord] = {}
        self.checks: dict[tuple[int, str], CheckResult] = {}
        self.failures: list[CheckResult] = []  # points that did not fire exactly once (completeness)
        self.source: UnitRecorder | None = None  # the unit whose files this one shares (duplicated prompts)
        self.results: list[CheckResult] = []  # every check the gate ran on this unit
        self.sealed = False
        self._rows_now = 0  # rows of the forward in progress
        self._pending: dict[str, torch.Tensor] = {}  # the layer in progress: int32 codes per point
        self._dtypes: dict[str, torch.dtype] = {}
        self._range: dict[str, tuple[int, int] | torch.Tensor] = {}  # (lo, hi), or quantize_device's stats
        self._previous: tuple[int, torch.Tensor] | None = None  # layer L-1's block_output, for the chain
        self._unresolved: list[_LayerInFlight] = []  # layers whose checks are still on the device
        self.gate_abs_max: dict[int, torch.Tensor] = {}  # layer -> max |gate_proj output|, 0-d, on the device
        self.drift: dict[tuple[int, str], dict[str, Any]] = {}  # exact-int: (layer, point) -> worst drift

    @property
    def where(self) -> str:
        """How errors name this unit: empty for a capture of one unit."""
        return "" if self.engine.single_unit_hint else f"{self.folder}: "

    def begin_forward(self, fwd: ForwardInputs, row: int, cols: slice | torch.Tensor) -> None:
        tokens = fwd.tokens(row, cols)
        self.token_ids = None if tokens is None or self.token_ids is None else self.token_ids + tokens
        self.position_ids += fwd.positions(row, cols)
        self._rows_now = fwd.width(cols)

    def add(self, layer: int, point: CapturePoint, x: torch.Tensor) -> None:
        what = f"{self.where}layer {layer} {point.name}"
        if x.dim() != 2:
            raise CaptureError(f"{what}: expected (seq_len, hidden), got {tuple(x.shape)}")
        if self.hidden is None:
            self.hidden = int(x.shape[1])
        if tuple(x.shape) != (self._rows_now, self.hidden):
            raise CaptureError(
                f"{what}: shape {tuple(x.shape)}, expected ({self._rows_now}, {self.hidden}); every point must be "
                f"(seq_len, hidden_size)"
            )
        engine = self.engine
        if engine.asynchronous(x.device):  # on the device, no sync: the range is read back with the layer
            codes, self._range[point.name] = fp.quantize_device(x, engine.scale_log2, what=what)
        elif x.device.type == "cpu":  # straight into a pooled host buffer, which the writer then writes
            codes = engine.buffers.acquire(x.shape)
            self._range[point.name] = fp.quantize_into(x, codes, engine.scale_log2, what=what)
        else:  # another device (mps, xpu): quantise there, one sync per point
            codes, lo, hi = fp.quantize_with_range(x, engine.scale_log2, what=what)
            self._range[point.name] = (lo, hi)
        self._pending[point.name] = codes
        self._dtypes[point.name] = x.dtype
        if point.name == POINTS[-1].name:  # block_output closes the layer
            self._finish_layer(layer)

    def add_gate(self, layer: int, gate: torch.Tensor) -> None:
        """Keep the largest |gate_proj output| of the layer (zkLLM's SwiGLU table covers |gate| < 512)."""
        amax = gate.detach().abs().amax().to(torch.float32)  # stays on the device: no sync in the hot path
        old = self.gate_abs_max.get(layer)
        self.gate_abs_max[layer] = amax if old is None else torch.maximum(old, amax)

    def _derive_residuals(
        self, layer: int, previous: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """``residuals="exact-int"``: the residual points recomputed in int32 from the sublayer outputs, so that
        zkLLM's skip steps (``z = x + y``) reproduce them exactly. Returns the model's own codes they replace,
        and the largest drift from them per point, in LSB."""
        p = self._pending
        model = {name: p[name] for name in ("block_input", "post_attn_residual", "block_output")}
        block_input = previous if previous is not None else p["block_input"]
        post_attn = block_input.to(torch.int64) + p["attn_output"].to(torch.int64)
        block_output = post_attn + p["mlp_output"].to(torch.int64)
        for name, codes in (("post_attn_residual", post_attn), ("block_output", block_output)):
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(codes)).tolist())
            if lo < -fp.INT32_MAX or hi > fp.INT32_MAX:
                raise CaptureError(
                    f"{self.where}layer {layer} {name}: the int32 sum derived for residuals='exact-int' reaches "
                    f"{max(-lo, hi)}, beyond int32; lower --scale-log2, or capture with residuals='model'"
                )
            p[name] = codes.to(torch.int32)
            self._range[name] = (lo, hi)
        if previous is not None:
            p["block_input"] = previous
            lo, hi = (int(v) for v in torch.stack(torch.aminmax(previous)).tolist())
            self._range["block_input"] = (lo, hi)
        devs = torch.stack([(p[k].to(torch.int64) - v.to(torch.int64)).abs().max() for k, v in model.items()])
        drift = dict(zip(model, (float(d) for d in devs.tolist())))
        for name, lsb in drift.items():
            rec = self.drift.setdefault(
                (layer, name),
                {
                    "layer": layer,
                    "point": name,
                    "max_dev_lsb": 0.0,
                    "max_ratio": None,
                    "tolerance_lsb": None,
                    "index": [],
                },
            )
            rec["max_dev_lsb"] = max(rec["max_dev_lsb"], lsb)
        return model, drift

    def _settle_ranges(self, layer: int) -> None:
        """Read back the ranges quantised on the device (one sync per point), raising as quantize would."""
        for name, r in self._range.items():
            if isinstance(r, torch.Tensor):
                self._range[name] = fp.check_quantized(
                    r.tolist(),
                    tuple(self._pending[name].shape),
                    self._dtypes[name],
                    self.engine.scale_log2,
                    what=f"{self.where}layer {layer} {name}",
                )

    def _finish_layer(self, layer: int) -> None:
        """Check the layer and queue its files. All of the layer's quantised codes are in ``self._pending``
        here (int32 tensors: pooled host buffers on the CPU, device tensors on CUDA), before any check runs
        or anything is written."""
        engine = self.engine
        buffers = engine.buffers
        pending = None
        exact = engine.residuals == "exact-int"
        if exact:  # the derivation needs the codes' ranges now: exact-int takes the synchronous path
            self._settle_ranges(layer)
        if all(p.name in self._pending for p in POINTS):
            previous = self._previous[1] if self._previous and self._previous[0] == layer - 1 else None
            model_codes, drift = self._derive_residuals(layer, previous) if exact else (None, None)
            pending = start_identities(
                engine.contract,
                layer,
                self._pending,
                self._dtypes,
                engine.scale_log2,
                previous=None if previous is None else {"block_output": previous},
                norms=engine.norms(layer),
                files={p.name: p.file_name(layer) for p in POINTS},
                residuals=engine.residuals,
                model_codes=model_codes,
                drift_lsb=drift,
            )
            for name, codes in (model_codes or {}).items():  # replaced, and their checks have run: back to the pool
                if codes is not self._pending[name] and _pooled(buffers, codes):
                    buffers.release(codes)
        # else: a point did not fire; the completeness check fails the capture at the gate
        points = [p for p in POINTS if p.name in self._pending]
        flight = _LayerInFlight(layer, pending, {p.name: self._dtypes[p.name] for p in points}, engine.scale_log2)
        files, hosts = [], []
        device = next(iter(self._pending.values())).device if self._pending else torch.device("cpu")
        if exact or not engine.asynchronous(device):
            for point in points:
                codes = self._pending[point.name]
                host = codes if codes.device.type == "cpu" else codes.to("cpu")
                hosts.append(host)
                files.append((f"{self.folder}/{point.file_name(layer)}", host.numpy()))
                flight.shapes[point.name] = tuple(host.shape)
                flight.ranges[point.name] = self._range[point.name]
            flight.resolve_now()
            pooled = [h for h in hosts if _pooled(buffers, h)]
            ready = None
        else:  # CUDA: page-locked copies, one event for the layer; the writer waits on it, nobody else
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                for point in points:
                    codes = self._pending[point.name]
                    host = buffers.acquire(codes.shape)
                    host.copy_(codes, non_blocking=True)
                    hosts.append(host)
                    files.append((f"{self.folder}/{point.file_name(layer)}", host.numpy()))
                    flight.shapes[point.name] = tuple(host.shape)
                stats = [self._range[p.name] for p in points]
                if pending is not None and pending.stats is not None:
                    stats.append(pending.stats.reshape(-1))
                flight.stats = torch.empty(
                    sum(t.numel() for t in stats), dtype=torch.float64, pin_memory=buffers.pin_memory
                )
                flight.stats.copy_(torch.cat(stats), non_blocking=True)
                flight.event = ready = _record_event(device)
            pooled = hosts
        self._unresolved.append(flight)
        block_output = self._pending.get("block_output")
        if self._previous is not None and _pooled(buffers, self._previous[1]):
            buffers.release(self._previous[1])  # its chain check has run: the writer's is the last reference
        if block_output is not None and _pooled(buffers, block_output):
            buffers.retain(block_output)  # kept for the next layer's chain check
        self._previous = (layer, block_output) if block_output is not None else None
        self._pending, self._dtypes, self._range = {}, {}, {}
        engine.staging.append_many(files, ready=ready, done=lambda: [buffers.release(h) for h in pooled])
        self._resolve(wait=False)
        engine.layer_done()

    def _resolve(self, *, wait: bool) -> None:
        """Take in the results of the layers whose device work has finished (all of them if ``wait``), in
        order: ranges, records and checks; a value that did not fit int32 raises here."""
        while self._unresolved:
            flight = self._unresolved[0]
            if not flight.done(wait):
                return
            self._unresolved.pop(0)
            for name, (lo, hi) in flight.point_ranges(self.where).items():
                self._record(flight.layer, name, flight.dtypes[name], lo, hi, flight.shapes[name])
            for r in flight.results():
                self._merge_check(r)
                if (flight.layer, r.point) in self.drift and r.check.startswith("drift"):
                    self._merge_drift(flight.layer, r)

    def _record(self, layer: int, name: str, dtype: torch.dtype, lo: int, hi: int, shape: tuple[int, ...]) -> None:
        point = next(p for p in POINTS if p.name == name)
        key = (layer, name)
        rec = self.records.get(key)
        if rec is None:
            self.records[key] = _PointRecord(layer, point, dtype, lo, hi, *shape)
            return
        if rec.dtype != dtype:
            raise CaptureError(
                f"{self.where}layer {layer} {name}: dtype {dtype} in a later forward, {rec.dtype} before; one unit "
                f"must come from one dtype"
            )
        rec.int_min, rec.int_max, rec.rows = min(rec.int_min, lo), max(rec.int_max, hi), rec.rows + shape[0]

    def _merge_check(self, r: CheckResult) -> None:
        """Keep the worst of a check over the forwards that fed this unit; token indices count from its start."""
        if r.index and self.seq_len:
            r = _replace(r, index=(r.index[0] + self.seq_len, *r.index[1:]))
        key = (r.layer, r.check)
        old = self.checks.get(key)
        if old is None or (r.max_ratio or 0.0) > (old.max_ratio or 0.0):
            self.checks[key] = r

    def _merge_drift(self, layer: int, r: CheckResult) -> None:
        """Keep the drift check's worst ratio to its bound over the forwards that fed this unit (the largest
        deviation, which the norm checks widen by, is kept as each forward derives its points)."""
        rec = self.drift[(layer, str(r.point))]
        if rec["max_ratio"] is None or (r.max_ratio or 0.0) > rec["max_ratio"]:
            index = list(r.index or ())
            if index and self.seq_len:
                index[0] += self.seq_len
            rec.update(max_ratio=float(r.max_ratio or 0.0), tolerance_lsb=r.tolerance_lsb, index=index)

    def end_forward(self, fired: Counter[tuple[int, str]], layers: Sequence[int]) -> None:
        """Close this unit's share of a forward: every requested point must have fired exactly once."""
        for layer in layers:
            for point in POINTS:
                count = fired[(layer, point.name)]
                if count != 1:
                    self.failures.append(
                        CheckResult(
                            "completeness",
                            False,
                            f"fired {count} times in one forward, expected once",
                            layer=layer,
                            point=point.name,
                            file=point.file_name(layer),
                        )
                    )
        self._resolve(wait=True)
        self.seq_len += self._rows_now
        self._rows_now = 0
        self._drop_previous()
        self._pending, self._dtypes, self._range = {}, {}, {}

    def _drop_previous(self) -> None:
        if self._previous is not None and _pooled(self.engine.buffers, self._previous[1]):
            self.engine.buffers.release(self._previous[1])
        self._previous = None

    def seal(self) -> None:
        """No more forwards for this unit: queue the end of each file (fsync, alias links, digest)."""
        if self.sealed:
            return
        self.sealed = True
        self.engine.staging.seal_many(
            [
                (f"{self.folder}/{rec.point.file_name(layer)}", rec.point.alias_names(layer))
                for (layer, _), rec in self.records.items()
            ]
        )

    # -- manifest ---------------------------------------------------------------------------------

    def rows(self, written: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Manifest rows, ``file`` relative to the unit's folder."""
        engine = self.engine
        drift = {spec.name for spec in engine.contract.identities if spec.kind == "drift"}
        by_lhs = {(c.layer, c.point): c for c in self.checks.values() if c.point is not None and c.check not in drift}
        rows = []
        for (layer, _), rec in sorted(self.records.items(), key=lambda kv: (kv[0][0], kv[1].point.file)):
            w = written[f"{self.folder}/{rec.point.file_name(layer)}"]
            check = by_lhs.get((layer, rec.point.name))
            base = {
                "sample": self.sample,
                "step": self.step,
                "phase": self.phase,
                "layer": layer,
                "point": rec.point.name,
                "file": rec.point.file_name(layer),
                "alias_of": None,
                "rows": rec.rows,
                "cols": rec.cols,
                "dtype": "int32",
                "scale_log2": engine.scale_log2,
                "byte_size": w.byte_size,
                "sha256": w.sha256,
                "source_dtype": str(rec.dtype).removeprefix("torch."),
                "int_min": rec.int_min,
                "int_max": rec.int_max,
                "headroom": max(-rec.int_min, rec.int_max) / fp.INT32_MAX,
                "hf_module": engine.layout.module_path(layer, rec.point),
                "hook": "forward_pre" if rec.point.hook == "pre" else "forward",
                "check": check.check if check else None,
                "max_dev_lsb": check.max_dev_lsb if check else None,
                "max_dev_ratio": check.max_ratio if check else None,
            }
            rows.append(base)
            for i, alias in enumerate(rec.point.alias_names(layer)):
                rows.append(dict(base, point=alias_point_name(rec.point.name, i), file=alias, alias_of=base["file"]))
        return rows

    def metadata(self, common: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **common,
            "kind": "unit",
            "unit": {"sample": self.sample, "step": self.step, "phase": self.phase, **self.info},
            "tokens": {
                "input_ids": self.token_ids,
                "position_ids": self.position_ids,
                "prompt_token_count": self.seq_len if self.prompt_token_count is None else self.prompt_token_count,
                "generated_token_count": self.generated_token_count,
                "seq_len": self.seq_len,
                "pad_token_id": self.pad_token_id,
            },
            "runtime": {**common.get("runtime", {}), "autocast": self.autocast},
            # zkLLM's SwiGLU lookup covers |gate| < 512: the largest |gate_proj output| per layer, over real tokens
            "ffn": {
                "gate_abs_max": [{"layer": layer, "value": float(v)} for layer, v in sorted(self.gate_abs_max.items())]
            },
            "residuals": {
                "mode": self.engine.residuals,
                "drift": [self.drift[k] for k in sorted(self.drift)],
            },
            "checks": {
                "skipped": [
                    {"check": c.check, "layer": c.layer, "point": c.point, "reason": c.skipped}
                    for c in self.checks.values()
                    if c.skipped is not None
                ]
            },
        }


# --------------------------------------------------------------------------------------------------
# The engine


Planner = Callable[[ForwardInputs], Sequence[Route]]


@dataclass
class _Forward:
    inputs: ForwardInputs
    routes: Sequence[Route]
    fired: Counter[tuple[int, str]] = field(default_factory=Counter)
    autocast_seen: bool = False
    norms: dict[int, Any] = field(default_factory=dict)


@dataclass
class CaptureResult:
    """What a finished capture holds, for the caller to report."""

    out_dir: Path
    seq_len: int  # the unit's seq_len; for a dataset, the longest unit's
    hidden_size: int
    layers: list[int]
    scale_log2: int
    max_abs_value: float  # largest |x| over every captured point
    worst: tuple[int, str]  # (layer, point) where it occurs
    checks: list[CheckResult] = field(default_factory=list)  # every check the gate ran, by contract name
    warnings: list[str] = field(default_factory=list)  # zkLLM limits the capture does not meet
    units: list[dict[str, Any]] = field(default_factory=list)  # folder, sample, step, phase, seq_len per unit
    mode: str = "forward"

    @property
    def headroom(self) -> float:
        """Fraction of the int32 range the largest value uses (0.69 means 69%)."""
        return fp.headroom(self.max_abs_value, self.scale_log2)

    @property
    def skipped(self) -> list[CheckResult]:
        """The checks that could not run, each with its reason (never counted as passed)."""
        return [c for c in self.checks if c.skipped is not None]

    @property
    def is_dataset(self) -> bool:
        return bool(self.units) and self.units[0]["folder"] != ""


class CaptureEngine:
    """Hooks on one model and the units of one capture. Adapters give it a planner and say when to commit."""

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | os.PathLike[str],
        *,
        mode: str,
        layers: Sequence[int] | str | None = None,
        scale_log2: int = 16,
        overwrite: bool = False,
        progress: bool = False,
        stepped: bool = False,
        extra_metadata: Mapping[str, Any] | None = None,
        contract: str = "v1",
        residuals: str = "model",
    ):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise CaptureError(
                f"{type(model).__name__}: zkllm_hf hooks the model itself, and {type(model).__name__} runs "
                f"replicas in worker threads; pass the wrapped model (.module) and run it on one device, or "
                f"use device_map for a model that does not fit one"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture needs a torch.nn.Module (a HF model), got {type(model).__name__}")
        self.model = model
        self.mode = mode
        self.out_dir = Path(out_dir)
        self.scale_log2 = fp.check_scale(scale_log2)
        self.overwrite = overwrite
        self.progress = progress
        self.stepped = stepped  # units are sample-{b}/step-{k}/ even for one sample
        self.paddable = mode in ("forward", "full", "evaluate", "predict")  # can the user pad these forwards?
        self.extra_metadata = dict(extra_metadata or {})
        self.contract = load_contract(contract)
        if residuals not in RESIDUAL_MODES:
            raise ValueError(
                f"residuals={residuals!r}; one of {RESIDUAL_MODES}: 'model' writes the model's own residual stream, "
                f"'exact-int' derives it in int32 from the sublayer outputs so zkLLM's skip steps reproduce it exactly"
            )
        self.residuals = residuals
        self.layout = find_layout(model)
        n = len(self.layout.layers)
        if layers is None or isinstance(layers, str):
            self.layers = parse_layers(layers, n)
        else:
            self.layers = parse_layers(",".join(str(int(i)) for i in layers), n) if layers else []
        if not self.layers:
            raise ValueError("layers is empty; pass None for every layer, or a spec such as '0-3,7'")
        check_target(self.out_dir.absolute(), overwrite)  # refuse before any forward runs
        self.single_unit_hint = not stepped  # names in errors: no unit prefix until a second unit appears
        self.sample_offset = 0  # added to the adapter's sample numbers in folders, rows and metadata (datasets)
        self.units: dict[tuple[int, int], UnitRecorder] = {}
        self._staging: StagingDir | None = None
        self._buffers: HostBufferPool | None = None
        self._hooks: HookSet | None = None
        self._planner: Planner | None = None
        self._fwd: _Forward | None = None
        self._broken: str | None = None
        self._thread = threading.get_ident()
        self._fingerprint: Future[str] | None = None  # the weights fingerprint, started with the first forward
        self._runtime: list[dict[str, Any]] = []  # provenance.runtime() at each captured forward, distinct ones
        self._bar = None

    # -- lifetime ---------------------------------------------------------------------------------

    def attach(self, planner: Planner) -> None:
        """Install the hooks; ``planner(inputs)`` routes each forward's rows to units (or to nothing)."""
        self._planner = planner
        self._hooks = attach(
            self.model,
            self.layout,
            self.layers,
            self._on_point,
            self._on_model_input,
            self._on_model_output,
            on_gate=self._on_gate,
        )
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="capturing layers", unit="layer")

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        if self._hooks is not None:
            self._hooks.remove()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    # Host buffers may hold two layers (and a point) of the current forward, or this much if more: small
    # forwards (decode steps) would otherwise run in lockstep with the writer thread.
    MIN_IN_FLIGHT_BYTES = 8 << 20

    @property
    def staging(self) -> StagingDir:
        if self._staging is None:
            self._staging = StagingDir(self.out_dir, overwrite=self.overwrite)
        return self._staging

    @property
    def buffers(self) -> HostBufferPool:
        """The host buffers of this capture's codes (page-locked when the model has weights on CUDA)."""
        if self._buffers is None:
            pin = torch.cuda.is_available() and any(p.device.type == "cuda" for p in self.model.parameters())
            self._buffers = HostBufferPool(self.MIN_IN_FLIGHT_BYTES, pin_memory=pin)
        return self._buffers

    @staticmethod
    def asynchronous(device: torch.device) -> bool:
        """Whether codes on ``device`` take the asynchronous path (quantised and checked there, copied to
        page-locked memory without a sync, read back one layer later)."""
        return device.type == "cuda"

    def set_in_flight_rows(self, rows: int) -> None:
        """Bound the host memory of a forward of ``rows`` rows (over all its units): the layer in progress,
        the layer before it (being written; its block_output also waits for the chain check) and one more
        point, or ``MIN_IN_FLIGHT_BYTES`` if that is more."""
        hidden = int(getattr(self.model.config, "hidden_size", 4096))
        bound = (2 * len(POINTS) + 1) * 4 * hidden * max(1, rows)
        self.buffers.max_bytes = max(bound, self.MIN_IN_FLIGHT_BYTES)
        self.staging.max_in_flight_bytes = self.buffers.max_bytes

    def abort(self) -> None:
        """Drop everything staged and forget every unit; the target is left as it was."""
        if self._staging is not None:
            self._staging.abort()
            self._staging = None
        self._buffers = None
        self.units.clear()
        self._fwd = None
        self._broken = None
        self._fingerprint = None  # a new capture hashes the weights again
        self._runtime = []

    # -- units --------------------------------------------------------------------------------------

    def unit(self, sample: int, step: int = 0, phase: str = "forward") -> UnitRecorder:
        """The unit of (sample, step), created on first use."""
        key = (sample, step)
        u = self.units.get(key)
        if u is None:
            label = sample + self.sample_offset
            folder = f"sample-{label}/step-{step}" if self.stepped else f"sample-{label}"
            u = self.units[key] = UnitRecorder(self, label, step, phase, folder)
            if len(self.units) > 1:
                self.single_unit_hint = False
        elif u.sealed:
            raise CaptureError(f"{u.folder} was already completed; a unit cannot take rows after it is sealed")
        return u

    def drop(self, unit: UnitRecorder) -> None:
        """Forget a unit and remove its staged files (a forward that was never committed)."""
        self.units.pop((unit.sample - self.sample_offset, unit.step), None)
        if self._staging is not None:
            self._staging.remove(unit.folder)

    def clone(self, source: UnitRecorder, sample: int) -> UnitRecorder:
        """A sealed copy of ``source`` as another sample (rows duplicated before prefill: the same bytes,
        computed once, hard-linked into the new unit's folder at commit)."""
        if not source.sealed:
            raise CaptureError(f"{source.folder} must be complete before it is shared")
        u = self.unit(sample, source.step, source.phase)
        for name in (
            "token_ids",
            "position_ids",
            "prompt_token_count",
            "generated_token_count",
            "pad_token_id",
            "autocast",
            "seq_len",
            "hidden",
            "records",
            "checks",
            "failures",
            "gate_abs_max",
            "drift",
        ):
            setattr(u, name, getattr(source, name))
        u.info = dict(source.info, copy_of=source.folder)
        u.sealed = True
        u.source = source
        return u

    def norms(self, layer: int) -> Mapping[str, tuple[torch.Tensor, float]] | None:
        """The layer's norm weights and eps, read once per forward."""
        cache = self._fwd.norms if self._fwd is not None else {}
        if layer not in cache:
            cache[layer] = self.layout.norms(layer, self.contract.norm_modules)
        return cache[layer]

    def layer_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    # -- hooks ------------------------------------------------------------------------------------

    def _on_model_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module is not self.model or threading.get_ident() != self._thread:
            raise CaptureError(
                "the model ran as a replica or in another thread (nn.DataParallel, or Trainer with several GPUs): "
                "zkllm_hf captures one model on one thread; run on one device (CUDA_VISIBLE_DEVICES=0) or use "
                "device_map for a model that does not fit one"
            )
        if self._fwd is not None:  # the previous forward raised part-way: its units hold partial data
            self._broken = self._broken or "a forward raised part-way through the capture"
            self._fwd = None
        if self._broken or self._planner is None:
            return
        inputs = _forward_inputs(self.model, args, kwargs)
        routes = list(self._planner(inputs))
        for r in routes:
            if not inputs.width(r.cols):
                raise CaptureError(
                    f"batch row {r.row}: the attention mask marks no real token, so there is nothing to capture "
                    f"for {r.unit.folder}; drop the empty row"
                )
        for r in routes:
            r.unit.begin_forward(inputs, r.row, r.cols)
        if routes:
            self.set_in_flight_rows(sum(r.unit._rows_now for r in routes))
            self._start_fingerprint()
            now = provenance.runtime(self.model)  # what this forward runs with, for the metadata
            if now not in self._runtime:
                self._runtime.append(now)
        self._fwd = _Forward(inputs, routes)

    def _start_fingerprint(self) -> None:
        """Hash the weights on a thread while the first captured forward runs (on a GPU the forward leaves the
        host idle, and the fingerprint is then most of a capture's cost). Not for a model with offloaded
        weights: reading those means onloading them, which accelerate's hooks also do during the forward. Nor
        for bitsandbytes layers, which repack or move their quant state during the forward: their fingerprint
        is taken after it, when the capture commits."""
        if self._fingerprint is not None:
            return
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if any(t.device.type == "meta" for t in tensors) or provenance.has_bnb_layers(self.model):
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zkllm-fingerprint")
        self._fingerprint = pool.submit(provenance.weights_fingerprint, self.model)
        pool.shutdown(wait=False)

    def weights_fingerprint(self) -> str:
        """The fingerprint of the weights the capture ran with (started with the first forward, if it could)."""
        if self._fingerprint is None:
            return provenance.weights_fingerprint(self.model)
        return self._fingerprint.result()

    def _on_model_output(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        fwd, self._fwd = self._fwd, None
        if fwd is None:
            return
        for r in fwd.routes:
            r.unit.end_forward(fwd.fired, self.layers)

    def _on_point(self, layer: int, point: CapturePoint, tensor: torch.Tensor) -> None:
        fwd = self._fwd
        if fwd is None or not fwd.routes:
            return
        if not fwd.autocast_seen:  # inside forward: a wrapper such as accelerate's enters autocast there
            fwd.autocast_seen = True
            state = _autocast_state(tensor.device.type)
            for r in fwd.routes:
                r.unit.autocast = r.unit.autocast or state
        key = (layer, point.name)
        fwd.fired[key] += 1
        if fwd.fired[key] > 1:
            return  # reported as a completeness failure when the forward ends
        parts = _per_route(fwd, tensor)
        if parts is None:
            raise CaptureError(
                f"layer {layer} {point.name}: shape {tuple(tensor.shape)}, expected (batch {fwd.inputs.batch}, "
                f"seq_len, hidden)"
            )
        for unit, rows in parts:
            unit.add(layer, point, rows)

    def _on_gate(self, layer: int, tensor: torch.Tensor) -> None:
        fwd = self._fwd
        if fwd is None or not fwd.routes:
            return
        # None: not the (batch, seq_len, intermediate) projection this probe expects; nothing recorded
        for unit, rows in _per_route(fwd, tensor) or ():
            unit.add_gate(layer, rows)

    # -- commit -----------------------------------------------------------------------------------

    def commit(self, *, dataset_metadata: Mapping[str, Any] | None = None) -> CaptureResult:
        """Seal every unit, run the gate, write the manifests and move the capture into place.

        On any failure nothing is emitted and everything staged is dropped.
        """
        try:
            return self._commit(dataset_metadata)
        except BaseException:
            self.abort()
            raise

    def _commit(self, dataset_metadata: Mapping[str, Any] | None) -> CaptureResult:
        if self._broken:
            raise CaptureError(f"nothing was emitted: {self._broken}")
        if self._fwd is not None:
            raise CaptureError("nothing was emitted: a forward is still running")
        units = sorted(self.units.values(), key=lambda u: (u.sample, u.step))
        if not units:
            raise CaptureError("no forward was captured; nothing to emit")
        for u in units:
            u.seal()
        staging = self.staging
        written = {w.name: w for w in staging.wait()}
        flat = len(units) == 1 and not self.stepped
        for u in units:
            source = u.source
            if source is not None:  # a shared unit: the same bytes, hard-linked under its own folder
                (staging.path / u.folder).mkdir(parents=True, exist_ok=True)
                for rec in u.records.values():
                    for name in (rec.point.file_name(rec.layer), *rec.point.alias_names(rec.layer)):
                        _link(staging.path / source.folder / name, staging.path / u.folder / name)
                    written[f"{u.folder}/{rec.point.file_name(rec.layer)}"] = written[
                        f"{source.folder}/{rec.point.file_name(rec.layer)}"
                    ]
        hidden = units[0].hidden or 0
        common = self._common_metadata(hidden)
        fingerprint = common["model"]["weights_fingerprint"]  # computed once, for the metadata and the check
        contract = self.contract
        tag = (lambda r, u: r) if flat else (lambda r, u: _replace(r, unit=u.folder))  # noqa: E731
        # The gate: the contract's capture and file checks on each staged unit, as validate runs them from
        # disk, plus the layer checks already run in memory as each layer completed. In a dataset the
        # manifest schema runs once, on the index, which holds every unit's rows.
        skip = frozenset() if flat else frozenset({"manifest_schema"})
        failures: list[CheckResult] = []
        unit_tables = []
        dataset_rows: list[dict[str, Any]] = []
        for u in units:
            rows = u.rows(written)
            # each unit carries how it was made (the generation config, the Trainer's settings) too
            table = build_table(rows, {**u.metadata(common), **dict(dataset_metadata or {})})
            unit_tables.append((u, table))
            # as validate reads it back: the rows in manifest order, the metadata through JSON
            subject = CaptureSubject(
                table.to_pylist(),
                table,
                table_metadata(table),
                staging.path / u.folder,
                self.model,
                lambda: fingerprint,
                u.failures,
            )
            u.results = (
                list(u.checks.values())
                + run_capture_checks(contract, subject, skip=skip)
                + run_file_checks(contract, staging.path / u.folder, rows)
            )
            failures += [tag(r, u) for r in u.results if r.failed]
            prefix = "" if flat else f"{u.folder}/"
            dataset_rows += index_rows(rows, prefix)
        index_results: list[CheckResult] = []
        if not flat:
            index = build_table(dataset_rows, {})
            subject = CaptureSubject(index.to_pylist(), index, table_metadata(index))
            index_results += [
                _replace(c, unit=(c.file.rpartition("/")[0] if c.file else "."))
                for c in run_capture_checks(contract, subject, kinds=frozenset({"manifest_schema"}))
            ]
            failures += [c for c in index_results if c.failed]
        if failures:
            raise ContractViolation(failures, context=f"capture into '{self.out_dir}'")
        unit_meta = [
            {
                "folder": "" if flat else u.folder,
                "sample": u.sample,
                "step": u.step,
                "phase": u.phase,
                "seq_len": u.seq_len,
            }
            for u in units
        ]

        def write_all(root: Path) -> None:
            if flat:
                u, table = unit_tables[0]
                for entry in list((root / u.folder).iterdir()):
                    os.rename(entry, root / entry.name)
                (root / u.folder).rmdir()
                if u.folder.count("/"):
                    (root / u.folder.split("/")[0]).rmdir()
                write_manifest(table, root / MANIFEST_NAME)
                return
            for u, table in unit_tables:
                write_manifest(table, root / u.folder / MANIFEST_NAME)
            index, results = build_index(
                root,
                contract,
                dataset_rows,
                {**common, **dict(dataset_metadata or {})},
                [(m, table) for m, (_, table) in zip(unit_meta, unit_tables)],
            )
            index_results.extend(results)
            bad = [r for r in index_results if r.failed]
            if bad:
                raise ContractViolation(bad, context=f"capture into '{self.out_dir}'")
            write_manifest(index, root / MANIFEST_NAME)

        out = staging.commit(write_all)
        self._staging = None
        self._buffers = None
        self.detach()
        records = [rec for u in units for rec in u.records.values()]
        worst = max(records, key=lambda r: max(-r.int_min, r.int_max))
        max_abs = max(-worst.int_min, worst.int_max) / 2**self.scale_log2
        seq_len = max(u.seq_len for u in units)
        config = getattr(self.model, "config", None)
        result = CaptureResult(
            out_dir=out,
            seq_len=seq_len,
            hidden_size=hidden,
            layers=list(self.layers),
            scale_log2=self.scale_log2,
            max_abs_value=max_abs,
            worst=(worst.layer, worst.point.name),
            checks=[tag(c, u) for u in units for c in u.results] + index_results,
            warnings=zkllm_limit_warnings(
                seq_len,
                hidden,
                getattr(config, "intermediate_size", None),
                paddable=self.paddable,
                num_attention_heads=getattr(config, "num_attention_heads", None),
                num_key_value_heads=getattr(config, "num_key_value_heads", None),
            ),
            units=unit_meta,
            mode=self.mode,
        )
        logger.info(
            "captured %d unit(s) of %d layers into %s; largest |x| %.6g at layer %d %s uses %.1f%% of int32",
            len(units),
            len(self.layers),
            out,
            max_abs,
            *result.worst,
            100 * result.headroom,
        )
        return result

    def _ran_with(self) -> dict[str, Any]:
        """The runtime the captured forwards ran with; a setting that changed between them lists each value."""
        seen = self._runtime or [provenance.runtime(self.model)]
        merged: dict[str, Any] = {}
        for key in seen[0]:
            values = [r[key] for r in seen]
            distinct = [v for i, v in enumerate(values) if v not in values[:i]]
            merged[key] = distinct[0] if len(distinct) == 1 else distinct
        return merged

    def _common_metadata(self, hidden: int) -> dict[str, Any]:
        ran = self._ran_with()
        return {
            "contract": self.contract.identity,
            "versions": provenance.versions(),
            "runtime": ran,
            "model": {
                **provenance.model_info(self.model, fingerprint=False),
                "weights_fingerprint": self.weights_fingerprint(),
                "attn_implementation": ran["attn_implementation"],  # the one that ran, not the one now
            },
            "capture": {
                "mode": self.mode,
                "layers": list(self.layers),
                "scale_log2": self.scale_log2,
                "residuals": self.residuals,
                "hidden_size": hidden,
                "points": [p.name for p in POINTS],
                "device": str(next((p.device for p in self.model.parameters()), "cpu")),
                "created_utc": provenance.utc_now(),
            },
            "extra": self.extra_metadata,
        }


def index_rows(rows: Sequence[Mapping[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """A unit's manifest rows as a dataset index lists them: ``file`` (and ``alias_of``) under ``prefix``."""
    return [
        dict(r, file=prefix + r["file"], alias_of=None if r["alias_of"] is None else prefix + r["alias_of"])
        for r in rows
    ]


def build_index(
    root: Path,
    contract: Any,
    rows: list[dict[str, Any]],
    metadata: Mapping[str, Any],
    units: Sequence[tuple[Mapping[str, Any], Any]],
    *,
    kinds: frozenset[str] = INDEX_KINDS - {"manifest_schema"},
) -> tuple[Any, list[CheckResult]]:
    """The dataset index over units whose manifests are already written under ``root``, and its checks.

    ``rows`` are every unit's rows as :func:`index_rows` lists them; ``units`` pairs each unit's entry
    (folder, sample, step, phase, seq_len, ...) with its manifest table. Returns the index table (the
    metadata's unit list gains each manifest's SHA-256) and the index's own checks as ``validate`` runs them.
    """
    meta = {
        **metadata,
        "kind": "dataset",
        "units": [dict(m, manifest_sha256=sha256_file(root / m["folder"] / MANIFEST_NAME)) for m, _ in units],
    }
    index = build_table(rows, meta)
    subject = CaptureSubject(index.to_pylist(), index, table_metadata(index))
    entries = [
        dict(m, rows=table.to_pylist(), metadata=table_metadata(table)) for m, (_, table) in zip(meta["units"], units)
    ]
    results = run_capture_checks(contract, subject, kinds=kinds)
    results += run_dataset_checks(contract, root, rows, meta, entries)
    return index, [_replace(r, unit=r.unit or ".") for r in results]


def _per_route(fwd: _Forward, tensor: torch.Tensor) -> list[tuple[UnitRecorder, torch.Tensor]] | None:
    """Each route's unit and its rows and columns of a hooked (batch, seq_len, width) tensor (a 2-D one is a
    batch of one), or None if the tensor is not shaped so."""
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tensor.shape[0] != fwd.inputs.batch:
        return None
    return [
        (r.unit, tensor[r.row, r.cols if isinstance(r.cols, slice) else r.cols.to(tensor.device)]) for r in fwd.routes
    ]


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
