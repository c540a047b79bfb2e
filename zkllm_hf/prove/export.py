"""The model folder zkLLM loads (``zkllm-hf export-zkllm-model``): the captured model, and for grouped-query
attention the exactly equivalent multi-head model, saved with ``save_pretrained`` and a record of what was done.

zkLLM's attention kernel builds K and V as ``embed_dim x embed_dim`` zkFCs (self-attn.cu:29-46; zkFC throws
"weight size does not match" at zkfc.cu:9 otherwise), so it cannot load a model with fewer key/value heads than
query heads. A GQA layer computes, for query head ``h``, attention with key/value head ``h // g`` (``g`` =
``num_attention_heads / num_key_value_heads``), which is what transformers' ``repeat_kv`` does. Repeating each
key/value head's ``head_dim`` rows of ``k_proj.weight`` and ``v_proj.weight`` ``g`` times (in place, head by
head) gives an MHA layer whose K and V are those repeated heads: the same function, and with transformers 5.24
in float32 on the CPU the same bits at all seven capture points (measured for sdpa and eager: tests/
test_export_zkllm_model.py). The folder's :data:`EXPORT_RECORD` names the transformation and both weights
fingerprints, so a proof of the expansion is bound to the captured GQA weights.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportRefused, OutputRefused
from ..provenance import FINGERPRINT_ALGORITHM, config_sha256, utc_now, weights_fingerprint
from ..version import __version__

EXPORT_RECORD = "zkllm-hf-export.json"
EXPORT_FORMAT = "zkllm-hf-export/1"
EXPANDED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def expand_gqa(model: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """The MHA model equivalent to ``model`` (a copy; ``model`` is unchanged) and the parameters repeated.

    For ``kv`` key/value heads of ``head_dim`` rows and ``g = heads / kv``, the expanded weight's rows
    ``[(j*g + r)*head_dim, (j*g + r + 1)*head_dim)`` are the original head ``j``'s rows, for each ``r < g``.
    A model that already has as many key/value heads as query heads is returned as a copy, unchanged.
    """
    config = model.config
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or 0)
    kv = kv or heads
    expanded = copy.deepcopy(model)
    if kv == heads:
        return expanded, []
    if heads % kv:
        raise ExportRefused(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}: no expansion")
    d, g = head_dim_of(config), heads // kv
    names = []
    with torch.no_grad():
        for i, layer in enumerate(expanded.model.layers):
            for proj in ("k_proj", "v_proj"):
                lin = getattr(layer.self_attn, proj)
                w = lin.weight
                new = w.reshape(kv, d, w.shape[1]).repeat_interleave(g, dim=0).reshape(heads * d, w.shape[1])
                lin.weight = torch.nn.Parameter(new.contiguous(), requires_grad=False)
                lin.out_features = heads * d
                if lin.bias is not None:
                    b = lin.bias.reshape(kv, d).repeat_interleave(g, dim=0).reshape(heads * d)
                    lin.bias = torch.nn.Parameter(b.contiguous(), requires_grad=False)
                names.append(f"model.layers.{i}.self_attn.{proj}.weight")
            layer.self_attn.num_key_value_groups = 1
            if hasattr(layer.self_attn, "num_key_value_heads"):
                layer.self_attn.num_key_value_heads = heads
    expanded.config.num_key_value_heads = heads
    return expanded, names


def read_export(folder: Path) -> dict[str, Any] | None:
    """The export record of a folder ``export_zkllm_model`` wrote, or None if it has none (or not one of ours)."""
    try:
        record = json.loads((folder / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != EXPORT_FORMAT:
        return None
    fields = ("weights_fingerprint", "source")
    ok = all(isinstance(record.get(k), (str, dict)) for k in fields)
    return record if ok and isinstance(record["source"].get("weights_fingerprint"), str) else None


def _refuse_target(out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise OutputRefused(
            f"{out} already exists and is not an empty folder; give export-zkllm-model (or plan --model-dir) a new "
            f"folder"
        )


def export_zkllm_model(model: torch.nn.Module, capture: Any, out: Path, tokenizer: Any = None) -> dict[str, Any]:
    """Write the folder zkLLM loads for ``capture`` (a ``validate.Capture``) from ``model``, the captured model
    (its weights fingerprint must be the capture's), and return its record (also written as EXPORT_RECORD).

    The folder is staged beside ``out`` and renamed into place whole; ``out`` must be new or an empty folder.
    The record's ``weights_fingerprint`` is computed on the folder as ``from_pretrained`` loads it back.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out)
    _refuse_target(out)
    meta = capture.metadata.get("model", {})
    source_fp = weights_fingerprint(model)
    if source_fp != meta.get("weights_fingerprint"):
        raise ExportRefused(
            f"the model given (weights {source_fp[:16]}...) is not the captured one (weights "
            f"{str(meta.get('weights_fingerprint'))[:16]}...): pass --model the model the capture ran"
        )
    if getattr(model.config, "quantization_config", None) is not None:
        raise ExportRefused(
            "the captured model is bitsandbytes-quantized; zkLLM commits float weights: capture in float32 "
            "(--dtype float32) to prove it"
        )
    expanded, names = expand_gqa(model)
    config = model.config
    heads, kv = int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None) or 0)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        expanded.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype="auto", local_files_only=True)
        mha_fp = weights_fingerprint(reloaded)
        if mha_fp != weights_fingerprint(expanded):
            raise ExportRefused(f"the model saved in {staging} does not load back with the weights written")
        record = {
            "format": EXPORT_FORMAT,
            "zkllm_hf": __version__,
            "created_utc": utc_now(),
            "capture": str(Path(capture.path).resolve()),
            "source": {
                "name_or_path": meta.get("name_or_path"),
                "weights_fingerprint": source_fp,
                "config_sha256": meta.get("config_sha256"),
                "num_attention_heads": heads,
                "num_key_value_heads": kv or heads,
            },
            "transformation": _transformation(names, heads, kv or heads, head_dim_of(config)),
            "weights_fingerprint": mha_fp,
            "weights_fingerprint_algorithm": FINGERPRINT_ALGORITHM,
            "config_sha256": config_sha256(reloaded.config),
            "dtype": str(reloaded.dtype).removeprefix("torch."),
            "num_hidden_layers": int(config.num_hidden_layers),
        }
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _transformation(names: list[str], heads: int, kv: int, d: int) -> dict[str, Any]:
    if not names:
        return {"kind": "none", "description": "the captured model as it is (multi-head attention)"}
    g = heads // kv
    return {
        "kind": "gqa-to-mha",
        "description": (
            f"k_proj and v_proj: each of the {kv} key/value heads' {d} rows repeated {g} times in place (rows "
            f"[(j*{g}+r)*{d}, (j*{g}+r+1)*{d}) = head j's, r < {g}); num_key_value_heads {kv} -> {heads}. Query "
            f"head h attends with key/value head h // {g}, as transformers' repeat_kv does: the same function"
        ),
        "groups": g,
        "head_dim": d,
        "parameters": len(names),
    }


def describe_export(record: dict[str, Any]) -> list[str]:
    """What the export record says, as lines for a script header or a report."""
    src, t = record["source"], record.get("transformation", {})
    lines = [f"exported by zkllm-hf {record.get('zkllm_hf')} ({EXPORT_RECORD}): {t.get('kind')}, {record.get('dtype')}"]
    if t.get("kind") == "gqa-to-mha":
        name, fp = src.get("name_or_path"), src["weights_fingerprint"]
        lines.append(f"  the MHA expansion of the captured {name}, weights {fp}:")
        lines.append(f"  {t['description']}")
    return lines
