"""zkllm-hf: capture Hugging Face Llama activations as proof-ready zkLLM inputs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .contracts import CheckResult, ContractViolation
from .dataset import DatasetResult, PromptsError, capture_dataset
from .engine import CaptureError, CaptureResult
from .errors import ZkllmHfError
from .fixed_point import FixedPointError
from .hooks import UnsupportedModelError
from .metadata import MetadataError
from .session import CaptureSession
from .validate import (
    Capture,
    CaptureDataset,
    CaptureNotFinished,
    UnsafeManifestError,
    ValidationReport,
    load_capture,
    validate,
)
from .version import __version__


def capture(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    layers: Sequence[int] | str | None = None,
    scale_log2: int = 16,
    overwrite: bool = False,
    progress: bool = False,
    prompt_length: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    contract: str = "v1",
    residuals: str = "model",
    tokenizer: Any = None,
    store_text: bool = True,
    digest: str = "blake3",
    fingerprint: str = "cached",
    writers: int | None = None,
) -> CaptureSession:
    """Capture the next forward of ``model`` into ``out_dir`` as zkLLM ``.bin`` files.

    Use as a context manager: ``with capture(model, "activations"): model(**inputs)``. Hooks attach on
    enter and are removed on exit; the files appear only if the whole capture passed its contracts.
    ``layers`` is None (all), a list of indices or a spec such as ``"0-3,7"``. ``contract`` is a packaged
    contract (``"v1"``) or a folder holding ``capture.yaml``. ``residuals="exact-int"`` writes the residual
    stream derived in int32 from the sublayer outputs, so that zkLLM's skip steps reproduce it bit for bit; the
    default, ``"model"``, writes the model's own values. ``tokenizer`` (the one the ids came from) is recorded by
    its fingerprint, and each unit's prompt is stored as text, decoded from its ids, unless ``store_text=False``.
    ``digest`` is the files', the manifest's and the
    weights fingerprint's hash: ``"blake3"`` (fast, the default) or ``"sha256"`` (for tools that need it).
    ``fingerprint="full"`` recomputes the weights fingerprint even when this process computed it for the
    same, unchanged parameters (``"cached"``, the default, reuses it; the manifest records which).
    ``writers`` is the number of writer threads (hash and write); by default 1 on the CPU, more on a GPU.
    """
    return CaptureSession(
        model,
        out_dir,
        layers=layers,
        scale_log2=scale_log2,
        overwrite=overwrite,
        progress=progress,
        prompt_length=prompt_length,
        pad_token_id=pad_token_id,
        extra_metadata=extra_metadata,
        contract=contract,
        residuals=residuals,
        tokenizer=tokenizer,
        store_text=store_text,
        digest=digest,
        fingerprint=fingerprint,
        writers=writers,
    )


def __getattr__(name: str) -> Any:
    # The integrations import transformers' generation and Trainer machinery: load them on first use.
    if name == "CaptureLogitsProcessor":
        from .integrations.generation import CaptureLogitsProcessor

        return CaptureLogitsProcessor
    if name == "CaptureCallback":
        from .integrations.trainer import CaptureCallback

        return CaptureCallback
    raise AttributeError(f"module 'zkllm_hf' has no attribute {name!r}")


__all__ = [
    "CaptureCallback",
    "CaptureLogitsProcessor",
    "Capture",
    "CaptureDataset",
    "CaptureNotFinished",
    "MetadataError",
    "UnsafeManifestError",
    "ValidationReport",
    "load_capture",
    "validate",
    "CaptureError",
    "CaptureResult",
    "CaptureSession",
    "CheckResult",
    "DatasetResult",
    "PromptsError",
    "capture_dataset",
    "ContractViolation",
    "FixedPointError",
    "UnsupportedModelError",
    "ZkllmHfError",
    "__version__",
    "capture",
]
