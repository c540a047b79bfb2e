"""One layer of one unit in flight: its checks started, its numbers not yet read back from the device.

On CUDA a layer's range statistics and check results are copied to page-locked memory without a sync and
read back once its event has completed (a layer later); elsewhere they are resolved at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import fixed_point as fp
from .buffers import HostBufferPool
from .contracts import CheckResult

__all__ = ["Done", "LayerInFlight", "pooled", "record_event"]


class Done:
    """The event of work that is already done (the asynchronous path run on the CPU, as tests do)."""

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def record_event(device: torch.device) -> Any:
    """An event recorded now on ``device``'s current stream (a done one off CUDA)."""
    if device.type != "cuda":
        return Done()
    event = torch.cuda.Event()
    event.record()
    return event


def pooled(buffers: HostBufferPool, t: torch.Tensor) -> bool:
    """Whether ``t`` is one of the pool's host buffers (and so must be given back to it)."""
    return t.device.type == "cpu" and buffers.owns(t)


@dataclass
class LayerInFlight:
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
