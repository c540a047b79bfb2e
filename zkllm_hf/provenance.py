"""What an auditor needs to know about the run: model identity, weights fingerprint, library versions, and the
runtime settings (threads, deterministic algorithms, attention, devices) that decide a forward's float bits."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import torch
from torch import nn

from .digests import DEFAULT_DIGEST, check_digest, digest_bytes
from .version import __version__
from .weights import read_tensor

_CANON = (
    "over the state dict, sorted by name; a bitsandbytes 4-bit or 8-bit weight as its float32 dequantized values "
    "(4-bit absmax at bfloat16), its quant-state entries skipped"
)
FINGERPRINT_ALGORITHMS = {  # by the capture's digest; a manifest records the definition it was made by
    "blake3": f"v3: blake3(name|dtype|shape|blake3(bytes)) {_CANON}",
    "sha256": f"v2: sha256(name|dtype|shape|sha256(bytes)) {_CANON}",
}
FINGERPRINT_ALGORITHM = FINGERPRINT_ALGORITHMS[DEFAULT_DIGEST]
FINGERPRINT_MODES = ("cached", "full")


def fingerprint_digest(algorithm: Any) -> str | None:
    """The digest a recorded fingerprint algorithm uses, or None for one this zkllm-hf does not compute."""
    return next((d for d, a in FINGERPRINT_ALGORITHMS.items() if a == algorithm), None)


def _tensor_digest(t: torch.Tensor, digest: str) -> str:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return digest_bytes(digest, b"")
    return digest_bytes(digest, flat.view(torch.uint8).numpy())


def _materialize(model: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """The real tensor behind a state-dict entry that device_map offloading left on the meta device."""
    if t.device.type != "meta":
        return t
    module_name, _, attr = name.rpartition(".")
    real = read_tensor(model.get_submodule(module_name), attr)
    if real is None:
        raise ValueError(f"weights fingerprint: {name} is on the meta device and its offloaded copy cannot be read")
    return real


class _Dequantized:
    """A bitsandbytes weight, hashed as the float32 values it stands for (computed only when hashed)."""

    def __init__(self, module: nn.Module, kind: str, shape: tuple[int, ...]) -> None:
        self.module, self.kind, self.shape = module, kind, tuple(shape)

    def values(self) -> torch.Tensor:
        if self.kind.startswith("bnb-4bit"):
            return _dequantize_4bit(self.module.weight)
        return _dequantize_8bit(self.module)


def _bnb_kind(module: nn.Module) -> tuple[str, tuple[int, ...]] | None:
    """('bnb-4bit[quant_type,blocksize]' or 'bnb-8bit', logical weight shape) for a bitsandbytes layer whose
    weight is quantized, else None. Reads attributes only: bitsandbytes' own state-dict code repacks."""
    weight = getattr(module, "_parameters", {}).get("weight")
    cls = type(weight).__name__ if weight is not None else ""
    if cls == "Params4bit" and getattr(weight, "quant_state", None) is not None:
        qs = weight.quant_state
        return f"bnb-4bit[{qs.quant_type},{qs.blocksize}]", tuple(qs.shape)
    state = getattr(module, "state", None)
    if cls == "Int8Params" and weight.dtype == torch.int8 and not getattr(state, "has_fp16_weights", True):
        return "bnb-8bit", tuple(weight.shape)
    return None


def _dequantize_4bit(weight: Any) -> torch.Tensor:
    """A Params4bit's weight in float32, whatever bitsandbytes' packing: the 4-bit codes in their original
    order, each times its block's absmax taken at bfloat16 (the precision bitsandbytes' CPU kernel repacks
    absmax to in the first forward; on other devices it keeps float32). Nothing on the module changes."""
    import bitsandbytes.functional as F

    qs = weight.quant_state
    codes = weight.data
    if getattr(qs, "packing_format_for_cpu", False):  # repacked for the CPU kernel: undo it on copies
        unpacked = copy.copy(qs)
        unpacked.original_nested = False  # the absmax below is read as packed; do not requantise it
        codes, _ = F._convert_weight_packed_for_cpu_inverse(codes, unpacked)
        absmax = qs.absmax.T.reshape(-1)  # packed as (blocks per row, rows)
    elif qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    else:
        absmax = qs.absmax
    absmax = absmax.reshape(-1).to(torch.bfloat16).to(torch.float32)
    state = F.QuantState(
        absmax=absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize, quant_type=qs.quant_type,
        dtype=torch.float32,
    )
    return F.dequantize_4bit(codes, state)


