"""Reconcile a finished ``generate()`` with the sequences it returned, and run mode ``full``'s forwards.

The returned sequences are what a capture is checked against. In mode ``steps`` a sample's steps end at its
first EOS and the last generated token is never forwarded: :func:`reconcile_steps` drops the decode units past
that point (undone steps), fails on a missing one or on a token that differs, and shares each prompt's step 0
with its other returned sequences. In mode ``full``, :class:`FullForwards` runs each returned sequence (the
prompt's real tokens and the generated ones up to and including the first EOS, padded at the end to
``pad_to``) once through the hooked model, routed whole to its own unit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine import CaptureEngine, CaptureError, ForwardInputs, Route, UnitRecorder


def returned_sequences(out: Any) -> torch.Tensor:
    """The ``(rows, tokens)`` sequences of what ``generate`` returned (a tensor or a ``GenerateOutput``), on CPU."""
    sequences = getattr(out, "sequences", out)
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
        raise TypeError(
            f"finalize() takes what generate() returned (a tensor or a GenerateOutput), got {type(out).__name__}"
        )
    return sequences.to("cpu")


def generated_tokens(sequences: torch.Tensor, prompt_len: int, row: int, eos: set[int]) -> list[int]:
    """Row ``row``'s generated tokens up to and including the first EOS."""
    gen = [int(t) for t in sequences[row, prompt_len:].tolist()]
    for j, t in enumerate(gen):
        if t in eos:
            return gen[: j + 1]
    return gen


def reconcile_steps(
    engine: CaptureEngine, sequences: torch.Tensor, prompt_len: int, *, rows: int | None, eos: set[int], returns: int
) -> None:
    """Make the ``steps`` units of ``engine`` those the sequences call for (``rows``: the rows the capture saw)."""
    if sequences.shape[0] != rows:
        raise CaptureError(f"generate returned {sequences.shape[0]} sequences; the capture saw {rows} rows")
    n = sequences.shape[1] - prompt_len
    for r in range(sequences.shape[0]):
        gen = generated_tokens(sequences, prompt_len, r, eos)
        ended = bool(gen) and gen[-1] in eos
        last = len(gen) - 1 if ended else n - 1  # forward k consumes token k-1; the last is never forwarded
        _check_steps(engine, r, gen, last)
    for r in range(sequences.shape[0]):
        if r % returns:  # the prompt's rows are identical: computed once, shared
            engine.clone(engine.units[(r - r % returns, 0)], r)


def _check_steps(engine: CaptureEngine, r: int, gen: list[int], last: int) -> None:
    """Sample ``r`` must have decode steps 1..``last``, each with its generated token; drop any later step."""
    steps = {k for (s, k) in engine.units if s == r and k}
    for k in sorted(steps - set(range(1, last + 1))):  # undone steps (deferred stop checks)
        engine.drop(engine.units[(r, k)])
    missing = sorted(set(range(1, last + 1)) - steps)
    if missing:
        raise CaptureError(f"sample {r}: decode steps {missing[:5]} were not captured; nothing was emitted")
    for k in range(1, last + 1):
        token = engine.units[(r, k)].token_ids
        if token != [gen[k - 1]]:
            raise CaptureError(f"sample {r} step {k}: captured token {token}, the sequence has {gen[k - 1]}")


class FullForwards:
    """Mode ``full``: one forward of the hooked model per returned sequence, each routed whole to its unit."""

    def __init__(self, model: nn.Module, engine: CaptureEngine, pad_to: int | None):
        self._model = model
        self._engine = engine
        self._pad_to = pad_to
        self.unit: UnitRecorder | None = None  # the unit of the forward running now, if any

    def route(self, fwd: ForwardInputs) -> list[Route]:
        """The route of the running forward: every position to :attr:`unit`."""
        return [Route(0, slice(0, fwd.q), self.unit)]

    def run(
        self,
        sequences: torch.Tensor,
        prompt_len: int,
        *,
        batch: int | None,
        expand: int,
        prompt_mask: torch.Tensor | None,
        eos: set[int],
        pad: int | None,
    ) -> None:
        """Run and seal each sequence's unit. ``batch``: the prompt forward's rows, ``expand`` rows per prompt,
        ``prompt_mask`` the real columns of each prompt row (None: all real)."""
        rows = sequences.shape[0]
        per_prompt = max(1, (batch or rows) // expand)
        returns = max(1, rows // per_prompt)
        device = next((p.device for p in self._model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        for r in range(rows):
            prompt = sequences[r, :prompt_len]
            if prompt_mask is not None:
                prompt = prompt[prompt_mask[(r // returns) * expand]]
            gen = generated_tokens(sequences, prompt_len, r, eos)
            ids = [int(t) for t in prompt.tolist()] + gen
            unit = self._engine.unit(r, 0, "full")
            unit.info.update(row=r, prompt_index=r // returns)
            unit.prompt_token_count, unit.generated_token_count = len(ids) - len(gen), len(gen)
            if self._pad_to is not None:
                ids = self._padded(r, ids, pad)
                unit.pad_token_id = pad
            self._forward(unit, ids, device)

    def _padded(self, r: int, ids: list[int], pad: int | None) -> list[int]:
        real = len(ids)
        if real > self._pad_to:
            raise CaptureError(
                f"sample {r}: {real} tokens (prompt and generated) exceed pad_to={self._pad_to}; raise pad_to "
                f"or lower max_new_tokens"
            )
        if pad is None:
            raise CaptureError("pad_to needs a pad or EOS token id in the generation config")
        return ids + [pad] * (self._pad_to - real)

    def _forward(self, unit: UnitRecorder, ids: list[int], device: torch.device) -> None:
        self.unit = unit
        try:
            with torch.inference_mode():
                self._model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        finally:
            self.unit = None
        unit.seal()
