"""The capture-point table (docs/architecture.md §1), as data, and the architectures it fits.

Everything else reads this table: the hooks attach from it, the writer names files from it and the
contracts name their checks after it. Adding a Llama-shaped architecture is one line in ``ARCHITECTURES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

HookKind = Literal["pre", "forward"]


@dataclass(frozen=True)
class CapturePoint:
    """One activation captured per decoder layer."""

    name: str
    module: str  # attribute of the decoder layer; "" is the decoder layer itself
    hook: HookKind  # "pre": the module's input; "forward": its output
    file: str  # file-name template, ``{L}`` is the layer index
    consumer: str  # the zkLLM step that reads it
    aliases: tuple[str, ...] = ()  # further file names holding the same bytes

    def file_name(self, layer: int) -> str:
        return self.file.format(L=layer)

    def alias_names(self, layer: int) -> tuple[str, ...]:
        return tuple(a.format(L=layer) for a in self.aliases)


POINTS: tuple[CapturePoint, ...] = (
    CapturePoint(
        "block_input",
        "",
        "pre",
        "layer-{L}-input-rmsnorm-activation.bin",
        "llama-rmsnorm.py input; skip #1 --block_input_file",
        aliases=("layer-{L}-block-input.bin",),
    ),
    CapturePoint(
        "input_layernorm_output",
        "input_layernorm",
        "forward",
        "layer-{L}-self-attn-activation.bin",
        "llama-self-attn.py",
    ),
    CapturePoint(
        "attn_output",
        "self_attn",
        "forward",
        "layer-{L}-attn-output.bin",
        "skip #1 --block_output_file",
    ),
    CapturePoint(
        "post_attn_residual",
        "post_attention_layernorm",
        "pre",
        "layer-{L}-post_attention-rmsnorm-activation.bin",
        "llama-rmsnorm.py post_attention; skip #2 --block_input_file",
    ),
    CapturePoint(
        "ffn_input",
        "post_attention_layernorm",
        "forward",
        "layer-{L}-ffn-activation.bin",
        "llama-ffn.py",
    ),
    CapturePoint(
        "mlp_output",
        "mlp",
        "forward",
        "layer-{L}-mlp-output.bin",
        "skip #2 --block_output_file",
    ),
    CapturePoint(
        "block_output",
        "",
        "forward",
        "layer-{L}-block-output.bin",
        "next layer's input; chain check",
    ),
)

POINTS_BY_NAME: dict[str, CapturePoint] = {p.name: p for p in POINTS}
FILES_PER_LAYER: int = sum(1 + len(p.aliases) for p in POINTS)


def alias_point_name(point: str, i: int = 0) -> str:
    """The manifest's point name for a point's i-th alias file (``block_input_alias``)."""
    return f"{point}_alias{'' if i == 0 else i}"


# Every manifest point name (aliases included) and its file-name template.
FILE_TEMPLATES: dict[str, str] = {
    **{p.name: p.file for p in POINTS},
    **{alias_point_name(p.name, i): a for p in POINTS for i, a in enumerate(p.aliases)},
}


@dataclass(frozen=True)
class Architecture:
    """Where the decoder layers live, for one family of Llama-shaped decoders."""

    model_types: tuple[str, ...]
    layers: tuple[str, ...] = ("model.layers", "layers")  # tried in order: *ForCausalLM, then the bare model


# Llama-shaped decoders: pre-norm RMSNorm, residual adds exactly as in LlamaDecoderLayer, module names as
# in the table above. Architectures whose norms sit elsewhere (Gemma's sandwich norms, Phi's parallel
# block) do not fit and are refused.
ARCHITECTURES: tuple[Architecture, ...] = (Architecture(("llama", "mistral", "qwen2", "qwen3")),)
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(t for a in ARCHITECTURES for t in a.model_types)


_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")
_INDEX = re.compile(r"^-?\d+$")


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """Parse a layer spec such as ``"all"``, ``"0-3,7"`` or ``"-1"`` into sorted layer indices."""
    if spec is None or spec.strip().lower() == "all":
        return list(range(num_layers))
    if not spec.strip():
        raise ValueError("layer spec '' is empty; use 'all', or indices and ranges such as '0-3,7'")
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if m := _RANGE.match(part):
            lo, hi = int(m[1]), int(m[2])
            if lo <= hi:
                chosen.update(range(lo, hi + 1))
                continue
        elif _INDEX.match(part):
            idx = int(part)
            chosen.add(idx + num_layers if idx < 0 else idx)
            continue
        raise ValueError(
            f"layer spec {spec!r}: cannot read {part!r}; use 'all', a comma list of indices and "
            f"ascending ranges such as '0-3,7', or a negative index such as '-1'"
        )
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if bad:
        raise ValueError(
            f"layer spec {spec!r}: layer(s) {bad} out of range; the model has {num_layers} layers (0-{num_layers - 1})"
        )
    return sorted(chosen)
