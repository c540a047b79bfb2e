"""One unit's recorder: quantise what is routed to it, check each layer as it completes, hand it to the sink.

A *unit* is one sample's share of one or more forwards (a prompt, a decode step, a padded batch row). The
recorder sees the capture only through a :class:`UnitContext` (the options, the host buffers, the sink, the
layers' norms): it never reaches into the engine. Its manifest rows and metadata are built by
:mod:`zkllm_hf.manifest_rows`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as _replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from . import fixed_point as fp
from . import manifest_rows
from .buffers import HostBufferPool
from .contracts import CheckResult, Contract, start_identities
from .errors import CaptureError
from .flight import LayerInFlight, pooled, record_event
from .hooks import DecoderLayout
from .options import CaptureOptions
from .points import POINTS, CapturePoint
from .residuals import derive_exact_int, merge_drift_check, note_drift

if TYPE_CHECKING:
    from .forward import ForwardInputs
    from .sink import Sink

__all__ = ["PHASES", "PointRecord", "UnitContext", "UnitRecorder", "completeness_failures"]

PHASES = ("forward", "prefill", "decode", "full")


class UnitContext(Protocol):
    """What a unit needs from the capture it belongs to (the engine provides it)."""

    options: CaptureOptions
    layout: DecoderLayout

    @property
    def buffers(self) -> HostBufferPool: ...

    @property
    def sink(self) -> Sink: ...

    def asynchronous(self, device: torch.device) -> bool: ...

    def norms(self, layer: int) -> Mapping[str, tuple[torch.Tensor, float]] | None: ...

    def layer_done(self) -> None: ...


@dataclass
class PointRecord:
    """What a unit's manifest says of one (layer, point): its source dtype, int range and shape so far."""

    layer: int
    point: CapturePoint
    dtype: torch.dtype
    int_min: int
    int_max: int
    rows: int
    cols: int


def completeness_failures(
    fired: Counter[tuple[int, str]], layers: Sequence[int], contract: Contract
) -> list[CheckResult]:
    """A failed completeness check for each requested point that did not fire exactly once in a forward."""
    return [
        CheckResult(
            contract.name_of("completeness"),
            False,
            f"fired {count} times in one forward, expected once",
            layer=layer,
            point=point.name,
            file=point.file_name(layer),
        )
        for layer in layers
        for point in POINTS
        if (count := fired[(layer, point.name)]) != 1
    ]


