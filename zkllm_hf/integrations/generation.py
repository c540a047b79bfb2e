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
        self._calls = 0  # processor calls so far: the step the next forward belongs to
        self._forwards_since_call = 0
        self._batch: int | None = None  # rows of the prompt's forward, after generate's expansion
        self._prefill_q = 0  # prompt positions covered by the forwards before the first call
        self._prompt_masks: list[
            tuple[int, torch.Tensor | None]
        ] = []  # (positions, real-token mask) per prompt forward
        self._prompt_len: int | None = None
        self._prompt_ids_unknown = False  # the prompt came as inputs_embeds
        self._done: list[bool] = []
        self._pending: list[UnitRecorder] = []  # decode units of the forward awaiting its processor call
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
        k = self._calls
        self._forwards_since_call += 1
        if k == 0 or not self._prompt_masks:  # the prompt's forward (or one of its chunks)
            if self._batch is None:
                self._batch = fwd.batch
                self._done = [False] * fwd.batch
            elif fwd.batch != self._batch:
                raise self._fail(f"a prompt forward of {fwd.batch} rows followed one of {self._batch}")
            self._prefill_q += fwd.q
            self._prompt_masks.append((fwd.q, fwd.mask))
            self._prompt_ids_unknown |= fwd.input_ids is None
            if self.mode == "full" or k:
                return []
            group = self._settings.expand if self.mode == "prefill" else self._settings.returns
            routes = []
            for r in range(0, fwd.batch, group):  # rows duplicated before prefill are captured once
                cols = fwd.real_columns(r)
                if not fwd.width(cols):  # a chunk of this row's prompt that is all padding
                    continue
                unit = self.engine.unit(r // group if self.mode == "prefill" else r, 0, "prefill")
                unit.info["row"] = r
                routes.append(Route(r, cols, unit))
            return routes
        if self.mode != "steps":
            return []
        if fwd.past_length and fwd.q != 1:
            raise self._fail(
                f"a decode forward computed {fwd.q} positions at once (assisted or speculative decoding checks "
                f"drafted tokens in one forward); mode='steps' needs one token per forward. Use mode='full'"
            )
        for unit in self._pending:  # a forward no processor call followed (synced_gpus): never committed
            self.engine.drop(unit)
        self._pending = []
        if fwd.input_ids is None:
            raise self._fail("a decode forward got inputs_embeds without input_ids; cannot tell its token")
        consumed = fwd.input_ids[:, -1].tolist()
        eos = self._settings.eos
        routes = []
        for r, token in enumerate(consumed):
            if self._done[r]:
                continue
            if int(token) in eos:  # the sample emitted EOS: no further steps
                self._done[r] = True
                continue
            unit = self.engine.unit(r, k, "decode")
            unit.info["row"] = r
            unit.prompt_token_count, unit.generated_token_count = 0, 1
            routes.append(Route(r, slice(fwd.q - 1, fwd.q), unit))
            self._pending.append(unit)
        return routes

    def _fail(self, message: str) -> CaptureError:
        self._error = CaptureError(f"nothing will be emitted: {message}")
        return self._error

    # -- the processor call: commit the step whose forward just ran ---------------------------------

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._error is not None:
            raise self._error
        if not self._armed or self.mode == "full":
            if self._prompt_len is None:
                self._prompt_len = int(input_ids.shape[1])
            self._calls += 1
            return scores
        k, width = self._calls, int(input_ids.shape[1])
        if not self._forwards_since_call:
            raise self._fail(
                f"generation step {k} reached the processor without a forward of the hooked model: assisted "
                f"decoding (the assistant's steps call the processor too) or a compiled call that bypassed the "
                f"hooks. Use mode='full'"
            )
        if k == 0:
            self._prompt_len = width
            if self._prompt_ids_unknown:
                raise self._fail(
                    "generate(inputs_embeds=...) gives the prompt as embeddings: its token ids are unknown, and a "
                    "capture records the tokens it proves. Pass input_ids"
                )
            if self._prefill_q != width:
                raise self._fail(
                    f"the prompt's forward(s) covered {self._prefill_q} positions but the prompt has {width} "
                    f"(assisted decoding runs the prompt with drafted tokens); use mode='full'"
                )
            for unit in list(self.engine.units.values()):
                unit.seal()
        else:
            if width != self._prompt_len + k:
                raise self._fail(f"step {k} saw {width} tokens, expected {self._prompt_len + k}")
            if self._pending:
                last = input_ids[:, -1].tolist()
                for unit in self._pending:
                    token = unit.token_ids[-1] if unit.token_ids else None
                    if token != int(last[unit.info["row"]]):
                        raise self._fail(
                            f"step {k}, row {unit.info['row']}: the forward consumed token {token}, the "
                            f"processor sees {int(last[unit.info['row']])}"
                        )
                    unit.seal()
            self._pending = []
        self._calls += 1
        self._forwards_since_call = 0
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
            if not self._calls:
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
            if self._prompt_ids_unknown:
                raise CaptureError(
                    "generate(inputs_embeds=...) returns only the generated tokens, so the prompt's token ids are "
                    "unknown and mode='full' cannot run the whole sequence; pass input_ids. Nothing was emitted"
                )
            prompt_len = int(self._prompt_len or 0)
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
        for unit in self._pending:  # a last forward no processor call followed
            self.engine.drop(unit)
        self._pending = []
        if sequences.shape[0] != self._batch:
            raise CaptureError(f"generate returned {sequences.shape[0]} sequences; the capture saw {self._batch} rows")
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
        per_prompt = max(1, (self._batch or rows) // self._settings.expand)
        returns = max(1, rows // per_prompt)
        prompt_mask = None  # the real columns of each prompt row (left padding), from the prompt's forwards
        if any(m is not None for _, m in self._prompt_masks):
            parts = [
                m if m is not None else torch.ones(self._batch, q, dtype=torch.bool) for q, m in self._prompt_masks
            ]
            prompt_mask = torch.cat(parts, dim=1)[:, :prompt_len]
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
        return self._settings.metadata(prompt_length=prompt_len, steps=self._calls, rows=self._batch)