def _dequantize_8bit(module: Any) -> torch.Tensor:
    """An Int8Params weight in float32: each row's int8 codes times its scale (SCB) / 127, as bitsandbytes'
    int8_vectorwise_dequant computes it. SCB sits on the weight before the first forward, on the state after."""
    import bitsandbytes.functional as F

    scb = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    return F.int8_vectorwise_dequant(module.weight.data, scb.to(torch.float32))


def _entries(model: nn.Module) -> list[tuple[str, Any]]:
    """The state dict's (name, tensor) pairs, a bitsandbytes layer's weight as a :class:`_Dequantized` and
    its quant-state entries (absmax, quant_map, nested_*, quant_state.*, SCB, weight_format) left out.

    A model without bitsandbytes layers is read with ``state_dict()``, as it always was. One with them is
    walked module by module as ``state_dict`` walks it, without calling a bitsandbytes layer's
    ``_save_to_state_dict``: in bitsandbytes 0.50 that undoes the CPU repacking but leaves absmax in the
    repacked layout, so the next forward computes other values."""
    layers = {name: kind for name, m in model.named_modules(remove_duplicate=False) if (kind := _bnb_kind(m))}
    if not layers:
        return list(model.state_dict(keep_vars=False).items())
    out: list[tuple[str, Any]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        if name in layers:
            kind, shape = layers[name]
            out.append((f"{prefix}weight", _Dequantized(module, kind, shape)))
            bias = module._parameters.get("bias")
            if bias is not None:
                out.append((f"{prefix}bias", bias.detach()))
            continue
        own: dict[str, Any] = {}
        module._save_to_state_dict(own, prefix, False)
        out += own.items()
    return out


def _digest(t: Any, digest: str) -> str:
    return _tensor_digest(t.values() if isinstance(t, _Dequantized) else t, digest)


def weights_fingerprint(model: nn.Module, *, threads: int | None = None, digest: str = DEFAULT_DIGEST) -> str:
    """The fingerprint of every tensor in ``model.state_dict()``, in a stable (sorted) order, under ``digest``
    (BLAKE3 by default, :data:`FINGERPRINT_ALGORITHMS` names each definition; ``"sha256"`` is the v2 one).

    Each distinct tensor is hashed once (tied weights share one digest; threads share the work, as both
    hashes release the GIL), then the sorted lines ``name|dtype|shape|digest`` are hashed. Nothing is cached
    here (:func:`cached_fingerprint` reuses a result while the parameters are provably untouched). Cost is
    one pass over the weights: SHA-256 runs at about 1.6 GB/s per core, BLAKE3 at several times that, plus
    the copy to host memory for weights on a GPU.

    A bitsandbytes 4-bit or 8-bit weight is defined by what it means, not by how bitsandbytes packs it at
    the moment: its line is ``name|bnb-4bit[quant_type,blocksize]->float32|shape|digest`` (or ``bnb-8bit``)
    with the digest of its float32 dequantized values (see :func:`_dequantize_4bit`), and the packed
    quant-state entries are not hashed. So the fingerprint is the same before and after the first forward
    (which repacks on CPU) and for a fresh load of the same checkpoint; reading it changes nothing.
    """
    items = sorted(
        ((k, v if isinstance(v, _Dequantized) else _materialize(model, k, v)) for k, v in _entries(model)
         if isinstance(v, (torch.Tensor, _Dequantized))),
        key=lambda kv: kv[0],
    )
    unique: dict[tuple[Any, ...], Any] = {}
    for _, t in items:
        unique.setdefault(_identity(t), t)
    check_digest(digest)
    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(unique, pool.map(lambda t: _digest(t, digest), unique.values())))
    lines = [f"{name}|{_dtype(t)}|{list(t.shape)}|{digests[_identity(t)]}" for name, t in items]
    return digest_bytes(digest, "\n".join(lines).encode())


