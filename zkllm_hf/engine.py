"""The capture engine: hook lifetime and dispatch. One set of hooks per model, switched on per forward.

The pipeline, one module per stage: :mod:`~zkllm_hf.options` (what was asked, checked once) ->
:mod:`~zkllm_hf.forward` (what a forward received, and the adapter's routes of its rows to units) ->
:mod:`~zkllm_hf.unit` (quantise, check each layer as it completes; :mod:`~zkllm_hf.residuals` for exact-int)
-> :mod:`~zkllm_hf.sink` (the staging writer, or memory) -> :mod:`~zkllm_hf.gate` (the commit's checks and
manifests). The engine installs the hooks once, and for each forward asks its adapter (``capture()``,
:class:`~zkllm_hf.CaptureLogitsProcessor`, :class:`~zkllm_hf.CaptureCallback`) which rows and columns go to
which unit; it hands each hooked tensor to the units and, at commit, the units to the gate.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import provenance
from .buffers import HostBufferPool
from .errors import CaptureError
from .forward import Forward, ForwardInputs, Planner, Route, autocast_state, forward_inputs, per_route
from .gate import CaptureResult, build_index, gate_units, index_rows, share_units, summarise, write_manifests
from .hooks import HookSet, attach, find_layout
from .manifest_rows import common_metadata, ran_with
from .options import CaptureOptions, residuals_dtype_problem
from .points import POINTS, CapturePoint
from .replay_record import ForwardLog
from .sink import Sink, staging_sink, writer_count
from .unit import PHASES, UnitRecorder
from .writer import StagingDir, check_target

__all__ = [
    "PHASES",
    "CaptureEngine",
    "CaptureError",
    "CaptureResult",
    "ForwardInputs",
    "Planner",
    "Route",
    "UnitRecorder",
    "build_index",
    "index_rows",
]


def _refuse_replicas(model: Any) -> None:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise CaptureError(
            f"{type(model).__name__}: zkllm_hf hooks the model itself, and {type(model).__name__} runs "
            f"replicas in worker threads; pass the wrapped model (.module) and run it on one device, or "
            f"use device_map for a model that does not fit one"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture needs a torch.nn.Module (a HF model), got {type(model).__name__}")


def _resolved_options(
    model: nn.Module, mode: str, options: CaptureOptions | None, kwargs: dict[str, Any]
) -> CaptureOptions:
    """The engine's options: given, or built from the keyword arguments; refused before any hook or forward
    when the residual mode cannot run in the model's dtype (with the fix)."""
    if options is None:
        options = CaptureOptions.build(lambda: len(find_layout(model).layers), mode=mode, **kwargs)
    elif kwargs:
        raise TypeError(f"pass options or keyword arguments, not both ({', '.join(kwargs)})")
    problem = residuals_dtype_problem(options.residuals, getattr(model, "dtype", None))
    if problem is not None:
        raise ValueError(problem)
    return options


