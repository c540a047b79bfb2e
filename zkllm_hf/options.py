"""What a capture was asked for, resolved and checked once: :class:`CaptureOptions`.

The entry points (``capture()``, ``capture_dataset()``, the integrations, the CLI) take the same keyword
arguments; :meth:`CaptureOptions.build` turns them into one frozen value, with the layer spec parsed against
the model's layer count, the residual mode and the scale checked, and the contract loaded. The layer
coercion and the residual-mode check live here, once, as public functions the others call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import fixed_point as fp
from .contracts import RESIDUAL_MODES, Contract, load_contract
from .digests import DEFAULT_DIGEST, check_digest
from .points import parse_layers

__all__ = ["GENERATE_MODES", "PADDABLE_MODES", "CaptureOptions", "check_fingerprint", "check_residuals",
           "generation_problem",
           "residuals_dtype_problem", "resolve_layers", "threads_problem"]

PADDABLE_MODES = frozenset({"forward", "full", "evaluate", "predict"})  # can the user pad these forwards?
GENERATE_MODES = ("prefill", "full", "steps")  # what a capture inside generate() takes


def threads_problem(threads: int | None, *, flags: bool = False) -> str | None:
    """What is wrong with an intra-op thread count (None: leave torch's alone), else None; ``flags`` spells it
    as the CLI's ``--threads``."""
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1):
        return None
    name = f"--threads {threads}" if flags else f"threads={threads!r}"
    return f"{name}: give a positive intra-op thread count, such as 1 (the default)"


def generation_problem(
    generate: int | bool | None, mode: str | None, pad_to: int | None, *, flags: bool = False
) -> str | None:
    """What is wrong with ``generate``, ``mode`` and ``pad_to`` together, else None: the one home of these rules
    for capture-dataset, CaptureLogitsProcessor and the CLI. ``generate`` is the number of new tokens, None for
    no generation, or True inside a ``generate()`` call; ``mode`` None when not given (prefill); ``flags``
    spells the names as the CLI's options."""
    g, m, p = ("--max-new-tokens", "--mode", "--pad-to") if flags else ("generate", "mode", "pad_to")
    if generate is None and mode is not None:
        return f"{m} applies to {g} N; add {g}, or drop {m}"
    if generate is not None and generate is not True and (isinstance(generate, bool) or generate < 1):
        return f"{g} {generate}: give a positive number of new tokens"
    if mode is not None and mode not in GENERATE_MODES:
        return f"{m} {mode!r}: choose one of {', '.join(GENERATE_MODES)}"
    if pad_to is not None and pad_to <= 0:
        return f"{p} {pad_to}: give a positive token count"
    if generate is not None and pad_to is not None and (mode or "prefill") != "full":
        return (
            f"{p} applies to {m} full with {g}: the {mode or 'prefill'} forwards are generate()'s own and cannot be "
            f"padded; use {m} full, or drop {p}"
        )
    return None


def residuals_dtype_problem(residuals: str, dtype: Any, *, flags: bool = False) -> str | None:
    """Why ``residuals`` cannot run with weights of ``dtype`` (a torch dtype or its name), else None.

    exact-int bounds the derived stream's drift by ``256 LSB + 4 ulp`` of the model's value; in bfloat16 or
    float16 the model's own rounding (about 2**-8 relative) is far coarser than 2**-16, so every layer would
    fail. It is refused before any forward, with the fix."""
    name = str(dtype).removeprefix("torch.")
    if residuals != "exact-int" or name not in ("bfloat16", "float16"):
        return None
    r, fix = (
        ("--residuals exact-int", "use --dtype float32 (or --residuals model)")
        if flags
        else ("residuals='exact-int'", "load the model in float32 (or use residuals='model')")
    )
    return (
        f"{r} with {name} weights: their rounding (about 2**-8 relative) is far coarser than the 2**-16 scale, "
        f"so the derived residuals would drift past the contract's bound at every layer; {fix}"
    )


def check_residuals(residuals: str) -> str:
    """Return ``residuals`` if it is a residual mode the capture knows, else raise naming the choices."""
    if residuals not in RESIDUAL_MODES:
        raise ValueError(
            f"residuals={residuals!r}; one of {RESIDUAL_MODES}: 'model' writes the model's own residual stream, "
            f"'exact-int' derives it in int32 from the sublayer outputs so zkLLM's skip steps reproduce it exactly"
        )
    return residuals