# The fingerprint cache: one result per (model, digest), kept while parameter_signature(model) is unchanged.
_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[tuple[Any, ...], str]]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _signature_of(name: str, t: Any) -> tuple[Any, ...]:
    if isinstance(t, _Dequantized):  # the packed codes and every quant-state tensor, by identity and version
        weight = t.module.weight
        qs = getattr(weight, "quant_state", None)
        parts = [weight, getattr(qs, "absmax", None), getattr(weight, "SCB", None)]
        parts.append(getattr(getattr(t.module, "state", None), "SCB", None))
        return (name, t.kind, id(weight), id(qs), *(_tensor_key(p) for p in parts))
    return (name, *_tensor_key(t))


class _Unprovable(Exception):
    """A tensor whose changes the signature cannot see (an inference tensor has no version counter)."""


def _tensor_key(t: Any) -> tuple[Any, ...]:
    if not isinstance(t, torch.Tensor):
        return (None,)
    if t.is_inference():  # written in place under inference_mode without a trace: never cached
        raise _Unprovable
    return (str(t.device), t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), str(t.dtype), t._version)


def parameter_signature(model: nn.Module) -> tuple[Any, ...] | None:
    """What the cache compares: each state-dict entry's name, device, storage pointer and offset, shape,
    stride, dtype and version counter (a bitsandbytes weight: its codes' and quant state's, by identity).
    None where that proves nothing: weights on the meta device (offloaded: their bytes live where this
    cannot see) or inference tensors (made under ``torch.inference_mode``: no version counter)."""
    out = []
    for name, t in _entries(model):
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            return None
        if isinstance(t, (torch.Tensor, _Dequantized)):
            try:
                out.append(_signature_of(name, t))
            except _Unprovable:
                return None
    return tuple(out)


def cached_fingerprint(
    model: nn.Module, *, digest: str = DEFAULT_DIGEST, mode: str = "cached", threads: int | None = None
) -> tuple[str, str]:
    """``(fingerprint, how)``: the fingerprint computed earlier in this process for this model and digest
    if :func:`parameter_signature` shows the parameters unchanged since (``how`` is ``"cached"``), else a
    full computation (``"full"``; ``mode="full"`` always computes). See docs/architecture.md §2 for what the
    signature proves and what it does not."""
    if mode not in FINGERPRINT_MODES:
        raise ValueError(f"fingerprint={mode!r}; one of {', '.join(FINGERPRINT_MODES)} ('full' recomputes it)")
    before = parameter_signature(model)
    with _CACHE_LOCK:
        hit = _CACHE.get(model, {}).get(digest)
    if mode == "cached" and before is not None and hit is not None and hit[0] == before:
        return hit[1], "cached"
    value = weights_fingerprint(model, threads=threads, digest=digest)
    if before is not None and parameter_signature(model) == before:  # nothing moved while it was hashed
        with _CACHE_LOCK:
            _CACHE.setdefault(model, {})[digest] = (before, value)
    return value, "full"


def _dtype(t: Any) -> str:
    return f"{t.kind}->torch.float32" if isinstance(t, _Dequantized) else str(t.dtype)


def has_bnb_layers(model: nn.Module) -> bool:
    """Whether any layer holds a bitsandbytes-quantized weight (bitsandbytes moves its state in a forward)."""
    return any(_bnb_kind(m) for m in model.modules())


