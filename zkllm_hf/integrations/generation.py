"""CaptureLogitsProcessor: turn capture on inside ``model.generate`` with one object in ``logits_processor``.

A logits processor is called once per generation step, after that step's forward, with ``(input_ids,
scores)`` only: it never sees the model. So the processor takes the model when it is built, installs the
engine's hooks then (the prompt's forward runs before the first processor call), and arms them when
``generate`` builds its processor list with this object in it. Each processor call commits the step whose
forward just ran; forwards that no call follows (``synced_gpus``, undone steps) are dropped.

This module is the processor's public face and its lifetime; it composes the parts that do the work:
``generate_probe`` (seeing a generate() call begin), ``generate_config`` (what its config asks for, and what a
mode refuses), ``generate_steps`` (which forward's rows go to which unit, and the step commits) and
``generate_finalize`` (the reconciliation with the returned sequences, and the ``full`` forwards).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor

from ..engine import CaptureEngine, CaptureError, CaptureResult, ForwardInputs, Route
from ..options import GENERATE_MODES, generation_problem
from .generate_config import GenerationSettings, refuse_config
from .generate_finalize import FullForwards, reconcile_steps, returned_sequences
from .generate_probe import can_watch, watch_generate
from .generate_steps import StepRouter

logger = logging.getLogger(__name__)

MODES = GENERATE_MODES


def check_arguments(mode: str, pad_to: int | None) -> None:
    """Raise ValueError for a ``mode`` or ``pad_to`` that the processor does not take."""
    problem = generation_problem(True, mode, pad_to)
    if problem is not None:
        raise ValueError(problem)


class CaptureLogitsProcessor(LogitsProcessor):
    """Capture the forwards of one ``model.generate`` call as zkLLM units.

    ``mode="prefill"`` captures the prompt's forward; ``"full"`` runs, in :meth:`finalize`, one forward
    over each returned sequence (the prompt's real tokens and every generated token up to and including
    the first EOS, padded at the end to ``pad_to`` if given); ``"steps"`` captures every forward: step 0
    is the prompt, each step k >= 1 the one token that forward consumed.

    Use::

        proc = CaptureLogitsProcessor(model, "acts", mode="steps")
        out = model.generate(**inputs, logits_processor=LogitsProcessorList([proc]), max_new_tokens=16)
        result = proc.finalize(out)

    Nothing is written unless :meth:`finalize` succeeds; :meth:`close` removes the hooks and drops anything
    staged. Leaving a ``with`` block removes them too; left without :meth:`finalize` (and without an
    exception of its own) it raises ``CaptureError``, since the capture it held is lost.
    """

    def __init__(
        self,
        model: nn.Module,
        out_dir: str | os.PathLike[str],
        *,
        mode: str = "prefill",
        layers: Sequence[int] | str | None = None,
        scale_log2: int = 16,
        overwrite: bool = False,
        pad_to: int | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
        residuals: str = "model",
        tokenizer: Any = None,
        store_text: bool = True,
        digest: str = "blake3",
        fingerprint: str = "cached",
    ):
        check_arguments(mode, pad_to)
        self.model = model
        self.mode = mode
        self.pad_to = pad_to
        self.engine = self._build_engine(
            out_dir,
            layers=layers,
            scale_log2=scale_log2,
            overwrite=overwrite,
            extra_metadata=extra_metadata,
            residuals=residuals,
            tokenizer=tokenizer,
            store_text=store_text,
            digest=digest,
            fingerprint=fingerprint,
        )
        self.result: CaptureResult | None = None
        self._armed = False
        self._generations = 0
        self._settings = GenerationSettings(model)
        self._steps = StepRouter(self.engine, mode, self._settings, self._fail)
        self._full = FullForwards(model, self.engine, pad_to)
        self._error: BaseException | None = None
        self._closed = False
        self.engine.attach(self._plan)
        self._restore_probe = self._install_probe()

    def _build_engine(self, out_dir: str | os.PathLike[str], **options: Any) -> CaptureEngine:
        """The capture's engine (the one place it is built)."""
        return CaptureEngine(self.model, out_dir, mode=self.mode, stepped=self.mode == "steps", **options)

    # -- lifetime ---------------------------------------------------------------------------------

    def __enter__(self) -> CaptureLogitsProcessor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        unfinished = not self._closed  # finalize() closes; a block left open discards what it staged
        self.close()
        if unfinished and exc_type is None:  # the block's own exception, if any, is the one to see
            raise CaptureError(
                "the CaptureLogitsProcessor block ended without finalize(out), so nothing was written: call "
                "proc.finalize(out) with what generate() returned, inside the block (or proc.close() to discard "
                "the capture on purpose)"
            )

    def close(self) -> None:
        """Remove the hooks and drop anything staged but not finalized (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.engine.detach()
        self._restore_probe()
        self.engine.abort()

    # -- seeing the generate() call -----------------------------------------------------------------

    def _install_probe(self):
        """Learn that a generate() with this processor has begun: generate calls the model's
        ``_get_logits_processor`` once, before any forward, with its generation config and the user's
        processor list. One shared probe per model serves every live processor (see :mod:`.generate_probe`)."""
        if not can_watch(self.model):
            logger.warning(
                "%s has no _get_logits_processor: cannot see the generation config; capturing every forward "
                "from now on",
                type(self.model).__name__,
            )
            self._armed = True
            return lambda: None
        return watch_generate(self.model, self._observe)

    def _observe(self, config: Any, user: Any) -> None:
        """Called by the model's probe at the start of every generate() call."""
        if user is not None and any(p is self for p in user):
            try:
                self._arm(config)
            except CaptureError as exc:
                self._error = exc
                raise

    def _arm(self, config: Any) -> None:
        if self._closed:
            raise CaptureError("this CaptureLogitsProcessor is closed; create a new one for this generate() call")
        if self._generations:
            raise CaptureError(
                "this CaptureLogitsProcessor already captured a generate() call; finalize() it and create a new "
                "one for each call"
            )
        self._generations += 1
        refuse_config(self.mode, config)
        self._settings.adopt(config)
        self._armed = True

    # -- routing ----------------------------------------------------------------------------------

    def _plan(self, fwd: ForwardInputs) -> list[Route]:
        if self._full.unit is not None:  # finalize's own forward in mode="full"
            return self._full.route(fwd)
        if not self._armed or self._error is not None:
            return []
        return self._steps.plan(fwd)

    def _fail(self, message: str) -> CaptureError:
        self._error = CaptureError(f"nothing will be emitted: {message}")
        return self._error

    # -- the processor call: commit the step whose forward just ran ---------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._error is not None:
            raise self._error
        if not self._armed or self.mode == "full":
            self._steps.count_call(input_ids)
        else:
            self._steps.commit_call(input_ids)
        return scores

    # -- finalize ---------------------------------------------------------------------------------

    def finalize(self, out: Any) -> CaptureResult:
        """Check the capture against what ``generate`` returned (a tensor or a ``GenerateOutput``), run the
        ``full`` forwards, and commit the dataset atomically. The hooks are removed either way."""
        try:
            if self._closed:
                raise CaptureError("this CaptureLogitsProcessor was closed before finalize(); nothing was emitted")
            if self._error is not None:
                raise self._error
            if not self._steps.calls:
                raise CaptureError(
                    "generate() never called this processor: pass it as "
                    "logits_processor=LogitsProcessorList([proc]) to the generate() call to capture"
                )
            sequences = returned_sequences(out)
            if self._steps.prompt_ids_unknown:
                raise CaptureError(
                    "generate(inputs_embeds=...) returns only the generated tokens, so the prompt's token ids are "
                    "unknown and mode='full' cannot run the whole sequence; pass input_ids. Nothing was emitted"
                )
            prompt_len = int(self._steps.prompt_len or 0)
            if sequences.shape[1] <= prompt_len:
                raise CaptureError(f"the sequences have {sequences.shape[1]} tokens, the prompt alone {prompt_len}")
            if self.mode == "steps":
                self._reconcile_steps(sequences, prompt_len)
            elif self.mode == "full":
                self._run_full(sequences, prompt_len)
            self.result = self.engine.commit(dataset_metadata={"generation": self._metadata(prompt_len)})
            return self.result
        finally:
            self.close()

    def _reconcile_steps(self, sequences: torch.Tensor, prompt_len: int) -> None:
        self._steps.drop_pending()  # a last forward no processor call followed
        settings = self._settings
        reconcile_steps(
            self.engine, sequences, prompt_len, rows=self._steps.batch, eos=settings.eos, returns=settings.returns
        )

    def _run_full(self, sequences: torch.Tensor, prompt_len: int) -> None:
        self._full.run(
            sequences,
            prompt_len,
            batch=self._steps.batch,
            expand=self._settings.expand,
            prompt_mask=self._steps.prompt_mask(prompt_len),
            eos=self._settings.eos,
            pad=self._settings.pad,
        )

    def _metadata(self, prompt_len: int) -> dict[str, Any]:
        return self._settings.metadata(prompt_length=prompt_len, steps=self._steps.calls, rows=self._steps.batch)