class UnitRecorder:
    """One unit: quantises what is routed to it, checks each layer as it completes, streams the files."""

    def __init__(self, context: UnitContext, sample: int, step: int, phase: str, folder: str, *, named: bool = False):
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}; one of {PHASES}")
        self.context, self.sample, self.step, self.phase, self.folder = context, sample, step, phase, folder
        self.named = named  # errors name the unit's folder (once the capture has more than one unit)
        self.token_ids: list[int] | None = []
        self.position_ids: list[int] = []
        self.prompt_token_count: int | None = None  # default: seq_len
        self.generated_token_count = 0  # tokens generate() chose that this unit holds
        self.pad_token_id: int | None = None
        self.info: dict[str, Any] = {}  # adapter-specific facts for the unit's metadata
        self.autocast: dict[str, Any] | None = None
        self.seq_len = 0  # rows written so far
        self.hidden: int | None = None
        self.records: dict[tuple[int, str], PointRecord] = {}
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
        self._unresolved: list[LayerInFlight] = []  # layers whose checks are still on the device
        self.gate_abs_max: dict[int, torch.Tensor] = {}  # layer -> max |gate_proj output|, 0-d, on the device
        self.drift: dict[tuple[int, str], dict[str, Any]] = {}  # exact-int: (layer, point) -> worst drift
        self.replay: dict[str, Any] | None = None  # where its rows came from (replay_record), set at commit

    @property
    def where(self) -> str:
        """How errors name this unit: empty for a capture of one unit."""
        return f"{self.folder}: " if self.named else ""

    @property
    def rows_now(self) -> int:
        """Rows of the forward in progress."""
        return self._rows_now

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
        ctx, scale = self.context, self.context.options.scale_log2
        if ctx.asynchronous(x.device):  # on the device, no sync: the range is read back with the layer
            codes, self._range[point.name] = fp.quantize_device(x, scale, what=what)
        elif x.device.type == "cpu":  # straight into a pooled host buffer, which the writer then writes
            codes = ctx.buffers.acquire(x.shape)
            self._range[point.name] = fp.quantize_into(x, codes, scale, what=what)
        else:  # another device (mps, xpu): quantise there, one sync per point
            codes, lo, hi = fp.quantize_with_range(x, scale, what=what)
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

    # -- one layer ----------------------------------------------------------------------------------

    def _settle_ranges(self, layer: int) -> None:
        """Read back the ranges quantised on the device (one sync per point), raising as quantize would."""
        for name, r in self._range.items():
            if isinstance(r, torch.Tensor):
                self._range[name] = fp.check_quantized(
                    r.tolist(),
                    tuple(self._pending[name].shape),
                    self._dtypes[name],
                    self.context.options.scale_log2,
                    what=f"{self.where}layer {layer} {name}",
                )

    def _start_checks(self, layer: int, exact: bool) -> Any:
        """Start the contract's layer checks on the complete layer in ``self._pending`` (deriving the residual
        points first for exact-int); None when a point did not fire (the gate's completeness check fails it)."""
        if not all(p.name in self._pending for p in POINTS):
            return None
        opts, buffers = self.context.options, self.context.buffers
        previous = self._previous[1] if self._previous and self._previous[0] == layer - 1 else None
        model_codes, drift = None, None
        if exact:
            derived, ranges, model_codes, drift = derive_exact_int(
                self._pending, previous, what=f"{self.where}layer {layer}"
            )
            self._pending.update(derived)
            self._range.update(ranges)
            note_drift(self.drift, layer, drift)
        pending = start_identities(
            opts.contract,
            layer,
            self._pending,
            self._dtypes,
            opts.scale_log2,
            previous=None if previous is None else {"block_output": previous},
            norms=self.context.norms(layer),
            files={p.name: p.file_name(layer) for p in POINTS},
            residuals=opts.residuals,
            model_codes=model_codes,
            drift_lsb=drift,
        )
        for name, codes in (model_codes or {}).items():  # replaced, and their checks have run: back to the pool
            if codes is not self._pending[name] and pooled(buffers, codes):
                buffers.release(codes)
        return pending

    def _to_host_now(self, layer: int, points: list[CapturePoint], flight: LayerInFlight) -> tuple[list, list]:
        """The synchronous path: the codes (already on the host, or copied there now) and their files."""
        files, hosts = [], []
        for point in points:
            codes = self._pending[point.name]
            host = codes if codes.device.type == "cpu" else codes.to("cpu")
            hosts.append(host)
            files.append((f"{self.folder}/{point.file_name(layer)}", host.numpy()))
            flight.shapes[point.name] = tuple(host.shape)
            flight.ranges[point.name] = self._range[point.name]
        flight.resolve_now()
        return files, [h for h in hosts if pooled(self.context.buffers, h)]

    def _to_host_async(self, layer: int, points: list[CapturePoint], flight: LayerInFlight, device: torch.device):
        """CUDA: page-locked copies, one event for the layer; the writer waits on it, nobody else."""
        buffers = self.context.buffers
        files, hosts = [], []
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            for point in points:
                codes = self._pending[point.name]
                host = buffers.acquire(codes.shape)
                host.copy_(codes, non_blocking=True)
                hosts.append(host)
                files.append((f"{self.folder}/{point.file_name(layer)}", host.numpy()))
                flight.shapes[point.name] = tuple(host.shape)
            stats = [self._range[p.name] for p in points]
            if flight.pending is not None and flight.pending.stats is not None:
                stats.append(flight.pending.stats.reshape(-1))
            flight.stats = torch.empty(
                sum(t.numel() for t in stats), dtype=torch.float64, pin_memory=buffers.pin_memory
            )
            flight.stats.copy_(torch.cat(stats), non_blocking=True)
            flight.event = record_event(device)
        return files, hosts

    def _finish_layer(self, layer: int) -> None:
        """Check the layer and queue its files. All of the layer's quantised codes are in ``self._pending``
        here (int32 tensors: pooled host buffers on the CPU, device tensors on CUDA), before any check runs
        or anything is written."""
        ctx = self.context
        buffers = ctx.buffers
        exact = ctx.options.residuals == "exact-int"
        if exact:  # the derivation needs the codes' ranges now: exact-int takes the synchronous path
            self._settle_ranges(layer)
        pending = self._start_checks(layer, exact)
        points = [p for p in POINTS if p.name in self._pending]
        flight = LayerInFlight(layer, pending, {p.name: self._dtypes[p.name] for p in points}, ctx.options.scale_log2)
        device = next(iter(self._pending.values())).device if self._pending else torch.device("cpu")
        if exact or not ctx.asynchronous(device):
            files, release = self._to_host_now(layer, points, flight)
        else:
            files, release = self._to_host_async(layer, points, flight, device)
        self._unresolved.append(flight)
        self._keep_block_output(layer)
        ctx.sink.append_many(files, ready=flight.event, done=lambda: [buffers.release(h) for h in release])
        self._resolve(wait=False)
        ctx.layer_done()

    def _keep_block_output(self, layer: int) -> None:
        """Keep this layer's block_output for the next layer's chain check (giving back the one before)."""
        buffers = self.context.buffers
        block_output = self._pending.get("block_output")
        if self._previous is not None and pooled(buffers, self._previous[1]):
            buffers.release(self._previous[1])  # its chain check has run: the writer's is the last reference
        if block_output is not None and pooled(buffers, block_output):
            buffers.retain(block_output)  # kept for the next layer's chain check
        self._previous = (layer, block_output) if block_output is not None else None
        self._pending, self._dtypes, self._range = {}, {}, {}

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
                if (flight.layer, r.point) in self.drift and r.check in self.context.options.contract.names_of("drift"):
                    merge_drift_check(self.drift[(flight.layer, str(r.point))], r, self.seq_len)

    def _record(self, layer: int, name: str, dtype: torch.dtype, lo: int, hi: int, shape: tuple[int, ...]) -> None:
        point = next(p for p in POINTS if p.name == name)
        key = (layer, name)
        rec = self.records.get(key)
        if rec is None:
            self.records[key] = PointRecord(layer, point, dtype, lo, hi, *shape)
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

    # -- the end of a forward, of the unit -----------------------------------------------------------

    def end_forward(self, fired: Counter[tuple[int, str]], layers: Sequence[int]) -> None:
        """Close this unit's share of a forward: every requested point must have fired exactly once."""
        self.failures += completeness_failures(fired, layers, self.context.options.contract)
        self._resolve(wait=True)
        self.seq_len += self._rows_now
        self._rows_now = 0
        self._drop_previous()
        self._pending, self._dtypes, self._range = {}, {}, {}

    def _drop_previous(self) -> None:
        if self._previous is not None and pooled(self.context.buffers, self._previous[1]):
            self.context.buffers.release(self._previous[1])
        self._previous = None

    def seal(self) -> None:
        """No more forwards for this unit: queue the end of each file (fsync, alias links, digest)."""
        if self.sealed:
            return
        self.sealed = True
        self.context.sink.seal_many(
            [
                (f"{self.folder}/{rec.point.file_name(layer)}", rec.point.alias_names(layer))
                for (layer, _), rec in self.records.items()
            ]
        )

    SHARED_FIELDS = (
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
    )

    def share(self, source: UnitRecorder) -> None:
        """Become a sealed copy of ``source``: its records and checks, its files hard-linked at commit."""
        for name in self.SHARED_FIELDS:
            setattr(self, name, getattr(source, name))
        self.info = dict(source.info, copy_of=source.folder)
        self.sealed = True
        self.source = source

    # -- manifest ---------------------------------------------------------------------------------

    def rows(self, written: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Manifest rows, ``file`` relative to the unit's folder."""
        return manifest_rows.unit_rows(self, written, self.context.options, self.context.layout)

    def metadata(self, common: Mapping[str, Any]) -> dict[str, Any]:
        """The unit's manifest metadata: ``common`` (what every unit of the capture shares) and its own."""
        options = self.context.options
        return manifest_rows.unit_metadata(
            self, common, options.residuals, tokenizer=options.tokenizer, store_text=options.store_text
        )
