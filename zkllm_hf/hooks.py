"""Attach the capture-point hooks to one model, and remove them, always.

The table in :mod:`zkllm_hf.points` says which module of each decoder layer to hook and how; this module
finds those modules, names every hook, and keeps the handles so that :meth:`HookSet.remove` leaves the
model exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError
from .points import ARCHITECTURES, POINTS, SUPPORTED_MODEL_TYPES, CapturePoint
from .weights import norm_params

logger = logging.getLogger(__name__)

OnCapture = Callable[[int, CapturePoint, torch.Tensor], None]


@dataclass
class DecoderLayout:
    """Where one model keeps its decoder layers."""

    layers_path: str
    layers: nn.ModuleList
    model_type: str
    _warned: set[tuple[int, str]] = field(default_factory=set, repr=False)  # unreadable norms, said once

    def module_path(self, layer: int, point: CapturePoint) -> str:
        base = f"{self.layers_path}.{layer}"
        return f"{base}.{point.module}" if point.module else base

    def module(self, layer: int, name: str) -> nn.Module:
        block = self.layers[layer]
        return block if not name else getattr(block, name)

    def norms(self, layer: int, modules: Iterable[str]) -> dict[str, tuple[torch.Tensor, float] | str]:
        """``{module: (weight, eps)}`` of the named RMSNorms of one layer, or why each cannot be read."""
        out: dict[str, tuple[torch.Tensor, float] | str] = {}
        for name in modules:
            params = norm_params(self.module(layer, name))
            if isinstance(params, str):
                if (layer, name) not in self._warned:  # once per capture, not once per forward
                    self._warned.add((layer, name))
                    logger.warning("layer %d %s: %s; its norm check is skipped", layer, name, params)
                params = f"{self.layers_path}.{layer}.{name}: {params}"
            out[name] = params
        return out


def _get_path(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder layers and check that every module the point table hooks exists."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    for arch in ARCHITECTURES:
        for path in arch.layers:
            layers = _get_path(model, path)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                layout = DecoderLayout(path, layers, model_type)
                _check_modules(layout)
                if model_type not in SUPPORTED_MODEL_TYPES:
                    logger.warning(
                        "model_type %r is not one zkllm_hf knows (%s); its modules match the Llama table, "
                        "and the data contracts will refuse the capture if its maths differ",
                        model_type,
                        ", ".join(sorted(SUPPORTED_MODEL_TYPES)),
                    )
                return layout
    tried = sorted({p for a in ARCHITECTURES for p in a.layers})
    raise UnsupportedModelError(
        f"{type(model).__name__}: no decoder layers found at {tried}; zkllm_hf captures Llama-shaped "
        f"decoders ({', '.join(sorted(SUPPORTED_MODEL_TYPES))}) given as *ForCausalLM or the bare *Model"
    )


def _check_modules(layout: DecoderLayout) -> None:
    needed = sorted({p.module for p in POINTS if p.module})
    for i, block in enumerate(layout.layers):
        missing = [name for name in needed if not isinstance(getattr(block, name, None), nn.Module)]
        if missing:
            raise UnsupportedModelError(
                f"{layout.layers_path}[{i}] ({type(block).__name__}) has no module "
                f"{', '.join(repr(m) for m in missing)}; zkllm_hf needs {needed} in every decoder layer "
                f"(a Llama-shaped decoder: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
            )


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hs = kwargs.get("hidden_states")
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError("hooked module received no hidden_states tensor (positional or keyword)")


def _output_tensor(output: Any) -> torch.Tensor:
    # Decoder layers return a tensor in transformers >= 4.54 and a tuple before; attention returns a tuple.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"hooked module returned {type(output).__name__}, expected a tensor or a tuple")


@dataclass
class NamedHook:
    name: str  # e.g. "model.layers.3.self_attn:forward"
    handle: torch.utils.hooks.RemovableHandle


@dataclass
class HookSet:
    """Every hook one capture attached; :meth:`remove` is idempotent."""

    hooks: list[NamedHook] = field(default_factory=list)

    def add(self, name: str, handle: torch.utils.hooks.RemovableHandle) -> None:
        self.hooks.append(NamedHook(name, handle))

    def remove(self) -> None:
        while self.hooks:
            self.hooks.pop().handle.remove()

    def __len__(self) -> int:
        return len(self.hooks)


def attach(
    model: nn.Module,
    layout: DecoderLayout,
    layers: Sequence[int],
    on_capture: OnCapture,
    on_model_input: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None] | None = None,
    on_model_output: Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None] | None = None,
    *,
    on_gate: Callable[[int, torch.Tensor], None] | None = None,
) -> HookSet:
    """Hook every point of every layer in ``layers``; call ``on_capture(layer, point, tensor)`` as each fires.

    ``on_model_input(module, args, kwargs)`` sees the top-level model's inputs (token ids, attention mask)
    before any layer runs, and ``on_model_output(module, args, kwargs, output)`` fires when the forward
    returns. Points are registered in table order, so for points sharing a module and hook kind the table's
    order is the firing order. ``on_gate(layer, tensor)`` sees each layer's ``mlp.gate_proj`` output, where the
    model has one (zkLLM's SwiGLU lookup bounds it). If anything fails part-way, the hooks already attached are
    removed.
    """
    hooks = HookSet()
    try:
        if on_model_input is not None:
            hooks.add("model:forward_pre", model.register_forward_pre_hook(on_model_input, with_kwargs=True))
        for layer in layers:
            for point in POINTS:
                module = layout.module(layer, point.module)
                name = f"{layout.module_path(layer, point)}:{point.name}"
                hooks.add(name, _register(module, point, layer, on_capture))
            gate = getattr(getattr(layout.module(layer, ""), "mlp", None), "gate_proj", None)
            if on_gate is not None and isinstance(gate, nn.Module):
                hooks.add(f"{layout.layers_path}.{layer}.mlp.gate_proj:gate", _register_gate(gate, layer, on_gate))
        if on_model_output is not None:
            hooks.add("model:forward", model.register_forward_hook(on_model_output, with_kwargs=True))
    except BaseException:
        hooks.remove()
        raise
    return hooks


def _register(module: nn.Module, point: CapturePoint, layer: int, on_capture: OnCapture):
    if point.hook == "pre":

        def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            on_capture(layer, point, _first_tensor(args, kwargs))

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        on_capture(layer, point, _output_tensor(output))

    return module.register_forward_hook(post, with_kwargs=True)


def _register_gate(module: nn.Module, layer: int, on_gate: Callable[[int, torch.Tensor], None]):
    def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        on_gate(layer, _output_tensor(output))

    return module.register_forward_hook(post, with_kwargs=True)