def _identity(t: Any) -> tuple[Any, ...]:
    """Same memory, same view: only tensors alive together in one state dict are compared with this."""
    if isinstance(t, _Dequantized):
        return ("bnb", id(t.module))
    return (t.device, t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def config_sha256(config: Any) -> str | None:
    if config is None:
        return None
    data = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def quantization_info(model: nn.Module) -> dict[str, Any] | None:
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    data = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    return _jsonable(data)


def model_info(model: nn.Module, *, fingerprint: bool = True, digest: str = DEFAULT_DIGEST) -> dict[str, Any]:
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "model_type": getattr(config, "model_type", None),
        "config_sha256": config_sha256(config),
        "weights_fingerprint": cached_fingerprint(model, digest=digest)[0] if fingerprint else None,
        "weights_fingerprint_algorithm": FINGERPRINT_ALGORITHMS[digest],
        "dtype": str(getattr(model, "dtype", None)).removeprefix("torch."),
        "quantization": quantization_info(model),
        # where the weights came from, as zkllm_hf.models records it in a converted GGUF's config (else None)
        "source": _jsonable(getattr(config, "zkllm_hf_source", None)),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "device_map": _jsonable(getattr(model, "hf_device_map", None)),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "rms_norm_eps": getattr(config, "rms_norm_eps", None),
        # what a proving plan checks against zkLLM's kernels and scripts
        "intermediate_size": getattr(config, "intermediate_size", None),
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "head_dim": getattr(config, "head_dim", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }


def versions() -> dict[str, str]:
    import numpy
    import pyarrow
    import transformers

    return {
        "zkllm_hf": __version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
        **{name: v for name in ("accelerate", "bitsandbytes") if (v := _installed(name)) is not None},
    }


def _installed(name: str) -> str | None:
    """A distribution's version when it is installed, without importing it (bitsandbytes' import is slow)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def runtime(model: nn.Module) -> dict[str, Any]:
    """What, besides the weights and the inputs, decides a forward's float bits, read now (call it during the
    forward): torch's intra-op and inter-op thread counts, whether deterministic algorithms are on, the
    attention implementation the model dispatches to, and the devices its weights are on."""
    config = getattr(model, "config", None)
    devices = {str(t.device) for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"}
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "devices": sorted(devices),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


TOKENIZER_FINGERPRINT_ALGORITHM = (
    "v1: sha256 of the canonical JSON (sorted keys) of {tokenizer: the backend's tokenizer.json less its "
    "padding and truncation state (or, for a tokenizer without one, its sorted vocabulary), special_tokens, "
    "added_tokens, chat_template}"
)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=16)
def _canonical_backend(raw: str) -> str:
    """The canonical JSON of a backend's tokenizer.json less its padding and truncation state (the slow part
    of the fingerprint: a 1.5 MB parse and sorted re-dump), once per distinct serialisation in a process."""
    serial = json.loads(raw)
    serial.pop("padding", None)
    serial.pop("truncation", None)
    return _canonical(serial)


def _tokenizer_state(tokenizer: Any) -> dict[str, Any]:
    """What decides a tokenizer's ids and text, without the per-call padding and truncation it keeps; the
    ``tokenizer`` entry is its canonical JSON text (spliced in as it is by :func:`tokenizer_fingerprint`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serial = _canonical_backend(backend.to_str())
    else:
        serial = _canonical({"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))})
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {
        "tokenizer": serial,
        "special_tokens": _jsonable(getattr(tokenizer, "special_tokens_map", {}) or {}),
        "added_tokens": {str(k): str(v) for k, v in sorted(added.items())},
        "chat_template": _jsonable(getattr(tokenizer, "chat_template", None)),
    }


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what a tokenizer maps text to ids with (:data:`TOKENIZER_FINGERPRINT_ALGORITHM`): the same for
    a fresh load of the same files, before and after it pads a batch, whatever folder it came from. The
    canonical JSON of the state with sorted keys, its ``tokenizer`` entry spliced in already canonical (the
    same text ``json.dumps`` would write for it)."""
    state = _tokenizer_state(tokenizer)
    serial = state.pop("tokenizer")
    canon = _canonical(state)  # keys added_tokens, chat_template, special_tokens: "tokenizer" sorts after them
    canon = f'{canon[:-1]},"tokenizer":{serial}}}' if state else f'{{"tokenizer":{serial}}}'
    return hashlib.sha256(canon.encode()).hexdigest()


def tokenizer_info(tokenizer: Any) -> dict[str, Any] | None:
    """The manifest's record of the tokenizer a capture's tokens came from (None without one)."""
    if tokenizer is None:
        return None
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or "") or None,
        "vocab_size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "fingerprint_algorithm": TOKENIZER_FINGERPRINT_ALGORITHM,
    }


def decode_text(tokenizer: Any, ids: list[int] | None) -> str | None:
    """``ids`` as text, special tokens kept (what the proof is about, not a cleaned-up rendering)."""
    if tokenizer is None or ids is None:
        return None
    return str(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
