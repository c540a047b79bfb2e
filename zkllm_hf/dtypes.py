"""The float dtypes zkllm-hf names: those a model may be loaded in (``--dtype``) and those a manifest's
``source_dtype`` may hold, by the names torch gives them."""

from __future__ import annotations

import torch

LOAD_DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what --dtype and models.load accept
SOURCE_DTYPE_NAMES = (*LOAD_DTYPE_NAMES, "float64")  # what a captured point's source_dtype may be

LOAD_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in LOAD_DTYPE_NAMES}
SOURCE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in SOURCE_DTYPE_NAMES}

__all__ = ["LOAD_DTYPES", "LOAD_DTYPE_NAMES", "SOURCE_DTYPES", "SOURCE_DTYPE_NAMES"]