class CaptureEngine:
    """Hooks on one model and the units of one capture. Adapters give it a planner and say when to commit.

    Pass ``options`` (a :class:`~zkllm_hf.options.CaptureOptions`), or the keyword arguments it is built
    from. ``sink`` (a function making a :class:`~zkllm_hf.sink.Sink`) replaces the staging folder, e.g. with a
    :class:`~zkllm_hf.sink.MemorySink`; such a capture is read from the sink and never committed.
    """

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | os.PathLike[str],
        *,
        mode: str = "forward",
        options: CaptureOptions | None = None,
        sink: Callable[[], Sink] | None = None,
        **kwargs: Any,
    ):
        _refuse_replicas(model)
        self.model = model
        self.out_dir = Path(out_dir)
        self.options = options = _resolved_options(model, mode, options, kwargs)
        self.layout = find_layout(model)
        self.layers = list(options.layers)
        self._make_sink = sink
        if sink is None:
            check_target(self.out_dir.absolute(), options.overwrite)  # refuse before any forward runs
        self.single_unit_hint = not options.stepped  # names in errors: no unit prefix until a second unit appears
        self.sample_offset = 0  # added to the adapter's sample numbers in folders, rows and metadata (datasets)
        self.units: dict[tuple[int, int], UnitRecorder] = {}
        self._sink: Sink | None = None
        self._buffers: HostBufferPool | None = None
        self._hooks: HookSet | None = None
        self._planner: Planner | None = None
        self._fwd: Forward | None = None
        self._broken: str | None = None
        self._thread = threading.get_ident()
        self._fingerprint: Future[tuple[str, str]] | None = None  # (fingerprint, how), from the first forward
        self._runtime: list[dict[str, Any]] = []  # provenance.runtime() at each captured forward, distinct ones
        self._bar = None
        self.forward_log = ForwardLog()  # every forward's inputs, for the units' replay metadata

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
        if self.options.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="capturing layers", unit="layer")

    def detach(self) -> None:
        """Remove every hook (idempotent)."""
        if self._hooks is not None:
            self._hooks.remove()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # Host buffers may hold two layers (and a point) of the current forward, or this much if more: small
    # forwards (decode steps) would otherwise run in lockstep with the writer thread.
    MIN_IN_FLIGHT_BYTES = 8 << 20

    @property
    def sink(self) -> Sink:
        """Where the units' codes go: the staging folder (made on first use), or the sink given."""
        if self._sink is None:
            o = self.options
            writers = writer_count(self.model, o.writers)
            make = self._make_sink or (
                lambda: staging_sink(self.out_dir, overwrite=o.overwrite, digest=o.digest, writers=writers)
            )
            self._sink = make()
        return self._sink

    @property
    def staging(self) -> StagingDir:
        """The staging folder the capture is written to (a capture to another sink has none)."""
        sink = self.sink
        if not isinstance(sink, StagingDir):
            raise CaptureError(f"this capture goes to a {type(sink).__name__}, not to disk; read it from the sink")
        return sink

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
        self.sink.max_in_flight_bytes = self.buffers.max_bytes

    def abort(self) -> None:
        """Drop everything staged and forget every unit; the target is left as it was."""
        if self._sink is not None:
            self._sink.abort()
            self._sink = None
        self._buffers = None
        self.units.clear()
        self._fwd = None
        self._broken = None
        self._fingerprint = None  # a new capture hashes the weights again
        self._runtime = []
        self.forward_log.clear()

    # -- units --------------------------------------------------------------------------------------

    def unit(self, sample: int, step: int = 0, phase: str = "forward") -> UnitRecorder:
        """The unit of (sample, step), created on first use."""
        key = (sample, step)
        u = self.units.get(key)
        if u is None:
            label = sample + self.sample_offset
            folder = f"sample-{label}/step-{step}" if self.options.stepped else f"sample-{label}"
            u = self.units[key] = UnitRecorder(self, label, step, phase, folder, named=not self.single_unit_hint)
            if len(self.units) > 1:
                self.single_unit_hint = False
                for other in self.units.values():
                    other.named = True
        elif u.sealed:
            raise CaptureError(f"{u.folder} was already completed; a unit cannot take rows after it is sealed")
        return u

    def drop(self, unit: UnitRecorder) -> None:
        """Forget a unit and remove its staged files (a forward that was never committed)."""
        self.units.pop((unit.sample - self.sample_offset, unit.step), None)
        if self._sink is not None:
            self._sink.remove(unit.folder)

    def clone(self, source: UnitRecorder, sample: int) -> UnitRecorder:
        """A sealed copy of ``source`` as another sample (rows duplicated before prefill: the same bytes,
        computed once, hard-linked into the new unit's folder at commit)."""
        if not source.sealed:
            raise CaptureError(f"{source.folder} must be complete before it is shared")
        u = self.unit(sample, source.step, source.phase)
        u.share(source)
        return u

    def norms(self, layer: int) -> Mapping[str, tuple[torch.Tensor, float]] | None:
        """The layer's norm weights and eps, read once per forward."""
        cache = self._fwd.norms if self._fwd is not None else {}
        if layer not in cache:
            cache[layer] = self.layout.norms(layer, self.options.contract.norm_modules)
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
        inputs = forward_inputs(self.model, args, kwargs)
        routes = list(self._planner(inputs))
        for r in routes:
            if not inputs.width(r.cols):
                raise CaptureError(
                    f"batch row {r.row}: the attention mask marks no real token, so there is nothing to capture "
                    f"for {r.unit.folder}; drop the empty row"
                )
        self.forward_log.observe(inputs, routes)
        for r in routes:
            r.unit.begin_forward(inputs, r.row, r.cols)
        if routes:
            self.set_in_flight_rows(sum(r.unit.rows_now for r in routes))
            self._start_fingerprint()
            now = provenance.runtime(self.model)  # what this forward runs with, for the metadata
            if now not in self._runtime:
                self._runtime.append(now)
        self._fwd = Forward(inputs, routes)

    def _start_fingerprint(self) -> None:
        """Hash the weights on a thread while the first captured forward runs (on a GPU the forward leaves the
        host idle, and the fingerprint is then most of a capture's cost). Not for a model with offloaded
        weights: reading those means onloading them, which accelerate's hooks also do during the forward. Nor
        for bitsandbytes layers, which repack or move their quant state during the forward: their fingerprint
        is taken after it, when the capture commits."""
        if self._fingerprint is not None or self._make_sink is not None:
            return  # a capture into another sink (a replay) is never committed: its fingerprint is never read
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if any(t.device.type == "meta" for t in tensors) or provenance.has_bnb_layers(self.model):
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zkllm-fingerprint")
        self._fingerprint = pool.submit(self.weights_fingerprint, now=True)
        pool.shutdown(wait=False)

    def weights_fingerprint(self, *, now: bool = False) -> tuple[str, str]:
        """``(fingerprint, "cached" or "full")`` of the weights the capture ran with (started with the first
        forward, if it could; reused from earlier in this process while the parameters are unchanged)."""
        if now or self._fingerprint is None:
            return provenance.cached_fingerprint(self.model, digest=self.options.digest, mode=self.options.fingerprint)
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
            state = autocast_state(tensor.device.type)
            for r in fwd.routes:
                r.unit.autocast = r.unit.autocast or state
        key = (layer, point.name)
        fwd.fired[key] += 1
        if fwd.fired[key] > 1:
            return  # reported as a completeness failure when the forward ends
        parts = per_route(fwd, tensor)
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
        for unit, rows in per_route(fwd, tensor) or ():
            unit.add_gate(layer, rows)

    # -- commit -----------------------------------------------------------------------------------

    def commit(self, *, dataset_metadata: Mapping[str, Any] | None = None) -> CaptureResult:
        """Seal every unit, run the gate, write the manifests and move the capture into place.

        On any failure nothing is emitted and everything staged is dropped.
        """
        try:
            return self._commit(dict(dataset_metadata or {}))
        except BaseException:
            self.abort()
            raise

    def _sealed_units(self) -> list[UnitRecorder]:
        """Every unit, in order, sealed; refused if a forward broke, is still running, or none ran."""
        if self._broken:
            raise CaptureError(f"nothing was emitted: {self._broken}")
        if self._fwd is not None:
            raise CaptureError("nothing was emitted: a forward is still running")
        units = sorted(self.units.values(), key=lambda u: (u.sample, u.step))
        if not units:
            raise CaptureError("no forward was captured; nothing to emit")
        for u in units:
            u.seal()
        return units

    def _commit(self, extra: dict[str, Any]) -> CaptureResult:
        units = self._sealed_units()
        staging = self.staging
        written = {w.name: w for w in staging.wait()}
        share_units(staging.path, units, written)
        self.forward_log.assign(units)
        hidden = units[0].hidden or 0
        ran = ran_with(self._runtime, self.model)
        common = common_metadata(self.model, self.options, ran, *self.weights_fingerprint(), hidden=hidden)
        gated = gate_units(
            units,
            written,
            staging.path,
            options=self.options,
            model=self.model,
            common=common,
            extra=extra,
            out_dir=self.out_dir,
        )
        out = staging.commit(
            lambda root: write_manifests(root, gated, self.options.contract, {**common, **extra}, self.out_dir)
        )
        self._sink = None
        self._buffers = None
        self.detach()
        return summarise(out, gated, self.options, self.model, hidden)


def _option(name: str) -> property:
    return property(lambda self: getattr(self.options, name), doc=f"Deprecated (0.1.x): ``options.{name}``.")


# the engine's attributes as they were named before CaptureOptions: read-only aliases for one release
for _name in (
    "mode",
    "scale_log2",
    "residuals",
    "contract",
    "overwrite",
    "progress",
    "stepped",
    "paddable",
    "extra_metadata",
):
    setattr(CaptureEngine, _name, _option(_name))
del _name
