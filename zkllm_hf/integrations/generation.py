"""CaptureLogitsProcessor: turn capture on inside ``model.generate`` with one object in ``logits_processor``.

A logits processor is called once per generation step, after that step's forward, with ``(input_ids,
scores)`` only: it never sees the model. So the processor takes the model when it is built, installs the
engine's hooks then (the prompt's forward runs before the first processor call), and arms them when
``generate`` builds its processor list with this object in it. Each processor call commits the step whose
forward just ran; forwards that no call follows (``synced_gpus``, undone steps) are dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor

from ..engine import CaptureEngine, CaptureError, CaptureResult, ForwardInputs, Route, UnitRecorder
from .generate_config import GenerationSettings, refuse_config
from .generate_probe import can_watch, watch_generate
from .generate_steps import StepRouter

logger = logging.getLogger(__name__)

MODES = ("prefill", "full", "steps")


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

    Nothing is written unless :meth:`finalize` succeeds; :meth:`close` (or leaving a ``with`` block)
    removes the hooks and drops anything staged.
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
    ):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        if pad_to is not None and mode != "full":
            raise ValueError(
                f"pad_to={pad_to} applies to mode='full' only: the prompt and decode forwards are generate()'s "
                f"own and cannot be padded. Use mode='full', or drop pad_to"
            )
        if pad_to is not None and pad_to <= 0:
            raise ValueError(f"pad_to={pad_to}: give a positive token count")
        self.model = model
        self.mode = mode
        self.pad_to = pad_to
        self.engine = CaptureEngine(
            model,
            out_dir,
            mode=mode,
            layers=layers,
            scale_log2=scale_log2,
            overwrite=overwrite,
            stepped=mode == "steps",
            extra_metadata=extra_metadata,
            residuals=residuals,
        )
        self.result: CaptureResult | None = None
        self._armed = False
        self._generations = 0
        self._settings = GenerationSettings(model)
        self._steps = StepRouter(self.engine, mode, self._settings, self._fail)
        self._full_unit: UnitRecorder | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.engine.attach(self._plan)
        self._restore_probe = self._install_probe()

    # -- lifetime ---------------------------------------------------------------------------------

    def __enter__(self) -> CaptureLogitsProcessor:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

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
        if self._full_unit is not None:  # finalize's own forward in mode="full"
            return [Route(0, slice(0, fwd.q), self._full_unit)]
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
            sequences = getattr(out, "sequences", out)
            if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
                raise TypeError(
                    f"finalize() takes what generate() returned (a tensor or a GenerateOutput), "
                    f"got {type(out).__name__}"
                )
            sequences = sequences.to("cpu")
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

    def _generated(self, sequences: torch.Tensor, prompt_len: int, row: int) -> list[int]:
        """Row ``row``'s generated tokens up to and including the first EOS."""
        gen = [int(t) for t in sequences[row, prompt_len:].tolist()]
        eos = self._settings.eos
        for j, t in enumerate(gen):
            if t in eos:
                return gen[: j + 1]
        return gen

    def _reconcile_steps(self, sequences: torch.Tensor, prompt_len: int) -> None:
        self._steps.drop_pending()  # a last forward no processor call followed
        batch = self._steps.batch
        if sequences.shape[0] != batch:
            raise CaptureError(f"generate returned {sequences.shape[0]} sequences; the capture saw {batch} rows")
        n = sequences.shape[1] - prompt_len
        for r in range(sequences.shape[0]):
            gen = self._generated(sequences, prompt_len, r)
            ended = bool(gen) and gen[-1] in self._settings.eos
            last = len(gen) - 1 if ended else n - 1  # forward k consumes token k-1; the last is never forwarded
            steps = {k for (s, k) in self.engine.units if s == r and k}
            for k in sorted(steps - set(range(1, last + 1))):  # undone steps (deferred stop checks)
                self.engine.drop(self.engine.units[(r, k)])
            missing = sorted(set(range(1, last + 1)) - steps)
            if missing:
                raise CaptureError(f"sample {r}: decode steps {missing[:5]} were not captured; nothing was emitted")
            for k in range(1, last + 1):
                token = self.engine.units[(r, k)].token_ids
                if token != [gen[k - 1]]:
                    raise CaptureError(f"sample {r} step {k}: captured token {token}, the sequence has {gen[k - 1]}")
        group = self._settings.returns
        for r in range(sequences.shape[0]):
            if r % group:  # the prompt's rows are identical: computed once, shared
                self.engine.clone(self.engine.units[(r - r % group, 0)], r)

    def _run_full(self, sequences: torch.Tensor, prompt_len: int) -> None:
        rows = sequences.shape[0]
        per_prompt = max(1, (self._steps.batch or rows) // self._settings.expand)
        returns = max(1, rows // per_prompt)
        prompt_mask = self._steps.prompt_mask(prompt_len)
        device = next((p.device for p in self.model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        pad = self._settings.pad
        for r in range(rows):
            prompt_row = (r // returns) * self._settings.expand
            prompt = sequences[r, :prompt_len]
            if prompt_mask is not None:
                prompt = prompt[prompt_mask[prompt_row]]
            gen = self._generated(sequences, prompt_len, r)
            ids = [int(t) for t in prompt.tolist()] + gen
            real = len(ids)
            unit = self.engine.unit(r, 0, "full")
            unit.info.update(row=r, prompt_index=r // returns)
            unit.prompt_token_count, unit.generated_token_count = real - len(gen), len(gen)
            if self.pad_to is not None:
                if real > self.pad_to:
                    raise CaptureError(
                        f"sample {r}: {real} tokens (prompt and generated) exceed pad_to={self.pad_to}; raise pad_to "
                        f"or lower max_new_tokens"
                    )
                if pad is None:
                    raise CaptureError("pad_to needs a pad or EOS token id in the generation config")
                ids += [pad] * (self.pad_to - real)
                unit.pad_token_id = pad
            self._full_unit = unit
            try:
                with torch.inference_mode():
                    self.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            finally:
                self._full_unit = None
            unit.seal()

    def _metadata(self, prompt_len: int) -> dict[str, Any]:
        return self._settings.metadata(prompt_length=prompt_len, steps=self._steps.calls, rows=self._steps.batch)
