"""What zkLLM will reject: the Llama-2 dims its scripts load, its SwiGLU table and scale, and the capture's
values checked against them (:func:`prover_problems`), plus what plan cannot check (:func:`prover_notes`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..profile import zkllm_limit_warnings

# The dims zkLLM's scripts read from the model they load by name (model_card = meta-llama/Llama-2-{size}b-hf).
LLAMA2 = {
    7: {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "num_hidden_layers": 32,
        "rms_norm_eps": 1e-5,
    },
    13: {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "num_hidden_layers": 40,
        "rms_norm_eps": 1e-5,
    },
}
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


def prover_problems(cap: Any, model_size: int, layers: Sequence[int], zkllm_root: Path | None) -> list[str]:
    """Every zkLLM limit the capture (``validate.Capture``) does not meet, each naming the value and the fix."""
    meta = cap.metadata
    model = meta.get("model", {})
    out = zkllm_limit_warnings(
        cap.seq_len,
        cap.hidden_size,
        model.get("intermediate_size"),
        paddable=meta.get("capture", {}).get("mode", "forward") in ("forward", "full", "evaluate", "predict"),
        num_attention_heads=model.get("num_attention_heads"),
        num_key_value_heads=model.get("num_key_value_heads"),
        flags=True,  # plan's fixes are commands to run again
    )
    if cap.scale_log2 != ZKLLM_SCALE_LOG2:
        out.append(
            f"the capture is at scale 2**{cap.scale_log2}; zkLLM's kernels read activations at 2**{ZKLLM_SCALE_LOG2}: "
            f"capture again with --scale-log2 {ZKLLM_SCALE_LOG2}"
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
    expected = LLAMA2[model_size]
    differ = []
    for key, want in expected.items():
        have = model.get(key)
        if have is None or (not math.isclose(float(have), float(want)) if key == "rms_norm_eps" else have != want):
            differ.append(f"{key} {have} (Llama-2-{model_size}B: {want})")
    if differ:
        out.append(
            f"zkLLM's scripts load meta-llama/Llama-2-{model_size}b-hf by name and prove with its weights, and this "
            f"capture's model differs: {', '.join(differ)}. To prove this model, change model_card in every "
            f"llama-*.py to it (and add GQA to the attention kernel if it has fewer key/value heads)"
        )
    bad_layers = [layer for layer in layers if layer >= expected["num_hidden_layers"]]
    if bad_layers:
        out.append(
            f"layers {bad_layers} do not exist in Llama-2-{model_size}B ({expected['num_hidden_layers']} layers)"
        )
    if zkllm_root is not None:
        absent = [s for s in SCRIPTS if not (zkllm_root / s).is_file()]
        if absent:
            out.append(
                f"{zkllm_root} is not a zkllm-ccs2024 checkout (no {', '.join(absent)}): pass --zkllm-root the folder "
                f"of git clone https://github.com/jvhs0706/zkllm-ccs2024"
            )
    return out


def prover_notes(cap: Any, model_size: int) -> list[str]:
    """What plan cannot check but the prover's user must know: zkLLM proves with the weights of the model it
    loads by name, whatever model the capture came from."""
    name = str(cap.metadata.get("model", {}).get("name_or_path") or "")
    if f"llama-2-{model_size}b" in name.lower().replace("_", "-"):
        return []
    return [
        f"the capture's model is {name or 'unnamed'}; zkLLM commits to and proves with the weights of "
        f"meta-llama/Llama-2-{model_size}b-hf, so unless these are exactly those weights the proof is about "
        f"another model (compare the manifest's weights_fingerprint with that model's)"
    ]
