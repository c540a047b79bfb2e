"""A small pool of reusable int32 host buffers: the capture's working memory, bounded in bytes.

Every layer's codes go through host memory on their way to the disk. Allocating that memory afresh for
every point makes the allocator's footprint grow with depth (freed blocks of several MB stay in the heap),
and on CUDA an ordinary allocation cannot take an asynchronous copy. So the engine takes its host buffers
from this pool (page-locked for CUDA) and gives each back when the writer has written it and no check
needs it any more. The pool never holds more than ``max_bytes`` (unless one buffer alone is larger):
:meth:`acquire` waits for a :meth:`release` instead, and ``high_water_bytes`` records the most it held.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from .direct_io import BLOCK


def aligned_empty(numel: int, *, pin_memory: bool = False) -> torch.Tensor:
    """A flat, uninitialised int32 tensor of ``numel`` elements starting on a page boundary, as ``O_DIRECT``
    writes need (:mod:`zkllm_hf.direct_io`); its storage is a page larger."""
    raw = torch.empty(numel + BLOCK // 4, dtype=torch.int32, pin_memory=pin_memory)
    skip = (-raw.data_ptr() % BLOCK) // 4  # torch aligns to 64 bytes at least: a whole number of int32
    return raw[skip : skip + numel]


class HostBufferPool:
    """int32 host buffers, reused; at most ``max_bytes`` held (in use or free) at once."""

    def __init__(self, max_bytes: int, *, pin_memory: bool = False):
        self.max_bytes = max_bytes
        self.pin_memory = pin_memory
        self._cond = threading.Condition()
        self._free: list[torch.Tensor] = []  # flat int32 buffers nobody uses
        self._refs: dict[int, tuple[torch.Tensor, int]] = {}  # data_ptr -> (flat buffer, owners)
        self.held_bytes = 0  # in use plus free
        self.in_use_bytes = 0
        self.high_water_bytes = 0
        self.waits = 0  # how many times acquire() had to wait for a release
        self.on_wait: Callable[[], None] | None = None  # called (holding no lock) before each such wait

    def acquire(self, shape: Sequence[int]) -> torch.Tensor:
        """A tensor of ``shape`` (int32, contiguous, uninitialised) backed by a pooled buffer; one owner."""
        numel = 1
        for n in shape:
            numel *= int(n)
        need = 4 * max(1, numel)
        with self._cond:
            while True:
                fit = [i for i, b in enumerate(self._free) if b.numel() * 4 >= need]
                if fit:
                    buf = self._free.pop(min(fit, key=lambda i: self._free[i].numel()))
                    break
                # drop free buffers too small to use, then allocate if the bound allows
                while self._free and self.held_bytes + need > self.max_bytes:
                    self.held_bytes -= self._free.pop(0).numel() * 4
                if self.held_bytes + need <= self.max_bytes or not self.in_use_bytes:
                    buf = aligned_empty(max(1, numel), pin_memory=self.pin_memory)
                    self.held_bytes += need
                    self.high_water_bytes = max(self.high_water_bytes, self.held_bytes)
                    break
                self.waits += 1
                if self.on_wait is not None:
                    self._cond.release()
                    try:
                        self.on_wait()
                    finally:
                        self._cond.acquire()
                self._cond.wait()
            self.in_use_bytes += buf.numel() * 4
            self._refs[buf.data_ptr()] = (buf, 1)
        return buf[:numel].view(tuple(int(n) for n in shape))

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a buffer this pool handed out and has not taken back."""
        with self._cond:
            return t.data_ptr() in self._refs

    def retain(self, t: torch.Tensor) -> None:
        """One more owner of the buffer behind ``t`` (a tensor :meth:`acquire` returned)."""
        with self._cond:
            buf, n = self._refs[t.data_ptr()]
            self._refs[t.data_ptr()] = (buf, n + 1)

    def release(self, t: torch.Tensor) -> None:
        """One owner fewer; the last one gives the buffer back to the pool."""
        with self._cond:
            buf, n = self._refs[t.data_ptr()]
            if n > 1:
                self._refs[t.data_ptr()] = (buf, n - 1)
                return
            del self._refs[t.data_ptr()]
            self.in_use_bytes -= buf.numel() * 4
            self._free.append(buf)
            self._cond.notify_all()

    def clear(self) -> None:
        """Forget every free buffer (their memory goes back to the allocator)."""
        with self._cond:
            for b in self._free:
                self.held_bytes -= b.numel() * 4
            self._free.clear()
