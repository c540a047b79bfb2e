"""Read a ``generate()`` call's generation config: refuse what a capture mode cannot capture, and describe it.

:func:`refuse_config` says no to a config whose forwards are not the steps a mode captures (beam search with
``steps``, prompt-lookup decoding with ``steps`` or ``prefill``). :class:`GenerationSettings` keeps the config
of the observed call (forcing ``disable_compile``, so a compiled decode cannot bypass or replay the hooks) and
answers what the rest of the processor needs of it: rows per prompt, returned sequences per prompt, the EOS and
pad ids, and the dataset's ``generation`` metadata.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine import CaptureError

CONFIG_FIELDS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "num_beams",
    "num_return_sequences",
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "use_cache",
    "cache_implementation",
    "prefill_chunk_size",
    "prompt_lookup_num_tokens",
)
"""The generation config fields recorded in the ``generation`` metadata."""


def refuse_config(mode: str, config: Any) -> None:
    """Raise :class:`CaptureError` if ``mode`` cannot capture what ``config`` makes ``generate`` run."""
    beams = int(getattr(config, "num_beams", 1) or 1)
    assisted = bool(getattr(config, "prompt_lookup_num_tokens", None))
    if mode == "steps" and beams > 1:
        raise CaptureError(
            f"mode='steps' with beam search (num_beams={beams}): the cache is reordered every step, so a "
            f"row is not one hypothesis from step to step. Use mode='prefill' or mode='full'"
        )
    if mode in ("steps", "prefill") and assisted:
        raise CaptureError(
            f"mode={mode!r} with prompt-lookup decoding: each forward checks several drafted tokens, "
            f"some later rejected, so forwards are not steps. Use mode='full'"
        )


class GenerationSettings:
    """The generation config of the observed ``generate()`` call (the model's own until one is observed)."""

    def __init__(self, model: nn.Module):
        self._model = model
        self.config: Any = None
        self.compile_forced = False  # disable_compile was off and this capture turned it on

    def adopt(self, config: Any) -> None:
        """Take ``config`` as the call's, forcing ``disable_compile`` on it."""
        self.compile_forced = not bool(getattr(config, "disable_compile", False))
        if config is not None:
            config.disable_compile = True  # a compiled decode could bypass or replay the hooks
        self.config = config

    @property
    def expand(self) -> int:
        """Rows per prompt after generate's expansion (num_beams or num_return_sequences)."""
        c = self.config
        return max(int(getattr(c, "num_beams", 1) or 1), int(getattr(c, "num_return_sequences", 1) or 1))

    @property
    def returns(self) -> int:
        """Sequences returned per prompt."""
        return int(getattr(self.config, "num_return_sequences", 1) or 1)

    def _effective(self) -> Any:
        return self.config if self.config is not None else getattr(self._model, "generation_config", None)

    @property
    def eos(self) -> set[int]:
        """The token ids that end a sample."""
        c = self._effective()
        eos = getattr(c, "_eos_token_tensor", None)
        if eos is None:
            eos = getattr(c, "eos_token_id", None)
        if eos is None:
            return set()
        if isinstance(eos, torch.Tensor):
            return {int(t) for t in eos.reshape(-1).tolist()}
        return {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}

    @property
    def pad(self) -> int | None:
        """The pad token id, if any."""
        c = self._effective()
        pad = getattr(c, "_pad_token_tensor", None)
        if pad is None:
            pad = getattr(c, "pad_token_id", None)
        return None if pad is None else int(pad)

    def metadata(self, *, prompt_length: int, steps: int, rows: int | None) -> dict[str, Any]:
        """The dataset's ``generation`` metadata: the config's fields and what the capture observed."""
        c = self.config
        meta: dict[str, Any] = {"observed": c is not None}
        if c is not None:
            for name in CONFIG_FIELDS:
                value = getattr(c, name, None)
                meta[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
        meta.update(
            eos_token_id=sorted(self.eos),
            pad_token_id=self.pad,
            disable_compile=True,
            disable_compile_forced=self.compile_forced,
            prompt_length=prompt_length,
            steps=steps,
            rows=rows,
        )
        if meta.get("do_sample"):
            meta["seed"] = torch.initial_seed()  # torch's default generator, which sampling draws from
        return meta