def check_fingerprint(fingerprint: Any, *, flag: bool = False) -> str:
    """``fingerprint`` if it is a fingerprint mode ("cached" reuses this process's while the parameters are
    unchanged, "full" recomputes it), else a ValueError naming the choices."""
    if fingerprint not in ("cached", "full"):
        said = f"--fingerprint {fingerprint}" if flag else f"fingerprint={fingerprint!r}"
        raise ValueError(f"{said}: one of 'cached' (reuse it while the weights are unchanged) or 'full' (recompute)")
    return fingerprint


def resolve_layers(layers: Sequence[int] | str | None, num_layers: int) -> list[int]:
    """The sorted layer indices of ``layers`` (None: all; a spec such as ``"0-3,7"``; or indices), each
    checked against ``num_layers``; an empty choice is refused."""
    if layers is None or isinstance(layers, str):
        chosen = parse_layers(layers, num_layers)
    else:
        chosen = parse_layers(",".join(str(int(i)) for i in layers), num_layers) if layers else []
    if not chosen:
        raise ValueError("layers is empty; pass None for every layer, or a spec such as '0-3,7'")
    return chosen


@dataclass(frozen=True)
class CaptureOptions:
    """One capture's settings, already checked: build it with :meth:`build`."""

    mode: str
    layers: tuple[int, ...]
    scale_log2: int = 16
    residuals: str = "model"
    contract: Contract = field(default_factory=load_contract)
    overwrite: bool = False
    progress: bool = False
    stepped: bool = False  # units are sample-{b}/step-{k}/ even for one sample
    extra_metadata: Mapping[str, Any] = field(default_factory=dict)
    tokenizer: Any = field(default=None, compare=False, repr=False)  # the tokens' tokenizer: its fingerprint, text
    store_text: bool = True  # record each unit's prompt (and generated) text, decoded by ``tokenizer``
    digest: str = DEFAULT_DIGEST  # the files', the manifest's and the fingerprint's digest: blake3 or sha256
    fingerprint: str = "cached"  # "full" recomputes the weights fingerprint even if this process has it
    writers: int | None = None  # writer threads (hash and write); None: 1 on the CPU, several on a GPU

    @property
    def paddable(self) -> bool:
        """Whether the user can pad this mode's forwards (a zkLLM limit the capture does not meet is a hint)."""
        return self.mode in PADDABLE_MODES

    @classmethod
    def build(
        cls,
        num_layers: int | Callable[[], int],
        *,
        mode: str,
        layers: Sequence[int] | str | None = None,
        scale_log2: int = 16,
        overwrite: bool = False,
        progress: bool = False,
        stepped: bool = False,
        extra_metadata: Mapping[str, Any] | None = None,
        contract: str = "v1",
        residuals: str = "model",
        tokenizer: Any = None,
        store_text: bool = True,
        digest: str = DEFAULT_DIGEST,
        fingerprint: str = "cached",
        writers: int | None = None,
    ) -> CaptureOptions:
        """The options of the keyword arguments the entry points take, checked in this order: scale, contract,
        residual mode, then the layers against ``num_layers`` (an int, or a function asked only then)."""
        scale = fp.check_scale(scale_log2)
        loaded = load_contract(contract)
        check_residuals(residuals)
        check_digest(digest)
        check_fingerprint(fingerprint)
        if writers is not None and (isinstance(writers, bool) or not isinstance(writers, int) or writers < 1):
            raise ValueError(f"writers={writers!r}; a number of writer threads of at least 1, or None for the default")
        n = num_layers() if callable(num_layers) else num_layers
        return cls(
            mode=mode,
            layers=tuple(resolve_layers(layers, n)),
            scale_log2=scale,
            residuals=residuals,
            contract=loaded,
            overwrite=overwrite,
            progress=progress,
            stepped=stepped,
            extra_metadata=dict(extra_metadata or {}),
            tokenizer=tokenizer,
            store_text=bool(store_text),
            digest=digest,
            fingerprint=fingerprint,
            writers=writers,
        )
