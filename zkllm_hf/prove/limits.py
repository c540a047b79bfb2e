"""What zkLLM will reject: its attention and SwiGLU tables, its scale and its query width, checked against the
capture's metadata (:func:`prover_problems`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..profile import zkllm_limit_warnings

GATE_LIMIT = 512.0  # llama-ffn.py's SwiGLU table spans x in [-512, 512)
ZKLLM_SCALE_LOG2 = 16  # zkLLM's kernels and llama-commit.py assume activations at 2**16
SCRIPTS = (
    "llama-ppgen.py",
    "llama-commit.py",
    "llama-rmsnorm.py",
    "llama-self-attn.py",
    "llama-ffn.py",
    "llama-skip-connection.py",
)
# Parameters of one Llama-2 decoder layer, as llama-ppgen.py and llama-commit.py name their files.
LAYER_PARAMS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def prover_problems(cap: Any, layers: Sequence[int], zkllm_root: Path | None) -> list[str]:
    """Every zkLLM limit the capture (``validate.Capture``) does not meet, each naming the value and the fix.

    The model's own dims are no limit: the launcher (``zkllm_hf.zkllm_run``) points zkLLM's scripts at the folder
    ``export-zkllm-model`` writes, and grouped-query attention is proved through its exact MHA expansion. What
    remains are zkLLM's tables and kernels: seq_len, the SwiGLU table's size and range, the scale, and a query
    width of ``num_attention_heads * head_dim == hidden_size`` (the self-attn kernel's q_proj is embed_dim x
    embed_dim, self-attn.cu:21-27, and llama-self-attn.py:44 views Q as (seq_len, num_heads, head_dim)).
    """
    meta = cap.metadata
    model = meta.get("model", {})
    out = zkllm_limit_warnings(
        cap.seq_len,
        cap.hidden_size,
        model.get("intermediate_size"),
        paddable=meta.get("capture", {}).get("mode", "forward") in ("forward", "full", "evaluate", "predict"),
        flags=True,  # plan's fixes are commands to run again
    )
    if cap.scale_log2 != ZKLLM_SCALE_LOG2:
        out.append(
            f"the capture is at scale 2**{cap.scale_log2}; zkLLM's kernels read activations at 2**{ZKLLM_SCALE_LOG2}: "
            f"capture again with --scale-log2 {ZKLLM_SCALE_LOG2}"
        )
    heads, head_dim = model.get("num_attention_heads"), model.get("head_dim")
    if heads and head_dim and int(heads) * int(head_dim) != cap.hidden_size:
        out.append(
            f"num_attention_heads {heads} x head_dim {head_dim} is not hidden_size {cap.hidden_size}; zkLLM's "
            f"self-attn kernel builds q_proj as hidden x hidden (self-attn.cu:21-27): this model cannot be proved "
            f"without changing that kernel"
        )
    gates = {int(e["layer"]): float(e["value"]) for e in (meta.get("ffn") or {}).get("gate_abs_max") or []}
    missing = [layer for layer in layers if layer not in gates]
    if missing:
        out.append(
            f"the capture records no gate_proj range for layers {missing} (made by an older zkllm-hf, or a model "
            f"without mlp.gate_proj); zkLLM's SwiGLU table needs |gate| < {GATE_LIMIT:g}: capture again to check it"
        )
    over = {layer: v for layer, v in gates.items() if layer in layers and not v < GATE_LIMIT}
    if over:
        worst = max(over, key=over.__getitem__)
        out.append(
            f"|gate_proj output| reaches {over[worst]:.6g} at layer {worst} ({len(over)} layer(s) at or above "
            f"{GATE_LIMIT:g}); llama-ffn.py's SwiGLU table covers [-512, 512) only: widen prepare_swiglu's range in "
            f"llama-ffn.py (and the table size ffn.cu expects), or prove other layers with --layers"
        )
    if zkllm_root is not None:
        absent = [s for s in SCRIPTS if not (zkllm_root / s).is_file()]
        if absent:
            out.append(
                f"{zkllm_root} is not a zkllm-ccs2024 checkout (no {', '.join(absent)}): pass --zkllm-root the folder "
                f"of git clone https://github.com/jvhs0706/zkllm-ccs2024"
            )
    return out
