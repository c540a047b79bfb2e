"""Route ``generate()``'s own forwards to units, and commit each step at the processor call that follows it.

Forwards before the first processor call are the prompt (several when prefill is chunked): in mode
``prefill`` each prompt gets one unit (rows that generate duplicated are captured once), in ``steps`` each
returned row gets its step-0 unit. Every later forward is a decode step (mode ``steps`` only): one unit per
row that has not emitted EOS, pending until the processor call after it checks the token and seals it. A
forward that no call follows (``synced_gpus``, undone steps) is dropped. Mode ``full`` captures none of these
forwards; the router still counts them, and keeps the prompt's masks for the ``full`` forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..engine import CaptureEngine, CaptureError, ForwardInputs, Route, UnitRecorder
from .generate_config import GenerationSettings

Fail = Callable[[str], CaptureError]
"""``fail(message)``: record the capture as failed and return the error to raise."""


class StepRouter:
    """Per-sample step bookkeeping of one ``generate()`` call: the planner of its forwards, the step commits."""

    def __init__(self, engine: CaptureEngine, mode: str, settings: GenerationSettings, fail: Fail):
        self._engine = engine
        self._mode = mode
        self._settings = settings
        self._fail = fail
        self.calls = 0  # processor calls so far: the step the next forward belongs to
        self._forwards_since_call = 0
        self.batch: int | None = None  # rows of the prompt's forward, after generate's expansion
        self._prefill_q = 0  # prompt positions covered by the forwards before the first call
        self._prompt_masks: list[tuple[int, torch.Tensor | None]] = []  # (positions, real-token mask) per forward
        self.prompt_len: int | None = None
        self.prompt_ids_unknown = False  # the prompt came as inputs_embeds
        self._done: list[bool] = []
        self._pending: list[UnitRecorder] = []  # decode units of the forward awaiting its processor call

    # -- the forwards -----------------------------------------------------------------------------

    def plan(self, fwd: ForwardInputs) -> list[Route]:
        """The routes of one forward of the armed capture."""
        k = self.calls
        self._forwards_since_call += 1
        if k == 0 or not self._prompt_masks:  # the prompt's forward (or one of its chunks)
            return self._plan_prompt(fwd, k)
        if self._mode != "steps":
            return []
        return self._plan_decode(fwd, k)

    def _plan_prompt(self, fwd: ForwardInputs, k: int) -> list[Route]:
        if self.batch is None:
            self.batch = fwd.batch
            self._done = [False] * fwd.batch
        elif fwd.batch != self.batch:
            raise self._fail(f"a prompt forward of {fwd.batch} rows followed one of {self.batch}")
        self._prefill_q += fwd.q
        self._prompt_masks.append((fwd.q, fwd.mask))
        self.prompt_ids_unknown |= fwd.input_ids is None
        if self._mode == "full" or k:
            return []
        group = self._settings.expand if self._mode == "prefill" else self._settings.returns
        routes = []
        for r in range(0, fwd.batch, group):  # rows duplicated before prefill are captured once
            cols = fwd.real_columns(r)
            if not fwd.width(cols):  # a chunk of this row's prompt that is all padding
                continue
            unit = self._engine.unit(r // group if self._mode == "prefill" else r, 0, "prefill")
            unit.info["row"] = r
            routes.append(Route(r, cols, unit))
        return routes

    def _plan_decode(self, fwd: ForwardInputs, k: int) -> list[Route]:
        if fwd.past_length and fwd.q != 1:
            raise self._fail(
                f"a decode forward computed {fwd.q} positions at once (assisted or speculative decoding checks "
                f"drafted tokens in one forward); mode='steps' needs one token per forward. Use mode='full'"
            )
        self.drop_pending()  # a forward no processor call followed (synced_gpus): never committed
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
            unit = self._engine.unit(r, k, "decode")
            unit.info["row"] = r
            unit.prompt_token_count, unit.generated_token_count = 0, 1
            routes.append(Route(r, slice(fwd.q - 1, fwd.q), unit))
            self._pending.append(unit)
        return routes

    def drop_pending(self) -> None:
        """Drop the decode units of a forward that no processor call followed."""
        for unit in self._pending:
            self._engine.drop(unit)
        self._pending = []

    # -- the processor calls ----------------------------------------------------------------------

    def count_call(self, input_ids: torch.Tensor) -> None:
        """A processor call of a capture that commits nothing at calls (mode ``full``, or not armed)."""
        if self.prompt_len is None:
            self.prompt_len = int(input_ids.shape[1])
        self.calls += 1

    def commit_call(self, input_ids: torch.Tensor) -> None:
        """A processor call: check and seal the step whose forward just ran."""
        k, width = self.calls, int(input_ids.shape[1])
        if not self._forwards_since_call:
            raise self._fail(
                f"generation step {k} reached the processor without a forward of the hooked model: assisted "
                f"decoding (the assistant's steps call the processor too) or a compiled call that bypassed the "
                f"hooks. Use mode='full'"
            )
        if k == 0:
            self._commit_prompt(width)
        else:
            self._commit_decode(k, width, input_ids)
        self.calls += 1
        self._forwards_since_call = 0

    def _commit_prompt(self, width: int) -> None:
        self.prompt_len = width
        if self.prompt_ids_unknown:
            raise self._fail(
                "generate(inputs_embeds=...) gives the prompt as embeddings: its token ids are unknown, and a "
                "capture records the tokens it proves. Pass input_ids"
            )
        if self._prefill_q != width:
            raise self._fail(
                f"the prompt's forward(s) covered {self._prefill_q} positions but the prompt has {width} "
                f"(assisted decoding runs the prompt with drafted tokens); use mode='full'"
            )
        for unit in list(self._engine.units.values()):
            unit.seal()

    def _commit_decode(self, k: int, width: int, input_ids: torch.Tensor) -> None:
        if width != self.prompt_len + k:
            raise self._fail(f"step {k} saw {width} tokens, expected {self.prompt_len + k}")
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

    # -- for finalize -----------------------------------------------------------------------------

    def prompt_mask(self, prompt_len: int) -> torch.Tensor | None:
        """The real columns of each prompt row (left padding), from the prompt's forwards; None if unmasked."""
        if not any(m is not None for _, m in self._prompt_masks):
            return None
        parts = [m if m is not None else torch.ones(self.batch, q, dtype=torch.bool) for q, m in self._prompt_masks]
        return torch.cat(parts, dim=1)[:, :prompt_len]
