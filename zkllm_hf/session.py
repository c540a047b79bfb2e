"""CaptureSession: ``with zkllm_hf.capture(model, dir): model(**batch)`` captures one forward.

Batch row ``b`` becomes its own unit, de-padded with the attention mask (left or right padding alike). A
batch of one is written flat, as a single capture; a batch of several is a dataset with ``sample-{b}/``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .engine import CaptureEngine, CaptureError, CaptureResult, ForwardInputs, Route
from .options import CaptureOptions

__all__ = ["CaptureError", "CaptureResult", "CaptureSession"]


class CaptureSession:
    """Context manager behind :func:`zkllm_hf.capture`. Hooks live exactly as long as the ``with`` block."""

    def __init__(
        self,
        model: nn.Module,
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
        options: CaptureOptions | None = None,
        tokenizer: Any = None,
        store_text: bool = True,
        digest: str = "blake3",
        fingerprint: str = "cached",
        writers: int | None = None,
    ):
        """``options`` (a :class:`~zkllm_hf.options.CaptureOptions` of mode ``"forward"``) replaces ``layers``,
        ``scale_log2``, ``overwrite``, ``progress``, ``extra_metadata``, ``contract``, ``residuals``, ``digest``,
        ``fingerprint``, ``writers``, ``tokenizer``
        and ``store_text``."""
        if options is None:
            self.engine = CaptureEngine(
                model,
                out_dir,
                mode="forward",
                layers=layers,
                scale_log2=scale_log2,
                overwrite=overwrite,
                progress=progress,
                extra_metadata=extra_metadata,
                contract=contract,
                residuals=residuals,
                tokenizer=tokenizer,
                store_text=store_text,
                digest=digest,
                fingerprint=fingerprint,
                writers=writers,
            )
        else:
            self.engine = CaptureEngine(model, out_dir, options=options)
        self.model = model
        self.layers = self.engine.layers
        self.prompt_length = prompt_length
        self.pad_token_id = pad_token_id
        self.result: CaptureResult | None = None
        self._forwards = 0

    def __enter__(self) -> CaptureSession:
        self._forwards = 0
        self.engine.attach(self._plan)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.engine.detach()
        try:
            if exc_type is None:
                if not self._forwards:
                    raise CaptureError("no forward ran inside capture(); call the model once inside the with block")
                self.result = self.engine.commit()
        finally:
            self.engine.abort()  # drops the staging folder unless the capture was committed

    def _plan(self, fwd: ForwardInputs) -> list[Route]:
        self._forwards += 1
        if self._forwards > 1:
            raise CaptureError(
                "capture() records exactly one forward, and a second one started inside the block "
                "(generate() runs one per token: use zkllm_hf.CaptureLogitsProcessor); run a single model(...) "
                "call inside capture()"
            )
        lengths = self.prompt_length
        if lengths is not None and not isinstance(lengths, int) and len(lengths) != fwd.batch:
            raise ValueError(f"prompt_length has {len(lengths)} entries for a batch of {fwd.batch}; give one per row")
        routes = []
        for b in range(fwd.batch):
            unit = self.engine.unit(b, 0, "forward")
            unit.prompt_token_count = lengths if lengths is None or isinstance(lengths, int) else int(lengths[b])
            unit.pad_token_id = self.pad_token_id
            unit.info["row"] = b
            routes.append(Route(b, fwd.real_columns(b), unit))
        return routes
