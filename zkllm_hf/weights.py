"""Reading a model's weights wherever accelerate keeps them (on a device, offloaded to CPU or to disk).

With ``device_map`` offloading, accelerate leaves a module's parameters on the meta device between
forwards and loads them in its pre-forward hook. Its public ``align_module_device`` runs that loading for
us, so the norm checks and the weights fingerprint read the real values.
"""

from __future__ import annotations

import torch
from accelerate.utils import align_module_device, has_offloaded_params
from torch import nn


def read_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` (a parameter or buffer) as a detached tensor, loaded from accelerate's offload when
    it is offloaded; None when no real tensor can be read."""
    if has_offloaded_params(module):
        with align_module_device(module, torch.device("cpu")):
            tensor = getattr(module, name, None)
            tensor = tensor.detach().clone() if isinstance(tensor, torch.Tensor) else None
    else:
        tensor = getattr(module, name, None)
        tensor = tensor.detach() if isinstance(tensor, torch.Tensor) else None
    if tensor is None or tensor.device.type == "meta":
        return None
    return tensor


def norm_params(module: nn.Module) -> tuple[torch.Tensor, float] | str:
    """An RMSNorm's ``(weight, eps)``, wherever its weight lives, or why it cannot be read."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        return f"{type(module).__name__} has no variance_epsilon or eps"
    weight = read_tensor(module, "weight")
    if weight is None:
        return f"{type(module).__name__}.weight is not readable (on the meta device, and not offloaded by accelerate)"
    return weight, float(eps)
