"""What one forward received, and where its rows go: :class:`ForwardInputs`, :class:`Route`, :class:`Forward`.

The model pre-hook reads the top-level inputs once (token ids, the 2-D padding mask, position ids, the cache
length); the adapter's planner turns them into routes (batch row and columns -> unit); each hooked tensor is
then sliced per route (a view when the real columns are contiguous). Stateless helpers only.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CaptureError

if TYPE_CHECKING:
    from .unit import UnitRecorder

__all__ = ["Forward", "ForwardInputs", "Planner", "Route", "autocast_state", "forward_inputs", "per_route"]


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
    # what replay needs besides: the 2-D mask as passed (CPU bool, every column), whether one was passed, the
    # cache object's id (forwards continuing one cache share it), and the forward's number in its capture
    full_mask: torch.Tensor | None = None
    mask_given: bool = False
    cache_id: int | None = None
    index: int = -1

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


def forward_inputs(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ForwardInputs:
    """Read the routing facts of one forward from the model's call (positional or keyword arguments)."""
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
    tail = full = None
    if isinstance(mask, torch.Tensor):
        if mask.dim() != 2:
            if batch > 1:
                raise CaptureError(
                    f"attention_mask has shape {tuple(mask.shape)}; zkllm_hf de-pads a batch with the 2-D padding "
                    f"mask (batch, seq_len). Pass that mask, or one row per forward (generate() builds a 4-D mask "
                    f"itself for cache_implementation='static': use the default dynamic cache to capture a batch)"
                )
        else:
            full = mask.to("cpu") != 0
            tail = full[:, -q:]
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
        full,
        isinstance(mask, torch.Tensor),
        None if cache is None else id(cache),
    )


def autocast_state(device: str) -> dict[str, Any]:
    """Autocast and grad mode as the forward runs them on ``device`` (read inside the forward)."""
    return {
        "enabled": torch.is_autocast_enabled(device),
        "dtype": str(torch.get_autocast_dtype(device)).removeprefix("torch."),
        "grad_enabled": torch.is_grad_enabled(),
    }


# --------------------------------------------------------------------------------------------------
# One unit


@dataclass
class Route:
    """Row ``row`` of the current forward, columns ``cols``, go to ``unit``."""

    row: int
    cols: slice | torch.Tensor
    unit: UnitRecorder


Planner = Callable[[ForwardInputs], Sequence[Route]]


@dataclass
class Forward:
    """The forward in progress: its inputs, its routes, the points that fired, the layers' norms read once."""

    inputs: ForwardInputs
    routes: Sequence[Route]
    fired: Counter[tuple[int, str]] = field(default_factory=Counter)
    autocast_seen: bool = False
    norms: dict[int, Any] = field(default_factory=dict)


def per_route(fwd: Forward, tensor: torch.Tensor) -> list[tuple[UnitRecorder, torch.Tensor]] | None:
    """Each route's unit and its rows and columns of a hooked (batch, seq_len, width) tensor (a 2-D one is a
    batch of one), or None if the tensor is not shaped so."""
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tensor.shape[0] != fwd.inputs.batch:
        return None
    return [
        (r.unit, tensor[r.row, r.cols if isinstance(r.cols, slice) else r.cols.to(tensor.device)]) for r in fwd.routes
    ]
