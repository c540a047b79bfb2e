"""CaptureCallback: capture the first evaluation or prediction samples of a ``transformers.Trainer``.

No Trainer event receives the batch, and there is no event before an evaluation starts. So the callback
installs the engine's hooks when the Trainer is built (``on_init_end``, which fires for callbacks passed to
``Trainer(callbacks=[...])``), captures eval-mode forwards only, commits each batch at
``on_prediction_step`` (which fires after the batch's forward), and emits the dataset at the end of the
evaluation or prediction it was asked for. Any other loop's capture is discarded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..engine import CaptureEngine, CaptureError, CaptureResult, ForwardInputs, Route, UnitRecorder
from ..writer import check_target

logger = logging.getLogger(__name__)

EVENTS = ("evaluate", "predict")


class CaptureCallback(TrainerCallback):
    """Capture the eval (or predict) forwards of the first ``max_samples`` samples, in dataloader order,
    de-padded, into ``sample-{i}/`` units under one dataset committed when the loop ends.

    Pass it when building the Trainer: ``Trainer(..., callbacks=[CaptureCallback("acts")])``. Training
    forwards are never captured. ``result`` holds the :class:`~zkllm_hf.CaptureResult` once written.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_samples: int = 8,
        layers: Sequence[int] | str | None = None,
        on: str = "evaluate",
        scale_log2: int = 16,
        overwrite: bool = False,
        extra_metadata: Mapping[str, Any] | None = None,
        residuals: str = "model",
        tokenizer: Any = None,
        store_text: bool = True,
    ):
        if on not in EVENTS:
            raise ValueError(f"on={on!r}: choose 'evaluate' or 'predict'")
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples}: capture at least one sample")
        check_target(Path(out_dir).absolute(), overwrite)  # refuse before training starts
        self.out_dir, self.on, self.max_samples = Path(out_dir), on, max_samples
        self._options = {"layers": layers, "scale_log2": scale_log2, "overwrite": overwrite, "residuals": residuals,
                         "tokenizer": tokenizer, "store_text": store_text}
        self._extra = dict(extra_metadata or {})
        self.engine: CaptureEngine | None = None
        self.result: CaptureResult | None = None
        self._pending: list[UnitRecorder] = []
        self._next = 0  # the next sample index
        self._batches = 0
        self._args: Any = None

    # -- installing -------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Install the hooks on ``model`` (done for you when the callback is passed to ``Trainer(...)``)."""
        if self.engine is not None:
            return
        self.engine = CaptureEngine(model, self.out_dir, mode=self.on, extra_metadata=self._extra, **self._options)
        self.engine.attach(self._plan)

    def close(self) -> None:
        """Remove the hooks and drop anything staged (idempotent)."""
        if self.engine is not None:
            self.engine.detach()
            self.engine.abort()

    def _install(self, args: Any, model: nn.Module | None) -> None:
        self._args = args
        if self.result is not None or model is None:
            return
        if int(getattr(args, "n_gpu", 1) or 1) > 1:
            raise CaptureError(
                f"Trainer runs evaluation on {args.n_gpu} GPUs with nn.DataParallel, which calls the hooks from "
                f"replica threads; run with one visible GPU (CUDA_VISIBLE_DEVICES=0) to capture"
            )
        self.attach(model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if self._options["tokenizer"] is None:  # the Trainer's own, when it has one that tokenizes
            found = kwargs.get("processing_class") or kwargs.get("tokenizer")
            self._options["tokenizer"] = found if callable(getattr(found, "decode", None)) else None
        self._install(args, model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._install(args, model)

    # -- routing ----------------------------------------------------------------------------------

    def _plan(self, fwd: ForwardInputs) -> list[Route]:
        if fwd.training or self.result is not None:
            return []
        self._discard_pending()  # an eval-mode forward that no prediction step followed: not the Trainer's
        routes = []
        for b in range(fwd.batch):
            if self._next >= self.max_samples:
                break
            unit = self.engine.unit(self._next, 0, "forward")
            unit.info.update(row=b, batch=self._batches)
            routes.append(Route(b, fwd.real_columns(b), unit))
            self._pending.append(unit)
            self._next += 1
        return routes

    def _discard_pending(self) -> None:
        for unit in self._pending:
            self.engine.drop(unit)
        self._next -= len(self._pending)
        self._pending = []

    # -- committing -------------------------------------------------------------------------------

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.result is not None:
            return
        if self.engine is None:
            raise CaptureError(
                "CaptureCallback saw a prediction step before its hooks were installed: pass it when building "
                "the Trainer (Trainer(..., callbacks=[cb])) or call cb.attach(model) before evaluating"
            )
        for unit in self._pending:
            unit.seal()
        self._pending = []
        self._batches += 1

    def on_evaluate(self, args, state, control, **kwargs):
        self._end("evaluate", args)

    def on_predict(self, args, state, control, **kwargs):
        self._end("predict", args)

    def _end(self, event: str, args: Any) -> None:
        engine = self.engine
        if engine is None or self.result is not None:
            return
        if event != self.on or not engine.units:
            if engine.units:
                logger.info("CaptureCallback(on=%r): discarding the capture of a %s loop", self.on, event)
            self._reset()
            return
        self._discard_pending()
        self.result = engine.commit(dataset_metadata={"trainer": self._trainer_metadata(args)})
        logger.info("captured %d samples of %s into %s", len(self.result.units), event, self.result.out_dir)

    def _reset(self) -> None:
        self._pending, self._next, self._batches = [], 0, 0
        if self.engine is not None:
            self.engine.abort()

    def _trainer_metadata(self, args: Any) -> dict[str, Any]:
        fields = (
            "per_device_eval_batch_size",
            "fp16",
            "bf16",
            "fp16_full_eval",
            "bf16_full_eval",
            "torch_compile",
            "use_cpu",
            "eval_do_concat_batches",
            "train_sampling_strategy",
        )
        return {
            "on": self.on,
            "max_samples": self.max_samples,
            "batches": self._batches,
            "args": {f: getattr(args, f, None) for f in fields if isinstance(getattr(args, f, None), (bool, int, str))},
        }
